"""What a benchmark run measured (pure): the records of one mode's run and the
metrics of its requests over a measurement window.

All figures are in emulated seconds (wall seconds over the time scale);
definitions of throughput, goodput, latency and utilization are in
``benchmarks/results-bench.md`` ("Metrics").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dflow.bench.workload import TraceEntry


@dataclass(frozen=True)
class Outcome:
    """One request of a run, in emulated seconds: arrival, completion (``None``:
    not completed) and whether it failed."""

    arrival: float
    model: str
    done: float | None
    failed: bool = False
    phase: str = ""
    #: its latency objective, seconds (``None``: its model's)
    slo: float | None = None


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
    of one mode's run over ``window``: throughput counts the requests completed
    in it, the others the requests that arrived in it. ``stop`` is when the run
    stopped waiting (unfinished requests count at their age then)."""
    start, end = window
    span = end - start
    arrived = [o for o in outcomes if start <= o.arrival < end]
    completed = [o for o in outcomes if o.done is not None and start <= o.done < end]
    latencies, good = [], 0
    for o in arrived:
        if o.done is not None and not o.failed:
            latency = o.done - o.arrival
            good += latency <= (slo[o.model] if o.slo is None else o.slo)
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


def per_phase(
    outcomes: Sequence[Outcome],
    *,
    spans: Mapping[str, tuple[float, float]],
    window: tuple[float, float],
    stop: float,
    slo,
) -> dict[str, dict[str, Any]]:
    """:func:`metrics` of the requests of each phase of the workload, over the
    phase's span within ``window`` (bound left out)."""
    result = {}
    for phase, (start, end) in spans.items():
        span = (max(start, window[0]), min(end, window[1]))
        if span[1] <= span[0]:
            continue
        mine = [o for o in outcomes if o.phase == phase]
        m = metrics(mine, window=span, stop=stop, slo=slo, bound_rps=0.0)
        result[phase] = {
            k: m[k] for k in ("throughput_rps", "p50_s", "p95_s", "slo_attainment")
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


@dataclass
class ModeRun:
    """What one mode's run recorded, in wall seconds (the functions below convert
    to emulated seconds)."""

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
    #: the batch each finished denoising task reported (telemetry's latest)
    dit_batches: list[float] = field(default_factory=list)
    #: (wall time, action, worker name, pool) of workers' pool changes
    #: (``worker-draining``, ``worker-loading``, ``worker-ready``, ...)
    events: list[tuple[float, str, str, str | None]] = field(default_factory=list)
    #: CPU seconds of the controller's steps (its scheduler thread)
    controller_cpu: list[float] = field(default_factory=list)
    #: each request's latency objective, emulated seconds (by entry)
    slos: list[float] = field(default_factory=list)


def outcomes(run: ModeRun) -> list[Outcome]:
    """The run's requests in emulated seconds."""
    result = []
    for i, entry in enumerate(run.entries):
        final = run.finals.get(i)
        done = None if final is None else (final[0] - run.start) / run.scale
        failed = final is not None and final[1] != "memory"
        slo = run.slos[i] if i < len(run.slos) else None
        result.append(
            Outcome(entry.t, entry.model, done, failed, phase=entry.phase, slo=slo)
        )
    return result


def rebalancing(run: ModeRun) -> dict[str, Any]:
    """What the run's moves cost, in emulated seconds: per move the drain
    (the worker finishes its running task and takes no new one: its GPU is
    busy, the target waits), the load (unload, load and warm the new pool: the
    GPU serves nothing, so ``lost_gpu_s`` is the loads' sum) and the
    rebalancing latency (the decision to the moved worker serving its new
    pool); their totals and percentiles. Decisions' pools are
    ``"stage:model"``. A move whose worker never served its target within the
    run counts in ``unfinished``."""
    scale, start = run.scale, run.start
    by_worker: dict[str, list[tuple[float, str, str | None]]] = defaultdict(list)
    for t, action, worker, pool in run.events:
        by_worker[worker].append(((t - start) / scale, action, pool))
    drains, loads, latencies, unfinished = [], [], [], 0
    for decision in run.decisions:
        pool, worker, when = decision["target"], decision["worker"], decision["time"]
        drained = loaded = ready = None
        for t, action, at in by_worker.get(worker, ()):
            if t < when:
                continue
            if action == "worker-draining" and drained is None:
                drained = t
            elif action == "worker-loading" and at == pool and loaded is None:
                loaded = t
            elif action == "worker-ready" and at == pool:
                ready = t
                break
        if ready is None or loaded is None:
            unfinished += 1
            continue
        drains.append(max(0.0, loaded - (drained if drained is not None else when)))
        loads.append(ready - loaded)
        latencies.append(ready - when)
    p50, p95, top = percentiles(latencies, (50, 95, 100))
    return {
        "moves": len(run.decisions),
        "unfinished": unfinished,
        "drain_s": float(sum(drains)),
        "load_s": float(sum(loads)),
        "lost_gpu_s": float(sum(loads)),
        "latency_p50_s": p50,
        "latency_p95_s": p95,
        "latency_max_s": top,
    }


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
