"""A scenario end to end: every mode on the same trace, then ``results.json``,
the markdown table and the plots."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import multiprocessing
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import dask.config

from dflow.bench import CONTROLLED, LABEL
from dflow.bench.metrics import (
    ModeRun,
    gpu_use,
    metrics,
    outcomes,
    per_model,
    per_phase,
    percentiles,
    rebalancing,
    utilization,
)
from dflow.bench.physics import (
    BOUNDS,
    KINDS,
    SHAPE,
    Physics,
    bound,
    latency_alone,
    physics,
    static_monolithic_latencies,
    template_request,
)
from dflow.bench.plots import plot_load, plot_pools
from dflow.bench.run import run_mode
from dflow.bench.workload import TraceEntry, generate

if TYPE_CHECKING:
    from dflow.bench.scenarios import Scenario

#: SLO attainment a rate must keep to count as within a mode's capacity (the
#: seed's metric: the largest rate at >= 90% attainment)
CAPACITY_ATTAINMENT = 0.9
#: The modes elastic's goodput goal is stated against: (b), (c) and
#: DisagFusion's policy
RIVALS = ("monolithic_autoscaled", "static", "disagfusion")


def summarize(
    run: ModeRun, physics_: Physics, scenario: Scenario, window: tuple[float, float]
) -> dict[str, Any]:
    """The mode's entry of ``results.json``."""
    kind = BOUNDS[run.mode][0]
    bound_rps = physics_.mode_bound(run.mode, run.entries, window)
    slo = model_slos(scenario, physics_)
    stop = (run.stop - run.start) / run.scale
    result = metrics(
        outcomes(run), window=window, stop=stop, slo=slo, bound_rps=bound_rps
    )
    result["utilization"] = utilization(run, window)
    result["models"] = per_model(outcomes(run), window=window, stop=stop, slo=slo)
    phases = scenario.workload.phases
    names = [p.name for p in phases]
    if len(phases) > 1 and len(set(names)) == len(names):
        ends = [p.start for p in phases[1:]] + [scenario.duration]
        result["phases"] = per_phase(
            outcomes(run),
            spans={p.name: (p.start, end) for p, end in zip(phases, ends)},
            window=window,
            stop=stop,
            slo=slo,
        )
    if run.dit_batches:
        result["dit_batch_mean"] = float(np.mean(run.dit_batches))
    result["decisions"] = len(run.decisions)
    result["rebalancing"] = rebalancing(run)
    result["decision_log"] = run.decisions[:100]
    if run.controller_cpu:
        # milliseconds of the scheduler thread's CPU per control step: what
        # the time scale cannot shrink
        result["controller_cpu_ms"] = {
            k: None if v is None else v * 1000
            for k, v in zip(
                ("p50", "p95", "max"), percentiles(run.controller_cpu, (50, 95, 100))
            )
        }
    if run.mode in CONTROLLED:
        result["controller_start_s"] = run.controller_start
        # wall milliseconds (see the module doc)
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


def model_slos(scenario: Scenario, physics_: Physics) -> dict[str, float]:
    """Per model, the SLO of its requests that have no SLO of their own: the
    scenario's ``slo``, else its factor times the model's latency alone."""
    return {
        m: scenario.slo.get(m, scenario.slo_factor * s)
        for m, s in physics_.reference_latency.items()
    }


def request_slos(
    scenario: Scenario, cost: Any, entries: Sequence[TraceEntry]
) -> list[float]:
    """Each request's SLO, emulated seconds: its template's ``slo``, else the
    scenario's for its model, else the scenario's factor times its latency
    alone on the fleet's best deployment (per shape: a 512px request's SLO is
    that of 512px)."""
    own: dict[tuple, float] = {}
    for phase in scenario.workload.phases:
        for template in phase.mix:
            if template.slo is not None:
                own.setdefault(_shape(template), template.slo)
    cache: dict[tuple, float] = {}
    result = []
    for entry in entries:
        key = _shape(entry)
        if key not in cache:
            if key in own:
                cache[key] = own[key]
            elif entry.model in scenario.slo:
                cache[key] = scenario.slo[entry.model]
            else:
                request = template_request(entry)
                alone = latency_alone(cost, request, scenario.fleet)
                cache[key] = scenario.slo_factor * alone
        result.append(cache[key])
    return result


def _shape(template: Any) -> tuple:
    return (template.model, *(getattr(template, k) for k in SHAPE))


def run_scenario(
    scenario: Scenario,
    out: Path,
    *,
    quick: bool = False,
    modes: Sequence[str] | None = None,
    repeats: int | None = None,
    capacity: bool = False,
    capacity_steps: int = 5,
    progress: Callable[[str, float, float], Any] | None = None,
    dit_batch: int = 1,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Run every mode of ``scenario`` on the same trace, ``repeats`` times
    (seeds ``seed``, ``seed + 1``, ...); with ``capacity``, also find each
    mode's capacity (:func:`capacity_sweep`). Writes ``out/results.json``
    (every run, and per mode the median of the repeats with their min and
    max) and the first repeat's plots; returns the results. ``dit_batch`` is
    every worker's ``dflow.runtime.max-dit-batch`` (1: no DiT batching),
    which the physical bounds assume too. Every fleet runs in a process of
    its own, ``jobs`` (default the scenario's) at once
    (:func:`run_in_processes`)."""
    if quick:
        scenario = scenario.quick_variant()
    runs = Runs(
        scenario,
        tuple(modes or scenario.modes),
        repeats or scenario.repeats,
        capacity,
        capacity_steps,
        dit_batch,
        out,
        progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    results = _header(scenario, quick, dit_batch, runs.repeats)
    jobs = jobs or scenario.jobs
    with dask.config.set({"dflow.runtime.max-dit-batch": dit_batch}):
        return run_in_processes(runs, results, jobs)


@dataclass(frozen=True)
class Runs:
    """What one :func:`run_scenario` call runs: the scenario as run (its quick
    variant with ``quick``), its modes and repeats, and what every run shares."""

    scenario: Scenario
    modes: tuple[str, ...]
    repeats: int
    capacity: bool
    capacity_steps: int
    dit_batch: int
    out: Path
    progress: Callable[[str, float, float], Any] | None


def emulated_cost() -> Any:
    """The emulated backend's cost model, as this process's config has it."""
    from dflow.emulation import cost_model

    with dask.config.set({"dflow.runtime.backend": "emulated"}):
        return cost_model()


def _header(
    scenario: Scenario, quick: bool, dit_batch: int, repeats: int
) -> dict[str, Any]:
    """``results.json``'s description of the runs."""
    return {
        "scenario": scenario.name,
        "title": scenario.title,
        "source": scenario.source,
        "label": LABEL,
        "quick": quick,
        "dit_batch": dit_batch,
        "time_scale": scenario.time_scale,
        "duration_s": scenario.duration,
        "window_s": [scenario.warmup, scenario.duration],
        "fleet": scenario.fleet,
        "repeats": repeats,
        "runs": [],
    }


#: A mode's run on one trace: what it recorded, its wall seconds and the
#: machine's load averages at its end
Served = tuple[ModeRun, float, list[float]]


#: A scenario's physics, trace and each request's SLO
Trace = tuple[Physics, list[TraceEntry], list[float]]


def trace(scenario: Scenario, cost: Any) -> Trace:
    """``scenario``'s physics, the trace of its seed and each request's SLO."""
    entries = generate(scenario.workload, scenario.duration)
    return physics(scenario, cost), entries, request_slos(scenario, cost, entries)


def serve(
    scenario: Scenario,
    mode: str,
    cost: Any,
    progress: Callable[[float], Any] | None = None,
    traced: Trace | None = None,
) -> Served:
    """``mode`` serving ``scenario``'s trace on a fresh fleet laid out as its
    physics' best static allocation of the mode's kind (``traced``:
    :func:`trace`, if made already)."""
    physics_, entries, slos = traced or trace(scenario, cost)
    started = time.monotonic()
    run = run_mode(
        scenario,
        mode,
        entries,
        physics_.allocation[BOUNDS[mode][0]],
        cost,
        scale=scenario.time_scale,
        duration=scenario.duration,
        drain=scenario.drain,
        progress=progress,
        slos=slos,
    )
    return run, time.monotonic() - started, _load_average()


def run_once(
    scenario: Scenario,
    modes: Sequence[str],
    cost: Any,
    plots: Path | None = None,
    progress: Callable[[str, float, float], Any] | None = None,
    served: Mapping[str, Served] | None = None,
) -> dict[str, Any]:
    """Every mode of ``modes`` on one trace of ``scenario``: its entry of
    ``results.json``'s ``runs``; the plots go to ``plots`` if given. Modes
    in ``served`` have run already (:func:`serve`)."""
    physics_, entries, slos = traced = trace(scenario, cost)
    window = (scenario.warmup, scenario.duration)
    slo = model_slos(scenario, physics_)
    result: dict[str, Any] = {
        "seed": scenario.workload.seed,
        "requests": len(entries),
        "slo_s": slo,
        "slo_by_shape_s": {
            " ".join(str(v) for v in _shape(e) if v is not None): s
            for e, s in zip(entries, slos)
        },
        "physics": physics_summary(
            physics_, entries, window, stop=scenario.duration + scenario.drain, slo=slo
        ),
        "modes": {},
    }
    runs = {}
    for mode in modes:
        allocation = physics_.allocation[BOUNDS[mode][0]]

        def report(elapsed: float, mode: str = mode) -> None:
            if progress is not None:
                progress(mode, elapsed, scenario.duration)

        if served is not None and mode in served:
            run, wall, load = served[mode]
        else:
            run, wall, load = serve(scenario, mode, cost, report, traced)
        runs[mode] = run
        summary = summarize(run, physics_, scenario, window)
        summary["wall_s"] = wall
        summary["load_average"] = load
        summary["allocation"] = {"/".join(p): v for p, v in sorted(allocation.items())}
        result["modes"][mode] = summary
    result["ratios"] = ratios(result)
    if plots is not None:
        title = f"{scenario.name}: {scenario.title}"
        plot_load(runs, plots / "load.png", title=title)
        plot_pools(runs, plots / "pools.png", title=title)
    return result


def _load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (what else ran)."""
    return [round(x, 2) for x in os.getloadavg()]


def combine(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The repeats summed up: per mode, every figure's median over the runs
    (``modes``) and its min and max (``spread``); each ratio's median, min,
    max and every repeat's value (``ratios``); the first run's physics."""
    first = runs[0]
    modes = {
        mode: median_tree([r["modes"][mode] for r in runs if mode in r["modes"]])
        for mode in first["modes"]
    }
    spread = {
        mode: spread_tree([r["modes"][mode] for r in runs if mode in r["modes"]])
        for mode in first["modes"]
    }
    keys = [k for k, v in first["ratios"].items() if not isinstance(v, str)]
    ratio: dict[str, Any] = {}
    for key in keys:
        values = [r["ratios"][key] for r in runs]
        known = [v for v in values if v is not None]
        ratio[key] = statistics.median(known) if known else None
        ratio[f"{key}_min"] = min(known, default=None)
        ratio[f"{key}_max"] = max(known, default=None)
        ratio[f"{key}_per_repeat"] = values
    ratio["best_of_b_c_df_per_repeat"] = [r["ratios"]["best_of_b_c_df"] for r in runs]
    return {
        "requests": first["requests"],
        "slo_s": first["slo_s"],
        "physics": first["physics"],
        "modes": modes,
        "spread": spread,
        "ratios": ratio,
    }


def median_tree(values: Sequence[Any]) -> Any:
    """The median of each number across ``values`` (mappings of the same
    shape); anything else as in the first."""
    return _tree(values, statistics.median)


def spread_tree(values: Sequence[Any]) -> Any:
    """``[min, max]`` of each number across ``values``; other leaves dropped."""
    return _tree(values, lambda known: [min(known), max(known)], keep=False)


def _tree(values: Sequence[Any], reduce: Callable, keep: bool = True) -> Any:
    first = values[0]
    if isinstance(first, Mapping):
        result = {}
        for key in first:
            nested = [v.get(key) for v in values if isinstance(v, Mapping)]
            value = _tree(nested, reduce, keep)
            if keep or value not in (None, {}):
                result[key] = value
        return result
    known = [v for v in values if v is not None]
    numbers_ = [
        v for v in known if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    finite_ = [v for v in numbers_ if math.isfinite(v)]
    if finite_ and len(numbers_) == len(known):
        return reduce(finite_)
    return first if keep else None


def bisect_rate(
    probe: Callable[[float], Mapping[str, Any]], low: float, high: float, steps: int
) -> list[dict[str, Any]]:
    """Bisect ``[low, high]`` for the highest rate multiple that ``probe``
    (multiple -> its run's figures, ``slo_attainment`` among them) passes at
    :data:`CAPACITY_ATTAINMENT`: ``steps`` probes, each at the middle of what
    is left, taking the upper half after a pass and the lower after a failure.
    Returns the probes in order, each with its ``multiple``."""
    probes = []
    for _ in range(steps):
        multiple = (low + high) / 2
        probes.append({"multiple": multiple, **probe(multiple)})
        if (probes[-1]["slo_attainment"] or 0.0) >= CAPACITY_ATTAINMENT:
            low = multiple
        else:
            high = multiple
    return probes


def capacity_sweep(
    scenario: Scenario,
    modes: Sequence[str],
    cost: Any,
    repeats: int,
    steps: int,
    progress: Callable[[str, float, float], Any] | None = None,
    chains: Mapping[tuple[str, int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per mode, the highest multiple of the scenario's arrival rates at which
    at least :data:`CAPACITY_ATTAINMENT` of the requests meet their SLO: a
    :func:`capacity_chain` per mode and repeat (seeds ``seed``, ``seed + 1``,
    ...), and each mode's median, min and max over the repeats. ``chains``
    holds the ``(mode, repeat)`` ones that have run already."""
    result: dict[str, Any] = {
        "attainment": CAPACITY_ATTAINMENT,
        "steps": steps,
        "modes": {},
    }
    for mode in modes:
        repeats_: list[dict[str, Any]] = []
        for repeat in range(repeats):
            if chains is not None and (mode, repeat) in chains:
                repeats_.append(chains[mode, repeat])
                continue
            seeded = scenario.reseeded(scenario.workload.seed + repeat)
            repeats_.append(capacity_chain(seeded, mode, cost, steps, progress))
        found = [r["capacity_rps"] for r in repeats_ if r["capacity_rps"] is not None]
        result["modes"][mode] = {
            "capacity_rps": statistics.median(found) if found else None,
            "min": min(found, default=None),
            "max": max(found, default=None),
            "repeats": repeats_,
        }
    return result


def capacity_chain(
    scenario: Scenario,
    mode: str,
    cost: Any,
    steps: int,
    progress: Callable[[str, float, float], Any] | None = None,
) -> dict[str, Any]:
    """``mode``'s capacity on ``scenario``'s seed: :func:`bisect_rate` with
    ``steps`` runs, bracketed by the physics.

    The rate multiple at which the mode's physics saturates (``sat``,
    :meth:`~dflow.bench.physics.Physics.saturation`) bounds its capacity in a
    run that lasts (a finite run lets a queue grow for a while, so the bracket
    reaches 1.25 ``sat``); the bisection starts from ``[0.25 sat, 1.25
    sat]``, so ``steps`` runs place the capacity within ``sat / 2**steps``.
    ``capacity_rps`` is the offered rate (requests a second in the window) of
    the highest multiple that passed; ``None`` when none did (the capacity is
    below 0.25 ``sat``)."""
    window = (scenario.warmup, scenario.duration)
    physics_ = physics(scenario, cost)
    allocation = physics_.allocation[BOUNDS[mode][0]]
    saturation = physics_.saturation(mode) or 1.0

    def measure(multiple: float) -> dict[str, Any]:
        probe = scenario.at_rate(multiple)
        entries = generate(probe.workload, probe.duration)

        def report(elapsed: float) -> None:
            if progress is not None:
                label = f"{mode} capacity x{multiple:.2f}"
                progress(label, elapsed, probe.duration)

        run = run_mode(
            probe,
            mode,
            entries,
            allocation,
            cost,
            scale=probe.time_scale,
            duration=probe.duration,
            drain=probe.drain,
            progress=report,
            slos=request_slos(probe, cost, entries),
        )
        measured = metrics(
            outcomes(run),
            window=window,
            stop=(run.stop - run.start) / run.scale,
            slo=model_slos(probe, physics_),
            bound_rps=0.0,
        )
        return {
            "offered_rps": measured["arrived"] / (window[1] - window[0]),
            "slo_attainment": measured["slo_attainment"],
            "goodput_rps": measured["goodput_rps"],
            "p95_s": measured["p95_s"],
            "load_average": _load_average(),
        }

    probes = bisect_rate(measure, 0.25 * saturation, 1.25 * saturation, steps)
    passed = [p for p in probes if (p["slo_attainment"] or 0.0) >= CAPACITY_ATTAINMENT]
    best = max(passed, key=lambda p: p["multiple"], default=None)
    return {
        "seed": scenario.workload.seed,
        "saturation_multiple": saturation,
        "capacity_multiple": best and best["multiple"],
        "capacity_rps": best and best["offered_rps"],
        "probes": probes,
    }


# -- several fleets at once ------------------------------------------------------------


def run_in_processes(runs: Runs, results: dict[str, Any], jobs: int) -> dict[str, Any]:
    """:func:`run_scenario`'s runs with ``jobs`` fleets at once, each run in a
    fresh process (spawned: it starts none of this one's threads, and runs
    nothing else): every mode's run of each repeat, and each mode and
    repeat's capacity bisection (its runs in turn, longest units first). A
    fleet run after others in one process served slower than alone (the
    controller's modes most), so no run inherits another's state. A run is
    the one :func:`serve` or :func:`capacity_chain` makes in one process;
    the results and plots come out as there. A worker process reads dask config
    from its files and environment (not this process's ``dask.config.set``
    but the DiT batch limit, which it is given). ``runs.progress`` hears each
    unit done."""
    scenario, modes, repeats = runs.scenario, runs.modes, runs.repeats
    dit_batch, progress = runs.dit_batch, runs.progress
    cost = emulated_cost()
    seeded = [scenario.reseeded(scenario.workload.seed + r) for r in range(repeats)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
        labels: dict[Future[Any], str] = {}
        chains: dict[tuple[str, int], Future[dict[str, Any]]] = {}
        if runs.capacity:
            for repeat in range(repeats):
                for mode in modes:
                    chain = pool.submit(
                        _capacity_job,
                        seeded[repeat],
                        mode,
                        runs.capacity_steps,
                        dit_batch,
                    )
                    chains[mode, repeat] = chain
                    labels[chain] = f"{mode} capacity, repeat {repeat + 1}"
        served: dict[tuple[str, int], Future[Served]] = {}
        for repeat in range(repeats):
            for mode in modes:
                run = pool.submit(_serve_job, seeded[repeat], mode, dit_batch)
                served[mode, repeat] = run
                labels[run] = f"{mode}, repeat {repeat + 1}"
        try:
            for future in as_completed(labels):
                future.result()
                if progress is not None:
                    progress(labels[future], 1, 1)
        except BaseException:
            # a failed run (or ^C) ends the benchmark: start no other run
            pool.shutdown(cancel_futures=True)
            raise
    for repeat in range(repeats):
        plots = runs.out if repeat == 0 else None
        done = {mode: served[mode, repeat].result() for mode in modes}
        results["runs"].append(run_once(seeded[repeat], modes, cost, plots, None, done))
    results.update(combine(results["runs"]))
    if runs.capacity:
        results["capacity"] = capacity_sweep(
            scenario,
            modes,
            cost,
            repeats,
            runs.capacity_steps,
            chains={key: future.result() for key, future in chains.items()},
        )
    results["jobs"] = jobs
    write_results(runs.out / "results.json", results)
    return results


@functools.cache
def _worker_cost() -> Any:
    """The cost model of a worker process of :func:`run_in_processes`."""
    return emulated_cost()


def _serve_job(scenario: Scenario, mode: str, dit_batch: int) -> Served:
    with quiet(), dask.config.set({"dflow.runtime.max-dit-batch": dit_batch}):
        return serve(scenario, mode, _worker_cost())


def _capacity_job(
    scenario: Scenario, mode: str, steps: int, dit_batch: int
) -> dict[str, Any]:
    with quiet(), dask.config.set({"dflow.runtime.max-dit-batch": dit_batch}):
        return capacity_chain(scenario, mode, _worker_cost(), steps)


def mix_shares(mix: Sequence[tuple[Any, float]]) -> dict[str, float]:
    """The share of each model in a phase's mix; a model of several shapes, the
    share of each shape ("model WxH", frames too for videos)."""
    shapes: dict[str, set] = defaultdict(set)
    for request, _ in mix:
        shapes[request.model].add((request.width, request.height, request.num_frames))
    shares: dict[str, float] = defaultdict(float)
    for request, weight in mix:
        label = request.model
        if len(shapes[label]) > 1:
            label += f" {request.width}x{request.height}"
            if request.num_frames:
                label += f"x{request.num_frames}"
        shares[label] += weight
    return {label: round(share, 4) for label, share in shares.items()}


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
                "mix": mix_shares(mix),
                "offered_rps": offered,
                "bound_monolithic_rps": p.capacity["monolithic"][index],
                "bound_disaggregated_rps": p.capacity["disaggregated"][index],
                # each mode's physics for this phase's mix (static modes:
                # the rate at which their first model saturates)
                "mix_rps": {m: p.mode_capacity(m)[index] for m in BOUNDS},
            }
        )
    for kind in KINDS:
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

    rivals = [m for m in RIVALS if m in modes]
    best = max(rivals, key=lambda m: modes[m]["goodput_rps"], default=None)
    return {
        "elastic_over_monolithic_throughput": ratio(
            "elastic", "monolithic", "throughput_rps"
        ),
        "monolithic_over_elastic_p95": ratio(
            "elastic", "monolithic", "p95_s", invert=True
        ),
        "elastic_over_best_b_c_df_goodput": ratio("elastic", best, "goodput_rps")
        if best
        else None,
        "best_of_b_c_df": best,
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


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(finite(dict(results)), indent=2, default=_json))


def table(results: Mapping[str, Any]) -> str:
    """The modes of ``results`` as markdown tables: the metrics (medians of
    the repeats, with min-max where they differ), SLO attainment per model,
    and the moves' costs; then each mode's capacity if measured."""
    spread = results.get("spread", {})

    def f(value: Any, digits: int = 3) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    def cell(mode: str, *path: str) -> str:
        value: Any = results["modes"][mode]
        bounds: Any = spread.get(mode, {})
        for key in path:
            value = (value or {}).get(key)
            bounds = (bounds or {}).get(key) if isinstance(bounds, Mapping) else None
        text = f(value)
        if isinstance(bounds, list) and bounds[0] != bounds[1]:
            text += f" ({f(bounds[0])}-{f(bounds[1])})"
        return text

    models = sorted({m for v in results["modes"].values() for m in v["models"]})
    lines = [
        "| mode | throughput rps | goodput rps | p50 s | p95 s | p99 s | SLO att. "
        "| " + " | ".join(f"SLO att. {m}" for m in models) + " | bound ratio |",
        "|---" * (8 + len(models)) + "|",
    ]
    for mode in results["modes"]:
        per_model_ = " | ".join(
            cell(mode, "models", m, "slo_attainment") for m in models
        )
        lines.append(
            f"| {mode} | {cell(mode, 'throughput_rps')} | {cell(mode, 'goodput_rps')} "
            f"| {cell(mode, 'p50_s')} | {cell(mode, 'p95_s')} | {cell(mode, 'p99_s')} "
            f"| {cell(mode, 'slo_attainment')} | {per_model_} "
            f"| {cell(mode, 'bound_ratio')} |"
        )
    lines += [
        "",
        "| mode | moves | drain s | load s (GPU lost) | rebalancing latency p50 / "
        "p95 s | controller CPU ms/step p50 / max | utilization |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, m in results["modes"].items():
        use = ", ".join(
            f"{s} {u:.2f}" for s, u in m["utilization"].items() if u is not None
        )
        cpu = m.get("controller_cpu_ms") or {}
        lines.append(
            f"| {mode} | {cell(mode, 'rebalancing', 'moves')} "
            f"| {cell(mode, 'rebalancing', 'drain_s')} "
            f"| {cell(mode, 'rebalancing', 'load_s')} "
            f"| {cell(mode, 'rebalancing', 'latency_p50_s')} / "
            f"{cell(mode, 'rebalancing', 'latency_p95_s')} "
            f"| {f(cpu.get('p50'))} / {f(cpu.get('max'))} | {use} |"
        )
    capacity = results.get("capacity")
    if capacity:
        lines += [
            "",
            f"Capacity: highest offered rate at SLO attainment >= "
            f"{capacity['attainment']:g} ({capacity['steps']} rates tried per mode "
            "and repeat, bisection from the physics' bracket)",
            "",
            "| mode | capacity rps (median) | min | max | / monolithic |",
            "|---|---|---|---|---|",
        ]
        base = capacity["modes"].get("monolithic", {}).get("capacity_rps")
        for mode, c in capacity["modes"].items():
            ratio = c["capacity_rps"] / base if base and c["capacity_rps"] else None
            lines.append(
                f"| {mode} | {f(c['capacity_rps'])} | {f(c['min'])} | {f(c['max'])} "
                f"| {'-' if ratio is None else f'{ratio:.2f}x'} |"
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
