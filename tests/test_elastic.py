"""Elastic per-stage pools, end to end, on real worker processes.

One :class:`~dflow.cluster.StageCluster` of tiny PixArt-Sigma serves the whole
module: four worker processes, starting as 2 encoder / 1 DiT / 1 VAE. Its
scheduler runs in this process, so ``dask.config`` set around the cluster
configures the controller: a 1 s interval, a 3 s cooldown and a 4 s horizon
(hysteresis, target utilization and pool minimum as shipped), and the controller *off*, so that the
tests turn it on only while they want it to act. Tests that need a layout set it
first with forced switches through the controller's own switcher (they show in
its decisions with a ``"test:"`` reason).

On these tiny models the DiT dominates requests of many steps (``steps=200``:
about 0.26 s of DiT against 5 ms of VAE on one quiet CPU core), and the VAE
dominates large one-step requests (512 x 512, ``steps=1``: about 0.19 s of VAE
against 0.02 s of DiT); the encoder never does. Bursts are sized so their
backlog on one worker exceeds the controller's target utilization of the
horizon on a quiet machine; a loaded one only makes them heavier.

The traps of role switching on distributed 2026.8 (queued tasks stuck on a
switching worker, tasks that wait for a resource no one has, intermediates a
switching worker holds) each have a test. The scheduler's ``used_resources``
goes wrong across switches (and across work stealing, which moves a task
without moving its resources); nothing reads it for placement, and the tests
record the values they see (``negative_used_resources``).

The last test lets :class:`~dflow.cluster.PoolAdaptive` resize the pools
(retiring a worker): keep it last.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from test_equivalence import pixels

import dask.config
from distributed import Client, Future, wait

import dflow
from dflow import runtime
from dflow.cluster import StageCluster
from dflow.request import Request
from dflow.testing import poll, wait_for_pools

MODEL = "tiny-pixart"
#: The module's fleet at the start, and the shift test's starting layout
START = {"encoder": 2, "dit": 1, "vae": 1}
INTERVAL = 1.0
COOLDOWN = 3.0
CONFIG = {
    "dflow.elastic.enabled": False,
    "dflow.elastic.interval": f"{INTERVAL}s",
    "dflow.planner.cooldown": f"{COOLDOWN}s",
    "dflow.planner.horizon": "4s",
    # the workers' transition logs must hold the whole module, to count executions
    "distributed.admin.low-level-log-length": 200_000,
}
DIT_HEAVY = {"steps": 200}
VAE_HEAVY = {"steps": 1, "height": 512, "width": 512}
#: requests of a burst that must still owe work after several intervals
LONG_BURST = 40
STAGE_PREFIXES = ("encode-", "denoise-", "decode-")
TEST_REASON = "test: set the layout"


# -- on the scheduler (run_on_scheduler: on its event loop) ---------------------------


def _controller(scheduler):
    return scheduler.plugins["dflow-elastic"]


def _workers(*, dask_scheduler) -> dict[str, dict[str, Any]]:
    switching = _controller(dask_scheduler).switcher.switching
    return {
        r.name: {
            "address": r.address,
            "stage": r.stage,
            "state": r.state,
            "switching": r.address in switching,
        }
        for r in dask_scheduler.extensions["dflow"].workers.values()
    }


def _force_switch(address: str, stage: str, reason: str, *, dask_scheduler) -> None:
    controller = _controller(dask_scheduler)
    source = controller.extension.workers[address].pool
    controller.apply(address, source, (stage, MODEL), reason)


def _set_enabled(enabled: bool, *, dask_scheduler) -> None:
    _controller(dask_scheduler).enabled = enabled


def _enabled(*, dask_scheduler) -> bool:
    return _controller(dask_scheduler).enabled


def _decisions(*, dask_scheduler) -> list[dict[str, Any]]:
    return _controller(dask_scheduler).decisions()


def _last_plan(*, dask_scheduler) -> dict[str, Any]:
    return dict(_controller(dask_scheduler).last_plan)


def _plan_moves(*, dask_scheduler) -> list[list[list[str] | None]]:
    """[source, target] of the moves the controller would make now (nothing is
    applied)."""
    plan = _controller(dask_scheduler).plan()
    return [
        [list(m.source) if m.source else None, list(m.target) if m.target else None]
        for m in (plan.moves if plan else [])
    ]


def _pool_targets(utilization: float, *, dask_scheduler) -> dict[str, int]:
    return _controller(dask_scheduler).pool_targets(utilization)


def _stage_records(
    requests: list[str], *, dask_scheduler
) -> list[tuple[str, str, float]]:
    """(key, worker, finished) of every stage task of ``requests`` that finished."""
    wanted = set(requests)
    telemetry = dask_scheduler.extensions["dflow"].telemetry
    return [
        (r.key, r.worker, r.finished) for r in telemetry.records if r.request in wanted
    ]


def _processing(*, dask_scheduler) -> dict[str, list[str]]:
    return {
        ws.address: sorted(str(ts.key) for ts in ws.processing)
        for ws in dask_scheduler.workers.values()
    }


def _holders(prefix: str, *, dask_scheduler) -> dict[str, list[str]]:
    """Key -> addresses of the workers holding it, for keys in memory."""
    return {
        str(ts.key): sorted(ws.address for ws in ts.who_has)
        for ts in dask_scheduler.tasks.values()
        if str(ts.key).startswith(prefix) and ts.state == "memory"
    }


def _events(kind: str, *, dask_scheduler) -> list[tuple[float, dict[str, Any]]]:
    return [
        (t, detail)
        for t, k, detail in dask_scheduler.extensions["dflow"].events
        if k == kind
    ]


def _forget(*stages: str, dask_scheduler) -> None:
    """Forget the observed service times of the pools of ``stages``, as if none
    of their tasks had finished yet."""
    telemetry = dask_scheduler.extensions["dflow"].telemetry
    for stage in stages:
        telemetry.service.pop((stage, MODEL), None)
        getattr(telemetry, "recent", {}).pop((stage, MODEL), None)
    kept = [r for r in telemetry.records if r.stage not in stages]
    telemetry.records.clear()
    telemetry.records.extend(kept)


def _members(*, dask_scheduler) -> Counter[str]:
    """Workers per stage as the controller counts them: serving it, or switching
    to it."""
    switching = _controller(dask_scheduler).switcher.switching
    members: Counter[str] = Counter()
    for record in dask_scheduler.extensions["dflow"].workers.values():
        if record.address in switching:
            members[switching[record.address][0]] += 1
        elif record.state == "ready":
            members[record.stage] += 1
    return members


#: predictors the controller had before a test gave it a profile (in-process)
_SAVED_PREDICTORS: list[Any] = []


def _use_profile(rows: list[dict[str, Any]] | None, *, dask_scheduler) -> None:
    """Price the pools by a predictor fitted on ``rows``; ``None``: restore."""
    from dflow.predictor import Predictor

    controller = _controller(dask_scheduler)
    if rows is None:
        predictor = _SAVED_PREDICTORS.pop()
    else:
        _SAVED_PREDICTORS.append(controller.predictor)
        predictor = Predictor(rows)
    controller.predictor = controller.telemetry.predictor = predictor


def _unrunnable(*, dask_scheduler) -> list[str]:
    return sorted(str(ts.key) for ts in dask_scheduler.unrunnable)


def _used_resources(*, dask_scheduler) -> dict[str, dict[str, float]]:
    return {
        str(ws.name): dict(ws.used_resources) for ws in dask_scheduler.workers.values()
    }


# -- on the workers --------------------------------------------------------------------


def _executed(*, dask_worker) -> dict[str, int]:
    """Stage keys this worker computed (executing -> memory), and how often."""
    counts: Counter[str] = Counter()
    for entry in dask_worker.state.log:
        if (
            len(entry) > 2
            and entry[1] == "executing"
            and entry[2] == "memory"
            and str(entry[0]).startswith(STAGE_PREFIXES)
        ):
            counts[str(entry[0])] += 1
    return dict(counts)


def _starts(prefix: str, *, dask_worker) -> list[tuple[str, float]]:
    """(key, time) of each start of a task with ``prefix`` on this worker."""
    return [
        (str(entry[0]), entry[-1])
        for entry in dask_worker.state.log
        if len(entry) > 3
        and entry[2] == "executing"
        and entry[3] == "executing"
        and str(entry[0]).startswith(prefix)
    ]


# -- the fleet -------------------------------------------------------------------------


def request_id(key: Any) -> str:
    return str(key).partition("-")[2]


def make_requests(n: int, seed: int, **fields: Any) -> list[Request]:
    return [
        Request(model=MODEL, prompt="a lighthouse at dusk", seed=seed + i, **fields)
        for i in range(n)
    ]


@dataclass
class Batch:
    requests: list[Request]
    futures: list[Future]
    submitted: float

    @property
    def ids(self) -> list[str]:
        return [request_id(f.key) for f in self.futures]


@dataclass
class Fleet:
    cluster: StageCluster
    client: Client

    def call(self, function: Callable, *args: Any) -> Any:
        return self.client.run_on_scheduler(function, *args)

    def workers(self) -> dict[str, dict[str, Any]]:
        return self.call(_workers)

    def layout(self) -> dict[str, str]:
        """Name -> stage of every worker, as the extension records it (a switching
        worker's old stage while it drains, its new one from when it loads)."""
        workers = self.workers()
        return {name: w["stage"] for name, w in workers.items()}

    def counts(self) -> Counter[str]:
        return Counter(self.layout().values())

    def settled(self) -> bool:
        return all(
            w["state"] == "ready" and not w["switching"]
            for w in self.workers().values()
        )

    def decisions(self) -> list[dict[str, Any]]:
        return self.call(_decisions)

    def status(self) -> dict[str, Any]:
        return dflow.status(self.client)

    @contextlib.contextmanager
    def controller(self) -> Iterator[None]:
        """The elastic controller on, for the block."""
        self.call(_set_enabled, True)
        try:
            yield
        finally:
            self.call(_set_enabled, False)

    def switch(self, name: str, stage: str, reason: str = TEST_REASON) -> None:
        """Switch worker ``name`` to ``stage`` through the controller's switcher."""
        self.call(_force_switch, self.workers()[name]["address"], stage, reason)

    def set_roles(self, roles: dict[str, str], timeout: float = 120) -> None:
        """Switch the workers whose stage differs from ``roles``; wait until every
        worker serves its stage, then out the moved workers' cooldown."""
        poll(self.settled, timeout, "no switch in progress")
        moved = [name for name, stage in self.layout().items() if roles[name] != stage]
        for name in moved:
            self.switch(name, roles[name])
        poll(
            lambda: self.settled() and self.layout() == roles,
            timeout,
            f"the layout {roles}",
        )
        if moved:
            time.sleep(COOLDOWN)

    def set_layout(self, counts: dict[str, int]) -> dict[str, str]:
        """Workers per stage as ``counts``, moving as few workers as possible."""
        poll(self.settled, 120, "no switch in progress")
        roles = self.layout()
        by_stage: dict[str, list[str]] = {}
        for name in sorted(roles):
            by_stage.setdefault(roles[name], []).append(name)
        spare = [n for s, names in by_stage.items() for n in names[counts.get(s, 0) :]]
        for stage, count in counts.items():
            for _ in range(count - len(by_stage.get(stage, []))):
                roles[spare.pop(0)] = stage
        self.set_roles(roles)
        return roles

    def submit(self, requests: list[Request]) -> Batch:
        submitted = time.time()
        return Batch(requests, dflow.map(self.client, requests), submitted)

    def finish(self, *batches: Batch, timeout: float = 180) -> list[dflow.Output]:
        """Every request's output; each must be its request's."""
        futures = [f for b in batches for f in b.futures]
        wait(futures, timeout=timeout)
        assert [f.status for f in futures] == ["finished"] * len(futures)
        outputs = self.client.gather(futures)
        requests = [r for b in batches for r in b.requests]
        assert [o.request for o in outputs] == requests
        return outputs

    def stage_records(self, *batches: Batch) -> list[tuple[str, str, float]]:
        return self.call(_stage_records, [i for b in batches for i in b.ids])

    def assert_each_stage_ran_once(self, *batches: Batch, workers: bool = True) -> None:
        """Each stage task of each request finished once on the scheduler and,
        with ``workers``, was computed once over all workers: no task ran twice,
        no intermediate was lost and recomputed."""
        ids = [i for b in batches for i in b.ids]
        expected = Counter(f"{p}{i}" for i in ids for p in STAGE_PREFIXES)
        finished = Counter(key for key, _, _ in self.stage_records(*batches))
        assert finished == expected
        if workers:
            computed: Counter[str] = Counter()
            for counts in self.client.run(_executed).values():
                computed.update({k: n for k, n in counts.items() if k in expected})
            assert computed == expected

    def first_finished(self, batch: Batch, prefix: str) -> float | None:
        times = [t for key, _, t in self.stage_records(batch) if key.startswith(prefix)]
        return min(times, default=None)


@pytest.fixture(scope="module")
def fleet(tiny_folders) -> Iterator[Fleet]:
    # the config stays set: the in-process controller reads the planner's settings
    # at each plan, and the workers inherit it
    with (
        dask.config.set(CONFIG),
        StageCluster(MODEL, START) as cluster,
        Client(cluster) as client,
    ):
        wait_for_pools(
            client,
            {MODEL: [s for s, n in START.items() for _ in range(n)]},
            timeout=300,
        )
        yield Fleet(cluster, client)
    runtime.uninstall(MODEL, "all")  # the model dflow.generate loaded here


def assert_like_generate(outputs: list[dflow.Output]) -> None:
    """Outputs equal ``dflow.generate``'s: pixel-exact, or within one level when
    the VAE decoded them in a batch. ``dflow.generate`` runs on one thread, as
    the workers do (Nannies start them with ``OMP_NUM_THREADS=1``): torch's
    reductions on more threads round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for output in outputs:
            ours = pixels(output).astype(np.int16)
            local = pixels(dflow.generate(output.request)).astype(np.int16)
            bound = 0 if output.timings["decode_batch"] == 1 else 1
            diff = int(np.abs(ours - local).max())
            assert diff <= bound, (diff, output.timings)
    finally:
        torch.set_num_threads(threads)


def moves(decisions: list[dict[str, Any]], source: str, target: str) -> list[dict]:
    return [
        d
        for d in decisions
        if d["source"] == [source, MODEL] and d["target"] == [target, MODEL]
    ]


# -- on and off, limits ----------------------------------------------------------------


def test_a_disabled_controller_makes_no_decisions(fleet):
    """``dflow.elastic.enabled: False`` (the module's cluster starts so): a
    DiT-heavy burst that the controller would answer moves nobody."""
    assert fleet.call(_enabled) is False
    fleet.set_layout(START)
    roles, before = fleet.layout(), len(fleet.decisions())
    batch = fleet.submit(make_requests(LONG_BURST, seed=100, **DIT_HEAVY))
    poll(lambda: fleet.first_finished(batch, "denoise-"), 120, "a denoise finished")
    time.sleep(4 * INTERVAL)

    assert len(fleet.decisions()) == before
    assert fleet.layout() == roles
    # the controller would move an encoder to the DiT: off is what held it
    would = fleet.call(_plan_moves)
    assert [["encoder", MODEL], ["dit", MODEL]] in would, fleet.call(_last_plan)
    fleet.client.cancel(batch.futures)


def test_max_per_pool_caps_the_dit_pool(fleet):
    """``dflow.planner.max-per-pool: 1``: under a DiT-heavy burst the DiT pool
    keeps its one worker. (With 4 workers and a minimum of 1 per pool the DiT
    pool can hold 2 at most, so 1 is the cap that binds.)"""
    fleet.set_layout(START)
    before = len(fleet.decisions())
    dit_workers = []
    with dask.config.set({"dflow.planner.max-per-pool": 1}):
        with fleet.controller():
            batch = fleet.submit(make_requests(LONG_BURST, seed=200, **DIT_HEAVY))
            poll(lambda: fleet.first_finished(batch, "denoise-"), 120, "a denoise")
            for _ in range(int(6 * INTERVAL / 0.5)):
                dit_workers.append(fleet.status()["stages"]["dit"]["workers"])
                time.sleep(0.5)
        capped = fleet.call(_plan_moves)
    uncapped = fleet.call(_plan_moves)

    assert not moves(fleet.decisions()[before:], "encoder", "dit")
    assert max(dit_workers) == 1
    assert fleet.counts()["dit"] == 1
    assert all(target != ["dit", MODEL] for _, target in capped)
    # without the cap the controller would move an encoder to the DiT
    assert [["encoder", MODEL], ["dit", MODEL]] in uncapped, fleet.call(_last_plan)
    fleet.client.cancel(batch.futures)


# -- noise -----------------------------------------------------------------------------


def test_noise_alone_does_not_move_workers(fleet, record_property):
    """A steady, moderate DiT-heavy load with +-10% jitter (steps alternating 18
    and 22, 1.7 requests/s; the shared machine adds its own noise to the observed
    times) on a fleet shaped for it: for its ~10 intervals and after, no move.

    The controller prices pools by observed averages, which lag a change of mix:
    the load first runs with the controller off until the planner, on the
    averages of this load, wants no move (a VAE-heavy history would rightly move
    a worker, and the averages' catching up would move it back). These steps keep
    the DiT clearly the bottleneck: at 9 and 11 on a loaded 2-core machine the
    VAE's and the encoder's observed times came within a few percent of a move
    (``other_over_dit_utilization_max`` records the margin; about 2.2 moves)."""
    roles = fleet.set_layout({"encoder": 1, "dit": 2, "vae": 1})

    def steady(i: int) -> Batch:
        steps = 18 if i % 2 else 22
        batch = fleet.submit(make_requests(1, seed=300 + i, steps=steps))
        time.sleep(0.6)
        return batch

    warmup = [steady(i) for i in range(6)]
    poll(lambda: fleet.call(_plan_moves) == [], 60, "the fleet at rest")
    before = len(fleet.decisions())
    batches, plans = [], []
    with fleet.controller():
        for i in range(6, 26):
            batches.append(steady(i))
            plans.append(fleet.call(_last_plan))
        fleet.finish(*batches)
        time.sleep(3 * INTERVAL)
        plans.append(fleet.call(_last_plan))

    moved = [
        (round(d["time"] - batches[0].submitted, 1), d["worker"], d["reason"])
        for d in fleet.decisions()[before:]
    ]
    assert not moved, (moved, plans)
    assert fleet.layout() == roles
    # the controller planned on the load all along
    bottlenecks = [p.get("bottleneck") for p in plans]
    assert sum(b is not None for b in bottlenecks) >= len(plans) // 2, plans
    fleet.assert_each_stage_ran_once(*warmup, *batches)
    # how near a move it came: a DiT worker goes to the VAE or the encoder when
    # its utilization exceeds about 2.2 times the DiT's (1 worker against 2, 10%)
    ratios = [
        p["utilization"][f"{stage}/{MODEL}"] / p["utilization"][f"dit/{MODEL}"]
        for p in plans
        for stage in ("encoder", "vae")
        if p.get("utilization", {}).get(f"dit/{MODEL}")
    ]
    record_property(
        "bottlenecks", Counter("/".join(b or ["none"]) for b in bottlenecks)
    )
    record_property("other_over_dit_utilization_max", round(max(ratios, default=0), 2))


# -- a shift and back ------------------------------------------------------------------


def test_a_shift_moves_workers_to_the_bottleneck_and_back(fleet, record_property):
    """2 encoder / 1 DiT / 1 VAE, and a controller that has observed nothing yet.
    DiT-heavy requests move an encoder worker to the DiT within a few intervals
    of the first observations of every pool they use; VAE-heavy ones then move
    a worker from the DiT to the VAE while their decodes are still queued
    (directly, or through the encoder). Pools never
    drop below their minimum of one (counting a worker switching in), every
    request completes once, and outputs equal ``dflow.generate``'s."""
    fleet.set_layout(START)
    # observed times of an earlier mix would price this one until they catch up
    fleet.call(_forget, *START)
    before = len(fleet.decisions())
    samples: list[dict[str, Any]] = []

    def sample() -> dict[str, Any]:
        stages = fleet.status()["stages"]
        samples.append({"time": time.time(), "members": fleet.call(_members), **stages})
        return samples[-1]

    def run_out(batch: Batch) -> None:
        while not all(f.done() for f in batch.futures):
            sample()
            time.sleep(0.25)

    with fleet.controller():
        dit_burst = fleet.submit(make_requests(24, seed=1000, **DIT_HEAVY))
        poll(lambda: sample()["dit"]["workers"] == 2, 120, "a second DiT worker")
        dit_ready = time.time()
        run_out(dit_burst)
        shifted = len(fleet.decisions())

        vae_burst = fleet.submit(make_requests(24, seed=2000, **VAE_HEAVY))

        def moved_back() -> bool:
            stages = sample()
            return stages["dit"]["workers"] == 1 and stages["vae"]["workers"] == 2

        poll(moved_back, 180, "a DiT worker on the VAE")
        vae_ready = time.time()
        run_out(vae_burst)
        status = fleet.status()

    to_dit = moves(fleet.decisions()[before:shifted], "encoder", "dit")
    assert len(to_dit) == 1, fleet.decisions()[before:]
    assert "dit of tiny-pixart utilization" in to_dit[0]["reason"]
    observed = max(fleet.first_finished(dit_burst, prefix) for prefix in STAGE_PREFIXES)
    assert to_dit[0]["time"] - observed <= 5 * INTERVAL
    # the way back may take two steps (DiT to encoder, encoder to VAE): batched
    # encodes are priced at their batch's time
    back = fleet.decisions()[shifted:]
    to_vae = [d for d in back if d["target"] == ["vae", MODEL]]
    assert to_vae and [d for d in back if d["source"] == ["dit", MODEL]], back
    assert len(back) <= 3, back
    assert "vae of tiny-pixart utilization" in to_vae[0]["reason"]
    decodes = [
        t for k, _, t in fleet.stage_records(vae_burst) if k.startswith("decode-")
    ]
    assert to_vae[0]["time"] < max(decodes)
    for name, value in {
        "dit_decision_after_burst_s": to_dit[0]["time"] - dit_burst.submitted,
        "dit_decision_after_observations_s": to_dit[0]["time"] - observed,
        "dit_ready_after_burst_s": dit_ready - dit_burst.submitted,
        "vae_decision_after_burst_s": to_vae[0]["time"] - vae_burst.submitted,
        "vae_decision_after_first_decode_s": to_vae[0]["time"] - min(decodes),
        "vae_ready_after_burst_s": vae_ready - vae_burst.submitted,
    }.items():
        record_property(name, round(value, 2))
    record_property("moves_back", [f"{d['source'][0]}->{d['target'][0]}" for d in back])

    # status while it happened: queues, rates, observed times, minimums kept
    assert max(s["dit"]["queue"] for s in samples) > 0
    assert max(s["vae"]["queue"] for s in samples) > 0
    assert all(s[stage]["arrival_rate"] > 0 for s in samples for stage in START)
    short = [
        (round(s["time"] - dit_burst.submitted, 2), s["members"])
        for s in samples
        if min(s["members"].get(stage, 0) for stage in START) < 1
    ]
    assert not short, (short, fleet.decisions()[before:])
    # a pool whose last worker is still loading serves nothing meanwhile
    record_property(
        "samples_with_a_pool_not_ready",
        sum(min(s[stage]["workers"] for stage in START) < 1 for s in samples),
    )
    for stage in START:
        assert status["stages"][stage]["observed_s"] > 0
    reported = status["decisions"]
    assert to_dit[0] in reported and to_vae[0] in reported
    for decision in reported:
        assert set(decision) == {"time", "worker", "source", "target", "reason"}
        assert decision["worker"] in fleet.layout() and decision["reason"]

    outputs = fleet.finish(dit_burst, vae_burst)
    fleet.assert_each_stage_ran_once(dit_burst, vae_burst)
    assert_like_generate([outputs[0], outputs[23], outputs[24], outputs[-1]])


def test_a_pool_not_priced_yet_keeps_its_workers(fleet):
    """Until its first task finishes, a pool no profile covers has no price: its
    demand is unknown, not zero. Long denoises behind fast encodes (the encoder
    priced, the DiT not yet) must not send DiT workers to the encoder."""
    fleet.set_layout({"encoder": 1, "dit": 2, "vae": 1})
    fleet.call(_forget, "dit")
    before = len(fleet.decisions())
    with fleet.controller():
        batch = fleet.submit(make_requests(4, seed=800, steps=150))
        poll(lambda: fleet.first_finished(batch, "denoise-"), 120, "a denoise")
        time.sleep(2 * INTERVAL)
    fleet.client.cancel(batch.futures)

    assert moves(fleet.decisions()[before:], "dit", "encoder") == []
    assert fleet.counts()["dit"] == 2


def cpu_profile() -> list[dict[str, Any]]:
    """Profile rows pricing tiny PixArt on the CPU roughly as it runs here (DiT:
    about 10 ms a pass, VAE: 12 us a pixel), in the form ``dflow profile``
    writes."""
    rows = []
    for size in (64, 128, 256):
        shape = {"model": MODEL, "gpu_type": "cpu", "batch": 1, "height": size}
        shape |= {"width": size, "frames": 1, "cfg": True}
        rows.append({**shape, "stage": "encoder", "steps": 1, "seconds": 0.05})
        rows.append(
            {**shape, "stage": "vae", "steps": 1, "seconds": 0.03 + 1.2e-5 * size**2}
        )
        tokens = (size // 8 // 2) ** 2
        for steps in (1, 10, 40, 150):
            seconds = 2 * steps * (0.01 + 1e-4 * tokens)
            rows.append({**shape, "stage": "dit", "steps": steps, "seconds": seconds})
    return rows


def test_a_profiled_pool_prices_a_new_mix_by_its_requests(fleet):
    """With a profile covering the pools (``cpu_profile``), a burst of long
    denoises after a VAE-heavy mix is priced by its own requests: a VAE worker
    moves to the DiT before the burst's first denoise finishes."""
    fleet.set_layout({"encoder": 1, "dit": 1, "vae": 2})
    fleet.call(_use_profile, cpu_profile())
    try:
        # the VAE-heavy mix: the last tasks each pool finished
        fleet.finish(fleet.submit(make_requests(4, seed=900, **VAE_HEAVY)))
        before = len(fleet.decisions())
        with fleet.controller():
            # 3 s a denoise here: the controller plans within its 1 s interval
            batch = fleet.submit(
                make_requests(4, seed=910, steps=150, height=512, width=512)
            )
            first = poll(
                lambda: fleet.first_finished(batch, "denoise-"), 120, "a denoise"
            )
            time.sleep(INTERVAL)
        fleet.client.cancel(batch.futures)
    finally:
        fleet.call(_use_profile, None)
    to_dit = moves(fleet.decisions()[before:], "vae", "dit")
    assert to_dit and to_dit[0]["time"] < first, fleet.decisions()[before:]


def test_status_reports_every_stage(fleet):
    """``dflow.status``: per stage workers, loading, queue, arrival rate and the
    predicted and observed service times; the decisions beside."""
    poll(fleet.settled, 120, "no switch in progress")
    batch = fleet.submit(make_requests(3, seed=400, steps=4))
    fleet.finish(batch)
    status = fleet.status()
    assert set(status) == {"stages", "decisions"}
    counts = fleet.counts()
    for stage in ("encoder", "dit", "vae"):
        summary = status["stages"][stage]
        assert summary["workers"] == counts[stage]
        assert summary["loading"] == summary["queue"] == 0
        assert summary["arrival_rate"] > 0
        assert summary["observed_s"] > 0
        # no profile covers tiny models on a CPU: the controller prices them by
        # observed times, and predicts nothing
        assert summary["predicted_s"] is None or summary["predicted_s"] > 0
    assert status["stages"]["all"]["workers"] == 0
    assert status["stages"]["all"]["arrival_rate"] == 0
    assert isinstance(status["decisions"], (list, tuple))


def test_status_decisions_are_lists(fleet):
    """``dflow.status`` documents ``"decisions": [...]`` with ``source`` and
    ``target`` as ``[stage, model]``, as ``ElasticController.decisions`` makes them."""
    if not fleet.status()["decisions"]:
        name, stage = next(iter(fleet.layout().items()))
        fleet.switch(name, stage)  # a forced switch is a decision too
        poll(fleet.settled, 120, "the switch done")
    decisions = fleet.status()["decisions"]
    assert isinstance(decisions, list)
    assert all(isinstance(d["source"], list) for d in decisions)


# -- the traps of switching roles --------------------------------------------------------


def test_tasks_queued_on_a_switching_worker_move_to_the_pool(fleet, record_property):
    """A DiT worker with denoise tasks queued behind the running one switches to
    the encoder: none of them starts there once it drains, the queued ones run
    on the other DiT worker, and every request completes once."""
    fleet.set_layout({"encoder": 1, "dit": 2, "vae": 1})
    dits = {w["address"]: n for n, w in fleet.workers().items() if w["stage"] == "dit"}
    batch = fleet.submit(make_requests(8, seed=500, **DIT_HEAVY))

    def queued() -> tuple[str, list[str]] | None:
        processing = fleet.call(_processing)
        busiest = max(dits, key=lambda a: len(processing[a]))
        return (busiest, processing[busiest]) if len(processing[busiest]) >= 3 else None

    address, placed = poll(queued, 60, "denoise tasks queued on a DiT worker")
    name = dits[address]
    fleet.switch(name, "encoder", "test: switch a worker with queued tasks")
    poll(
        lambda: (
            not any(k.startswith("denoise-") for k in fleet.call(_processing)[address])
        ),
        60,
        "no denoise task left on the switching worker",
    )
    outputs = fleet.finish(batch)
    poll(fleet.settled, 60, "the switch done")

    drained = max(
        t for t, d in fleet.call(_events, "worker-draining") if d["worker"] == name
    )
    starts = fleet.client.run(_starts, "denoise-", workers=[address])[address]
    assert [k for k, t in starts if t > drained] == []
    others = {
        w for k, w, _ in fleet.stage_records(batch) if k in placed and w != address
    }
    assert others == set(dits) - {address}  # most of the queued ones ran there
    assert fleet.layout()[name] == "encoder"
    fleet.assert_each_stage_ran_once(batch)
    assert_like_generate(outputs[:1])
    record_property("queued_on_switching_worker", len(placed))
    record_property("negative_used_resources", negative(fleet.call(_used_resources)))


def test_unrunnable_tasks_run_and_held_intermediates_survive(fleet, record_property):
    """The DiT pool empties (its worker goes to the VAE) as requests arrive: their
    embeddings wait on the encoder workers and their denoise tasks wait for a
    pool nobody serves. An encoder worker that alone holds some embeddings
    switches to the DiT: the waiting tasks run on it, and no embedding is lost
    (none is computed twice)."""
    roles = fleet.set_layout(START)
    dit = next(name for name, stage in roles.items() if stage == "dit")
    batch = fleet.submit(make_requests(8, seed=600, steps=10))
    fleet.switch(dit, "vae", "test: empty the DiT pool")
    denoise = {f"denoise-{i}" for i in batch.ids}

    def parked() -> set[str]:
        # every denoise task waits for a worker, or ran on the DiT worker before
        # it drained (a race with the switch that this test does not need to win)
        done = {k for k, _, _ in fleet.stage_records(batch)}
        waiting = denoise & set(fleet.call(_unrunnable))
        return waiting if waiting | (denoise & done) == denoise else set()

    waiting = poll(parked, 60, "denoise tasks waiting for a DiT worker")
    poll(fleet.settled, 60, "the DiT worker on the VAE")
    assert fleet.status()["stages"]["dit"]["workers"] == 0
    assert fleet.status()["stages"]["dit"]["queue"] == len(waiting)

    # an encoder worker that alone holds some embeddings
    holders = fleet.call(_holders, "encode-")
    sole: Counter[str] = Counter(h[0] for h in holders.values() if len(h) == 1)
    assert sole, holders
    address, held = sole.most_common(1)[0]
    name = next(n for n, w in fleet.workers().items() if w["address"] == address)
    fleet.switch(name, "dit", "test: switch an encoder holding embeddings")
    outputs = fleet.finish(batch)

    ran_on = {k: w for k, w, _ in fleet.stage_records(batch)}
    assert {ran_on[k] for k in waiting} == {address}
    fleet.assert_each_stage_ran_once(batch)
    assert_like_generate(outputs[:1])
    record_property("waiting_denoise_tasks", len(waiting))
    record_property("sole_embeddings_on_switching_worker", held)
    record_property("negative_used_resources", negative(fleet.call(_used_resources)))


def negative(used: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        w: {r: q for r, q in resources.items() if q < 0}
        for w, resources in used.items()
        if any(q < 0 for q in resources.values())
    }


# -- the cloud actuator: pools that grow (last: it retires workers) -----------------------


def test_pool_adaptive_grows_and_shrinks_the_dit_pool(fleet, record_property):
    """With the controller off, :meth:`StageCluster.adapt` follows the
    controller's pool targets: a burst of long denoises grows the DiT pool to
    the maximum (never past it, though at a target utilization of 0.5 the
    target mostly is: ``dit_target_max``) and, ``wait`` after the burst, shrinks
    it back; no request is lost. (The encoder pool shrinks to the minimum of
    one, which its load needs; a new worker that has not joined when its pool
    shrinks is stopped as it starts.)"""
    cluster = fleet.cluster
    roles = {name: spec["stage"] for name, spec in list(cluster.worker_spec.items())}
    fleet.set_roles(roles)

    def specs(stage: str) -> int:
        return sum(1 for s in list(cluster.worker_spec.values()) if s["stage"] == stage)

    batch = fleet.submit(make_requests(24, seed=700, **DIT_HEAVY))
    utilization = 0.5
    adaptive = cluster.adapt(
        minimum=1, maximum=2, interval="1s", wait="5s", utilization=utilization
    )
    sizes, targets, ready, vae = [], [], [], []
    try:

        def grown() -> bool:
            sizes.append(specs("dit"))
            vae.append(specs("vae"))
            targets.append(
                fleet.call(_pool_targets, utilization).get(f"dit/{MODEL}", 0)
            )
            ready.append(fleet.status()["stages"]["dit"]["workers"])
            return sizes[-1] == 2

        poll(grown, 60, "a second DiT worker specified")
        while not all(f.done() for f in batch.futures):
            grown()
            time.sleep(0.5)
        fleet.finish(batch)

        def shrunk() -> bool:
            sizes.append(specs("dit"))
            ready.append(fleet.status()["stages"]["dit"]["workers"])
            return sizes[-1] == 1 and fleet.counts()["dit"] == 1

        poll(shrunk, 120, "the DiT pool back to one worker")
    finally:
        adaptive.stop()

    assert max(sizes) == 2, (sizes, targets)  # all of them at most the maximum
    assert sizes[-1] == 1
    # the scheduler's records only: the retired worker took its logs with it
    fleet.assert_each_stage_ran_once(batch, workers=False)
    record_property("dit_target_max", max(targets))
    record_property("dit_ready_max", max(ready))
    record_property("vae_specs_max", max(vae))
