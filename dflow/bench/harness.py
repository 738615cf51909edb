"""The benchmark harness: one workload, one fleet, four ways of serving it.

``run_scenario`` replays a scenario's trace (:mod:`dflow.bench.workload`) against
the same emulated fleet (:mod:`dflow.emulation`) served four ways:

``monolithic``
    Monolithic replicas (``--stage all``), statically partitioned per model in
    proportion to the expected mix: the allocation of replicas that sustains
    the highest rate of the run's average mix (:func:`~dflow.bench.bounds.best_allocation`).
``monolithic_autoscaled``
    The same replicas moving between models on load, as a Ray Serve deployment
    with per-model autoscaling would (:class:`~dflow.bench.baselines.ReplicaAutoscaler`),
    each move paying the drain and the whole pipeline's load.
``static``
    Stage pools at the best static ratio for the average mix.
``elastic``
    The same pools, rebalanced by dflow's elastic controller.

Fleets run in this process: a scheduler and one in-process Dask worker per
emulated GPU on one event loop (``StageCluster(processes=False)``, ``inproc://``
comms), so dozens of emulated GPUs fit two cores. Every stage call sleeps its
emulated cost times ``dflow.emulation.time-scale``.

Time
    All figures are in *emulated* seconds: wall seconds divided by the time
    scale. Arrivals are paced at ``t x scale`` wall seconds after the start;
    a request's latency is its completion's wall time (on the scheduler, when
    its last task finishes) less its paced arrival, divided by the scale. The
    controllers' periods, horizons, cooldowns and delays are set in emulated
    seconds and scaled the same way. What the scale cannot shrink is the CPU
    time of Dask and dflow themselves (a few milliseconds per task on a busy
    machine): it reads as that time divided by the scale, which is why the
    stage calls priced in fractions of a second (encoder, VAE) look slower
    than their profile, and why full runs use a larger scale than ``--quick``.

Metrics (per mode, :func:`metrics`)
    Over the measurement window ``[warmup, duration)`` of the arrivals:
    throughput (requests completed in the window per second), goodput (requests
    that arrived in the window and finished within their model's SLO, per
    second), latency percentiles of the requests that arrived in the window
    (a request still unfinished when the run stops counts at its age then, a
    lower bound), SLO attainment, per-stage utilization (busy time of the stage's
    workers over their time on the stage) and ``bound_ratio``: throughput over
    the physical bound of the mode's fleet (:func:`bound`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import dask.config
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

import dflow
import dflow.client
from dflow.bench.bounds import (
    Allocation,
    best_allocation,
    capacity,
    fluid_departures,
    pool_work,
)
from dflow.bench.workload import TraceEntry, generate

if TYPE_CHECKING:
    from dflow.bench.scenarios import Scenario

logger = logging.getLogger(__name__)

LABEL = "emulated (cost model: H200 profile scaled by GPU type)"
MODES = ("monolithic", "monolithic_autoscaled", "static", "elastic")
#: Modes served by monolithic replicas
MONOLITHIC = ("monolithic", "monolithic_autoscaled")
#: Each mode's physical ceiling: (kind, whether its allocation is the static
#: one for the run's average mix). A static mode cannot follow the phases, so
#: its bound is its own allocation's capacity per phase; a mode that moves
#: workers is bounded by the best allocation of each phase.
BOUNDS = {
    "monolithic": ("monolithic", True),
    "monolithic_autoscaled": ("monolithic", False),
    "static": ("disaggregated", True),
    "elastic": ("disaggregated", False),
}


# -- the physics of a scenario (pure) ------------------------------------------------


@dataclass
class Physics:
    """What the profile says a scenario's fleet can do.

    ``kind`` is ``"monolithic"`` or ``"disaggregated"``: ``capacity[kind]`` is
    the best allocation's rate of each phase's mix (what a mode that follows the
    phases could sustain), ``allocation[kind]`` the best static allocation for
    the run's average mix and ``static_capacity[kind]`` its rate of each phase's
    mix (what a static deployment sustains as the mix moves away from it: the
    rate at which its first model saturates). ``model_capacity[kind]`` is the
    static allocation's rate of each model's requests alone: its models' pools
    are separate, so each model is a queue of its own.
    """

    fleet: dict[str, int]
    phases: list[tuple[float, float]]  # (start, end)
    mixes: list[list[tuple[Any, float]]]
    average: list[tuple[Any, float]]
    capacity: dict[str, list[float]] = field(default_factory=dict)
    allocation: dict[str, Allocation] = field(default_factory=dict)
    average_capacity: dict[str, float] = field(default_factory=dict)
    static_capacity: dict[str, list[float]] = field(default_factory=dict)
    model_capacity: dict[str, dict[str, float]] = field(default_factory=dict)
    reference_latency: dict[str, float] = field(default_factory=dict)
    #: per model, seconds a request costs one replica of each GPU type
    replica_seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    def mode_capacity(self, mode: str) -> list[float]:
        """Per phase, the rate ``mode``'s physics sustains (see ``BOUNDS``)."""
        kind, static = BOUNDS[mode]
        return (self.static_capacity if static else self.capacity)[kind]

    def mode_bound(
        self, mode: str, entries: Sequence[TraceEntry], window: tuple[float, float]
    ) -> float:
        """Most requests per second ``mode``'s physics completes in ``window``
        (:func:`bound`). A mode that moves workers: one fluid queue drained at
        the best allocation's rate of each phase's mix. A static mode: one
        fluid queue per model at its pools' rate (a model's requests queue for
        its own pools, which serve them whatever the others do), summed: an
        upper bound for the static allocation."""
        kind, static = BOUNDS[mode]
        if not static:
            return bound(
                [e.t for e in entries], self.phases, self.capacity[kind], window
            )
        total = 0.0
        for model, rate in self.model_capacity[kind].items():
            times = [e.t for e in entries if e.model == model]
            if times:
                total += bound(times, [(0.0, window[1])], [rate], window)
        return total


def mix_of(
    templates: Sequence[Any], weights: Sequence[float]
) -> list[tuple[Any, float]]:
    """``(request, weight)`` pairs of a phase's templates (model defaults filled)."""
    from dflow.request import Request

    pairs = []
    total = sum(weights)
    for template, weight in zip(templates, weights):
        fields = {
            k: getattr(template, k)
            for k in ("height", "width", "num_frames", "steps", "guidance_scale")
            if getattr(template, k) is not None
        }
        request = Request(model=template.model, prompt="x", seed=0, **fields)
        pairs.append((request, weight / total))
    return pairs


def physics(scenario: Scenario, cost: Any) -> Physics:
    """Bounds and best static allocations of ``scenario``'s fleet (emulated costs)."""
    workload = scenario.workload
    phases = workload.phases
    duration = scenario.duration
    spans, mixes = [], []
    expected: dict[int, float] = defaultdict(float)
    requests: dict[int, Any] = {}
    for index, phase in enumerate(phases):
        end = phases[index + 1].start if index + 1 < len(phases) else duration
        end = min(end, duration)
        if end <= phase.start:
            continue
        spans.append((phase.start, end))
        mix = mix_of(phase.mix, [t.weight for t in phase.mix])
        mixes.append(mix)
        for (request, weight), template in zip(mix, phase.mix):
            key = hash((template.model, template.num_frames, template.height))
            requests[key] = request
            expected[key] += phase.arrivals.rate * (end - phase.start) * weight
    total = sum(expected.values()) or 1.0
    average = [(requests[k], v / total) for k, v in expected.items() if v > 0]
    result = Physics(dict(scenario.fleet), spans, mixes, average)
    for kind in ("monolithic", "disaggregated"):
        mono = kind == "monolithic"
        work = pool_work(cost, average, scenario.fleet, mono)
        rate, allocation = best_allocation(scenario.fleet, work)
        result.allocation[kind] = allocation
        result.average_capacity[kind] = rate
        result.capacity[kind] = [
            best_allocation(scenario.fleet, pool_work(cost, mix, scenario.fleet, mono))[
                0
            ]
            for mix in mixes
        ]
        result.static_capacity[kind] = [
            capacity(allocation, pool_work(cost, mix, scenario.fleet, mono))
            for mix in mixes
        ]
        result.model_capacity[kind] = {
            request.model: capacity(
                allocation, pool_work(cost, [(request, 1.0)], scenario.fleet, mono)
            )
            for request, _ in average
        }
    result.reference_latency = reference_latency(cost, average, scenario.fleet)
    from dflow.bench.bounds import request_seconds

    for request, _ in average:
        result.replica_seconds[request.model] = {
            g: request_seconds(cost, request, ("all", request.model), g, 1)
            for g in scenario.fleet
        }
    return result


def reference_latency(
    cost: Any, mix: Sequence[tuple[Any, float]], fleet: Mapping[str, int]
) -> dict[str, float]:
    """Per model, the latency of one request alone on the fleet's best deployment:
    the lesser of a monolithic replica and a stage per GPU, on the fastest type
    that holds it (the SLOs are multiples of it)."""
    from dflow.bench.bounds import request_seconds
    from dflow.spec import STAGES

    latency: dict[str, float] = {}
    for request, _ in mix:
        mono = min(
            request_seconds(cost, request, ("all", request.model), g, 1) for g in fleet
        )
        split = sum(
            min(request_seconds(cost, request, (s, request.model), g, 1) for g in fleet)
            for s in STAGES
        )
        best = min(mono, split)
        latency[request.model] = max(latency.get(request.model, 0.0), best)
    return latency


def bound(
    arrivals: Sequence[float],
    phases: Sequence[tuple[float, float]],
    capacities: Sequence[float],
    window: tuple[float, float],
) -> float:
    """Most requests per second any allocation could complete in ``window``: a
    fluid queue fed by the trace's ``arrivals`` and drained at each phase's
    best-allocation rate (:func:`~dflow.bench.bounds.fluid_departures`)."""
    start, end = window
    pieces = [(s, c) for (s, _), c in zip(phases, capacities)]
    departures = fluid_departures(arrivals, pieces, end, step=0.5)
    grid = np.arange(0.0, end + 0.5, 0.5)
    done = np.interp([start, end], grid, departures)
    return float(done[1] - done[0]) / (end - start)


def fluid_latencies(
    arrivals: Sequence[float], rate: float, service: float, horizon: float
) -> list[float]:
    """Least latency of each of ``arrivals`` (sorted) at a server of ``rate``
    requests per second taking ``service`` seconds each: the fluid queue's
    wait (:func:`~dflow.bench.bounds.fluid_departures`) plus the service. A
    lower bound: it ignores that arrivals are discrete and service varies."""
    if not len(arrivals):
        return []
    if rate <= 0:
        return [math.inf] * len(arrivals)
    step = 0.5
    end = max(horizon, arrivals[-1]) + len(arrivals) / rate + step
    departures = fluid_departures(arrivals, [(0.0, rate)], end, step=step)
    grid = np.arange(0.0, end + step, step)
    index = np.searchsorted(departures, np.arange(1, len(arrivals) + 1) - 1e-9)
    done = grid[np.minimum(index, len(grid) - 1)]
    return [max(0.0, d - a) + service for a, d in zip(arrivals, done)]


def static_monolithic_latencies(
    p: Physics,
    entries: Sequence[TraceEntry],
    window: tuple[float, float],
    stop: float = math.inf,
) -> list[tuple[str, float]]:
    """Lower bounds on the latencies of (a), the static monolithic partition:
    each model's replicas are a fluid server of their summed rate (a model's
    requests queue for its own replicas only), plus the request's time on a
    replica. ``(model, latency)`` of the requests arriving in ``window``, a
    latency capped at the request's age at ``stop`` (what a run that stops then
    can measure)."""
    allocation = p.allocation["monolithic"]
    start, end = window
    latencies: list[tuple[str, float]] = []
    for model, seconds in p.replica_seconds.items():
        replicas = allocation.get(("all", model), {})
        rate = sum(n / seconds[g] for g, n in replicas.items() if seconds[g] > 0)
        service = min((seconds[g] for g, n in replicas.items() if n), default=math.inf)
        times = sorted(e.t for e in entries if e.model == model)
        for t, latency in zip(times, fluid_latencies(times, rate, service, end)):
            if start <= t < end:
                latencies.append((model, min(latency, stop - t)))
    return latencies


# -- metrics (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One request of a run, in emulated seconds: arrival, completion (``None``:
    not completed) and whether it failed."""

    arrival: float
    model: str
    done: float | None
    failed: bool = False


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> list:
    """Percentiles (linear interpolation, numpy's default); ``None`` without values."""
    if not len(values):
        return [None for _ in qs]
    return [float(v) for v in np.percentile(np.asarray(values, float), qs)]


def metrics(
    outcomes: Sequence[Outcome],
    *,
    window: tuple[float, float],
    stop: float,
    slo: Mapping[str, float],
    bound_rps: float,
) -> dict[str, Any]:
    """Throughput, goodput, latency percentiles, SLO attainment and bound ratio
    of one mode's run (see the module docstring); ``stop`` is when the run
    stopped waiting (unfinished requests count at their age then)."""
    start, end = window
    span = end - start
    arrived = [o for o in outcomes if start <= o.arrival < end]
    completed = [o for o in outcomes if o.done is not None and start <= o.done < end]
    latencies, good = [], 0
    for o in arrived:
        if o.done is not None and not o.failed:
            latency = o.done - o.arrival
            good += latency <= slo[o.model]
        else:
            latency = stop - o.arrival
        latencies.append(latency)
    p50, p95, p99 = percentiles(latencies)
    throughput = len(completed) / span
    return {
        "throughput_rps": throughput,
        "goodput_rps": good / span,
        "p50_s": p50,
        "p95_s": p95,
        "p99_s": p99,
        "slo_attainment": good / len(arrived) if arrived else None,
        "bound_rps": bound_rps,
        "bound_ratio": throughput / bound_rps if bound_rps > 0 else None,
        "arrived": len(arrived),
        "completed": len(completed),
        "unfinished": sum(1 for o in arrived if o.done is None or o.failed),
    }


def per_model(
    outcomes: Sequence[Outcome], *, window: tuple[float, float], stop: float, slo
) -> dict[str, dict[str, Any]]:
    """:func:`metrics` of each model's requests (bound left out)."""
    models = sorted({o.model for o in outcomes})
    result = {}
    for model in models:
        mine = [o for o in outcomes if o.model == model]
        m = metrics(mine, window=window, stop=stop, slo=slo, bound_rps=0.0)
        result[model] = {
            k: m[k]
            for k in (
                "throughput_rps",
                "goodput_rps",
                "p50_s",
                "p95_s",
                "slo_attainment",
            )
        }
    return result


def busy_fraction(
    intervals: Mapping[str, Sequence[tuple[float, float]]],
    presence: Mapping[str, float],
    window: tuple[float, float],
) -> float | None:
    """Busy time of workers (their task intervals merged, clipped to ``window``)
    over ``presence``, the seconds each spent on the stage in the window."""
    total = sum(presence.values())
    if total <= 0:
        return None
    start, end = window
    busy = 0.0
    for spans in intervals.values():
        clipped = sorted(
            (max(a, start), min(b, end)) for a, b in spans if b > start and a < end
        )
        merged: list[list[float]] = []
        for a, b in clipped:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        busy += sum(b - a for a, b in merged)
    return min(1.0, busy / total)


# -- on the scheduler -----------------------------------------------------------------


class Recorder(SchedulerPlugin):
    """Records what the metrics need, cheaply: each stage task's compute span
    and worker, each request's completion, and pool sizes every ``interval``."""

    name = "dflow-bench-recorder"

    def __init__(self, interval: float):
        self.interval = interval
        self.scheduler: Any = None
        #: (stage, model, worker, start, stop) of finished stage tasks
        self.tasks: list[tuple[str, str, str, float, float]] = []
        #: final key -> (time, "memory" | "erred")
        self.finals: dict[str, tuple[float, str]] = {}
        #: (time, {pool label: workers ready or loading}, {stage: queued tasks})
        self.samples: list[tuple[float, dict[str, int], dict[str, int]]] = []
        #: pools that have finished a task
        self.served: set[tuple[str, str]] = set()
        #: (time, utilization per pool, reason) of the elastic controller's
        #: plans, one per plan (sampled: a plan made between samples is kept)
        self.plans: list[tuple[float, dict[str, float], str]] = []
        self._pc: Any = None

    async def start(self, scheduler: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self._pc = PeriodicCallback(self.sample, self.interval * 1000)
        self._pc.start()

    async def close(self) -> None:
        if self._pc is not None:
            self._pc.stop()

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        if start != "processing" or finish not in ("memory", "erred"):
            return
        ts = self.scheduler.tasks.get(key)
        info = (ts.annotations or {}).get("dflow") if ts is not None else None
        if not info:
            return
        now = time.time()
        if finish == "memory":
            self.served.add((info["stage"], info["model"]))
            for startstop in kwargs.get("startstops", ()):
                if startstop["action"] == "compute":
                    self.tasks.append(
                        (
                            info["stage"],
                            info["model"],
                            kwargs.get("worker", ""),
                            startstop["start"],
                            startstop["stop"],
                        )
                    )
        if str(key).startswith(("decode-", "generate-")):
            self.finals[str(key)] = (now, finish)

    def sample(self) -> None:
        extension = self.scheduler.extensions.get("dflow")
        if extension is None:
            return
        pools: dict[str, int] = defaultdict(int)
        for record in extension.workers.values():
            if record.state in ("ready", "loading", "draining") and record.pool:
                pools["/".join(record.pool)] += 1
        queue: dict[str, int] = defaultdict(int)
        for ts in self.scheduler.unrunnable:
            info = (ts.annotations or {}).get("dflow")
            if info:
                queue[info["stage"]] += 1
        for ws in self.scheduler.workers.values():
            for ts in ws.processing:
                info = (ts.annotations or {}).get("dflow")
                if info:
                    queue[info["stage"]] += 1
        self.samples.append((time.time(), dict(pools), dict(queue)))
        controller = self.scheduler.plugins.get("dflow-elastic")
        last = getattr(controller, "last_plan", None) or {}
        if last.get("time") and (not self.plans or self.plans[-1][0] != last["time"]):
            self.plans.append(
                (last["time"], dict(last.get("utilization", {})), last["reason"])
            )


async def _install(
    scheduler: Any,
    predictor: Any,
    recorder: Recorder,
    autoscaler: Any,
) -> None:
    """dflow (:func:`~dflow.plugins.install.install`, with the fleet's
    predictor), the recorder, and the replica autoscaler if any."""
    from dflow.plugins.install import install

    await install(scheduler, predictor=predictor)
    for plugin in [recorder] if autoscaler is None else [recorder, autoscaler]:
        scheduler.add_plugin(plugin)
        await plugin.start(scheduler)


# -- one mode -----------------------------------------------------------------------


def fleet_workers(
    allocation: Allocation, monolithic: bool
) -> list[tuple[str, str, str]]:
    """``(stage, model, gpu_type)`` of each worker of an allocation."""
    workers = []
    for (stage, model), per_type in sorted(allocation.items()):
        for gpu, count in sorted(per_type.items()):
            workers += [(stage, model, gpu)] * count
    return workers


def fleet_predictor(cost: Any, gpu_types: Sequence[str], scale: float) -> Any:
    """A predictor that prices every pool on every GPU type of the fleet as the
    emulation charges it, in wall seconds at ``scale`` (as the controller
    observes them): what a deployment profiled on its own GPU types knows.

    Its online correction is off (``ewma_alpha=0``): it would learn Dask's
    per-task CPU time divided by the time scale (25x at 0.04) and inflate the
    sub-second encoder and VAE calls many times over; the controller trusts the
    profile, which is what the emulation charges. (The predictor is built
    before the run's config is set, so the alpha is passed, not configured.)"""
    from dflow.predictor import Predictor

    rows = []
    for gpu in sorted(set(gpu_types)):
        for row in cost.rows_for(gpu):
            rows.append({**row, "seconds": row["seconds"] * scale})
    return Predictor(rows, ewma_alpha=0.0)


def run_config(scenario: Scenario, mode: str, scale: float) -> dict[str, Any]:
    """Dask config of one mode's run: the emulated backend and every controller
    period in emulated seconds times the scale."""
    s = scenario.controller
    return {
        "dflow.runtime.backend": "emulated",
        "dflow.emulation.time-scale": scale,
        # the elastic controller starts with the arrivals (run_mode)
        "dflow.elastic.enabled": False,
        "dflow.elastic.interval": s["interval"] * scale,
        "dflow.elastic.default-switch": s["default-switch"] * scale,
        "dflow.planner.horizon": s["horizon"] * scale,
        "dflow.planner.cooldown": s["cooldown"] * scale,
        "dflow.planner.hysteresis": s["hysteresis"],
        "dflow.telemetry.window": s["window"] * scale,
        "dflow.telemetry.max-records": 2000,
        # the online correction would learn Dask's per-task CPU time divided by
        # the time scale (25x at 0.04), inflating the sub-second encoder and
        # VAE: the controller trusts the profile, which the emulation charges
        "dflow.predictor.ewma-alpha": 0.0,
        "dflow.predictor.refit-interval": 3600,
        "dflow.client.model-timeout": "120s",
        "dflow.scheduler.unserved-timeout": "3600s",
    }


@dataclass
class ModeRun:
    """What one mode's run recorded, in wall time (converted by :func:`summarize`)."""

    mode: str
    start: float
    scale: float
    stop: float
    entries: list[TraceEntry]
    finals: dict[int, tuple[float, str] | None]
    tasks: list[tuple[str, str, str, float, float]]
    samples: list[tuple[float, dict[str, int], dict[str, int]]]
    decisions: list[dict[str, Any]]
    workers: dict[str, tuple[str, str | None]]
    #: emulated second the elastic controller started at (None: never)
    controller_start: float | None = None
    #: wall seconds of the elastic controller's planning steps
    planning: list[float] = field(default_factory=list)
    #: (wall time, utilization per pool, reason) of sampled plans
    plans: list[tuple[float, dict[str, float], str]] = field(default_factory=list)


def _wait_ready(cluster: Any, count: int, timeout: float) -> None:
    extension = cluster.scheduler.extensions["dflow"]
    deadline = time.monotonic() + timeout
    while True:
        states = [r.state for r in list(extension.workers.values())]
        if states.count("ready") >= count:
            return
        failed = [r for r in list(extension.workers.values()) if r.state == "failed"]
        if failed:
            raise RuntimeError(f"worker failed to load: {failed[0].error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{states.count('ready')} of {count} workers ready")
        time.sleep(0.05)


@contextlib.contextmanager
def parallel_loads() -> Iterator[None]:
    """Let the in-process workers' emulated loads overlap.

    ``dflow.runtime`` builds one model at a time per process (diffusers' lazy
    imports are not thread-safe). On GPUs every worker is its own process, so
    loads overlap; an emulated adapter builds nothing, so its loads (sleeps)
    may overlap here too, or every move of a fleet in one process would wait
    for the others' loads.
    """
    from dflow import runtime

    saved = runtime._loading
    runtime._loading = contextlib.nullcontext()  # type: ignore[assignment]
    try:
        yield
    finally:
        runtime._loading = saved


def run_mode(
    scenario: Scenario,
    mode: str,
    entries: Sequence[TraceEntry],
    allocation: Allocation,
    cost: Any,
    *,
    scale: float,
    duration: float,
    drain: float,
    progress: Callable[[float], None] | None = None,
) -> ModeRun:
    """Serve ``entries`` on a fresh in-process fleet laid out as ``allocation``.

    Arrivals are paced over ``duration`` emulated seconds; the run then waits up
    to ``drain`` emulated seconds for requests in flight and cancels the rest.
    ``progress`` hears the emulated seconds elapsed.
    """
    from dflow.bench.baselines import ReplicaAutoscaler
    from dflow.cluster import StageCluster

    monolithic = mode in MONOLITHIC
    workers = fleet_workers(allocation, monolithic)
    predictor = fleet_predictor(cost, list(scenario.fleet), scale)
    recorder = Recorder(interval=max(0.05, scenario.sample_every * scale))
    autoscaler = (
        ReplicaAutoscaler(scale=scale, **scenario.autoscaler)
        if mode == "monolithic_autoscaled"
        else None
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set(run_config(scenario, mode, scale)))
        stack.enter_context(parallel_loads())
        cluster = stack.enter_context(
            StageCluster(
                workers[0][1],
                fleet=workers,
                processes=False,
                protocol="inproc",
                host=None,
                dashboard_address=None,
                worker_options={"memory_limit": 0},
                scheduler_options={"preload": [], "dashboard": False},
            )
        )
        cluster.sync(_install, cluster.scheduler, predictor, recorder, autoscaler)
        _wait_ready(cluster, len(workers), timeout=300)
        client = stack.enter_context(Client(cluster))
        mode_name = "monolithic" if monolithic else "disaggregated"
        futures: dict[int, Any] = {}
        keys: dict[Any, int] = {}
        enabled: float | None = None
        lock = threading.Lock()
        ordered = sorted(range(len(entries)), key=lambda i: entries[i].t)
        controller = cluster.scheduler.plugins["dflow-elastic"]
        start = time.time()
        position = 0
        while position < len(ordered):
            now = time.time()
            if mode == "elastic" and not controller.enabled:
                # from the first arrival: the controller prices a pool that has
                # not finished a task yet from the tasks it owes (dcb7b67)
                controller.enabled = True
                enabled = (now - start) / scale
            due = []
            while position < len(ordered) and (
                start + entries[ordered[position]].t * scale <= now
            ):
                due.append(ordered[position])
                position += 1
            if due:
                submitted = dflow.client.map(
                    client, [entries[i].request() for i in due], mode=mode_name
                )
                with lock:
                    for i, future in zip(due, submitted):
                        futures[i] = future
                        keys[future.key] = i
            if progress is not None:
                progress((time.time() - start) / scale)
            if position < len(ordered):
                wait = start + entries[ordered[position]].t * scale - time.time()
                time.sleep(min(max(wait, 0.0), 0.05))
        # the arrivals are over: wait for what is in flight, up to the drain
        end = start + duration * scale
        while time.time() < end:
            time.sleep(0.05)
            if progress is not None:
                progress((time.time() - start) / scale)
        deadline = end + drain * scale
        while time.time() < deadline:
            if all(f.done() for f in futures.values()):
                break
            time.sleep(0.05)
        stop = time.time()
        client.cancel([f for f in futures.values() if not f.done()], force=True)
        finals: dict[int, tuple[float, str] | None] = dict.fromkeys(range(len(entries)))
        for key, value in list(recorder.finals.items()):
            if key in keys:
                finals[keys[key]] = value
        extension = cluster.scheduler.extensions["dflow"]
        decisions = [
            {**d, "time": (d["time"] - start) / scale}
            for d in extension.recent_decisions()
        ]
        if autoscaler is not None:
            decisions += [
                {**asdict(d), "time": (d.time - start) / scale}
                for d in autoscaler.decisions
            ]
        roles = {
            r.name: (r.gpu_type, "/".join(r.pool) if r.pool else None)
            for r in extension.workers.values()
        }
        names = {r.address: r.name for r in extension.workers.values()}
        tasks = [(s, m, names.get(w, w), a, b) for s, m, w, a, b in recorder.tasks]
        planning = controller.planning_seconds()
        futures.clear()
    return ModeRun(
        mode=mode,
        start=start,
        scale=scale,
        stop=stop,
        entries=list(entries),
        finals=finals,
        tasks=tasks,
        samples=list(recorder.samples),
        decisions=decisions,
        workers=roles,
        controller_start=enabled,
        planning=planning,
        plans=list(recorder.plans),
    )


def outcomes(run: ModeRun) -> list[Outcome]:
    """The run's requests in emulated seconds."""
    result = []
    for i, entry in enumerate(run.entries):
        final = run.finals.get(i)
        done = None if final is None else (final[0] - run.start) / run.scale
        failed = final is not None and final[1] != "memory"
        result.append(Outcome(entry.t, entry.model, done, failed))
    return result


def utilization(run: ModeRun, window: tuple[float, float]) -> dict[str, float | None]:
    """Per stage: busy time of its workers over their time on it, in the window."""
    scale, start = run.scale, run.start
    intervals: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for stage, _, worker, a, b in run.tasks:
        intervals[stage][worker].append(((a - start) / scale, (b - start) / scale))
    presence: dict[str, float] = defaultdict(float)
    times = [(t - start) / scale for t, _, _ in run.samples]
    lo, hi = window
    for (t, pools, _), following in zip(run.samples, [*times[1:], None]):
        t = (t - start) / scale
        if following is None or following <= lo or t >= hi:
            continue
        span = min(following, hi) - max(t, lo)
        for label, count in pools.items():
            presence[label.split("/")[0]] += count * span
    stages = sorted(set(intervals) | set(presence))
    return {
        s: busy_fraction(intervals.get(s, {}), {s: presence.get(s, 0.0)}, window)
        for s in stages
    }


def summarize(
    run: ModeRun, physics_: Physics, scenario: Scenario, window: tuple[float, float]
) -> dict[str, Any]:
    """The mode's entry of ``results.json``."""
    kind = "monolithic" if run.mode in MONOLITHIC else "disaggregated"
    bound_rps = physics_.mode_bound(run.mode, run.entries, window)
    slo = {m: scenario.slo_factor * s for m, s in physics_.reference_latency.items()}
    result = metrics(
        outcomes(run),
        window=window,
        stop=(run.stop - run.start) / run.scale,
        slo=slo,
        bound_rps=bound_rps,
    )
    result["utilization"] = utilization(run, window)
    result["models"] = per_model(
        outcomes(run), window=window, stop=(run.stop - run.start) / run.scale, slo=slo
    )
    result["decisions"] = len(run.decisions)
    result["decision_log"] = run.decisions[:100]
    if run.mode == "elastic":
        result["controller_start_s"] = run.controller_start
        # wall milliseconds: what the scale cannot shrink (see the module doc)
        result["planning_ms"] = {
            k: None if v is None else v * 1000
            for k, v in zip(
                ("p50", "p95", "max"), percentiles(run.planning, (50, 95, 100))
            )
        }
        result["plan_log"] = [
            {
                "time": (t - run.start) / run.scale,
                "utilization": {k: round(u, 3) for k, u in use.items()},
                "reason": reason,
            }
            for t, use, reason in run.plans
        ]
    result["physics"] = kind
    result["gpu_use"] = gpu_use(run, window)
    return result


def gpu_use(run: ModeRun, window: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Emulated busy seconds per GPU type and stage in the window: where each
    type's time went."""
    types = {name: gpu for name, (gpu, _) in run.workers.items()}
    use: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    lo, hi = window
    for stage, _, worker, a, b in run.tasks:
        a, b = (a - run.start) / run.scale, (b - run.start) / run.scale
        span = min(b, hi) - max(a, lo)
        if span > 0:
            use[types.get(worker, "?")][stage] += span
    return {g: dict(v) for g, v in use.items()}


# -- a scenario -----------------------------------------------------------------------


def run_scenario(
    scenario: Scenario,
    out: Path,
    *,
    quick: bool = False,
    modes: Sequence[str] = MODES,
    progress: Callable[[str, float, float], Any] | None = None,
) -> dict[str, Any]:
    """Run every mode of ``scenario`` on the same trace; write ``out/results.json``
    and the plots; return the results."""
    from dflow.emulation import cost_model

    if quick:
        scenario = scenario.quick_variant()
    out.mkdir(parents=True, exist_ok=True)
    scale = scenario.time_scale
    with dask.config.set({"dflow.runtime.backend": "emulated"}):
        cost = cost_model()
    physics_ = physics(scenario, cost)
    entries = generate(scenario.workload, scenario.duration)
    window = (scenario.warmup, scenario.duration)
    results: dict[str, Any] = {
        "scenario": scenario.name,
        "title": scenario.title,
        "label": LABEL,
        "quick": quick,
        "time_scale": scale,
        "duration_s": scenario.duration,
        "window_s": list(window),
        "requests": len(entries),
        "fleet": scenario.fleet,
        "slo_s": {
            m: scenario.slo_factor * s for m, s in physics_.reference_latency.items()
        },
        "physics": physics_summary(
            physics_,
            entries,
            window,
            stop=scenario.duration + scenario.drain,
            slo={
                m: scenario.slo_factor * s
                for m, s in physics_.reference_latency.items()
            },
        ),
        "modes": {},
    }
    runs = {}
    for mode in modes:
        kind = "monolithic" if mode in MONOLITHIC else "disaggregated"
        allocation = physics_.allocation[kind]

        def report(elapsed: float, mode: str = mode) -> None:
            if progress is not None:
                progress(mode, elapsed, scenario.duration)

        started = time.monotonic()
        run = run_mode(
            scenario,
            mode,
            entries,
            allocation,
            cost,
            scale=scale,
            duration=scenario.duration,
            drain=scenario.drain,
            progress=report,
        )
        runs[mode] = run
        summary = summarize(run, physics_, scenario, window)
        summary["wall_s"] = time.monotonic() - started
        summary["allocation"] = {"/".join(p): v for p, v in sorted(allocation.items())}
        results["modes"][mode] = summary
        write_results(out / "results.json", results)
    results["ratios"] = ratios(results)
    write_results(out / "results.json", results)
    from dflow.bench.plots import plot_load, plot_pools

    plot_load(runs, out / "load.png", title=f"{scenario.name}: {scenario.title}")
    plot_pools(runs, out / "pools.png", title=f"{scenario.name}: {scenario.title}")
    return results


def physics_summary(
    p: Physics,
    entries: Sequence[TraceEntry],
    window: tuple[float, float],
    stop: float = math.inf,
    slo: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    arrivals = [e.t for e in entries]
    summary: dict[str, Any] = {"phases": []}
    for index, ((start, end), mix) in enumerate(zip(p.phases, p.mixes)):
        offered = sum(1 for t in arrivals if start <= t < end) / (end - start)
        summary["phases"].append(
            {
                "start_s": start,
                "end_s": end,
                "mix": {r.model: round(w, 4) for r, w in mix},
                "offered_rps": offered,
                "bound_monolithic_rps": p.capacity["monolithic"][index],
                "bound_disaggregated_rps": p.capacity["disaggregated"][index],
                # each mode's physics for this phase's mix (static modes:
                # the rate at which their first model saturates)
                "mix_rps": {m: p.mode_capacity(m)[index] for m in BOUNDS},
            }
        )
    for kind in ("monolithic", "disaggregated"):
        summary[f"bound_{kind}_rps"] = bound(
            arrivals, p.phases, p.capacity[kind], window
        )
        summary[f"best_static_{kind}"] = {
            "/".join(k): v for k, v in sorted(p.allocation[kind].items())
        }
        summary[f"best_static_{kind}_rps"] = p.average_capacity[kind]
    summary["reference_latency_s"] = p.reference_latency
    mono, dis = (summary[f"bound_{k}_rps"] for k in ("monolithic", "disaggregated"))
    summary["physics_ratio"] = dis / mono if mono else None
    # each mode's bound over the run at the offered load, and what elastic
    # could reach against each baseline at most
    modes = {m: p.mode_bound(m, entries, window) for m in BOUNDS}
    summary["bound_mode_rps"] = modes
    summary["static_model_rps"] = {
        m: p.model_capacity[BOUNDS[m][0]] for m in BOUNDS if BOUNDS[m][1]
    }
    summary["possible"] = {
        f"elastic_over_{m}_throughput": modes["elastic"] / modes[m]
        if modes[m]
        else None
        for m in ("monolithic", "monolithic_autoscaled", "static")
    }
    # the rate multiple each mode saturates at, relative to the offered rates
    summary["saturation_multiple"] = {
        m: min(
            (
                c / (sum(1 for t in arrivals if a <= t < b) / (b - a))
                for (a, b), c in zip(p.phases, p.mode_capacity(m))
                if any(a <= t < b for t in arrivals)
            ),
            default=None,
        )
        for m in BOUNDS
    }
    # p95: (a)'s least p95 (fluid queue per model) against the p95 of the
    # requests' latency alone, which no mode can beat
    alone = [
        p.reference_latency[e.model] for e in entries if window[0] <= e.t < window[1]
    ]
    floor = percentiles(alone, (95,))[0]
    fluid = static_monolithic_latencies(p, entries, window, stop)
    least = percentiles([latency for _, latency in fluid], (95,))[0]
    summary["p95_floor_s"] = floor
    summary["monolithic_p95_least_s"] = least
    summary["possible"]["monolithic_over_elastic_p95"] = (
        least / floor if least is not None and floor else None
    )
    if slo:
        # goodput: (a) at most the fluid queue's requests within their SLO; a
        # mode at most every request arriving in the window
        span = window[1] - window[0]
        most = sum(latency <= slo[m] for m, latency in fluid) / span
        summary["monolithic_goodput_most_rps"] = most
        summary["goodput_most_rps"] = len(alone) / span
        summary["possible"]["elastic_over_monolithic_goodput"] = (
            len(alone) / span / most if most else None
        )
    return summary


def ratios(results: Mapping[str, Any]) -> dict[str, Any]:
    """The comparisons the scenarios' goals are stated in."""
    modes = results["modes"]

    def ratio(a: str, b: str, key: str, invert: bool = False) -> float | None:
        if a not in modes or b not in modes:
            return None
        x, y = modes[a].get(key), modes[b].get(key)
        if not x or not y:
            return None
        return y / x if invert else x / y

    best = None
    if "monolithic_autoscaled" in modes and "static" in modes:
        best = max(
            ("monolithic_autoscaled", "static"), key=lambda m: modes[m]["goodput_rps"]
        )
    return {
        "elastic_over_monolithic_throughput": ratio(
            "elastic", "monolithic", "throughput_rps"
        ),
        "monolithic_over_elastic_p95": ratio(
            "elastic", "monolithic", "p95_s", invert=True
        ),
        "elastic_over_best_b_c_goodput": ratio("elastic", best, "goodput_rps")
        if best
        else None,
        "best_of_b_c": best,
        "physics_ratio": results["physics"]["physics_ratio"],
    }


def _json(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def finite(value: Any) -> Any:
    """``value`` with infinities and NaNs as ``None`` (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def revision() -> str:
    """The commit of the dflow imported, ``+dirty`` if its tracked files differ:
    what a benchmark measured."""
    here = Path(dflow.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True
        ).stdout.strip()

    parts = (".", "../plugins", "../configs", "../dashboards")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *parts)
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{commit}{'+dirty' if dirty else ''} ({here})"


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(finite(dict(results)), indent=2, default=_json))


def table(results: Mapping[str, Any]) -> str:
    """The modes of ``results`` as a markdown table."""

    def f(value: Any, digits: int = 3) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = [
        "| mode | throughput rps | goodput rps | p50 s | p95 s | p99 s | SLO att. "
        "| bound rps | bound ratio | utilization | decisions |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in results["modes"].items():
        use = ", ".join(
            f"{s} {u:.2f}" for s, u in m["utilization"].items() if u is not None
        )
        lines.append(
            f"| {mode} | {f(m['throughput_rps'])} | {f(m['goodput_rps'])} | "
            f"{f(m['p50_s'])} | {f(m['p95_s'])} | {f(m['p99_s'])} | "
            f"{f(m['slo_attainment'])} | {f(m['bound_rps'])} | "
            f"{f(m['bound_ratio'])} | {use} | {m['decisions']} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep distributed's and dflow's INFO logs (a line per switch) out of a run."""
    loggers = [logging.getLogger(n) for n in ("distributed", "dflow")]
    levels = [log.level for log in loggers]
    for log in loggers:
        # a run cancels the requests left at its end: workers warn about each
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


__all__ = [
    "LABEL",
    "MODES",
    "Outcome",
    "Physics",
    "bound",
    "capacity",
    "metrics",
    "percentiles",
    "physics",
    "run_scenario",
]
