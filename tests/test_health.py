"""Hung and slow stage workers (``dflow.health``), end to end.

:class:`TestStopped`: real ``dask scheduler`` and ``dflow-worker`` processes on
127.0.0.1 serve tiny Flux with two workers per stage, ``dflow.health`` at its
defaults (the elastic controller off, so that workers keep their stages). A
worker process of one stage is stopped with SIGSTOP during a burst, as a hung
GPU leaves it: alive, connected, silent. Every request must complete once,
with the pixels of the same burst without the fault, long before Dask's own
worker TTL (minutes) would have moved its tasks; the fenced worker's late
results, once SIGCONT wakes it, must not be delivered. The delays the fault
adds to each request are printed and recorded (``record_property``), not
asserted. The last test leaves a worker stopped past the grace period: its
nanny restarts it.

:class:`TestEmulated`: an emulated fleet in this process
(``dflow.runtime.backend: emulated``, time compressed :data:`SCALE` times, a
predictor that prices every pool as the emulation charges it), whose cards
can be slowed down (:func:`dflow.emulation.adapter.set_speed`): a slow DiT
worker gets its share of the work and is reported; one whose steps stop while
its heartbeats go on is fenced and, once it steps again, unfenced; a long
request of a shape nothing predicts is not taken for a hang.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import cloudpickle
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import dask.config
from dask.utils import parse_timedelta
from distributed import Client, wait
from distributed.diagnostics.plugin import SchedulerPlugin

import dflow
from dflow import testing
from dflow.cluster import StageCluster
from dflow.emulation.adapter import set_speed
from dflow.planner import Demand, PlannerWorker, PoolCost, plan
from dflow.plugins.extension import DflowExtension, WorkerRecord
from dflow.plugins.health import Health
from dflow.plugins.predictions import Predictions
from dflow.plugins.pricing import speed_factor
from dflow.plugins.speeds import WorkerSpeeds
from dflow.plugins.telemetry import StageRecord, Telemetry
from dflow.pools import Pool
from dflow.predictor import Predictor
from dflow.request import Request
from dflow.testing import (
    ServiceProcess,
    pixels,
    poll,
    scheduler_process,
    wait_for_pools,
    worker_processes,
)

# The functions this module runs on the scheduler and workers travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODEL = "tiny-flux"
#: Two workers per stage: one can hang, the other takes over
LAYOUT = ("encoder", "encoder", "dit", "dit", "vae", "vae")
#: The elastic controller off, so that workers keep their stages; health at
#: its defaults
SCHEDULER_ENV = {"DASK_DFLOW__ELASTIC__ENABLED": "False"}
#: Requests of a burst, and their denoising steps (a few seconds of work)
BURST = 24
STEPS = 40


# -- on the scheduler and workers ------------------------------------------------------


class Ledger(SchedulerPlugin):
    """When each final task completed, and on which worker."""

    name = "test-health-ledger"

    def __init__(self) -> None:
        self.completions: list[tuple[float, str, str]] = []

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        final = str(key).startswith("decode-")
        if start == "processing" and finish == "memory" and final:
            self.completions.append((time.time(), str(key), kwargs["worker"]))


def completions(dask_scheduler) -> list[tuple[float, str, str]]:
    return list(dask_scheduler.plugins[Ledger.name].completions)


def request_counts(dask_scheduler) -> dict[str, int]:
    return {s: n for (_, s), n in dask_scheduler.extensions["dflow"].counts.items()}


def executing(dask_worker) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


def dflow_keys(dask_scheduler) -> list[str]:
    prefixes = ("encode-", "denoise-", "decode-")
    return [str(k) for k in dask_scheduler.tasks if str(k).startswith(prefixes)]


def health_decisions(client: Client, kind: str) -> list[dict[str, Any]]:
    return [d for d in testing.decisions(client) if d.get("kind") == kind]


def scrape(client: Client) -> dict[tuple[str, frozenset], float]:
    """The dflow samples of the scheduler's ``/metrics``, by name and labels."""
    port = client.scheduler_info()["services"]["dashboard"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as page:
        text = page.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("dflow_")
        for sample in family.samples
    }


# -- settings, speeds and the planner ---------------------------------------------------


def test_every_default_has_its_place_in_the_schema():
    """``configs/dflow.yaml`` and ``configs/dflow-schema.yaml`` list the same
    keys (``dflow.health`` and ``dflow.emulation.speed`` among them)."""
    defaults = yaml.safe_load(files("dflow.configs").joinpath("dflow.yaml").read_text())
    schema = yaml.safe_load(
        files("dflow.configs").joinpath("dflow-schema.yaml").read_text()
    )

    def keys(node: dict, prefix: str, *, schema: bool) -> set[str]:
        found = set()
        items = node.get("properties", {}) if schema else node
        for key, value in items.items():
            found.add(f"{prefix}{key}")
            nested = (
                value.get("type") == "object" if schema else isinstance(value, dict)
            )
            if nested and (value.get("properties") if schema else value):
                found |= keys(value, f"{prefix}{key}.", schema=schema)
        return found

    assert keys(defaults, "", schema=False) == keys(schema, "", schema=True)
    assert {
        "dflow.health.heartbeat-timeout",
        "dflow.health.grace",
        "dflow.emulation.speed",
    } <= keys(defaults, "", schema=False)


def stage_record(worker: str, seconds: float, **features: Any) -> StageRecord:
    return StageRecord(
        finished=time.time(),
        key="denoise-x",
        request="x",
        stage="dit",
        model=EMULATED,
        worker=worker,
        gpu_type="h200",
        compute_s=seconds,
        transfer_s=0.0,
        nbytes=0,
        features=features,
        call_s=seconds,
    )


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        # three or more: against their median
        (
            {"a": 3.3, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.1},
            {"a": 1 / 3.3, "b": 1.0, "e": 1 / 1.1},
        ),
        # two: against the faster
        ({"a": 3.3, "b": 1.0}, {"a": 1 / 3.3, "b": 1.0}),
        # one, and nothing predicts the pool: unknown
        ({"a": 3.3}, {}),
    ],
)
def test_a_workers_speed_is_against_its_gpu_types_other_workers(times, expected):
    extension = DflowExtension()
    predictions = Predictions(None)
    telemetry = Telemetry(extension, predictions)
    speeds = WorkerSpeeds(extension, predictions, telemetry, samples=3)
    pool = Pool("dit", EMULATED)
    telemetry.service[pool] = 1.0  # the pool's observed average
    for worker in times:
        extension.workers[worker] = WorkerRecord(
            worker, worker, "ready", "dit", EMULATED, gpu_type="h200"
        )
    for _ in range(3):
        for worker, seconds in times.items():
            speeds.observe(stage_record(worker, seconds))
    measured = speeds.refresh()
    assert set(measured) == set(times) if expected else not measured
    for worker, speed in expected.items():
        assert measured[worker] == pytest.approx(speed)


def test_a_lone_worker_is_measured_against_the_prediction():
    extension = DflowExtension()
    predictions = Predictions(testing.emulated_predictor())
    telemetry = Telemetry(extension, predictions)
    speeds = WorkerSpeeds(extension, predictions, telemetry, samples=3)
    extension.workers["a"] = WorkerRecord(
        "a", "a", "ready", "dit", EMULATED, gpu_type="h200"
    )
    features = Request(model=EMULATED, prompt="a fox", steps=20).features
    predicted = predictions.seconds(Pool("dit", EMULATED), "h200", features)
    assert predicted
    for _ in range(3):
        speeds.observe(stage_record("a", predicted * 2, **features))
    assert speeds.refresh()["a"] == pytest.approx(0.5)


def test_a_prediction_is_trusted_for_shapes_the_pool_has_run():
    """Calls of 1024 x 1024 finished, however slowly: their shape and smaller
    ones are priced, per step whatever the steps; 2048 x 2048 is not."""
    extension = DflowExtension()
    predictions = Predictions(testing.emulated_predictor())
    telemetry = Telemetry(extension, predictions)
    health = Health(
        extension, predictions, WorkerSpeeds(extension, predictions, telemetry)
    )
    pool = Pool("dit", EMULATED)

    def features(size: int, steps: int) -> dict[str, Any]:
        return Request(
            model=EMULATED, prompt="a fox", steps=steps, height=size, width=size
        ).features

    seen, smaller = features(1024, 20), features(512, 50)
    larger, fewer_steps = features(2048, 50), features(2048, 4)
    assert health.trusted_prediction(pool, "h200", seen, 1) is None
    health.observe(stage_record("a", 60.0, **seen))  # late, on a loaded host
    for trusted in (seen, smaller, features(1024, 50)):
        predicted = predictions.seconds(pool, "h200", trusted)
        assert health.trusted_prediction(pool, "h200", trusted, 1) == predicted
    for untrusted in (larger, fewer_steps):
        assert predictions.seconds(pool, "h200", untrusted)
        assert health.trusted_prediction(pool, "h200", untrusted, 1) is None


def test_the_planner_counts_a_slow_worker_at_its_speed():
    pool = Pool("dit", EMULATED)
    costs = {pool: PoolCost(speeds={"h200": 1.0})}
    demands = {pool: Demand(rate=1.3)}

    def utilization(speed: float) -> float:
        workers = [
            PlannerWorker("a", "h200", 2**40, pool=pool),
            PlannerWorker("b", "h200", 2**40, pool=pool, speed=speed),
        ]
        result = plan(workers, demands, costs, now=0.0, horizon=10.0)
        return result.utilization[pool]

    assert utilization(1.0) == pytest.approx(0.65)
    assert utilization(0.3) == pytest.approx(1.0)
    # noise does not split workers into classes; a slow one counts in 0.05 steps
    assert [speed_factor(s) for s in (None, 1.2, 0.93, 0.31, 0.001)] == [
        1.0,
        1.0,
        1.0,
        0.3,
        0.05,
    ]


# -- real processes --------------------------------------------------------------------


@dataclass
class Cluster:
    client: Client
    workers: list[ServiceProcess]
    #: pixels and latency of each seed's request in a burst without a fault
    baseline: dict[int, tuple[np.ndarray, float, int]] = field(default_factory=dict)

    def requests(self, seeds: range) -> list[Request]:
        return [
            Request(
                model=MODEL,
                prompt=f"a fox, seed {s}",
                seed=s,
                steps=STEPS,
                height=64,
                width=64,
            )
            for s in seeds
        ]

    def addresses(self, stage: str) -> dict[str, ServiceProcess]:
        """Address -> process of this stage's ready workers."""
        ready = {
            r["address"]
            for r in self.client.sync(self.client.scheduler.dflow_workers)
            if r["state"] == "ready" and r["stage"] == stage
        }
        return {
            address: process
            for process in self.workers
            if process.stage == stage and process.alive()
            for address in process.addresses(self.client)
            if address in ready
        }

    def names(self) -> dict[str, str]:
        """Name -> address of every worker (decisions name their workers)."""
        return {
            r["name"]: r["address"]
            for r in self.client.sync(self.client.scheduler.dflow_workers)
        }

    def burst(self, requests: list[Request]) -> tuple[list, dict[str, float]]:
        """Submit ``requests``; their futures and each one's latency as the
        client sees it, filled in as they complete (in another thread)."""
        submitted = time.monotonic()
        futures = dflow.map(self.client, requests)
        latencies: dict[str, float] = {}
        for future in futures:
            future.add_done_callback(
                lambda f: latencies.setdefault(f.key, time.monotonic() - submitted)
            )
        return futures, latencies

    def forget(self, futures: list) -> None:
        """Release a burst's futures and wait until the scheduler forgets its
        tasks (encode keys are shared by equal prompts: a later burst must
        compute its own)."""
        self.client.cancel(futures)
        del futures[:]
        poll(
            lambda: not self.client.run_on_scheduler(dflow_keys),
            30,
            "the burst's tasks to be forgotten",
        )


@pytest.fixture(scope="class")
def cluster(tiny_folders, tmp_path_factory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("health")
    with (
        scheduler_process(env=SCHEDULER_ENV, log_dir=logs) as address,
        worker_processes(
            address, [(s, MODEL) for s in LAYOUT], log_dir=logs
        ) as workers,
        Client(address) as client,
    ):
        wait_for_pools(client, {MODEL: LAYOUT}, processes=workers)
        client.register_plugin(Ledger())
        yield Cluster(client, workers)
        # a stopped process cannot exit: wake them all before they are stopped
        for process in workers:
            for pid in process.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def assert_same_pixels(output: dflow.Output, reference: tuple) -> None:
    """The output equals the fault-free run's: pixel-exact, or within one level
    where either decoded it in a batch (VAE batching rounds differently)."""
    ours = pixels(output).astype(np.int16)
    theirs, _, theirs_batch = reference
    bound = 0 if output.timings["decode_batch"] == theirs_batch == 1 else 1
    assert int(np.abs(ours - theirs.astype(np.int16)).max()) <= bound


@pytest.mark.slow
class TestStopped:
    def test_baseline_burst_without_a_fault(self, cluster):
        """The fault-free run the stopped ones compare with (it also warms
        every worker up)."""
        seeds = range(BURST)
        for _ in range(2):  # the first burst pays for first calls
            futures, latencies = cluster.burst(cluster.requests(seeds))
            outputs = cluster.client.gather(futures)
            cluster.baseline = {
                o.request.seed: (
                    pixels(o),
                    latencies[f.key],
                    int(o.timings["decode_batch"]),
                )
                for f, o in zip(futures, outputs)
            }
            cluster.forget(futures)

    @pytest.mark.parametrize("stage", ["dit", "encoder", "vae"])
    def test_a_stopped_worker_is_fenced_and_each_request_completes_once(
        self, cluster, stage, record_property
    ):
        """The DiT and VAE workers stop mid-burst, once results come out (a
        DiT worker in the middle of a denoising loop); the encoder, whose work
        is over within the burst's first second, as the burst arrives."""
        client = cluster.client
        assert cluster.baseline, "the baseline test runs first"
        wait_for_pools(client, {MODEL: LAYOUT}, timeout=60, processes=cluster.workers)
        before = client.run_on_scheduler(request_counts)
        workers = cluster.addresses(stage)
        names = cluster.names()
        requests = cluster.requests(range(BURST))
        if stage == "encoder":
            victim = sorted(workers)[0]
            (pid,) = workers[victim].worker_pids()
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.time()
            futures, latencies = cluster.burst(requests)
        else:
            futures, latencies = cluster.burst(requests)

            def busy() -> str | None:
                if len(latencies) < 2:
                    return None
                running = client.run(executing, workers=list(workers))
                return next((a for a, keys in running.items() if keys), None)

            victim = poll(busy, 60, f"a {stage} worker busy", interval=0.005)
            (pid,) = workers[victim].worker_pids()
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.time()
        try:
            assert not all(f.done() for f in futures), "the burst ended first"
            # Dask alone would wait for its worker TTL (5 minutes)
            fence = poll(
                lambda: next(
                    (
                        d
                        for d in health_decisions(client, "fence")
                        if d["time"] >= stopped_at and names[d["worker"]] == victim
                    ),
                    None,
                ),
                60,
                "the stopped worker to be fenced",
            )
            # it stays stopped through the burst, but wakes within the grace
            # period however long a loaded machine takes to finish the burst
            grace = parse_timedelta(dask.config.get("dflow.health.grace"))
            with contextlib.suppress(TimeoutError):
                wait(futures, timeout=max(0, fence["time"] + grace / 2 - time.time()))
        finally:
            os.kill(pid, signal.SIGCONT)
        stopped_through = all(f.done() for f in futures)
        wait(futures, timeout=120)
        outputs = client.gather(futures)
        # awake, it answers again: unfenced, and nothing it finished while
        # fenced reached the scheduler
        unfence = poll(
            lambda: next(
                (
                    d
                    for d in health_decisions(client, "unfence")
                    if d["time"] >= fence["time"] and d["worker"] == fence["worker"]
                ),
                None,
            ),
            30,
            "the stopped worker to be unfenced",
        )
        ledger = client.run_on_scheduler(completions)

        assert [o.request for o in outputs] == requests
        for output in outputs:
            assert_same_pixels(output, cluster.baseline[output.request.seed])
        after = client.run_on_scheduler(request_counts)
        for status, delta in (
            ("submitted", BURST),
            ("completed", BURST),
            ("failed", 0),
        ):
            assert after.get(status, 0) - before.get(status, 0) == delta, status
        assert fence["reason"].startswith("fenced: no heartbeat")
        fenced_at, unfenced_at = fence["time"], unfence["time"]
        # each request's output was delivered once; again only when a fenced
        # worker held it (recomputed elsewhere, as a lost worker's)
        fenced = {
            names[d["worker"]]
            for d in health_decisions(client, "fence")
            if d["time"] >= stopped_at
        }
        keys = {str(f.key) for f in futures}
        runs: dict[str, list[tuple[float, str]]] = {}
        for when, key, worker in ledger:
            if key in keys:
                runs.setdefault(key, []).append((when, worker))
        assert set(runs) == keys
        for key, done in runs.items():
            assert not any(
                w == victim and fenced_at < t < unfenced_at for t, w in done
            ), key
            for (_, holder), _ in itertools.pairwise(done):
                assert holder in fenced, (key, done)
        time.sleep(2)  # a late result would arrive now, if any
        late = [c for c in client.run_on_scheduler(completions) if c[1] in keys]
        assert late == [c for c in ledger if c[1] in keys]
        wait_for_pools(client, {MODEL: LAYOUT}, timeout=30, processes=cluster.workers)
        status = dflow.status(client)["health"]
        assert status["workers"][fence["worker"]]["state"] == "ready"
        assert status["workers"][fence["worker"]]["fences"] >= 1
        assert status["counts"]["fenced"][stage] >= 1
        metrics = scrape(client)
        cause = {"stage": stage, "cause": "heartbeat"}.items()
        assert metrics["dflow_workers_fenced_total", frozenset(cause)] >= 1
        unfenced = {"stage": stage}.items()
        assert metrics["dflow_workers_unfenced_total", frozenset(unfenced)] >= 1

        delays = sorted(
            latencies[f.key] - cluster.baseline[r.seed][1]
            for f, r in zip(futures, requests)
        )
        record_property(
            f"{stage} stopped: fenced after",
            f"{fenced_at - stopped_at:.1f}s; delays {[round(d, 1) for d in delays]}",
        )
        print(
            f"\n{stage} worker stopped mid-burst: fenced {fenced_at - stopped_at:.1f}s "
            f"later; burst {max(latencies.values()):.1f}s"
            f"{'' if stopped_through else ' (woken before its end)'}; delay per "
            f"request against the fault-free burst (s): max {delays[-1]:.1f}, "
            f"median {delays[len(delays) // 2]:.1f}"
        )
        cluster.forget(futures)

    def test_a_worker_stopped_past_the_grace_period_is_restarted(self, cluster):
        """``dflow.health.grace`` (30 s) after the fence, the stopped worker's
        nanny kills it (SIGKILL reaches a stopped process) and starts a new
        one, which loads the DiT and serves."""
        client = cluster.client
        wait_for_pools(client, {MODEL: LAYOUT}, timeout=60, processes=cluster.workers)
        workers = cluster.addresses("dit")
        victim = sorted(workers)[0]
        (pid,) = workers[victim].worker_pids()
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        try:
            futures, _ = cluster.burst(cluster.requests(range(100, 106)))
            outputs = client.gather(futures)
            retired = poll(
                lambda: [
                    d
                    for d in health_decisions(client, "retire")
                    if d["time"] >= stopped_at
                ],
                90,
                "the stopped worker to be retired",
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert [o.request.seed for o in outputs] == list(range(100, 106))
        assert retired[0]["reason"].startswith("retired: not recovered")
        # its nanny started a new worker process, which serves the DiT again
        poll(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 30, "exit")
        wait_for_pools(client, {MODEL: LAYOUT}, timeout=120, processes=cluster.workers)
        assert victim not in cluster.addresses("dit")
        futures, _ = cluster.burst(cluster.requests(range(200, 204)))
        assert len(client.gather(futures)) == 4


def _zombie(pid: int) -> bool:
    with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] == "Z"
    return True


# -- an emulated fleet in this process ---------------------------------------------------

EMULATED = "pixart-sigma-1024"
#: Wall seconds per emulated second
SCALE = 0.1
EMULATED_CONFIG = {
    "dflow.elastic.enabled": False,
    "dflow.runtime.backend": "emulated",
    "dflow.emulation.time-scale": SCALE,
    "dflow.client.model-timeout": "120s",
    # short periods: the tests watch a few seconds of emulated fleet
    "dflow.health.slow-after": "1s",
    "dflow.health.speed-samples": 3,
    "dflow.health.stall-floor": "1s",
}
#: 1.8 emulated seconds of DiT a request (50 steps at 1024 x 1024)
DIT_STEPS = 50
DITS = 4


@dataclass
class EmulatedFleet:
    cluster: StageCluster
    client: Client

    def dits(self) -> list[str]:
        return sorted(
            r["address"]
            for r in self.client.sync(self.client.scheduler.dflow_workers)
            if r["stage"] == "dit" and r["state"] == "ready"
        )

    def requests(self, n: int, seed: int, **fields: Any) -> list[Request]:
        fields = {"steps": DIT_STEPS, **fields}
        return [
            Request(
                model=EMULATED,
                prompt=f"a lighthouse {seed + i}",
                seed=seed + i,
                **fields,
            )
            for i in range(n)
        ]

    def run(self, requests: list[Request], timeout: float = 120) -> list:
        futures = dflow.map(self.client, requests)
        wait(futures, timeout=timeout)
        outputs = self.client.gather(futures)
        assert [o.request for o in outputs] == requests
        return futures

    def speed(self, address: str, speed: float) -> None:
        self.client.run(set_speed, speed, workers=[address])


def denoised_by(keys: list[str], dask_scheduler=None) -> dict[str, str]:
    """Worker of each denoise task among ``keys``' requests, from telemetry."""
    ids = {k.partition("-")[2] for k in keys}
    telemetry = dask_scheduler.plugins["dflow-telemetry"]
    return {
        r.key: r.worker
        for r in telemetry.records
        if r.stage == "dit" and r.request in ids
    }


@pytest.fixture(scope="class")
def emulated(request) -> Iterator[EmulatedFleet]:
    predictor = getattr(request, "param", "emulated")
    with dask.config.set(EMULATED_CONFIG):
        # in wall seconds at the time scale: priced under the config
        if predictor == "emulated":
            priced = testing.emulated_predictor()
        else:
            priced = Predictor()
        layout = {"encoder": 1, "dit": DITS, "vae": 1}
        with testing.emulated_fleet(EMULATED, layout, priced) as (cluster, client):
            yield EmulatedFleet(cluster, client)


@pytest.mark.slow
class TestEmulated:
    def test_a_slow_worker_gets_its_share_and_is_reported(
        self, emulated, record_property
    ):
        fleet = emulated
        slow, *others = fleet.dits()
        fleet.speed(slow, 0.3)
        try:
            # its speed is learned from calls it finishes
            fleet.run(fleet.requests(24, seed=0))
            poll(
                lambda: (
                    (s := dflow.status(fleet.client)["health"]["workers"])
                    and any(w["slow"] for w in s.values())
                ),
                30,
                "the slow worker reported",
            )
            futures = fleet.run(fleet.requests(60, seed=100))
        finally:
            fleet.speed(slow, 1.0)
        placed = Counter(
            fleet.client.run_on_scheduler(
                denoised_by, [str(f.key) for f in futures]
            ).values()
        )
        share = placed[slow] / sum(placed.values())
        record_property("slow worker's share of the DiT calls", share)
        # speed 0.3 of 3.3 in all: 9%; an equal split would give it 25%
        assert share < 0.5 / DITS, placed
        health = dflow.status(fleet.client)["health"]
        by_address = {w["address"]: w for w in health["workers"].values()}
        assert 0.2 < by_address[slow]["speed"] < 0.45
        assert all(0.8 < by_address[a]["speed"] < 1.25 for a in others)
        assert by_address[slow]["health"].startswith("slow: ")
        (report,) = [
            d
            for d in health_decisions(fleet.client, "slow")
            if d["reason"].startswith("slow: runs at")
        ]
        assert report["source"] == report["target"] == ["dit", EMULATED]
        assert health["counts"]["slow"] == {"dit": 1}

    def test_a_worker_whose_steps_stop_is_fenced_then_unfenced(self, emulated):
        """Heartbeats go on, steps stop: fenced after ``stall-floor`` (the
        predicted step is far shorter); the other workers finish its requests;
        once its step returns it runs nothing and is unfenced."""
        fleet = emulated
        stuck = fleet.dits()[0]
        fleet.run(fleet.requests(8, seed=300))
        futures = dflow.map(fleet.client, fleet.requests(16, seed=400))
        poll(
            lambda: fleet.client.run(executing, workers=[stuck])[stuck],
            30,
            "a denoise on the worker",
            interval=0.01,
        )
        # one step takes 2000 times the 36 ms the predictor expects: ~7 s
        fleet.speed(stuck, 0.0005)
        started = time.time()
        fence = poll(
            lambda: [
                d
                for d in health_decisions(fleet.client, "fence")
                if d["time"] >= started
            ],
            30,
            "the stalled worker fenced",
        )
        fleet.speed(stuck, 1.0)
        assert fence[0]["reason"].startswith("fenced: no progress for")
        wait(futures, timeout=120)
        assert [f.status for f in futures] == ["finished"] * len(futures)
        poll(
            lambda: [
                d
                for d in health_decisions(fleet.client, "unfence")
                if d["time"] >= started
            ],
            60,
            "the worker unfenced once its step returned",
        )

    def test_a_long_request_of_a_shape_never_seen_is_judged_by_its_steps(
        self, emulated
    ):
        """The predictor prices the pools, but no call of 2048 x 2048 has
        finished: its prediction is not trusted, and a card slowed down so that
        each step takes longer than ``stall-floor`` runs to its end, judged by
        the pace of its own steps."""
        fleet = emulated
        fleet.run(fleet.requests(8, seed=600))  # 1024 x 1024 calls seen
        # 8 steps of 1.5 s: 0.03 s each at full speed
        request = fleet.requests(1, seed=700, steps=8, height=2048, width=2048)
        assert_not_fenced(fleet, request, speed=0.02)

    @pytest.mark.parametrize("emulated", ["unpriced"], indirect=True)
    def test_a_long_request_nothing_predicts_is_not_fenced(self, emulated):
        """No profile prices the pools: steps of 1.8 s, longer than
        ``stall-floor``, are judged by their own pace, and by heartbeats."""
        fleet = emulated
        assert_not_fenced(fleet, fleet.requests(1, seed=500, steps=8), speed=0.002)


def assert_not_fenced(fleet: EmulatedFleet, requests: list, speed: float) -> None:
    """Run ``requests`` on one DiT card slowed to ``speed``: it is not fenced,
    and its steps took longer than ``stall-floor`` each."""
    slow = fleet.dits()[-1]
    fleet.client.run_on_scheduler(_pin_dits, [slow])
    fleet.speed(slow, speed)
    started = time.time()
    try:
        (future,) = fleet.run(requests, timeout=120)
    finally:
        fleet.speed(slow, 1.0)
        fleet.client.run_on_scheduler(_pin_dits, [])
    fences = [d for d in health_decisions(fleet.client, "fence") if d["time"] > started]
    assert not fences
    floor = dask.config.get("dflow.health.stall-floor")
    step = future.result().timings["denoise"] / requests[0].steps
    assert step > parse_timedelta(floor)


def _pin_dits(addresses: list[str], dask_scheduler=None) -> None:
    """Keep only ``addresses`` in the DiT pool (an empty list restores all)."""
    extension = dask_scheduler.extensions["dflow"]
    for address, record in extension.workers.items():
        if record.stage != "dit":
            continue
        ws = dask_scheduler.workers[address]
        slots = 1 if not addresses or address in addresses else 0
        dask_scheduler.add_resources(
            worker=address, resources={"dit": slots, record.pool.resource: slots}
        )
        if slots:
            dask_scheduler.bulk_schedule_unrunnable_after_adding_worker(ws)
