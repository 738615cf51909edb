"""Elastic per-stage pools, end to end: role switching on real worker processes,
and the controller's behaviour on an emulated fleet.

:class:`TestSwitching`: one :class:`~dflow.cluster.StageCluster` of tiny
PixArt-Sigma, four worker processes starting as 2 encoder / 1 DiT / 1 VAE, the
controller off; the tests set layouts with operator moves (the scheduler's
``dflow_move``; they show in the decisions with a ``"test:"`` reason). The traps
of role switching on distributed 2026.8 (queued tasks stuck on a switching
worker, tasks that wait for a resource no one has, intermediates a switching
worker holds) each have a test, and outputs equal ``dflow.generate``'s. The
scheduler's ``used_resources`` goes wrong across switches (and across work
stealing, which moves a task without moving its resources); nothing reads it for
placement, and the tests record the values they see (``negative_used_resources``).

:class:`TestController`: the controller's decisions, on emulated H200 workers of
PixArt-Sigma-1024 in this process (``dflow.runtime.backend: emulated``), with
time compressed :data:`SCALE` times and a predictor that prices every pool as
the emulation charges it (:func:`dflow.testing.emulated_predictor`). Stage calls
sleep their profiled time, so a loaded machine slows only Dask's own work, and
the controller prices bursts by the work they owe, not by how fast this machine
runs them: the bursts are sized in emulated seconds. Periods below are emulated
seconds. The last test lets the cluster resize its pools (``scale-pools``).
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

import dask.config
from distributed import Client, Future, wait

import dflow
from dflow import runtime, testing
from dflow.client import encoding_key
from dflow.cluster import StageCluster
from dflow.pools import STAGES, TASK_PREFIXES, Pool
from dflow.request import Request
from dflow.testing import pixels, poll, wait_for_pools

# fleets of workers, bursts of requests
pytestmark = pytest.mark.slow

STAGE_PREFIXES = tuple(f"{TASK_PREFIXES[stage]}-" for stage in STAGES)
TEST_REASON = "test: set the layout"
#: The fleets' layout at the start
START = {"encoder": 2, "dit": 1, "vae": 1}


# -- on the scheduler (run_on_scheduler: on its event loop) ---------------------------


def _stage_records(
    requests: list[str], *, dask_scheduler
) -> list[tuple[str, str, float]]:
    """(key, worker, finished) of every stage task of ``requests`` that finished."""
    wanted = set(requests)
    telemetry = dask_scheduler.plugins["dflow-telemetry"]
    return [
        (r.key, r.worker, r.finished) for r in telemetry.records if r.request in wanted
    ]


def _last_plan(*, dask_scheduler) -> dict[str, Any]:
    return dict(dask_scheduler.plugins["dflow-elastic"].last_plan)


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


# -- the fleets ------------------------------------------------------------------------


def request_id(key: Any) -> str:
    return str(key).partition("-")[2]


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
    model: str
    #: wall seconds a moved worker stays put (the planner's cooldown)
    cooldown: float

    def call(self, function: Callable, *args: Any) -> Any:
        return self.client.run_on_scheduler(function, *args)

    def requests(self, n: int, seed: int, **fields: Any) -> list[Request]:
        """Requests with prompts of their own: each has its own encode task
        (requests with equal prompts share one, :func:`dflow.client.encoding_key`)."""
        return [
            Request(
                model=self.model,
                prompt=f"a lighthouse at dusk, take {seed + i}",
                seed=seed + i,
                **fields,
            )
            for i in range(n)
        ]

    def workers(self) -> dict[str, dict[str, Any]]:
        return testing.fleet_workers(self.client)

    def layout(self) -> dict[str, str | None]:
        return testing.fleet_layout(self.client)

    def counts(self) -> Counter[str | None]:
        return Counter(self.layout().values())

    def settled(self) -> bool:
        return testing.fleet_settled(self.client)

    def decisions(self) -> list[dict[str, Any]]:
        return testing.decisions(self.client)

    def status(self) -> dict[str, Any]:
        return dflow.status(self.client)

    def plan(self) -> list[list[str | None]]:
        """[source, target] of the moves the controller would make now (nothing
        is applied)."""
        plan = self.client.sync(self.client.scheduler.dflow_plan)
        return [[m["source"], m["target"]] for m in plan["moves"]]

    def controller(self) -> contextlib.AbstractContextManager[None]:
        """The elastic controller on, for the block."""
        return testing.controller_on(self.client)

    def switch(self, name: str, stage: str, reason: str = TEST_REASON) -> None:
        testing.move(self.client, name, stage, self.model, reason)

    def set_roles(self, roles: dict[str, str]) -> None:
        testing.set_roles(
            self.client, roles, self.model, reason=TEST_REASON, cooldown=self.cooldown
        )

    def set_layout(self, counts: dict[str, int]) -> dict[str, str]:
        return testing.set_layout(
            self.client, counts, self.model, reason=TEST_REASON, cooldown=self.cooldown
        )

    def members(self) -> Counter[str]:
        """Workers per stage as the controller counts them: serving it, or
        switching to it."""
        switching = testing.elastic(self.client)["switching"]
        members: Counter[str] = Counter()
        for w in self.workers().values():
            if w["address"] in switching:
                members[Pool.parse(switching[w["address"]]).stage] += 1
            elif w["state"] == "ready":
                members[w["stage"]] += 1
        return members

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
        expected = Counter(encoding_key(r) for b in batches for r in b.requests)
        expected.update(
            f"{TASK_PREFIXES[stage]}-{i}" for i in ids for stage in ("dit", "vae")
        )
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

    def moves(self, decisions: list[dict], source: str, target: str) -> list[dict]:
        return [
            d
            for d in decisions
            if d["source"] == [source, self.model]
            and d["target"] == [target, self.model]
        ]


# -- role switching on real worker processes -------------------------------------------

TINY = "tiny-pixart"
#: Real processes: a 3 s cooldown, the controller off (tests switch workers)
REAL_CONFIG = {
    "dflow.elastic.enabled": False,
    "dflow.planner.cooldown": "3s",
    # the workers' transition logs must hold the whole class, to count executions
    "distributed.admin.low-level-log-length": 200_000,
}
#: about 0.26 s of DiT on a quiet CPU core; tiny PixArt's VAE and encoder: ms
DIT_HEAVY_TINY = {"steps": 200}


@pytest.fixture(scope="class")
def real_fleet(tiny_folders) -> Iterator[Fleet]:
    with (
        dask.config.set(REAL_CONFIG),
        StageCluster(TINY, START) as cluster,
        Client(cluster) as client,
    ):
        wait_for_pools(
            client, {TINY: [s for s, n in START.items() for _ in range(n)]}, timeout=300
        )
        yield Fleet(cluster, client, TINY, cooldown=3.0)
    runtime.uninstall(TINY, "all")  # the model dflow.generate loaded here


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


def negative(used: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        w: {r: q for r, q in resources.items() if q < 0}
        for w, resources in used.items()
        if any(q < 0 for q in resources.values())
    }


class TestSwitching:
    def test_status_reports_every_stage(self, real_fleet):
        """``dflow.status``: per stage workers, loading, queue, arrival rate and
        the predicted and observed service times; the decisions beside."""
        fleet = real_fleet
        poll(fleet.settled, 120, "no switch in progress")
        batch = fleet.submit(fleet.requests(3, seed=400, steps=4))
        fleet.finish(batch)
        status = fleet.status()
        assert set(status) == {"stages", "workers", "failures", "decisions", "health"}
        counts = fleet.counts()
        for stage in ("encoder", "dit", "vae"):
            summary = status["stages"][stage]
            assert summary["workers"] == counts[stage]
            assert summary["loading"] == summary["queue"] == 0
            assert summary["arrival_rate"] > 0
            assert summary["observed_s"] > 0
            # no profile covers tiny models on a CPU: the controller prices them
            # by observed times, and predicts nothing
            assert summary["predicted_s"] is None or summary["predicted_s"] > 0
        assert status["stages"]["all"]["workers"] == 0
        assert status["stages"]["all"]["arrival_rate"] == 0
        assert isinstance(status["decisions"], (list, tuple))

    def test_status_decisions_are_lists(self, real_fleet):
        """``dflow.status`` documents ``"decisions": [...]`` with ``source`` and
        ``target`` as ``[stage, model]``."""
        fleet = real_fleet
        if not fleet.status()["decisions"]:
            name, stage = next(iter(fleet.layout().items()))
            fleet.switch(name, str(stage))  # an operator's move is a decision too
            poll(fleet.settled, 120, "the switch done")
        decisions = fleet.status()["decisions"]
        assert isinstance(decisions, list)
        assert all(isinstance(d["source"], list) for d in decisions)
        for decision in decisions:
            assert set(decision) == {
                "time",
                "timestamp",
                "worker",
                "source",
                "target",
                "reason",
                "kind",
            }
            assert decision["worker"] in fleet.layout() and decision["reason"]

    def test_tasks_queued_on_a_switching_worker_move_to_the_pool(
        self, real_fleet, record_property
    ):
        """A DiT worker with denoise tasks queued behind the running one switches
        to the encoder: none of them starts there once it drains, the queued ones
        run on the other DiT worker, and every request completes once."""
        fleet = real_fleet
        fleet.set_layout({"encoder": 1, "dit": 2, "vae": 1})
        dits = {
            w["address"]: n for n, w in fleet.workers().items() if w["stage"] == "dit"
        }
        batch = fleet.submit(fleet.requests(8, seed=500, **DIT_HEAVY_TINY))

        def queued() -> tuple[str, list[str]] | None:
            processing = fleet.call(_processing)
            busiest = max(dits, key=lambda a: len(processing[a]))
            if len(processing[busiest]) >= 3:
                return busiest, processing[busiest]
            return None

        address, placed = poll(queued, 60, "denoise tasks queued on a DiT worker")
        name = dits[address]
        fleet.switch(name, "encoder", "test: switch a worker with queued tasks")
        poll(
            lambda: (
                not any(
                    k.startswith("denoise-") for k in fleet.call(_processing)[address]
                )
            ),
            60,
            "no denoise task left on the switching worker",
        )
        outputs = fleet.finish(batch)
        poll(fleet.settled, 60, "the switch done")

        drained = max(
            t
            for t, event in testing.dflow_events(fleet.client, "worker-draining")
            if event["worker"] == name
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
        record_property(
            "negative_used_resources", negative(fleet.call(_used_resources))
        )

    def test_unrunnable_tasks_run_and_held_intermediates_survive(
        self, real_fleet, record_property
    ):
        """The DiT pool empties (its worker goes to the VAE) as requests arrive:
        their embeddings wait on the encoder workers and their denoise tasks wait
        for a pool nobody serves. An encoder worker that alone holds some
        embeddings switches to the DiT: the waiting tasks run on it, and no
        embedding is lost (none is computed twice)."""
        fleet = real_fleet
        roles = fleet.set_layout(START)
        dit = next(name for name, stage in roles.items() if stage == "dit")
        batch = fleet.submit(fleet.requests(8, seed=600, steps=10))
        fleet.switch(dit, "vae", "test: empty the DiT pool")
        denoise = {f"denoise-{i}" for i in batch.ids}

        def parked() -> set[str]:
            # every denoise task waits for a worker, or ran on the DiT worker
            # before it drained (a race with the switch this test need not win)
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
        record_property(
            "negative_used_resources", negative(fleet.call(_used_resources))
        )


# -- the controller on an emulated fleet -----------------------------------------------

EMULATED = "pixart-sigma-1024"
#: Wall seconds per emulated second
SCALE = 0.25
#: The controller's periods, emulated seconds
INTERVAL = 2.0
COOLDOWN = 10.0
PERIODS = {
    "dflow.elastic.interval": INTERVAL,
    "dflow.planner.cooldown": COOLDOWN,
    "dflow.planner.horizon": 5.0,
    # arrival rates and status over the whole of a test
    "dflow.telemetry.window": 120.0,
    "dflow.elastic.default-switch": 5.0,
}
EMULATED_CONFIG = {
    "dflow.elastic.enabled": False,
    "dflow.runtime.backend": "emulated",
    "dflow.emulation.time-scale": SCALE,
    "dflow.client.model-timeout": "120s",
    "distributed.admin.low-level-log-length": 200_000,
    **{key: f"{value * SCALE}s" for key, value in PERIODS.items()},
}
#: 1.8 s of DiT (50 steps at 1024 x 1024) against 0.08 s of VAE
DIT_HEAVY = {"steps": 50}
#: one step without classifier-free guidance: the VAE takes four times the DiT
VAE_HEAVY = {"steps": 1, "guidance_scale": 1.0}
#: requests of a DiT-heavy burst: 29 s of work on one DiT worker
DIT_BURST = 16
#: requests of a VAE-heavy burst: 8 s of work on one VAE worker, twice the
#: target utilization of the 5 s horizon
VAE_BURST = 96


@pytest.fixture(scope="class")
def emulated_fleet() -> Iterator[Fleet]:
    with dask.config.set(EMULATED_CONFIG):
        predictor = testing.emulated_predictor()
        # dflow before the workers, priced as the emulation charges
        with testing.emulated_fleet(EMULATED, START, predictor) as (cluster, client):
            yield Fleet(cluster, client, EMULATED, cooldown=COOLDOWN * SCALE)


def emulated_seconds(wall: float) -> float:
    return wall / SCALE


class TestController:
    def test_a_disabled_controller_makes_no_decisions(self, emulated_fleet):
        """``dflow.elastic.enabled: False`` (the fleet starts so): a DiT-heavy
        burst that the controller would answer moves nobody."""
        fleet = emulated_fleet
        assert testing.elastic(fleet.client)["enabled"] is False
        fleet.set_layout(START)
        roles, before = fleet.layout(), len(fleet.decisions())
        batch = fleet.submit(fleet.requests(DIT_BURST, seed=100, **DIT_HEAVY))
        poll(lambda: fleet.first_finished(batch, "denoise-"), 120, "a denoise")
        time.sleep(4 * INTERVAL * SCALE)

        assert len(fleet.decisions()) == before
        assert fleet.layout() == roles
        # the controller would move an encoder to the DiT: off is what held it
        would = fleet.plan()
        assert [f"encoder:{EMULATED}", f"dit:{EMULATED}"] in would
        fleet.client.cancel(batch.futures)

    def test_max_per_pool_caps_the_dit_pool(self, emulated_fleet):
        """``dflow.planner.max-per-pool: 1``: under a DiT-heavy burst the DiT pool
        keeps its one worker. (With 4 workers and a minimum of 1 per pool the DiT
        pool can hold 2 at most, so 1 is the cap that binds.)"""
        fleet = emulated_fleet
        fleet.set_layout(START)
        before = len(fleet.decisions())
        dit_workers = []
        with dask.config.set({"dflow.planner.max-per-pool": 1}):
            with fleet.controller():
                batch = fleet.submit(fleet.requests(DIT_BURST, seed=200, **DIT_HEAVY))
                poll(lambda: fleet.first_finished(batch, "denoise-"), 120, "a denoise")
                for _ in range(12):
                    dit_workers.append(fleet.status()["stages"]["dit"]["workers"])
                    time.sleep(INTERVAL * SCALE / 2)
            capped = fleet.plan()
        uncapped = fleet.plan()

        assert not fleet.moves(fleet.decisions()[before:], "encoder", "dit")
        assert max(dit_workers) == 1
        assert fleet.counts()["dit"] == 1
        assert all(target != f"dit:{EMULATED}" for _, target in capped)
        # without the cap the controller would move an encoder to the DiT
        assert [f"encoder:{EMULATED}", f"dit:{EMULATED}"] in uncapped
        fleet.client.cancel(batch.futures)

    def test_noise_alone_does_not_move_workers(self, emulated_fleet, record_property):
        """A steady DiT-heavy load with +-10% jitter (steps alternating 45 and 55,
        a request every emulated second: the DiT pool at about 90% of its
        capacity) on a fleet shaped for it: for its ~10 intervals and after, no
        move, and the controller plans on the load all along."""
        fleet = emulated_fleet
        roles = fleet.set_layout({"encoder": 1, "dit": 2, "vae": 1})

        def steady(i: int) -> Batch:
            steps = 45 if i % 2 else 55
            batch = fleet.submit(fleet.requests(1, seed=300 + i, steps=steps))
            time.sleep(1.0 * SCALE)
            return batch

        before = len(fleet.decisions())
        batches, plans = [], []
        with fleet.controller():
            for i in range(20):
                batches.append(steady(i))
                plans.append(fleet.call(_last_plan))
            fleet.finish(*batches)
            time.sleep(3 * INTERVAL * SCALE)
            plans.append(fleet.call(_last_plan))

        moved = [
            (round(d["time"] - batches[0].submitted, 1), d["worker"], d["reason"])
            for d in fleet.decisions()[before:]
        ]
        assert not moved, (moved, plans)
        assert fleet.layout() == roles
        bottlenecks = [p.get("bottleneck") for p in plans]
        assert sum(b is not None for b in bottlenecks) >= len(plans) // 2, plans
        fleet.assert_each_stage_ran_once(*batches)
        record_property(
            "bottlenecks", Counter(str(Pool(*b)) if b else "none" for b in bottlenecks)
        )

    def test_a_shift_moves_workers_to_the_bottleneck_and_back(
        self, emulated_fleet, record_property
    ):
        """2 encoder / 1 DiT / 1 VAE. DiT-heavy requests move an encoder worker to
        the DiT within a few intervals; VAE-heavy ones then move a worker from the
        DiT to the VAE while their decodes are still queued (directly, or through
        the encoder). Pools never drop below their minimum of one (counting a
        worker switching in), every request completes once, and the status
        reports queues, rates and observed times meanwhile."""
        fleet = emulated_fleet
        fleet.set_layout(START)
        before = len(fleet.decisions())
        samples: list[dict[str, Any]] = []

        def sample() -> dict[str, Any]:
            stages = fleet.status()["stages"]
            samples.append({"time": time.time(), "members": fleet.members(), **stages})
            return samples[-1]

        def run_out(batch: Batch) -> None:
            while not all(f.done() for f in batch.futures):
                sample()
                time.sleep(0.25)

        with fleet.controller():
            dit_burst = fleet.submit(fleet.requests(DIT_BURST, seed=1000, **DIT_HEAVY))
            poll(lambda: sample()["dit"]["workers"] == 2, 120, "a second DiT worker")
            dit_ready = time.time()
            run_out(dit_burst)
            shifted = len(fleet.decisions())

            vae_burst = fleet.submit(fleet.requests(VAE_BURST, seed=2000, **VAE_HEAVY))

            def moved_back() -> bool:
                stages = sample()
                return stages["dit"]["workers"] == 1 and stages["vae"]["workers"] == 2

            poll(moved_back, 180, "a DiT worker on the VAE")
            vae_ready = time.time()
            run_out(vae_burst)
            status = fleet.status()

        to_dit = fleet.moves(fleet.decisions()[before:shifted], "encoder", "dit")
        assert len(to_dit) == 1, fleet.decisions()[before:]
        assert f"dit of {EMULATED} utilization" in to_dit[0]["reason"]
        observed = max(
            fleet.first_finished(dit_burst, prefix) for prefix in STAGE_PREFIXES
        )
        assert to_dit[0]["time"] - observed <= 5 * INTERVAL * SCALE
        # the way back may take two steps (DiT to encoder, encoder to VAE)
        back = fleet.decisions()[shifted:]
        to_vae = [d for d in back if d["target"] == ["vae", EMULATED]]
        assert to_vae and [d for d in back if d["source"] == ["dit", EMULATED]], back
        assert len(back) <= 3, back
        assert f"vae of {EMULATED} utilization" in to_vae[0]["reason"]
        decodes = [
            t for k, _, t in fleet.stage_records(vae_burst) if k.startswith("decode-")
        ]
        assert to_vae[0]["time"] < max(decodes)
        for name, value in {
            "dit_decision_after_burst_s": to_dit[0]["time"] - dit_burst.submitted,
            "dit_ready_after_burst_s": dit_ready - dit_burst.submitted,
            "vae_decision_after_burst_s": to_vae[0]["time"] - vae_burst.submitted,
            "vae_ready_after_burst_s": vae_ready - vae_burst.submitted,
        }.items():
            record_property(f"emulated_{name}", round(emulated_seconds(value), 2))

        # status while it happened: queues, rates, observed times, minimums kept
        assert max(s["dit"]["queue"] for s in samples) > 0
        assert max(s["vae"]["queue"] for s in samples) > 0
        # from when the scheduler has the burst's graph (a status call may
        # overtake the graph's submission), every stage has arrivals
        seen = next(
            i
            for i, s in enumerate(samples)
            if all(s[stage]["arrival_rate"] > 0 for stage in START)
        )
        assert all(
            s[stage]["arrival_rate"] > 0 for s in samples[seen:] for stage in START
        )
        short = [
            (round(s["time"] - dit_burst.submitted, 2), s["members"])
            for s in samples
            if min(s["members"].get(stage, 0) for stage in START) < 1
        ]
        assert not short, (short, fleet.decisions()[before:])
        for stage in START:
            assert status["stages"][stage]["observed_s"] > 0
            assert status["stages"][stage]["predicted_s"] > 0
        reported = [{**d, "time": d["timestamp"]} for d in status["decisions"]]
        assert all(
            {**d, "timestamp": d["time"]} in reported for d in (to_dit[0], to_vae[0])
        ), (reported, to_dit[0], to_vae[0])

        fleet.finish(dit_burst, vae_burst)
        fleet.assert_each_stage_ran_once(dit_burst, vae_burst)

    def test_a_profiled_pool_prices_a_new_mix_by_its_requests(self, emulated_fleet):
        """With a profile covering the pools, a burst of long denoises after a
        VAE-heavy mix is priced by its own requests: a VAE worker moves to the
        DiT before the burst's first denoise finishes."""
        fleet = emulated_fleet
        fleet.set_layout({"encoder": 1, "dit": 1, "vae": 2})
        # the VAE-heavy mix: the last tasks each pool finished
        fleet.finish(fleet.submit(fleet.requests(8, seed=900, **VAE_HEAVY)))
        before = len(fleet.decisions())
        with fleet.controller():
            # 7 s a denoise: the controller plans every 2 s
            batch = fleet.submit(fleet.requests(4, seed=910, steps=200))
            first = poll(
                lambda: fleet.first_finished(batch, "denoise-"), 120, "a denoise"
            )
            time.sleep(INTERVAL * SCALE)
        fleet.client.cancel(batch.futures)
        to_dit = fleet.moves(fleet.decisions()[before:], "vae", "dit")
        assert to_dit and to_dit[0]["time"] < first, fleet.decisions()[before:]

    # -- the cloud actuator: pools that grow (last: it retires workers) ----------------

    def test_pool_adaptive_grows_and_shrinks_the_dit_pool(
        self, emulated_fleet, record_property
    ):
        """:meth:`StageCluster.adapt` (the ``scale-pools`` actuator): a burst of
        long denoises grows the DiT pool to the maximum (never past it, though at
        a target utilization of 0.5 the target mostly is) and, ``wait`` after the
        burst, shrinks it back; no request is lost. (The encoder pool shrinks to
        the minimum of one, which its load needs.)"""
        fleet = emulated_fleet
        cluster = fleet.cluster
        roles = {
            name: spec["stage"] for name, spec in list(cluster.worker_spec.items())
        }
        fleet.set_roles(roles)

        def sizes(stage: str) -> int:
            return len(cluster.stage_workers(stage))

        batch = fleet.submit(fleet.requests(24, seed=700, **DIT_HEAVY))
        adaptive = cluster.adapt(
            minimum=1,
            maximum=2,
            interval=f"{INTERVAL * SCALE / 2}s",
            wait=f"{COOLDOWN * SCALE}s",
            utilization=0.5,
        )
        dit, targets, ready = [], [], []
        try:

            def grown() -> bool:
                dit.append(sizes("dit"))
                targets.append(
                    fleet.client.sync(
                        fleet.client.scheduler.dflow_pool_targets, utilization=0.5
                    ).get(f"dit:{EMULATED}", 0)
                )
                ready.append(fleet.status()["stages"]["dit"]["workers"])
                return dit[-1] == 2

            poll(grown, 60, "a second DiT worker specified")
            assert testing.elastic(fleet.client)["actuator"] == "scale-pools"
            while not all(f.done() for f in batch.futures):
                grown()
                time.sleep(0.25)
            fleet.finish(batch)

            def shrunk() -> bool:
                dit.append(sizes("dit"))
                ready.append(fleet.status()["stages"]["dit"]["workers"])
                return dit[-1] == 1 and fleet.counts()["dit"] == 1

            poll(shrunk, 120, "the DiT pool back to one worker")
        finally:
            adaptive.stop()

        assert max(dit) == 2, (dit, targets)  # all of them at most the maximum
        assert dit[-1] == 1
        assert max(targets) > 2  # the maximum bound the pool, not its load
        poll(
            lambda: testing.elastic(fleet.client)["actuator"] == "switch-roles",
            10,
            "the controller's settings back",
        )
        # the scheduler's records only: the retired worker took its logs with it
        fleet.assert_each_stage_ran_once(batch, workers=False)
        record_property("dit_target_max", max(targets))
        record_property("dit_ready_max", max(ready))
