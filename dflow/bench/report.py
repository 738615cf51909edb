"""A scenario end to end: every mode on the same trace, then ``results.json``,
the markdown table and the plots."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import dask.config

from dflow.bench import LABEL, MODES, MONOLITHIC
from dflow.bench.metrics import (
    ModeRun,
    gpu_use,
    metrics,
    outcomes,
    per_model,
    per_phase,
    percentiles,
    utilization,
)
from dflow.bench.physics import (
    BOUNDS,
    Physics,
    bound,
    physics,
    static_monolithic_latencies,
)
from dflow.bench.plots import plot_load, plot_pools
from dflow.bench.run import run_mode
from dflow.bench.workload import TraceEntry, generate

if TYPE_CHECKING:
    from dflow.bench.scenarios import Scenario


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
    phases = scenario.workload.phases
    names = [p.name for p in phases]
    if len(phases) > 1 and len(set(names)) == len(names):
        ends = [p.start for p in phases[1:]] + [scenario.duration]
        result["phases"] = per_phase(
            outcomes(run),
            spans={p.name: (p.start, end) for p, end in zip(phases, ends)},
            window=window,
            stop=(run.stop - run.start) / run.scale,
            slo=slo,
        )
    if run.dit_batches:
        result["dit_batch_mean"] = float(np.mean(run.dit_batches))
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


def run_scenario(
    scenario: Scenario,
    out: Path,
    *,
    quick: bool = False,
    modes: Sequence[str] = MODES,
    progress: Callable[[str, float, float], Any] | None = None,
    dit_batch: int = 1,
) -> dict[str, Any]:
    """Run every mode of ``scenario`` on the same trace; write ``out/results.json``
    and the plots; return the results. ``dit_batch`` is every worker's
    ``dflow.runtime.max-dit-batch`` (1: no DiT batching), which the physical
    bounds assume too."""
    with dask.config.set({"dflow.runtime.max-dit-batch": dit_batch}):
        return _run_scenario(scenario, out, quick, modes, progress, dit_batch)


def _run_scenario(
    scenario: Scenario,
    out: Path,
    quick: bool,
    modes: Sequence[str],
    progress: Callable[[str, float, float], Any] | None,
    dit_batch: int,
) -> dict[str, Any]:
    from dflow.emulation import cost_model

    if quick:
        scenario = scenario.quick_variant()
    out.mkdir(parents=True, exist_ok=True)
    scale = scenario.time_scale
    with dask.config.set({"dflow.runtime.backend": "emulated"}):
        cost = cost_model()
    with dask.config.set(scenario.config):
        physics_ = physics(scenario, cost)
    entries = generate(scenario.workload, scenario.duration)
    window = (scenario.warmup, scenario.duration)
    results: dict[str, Any] = {
        "scenario": scenario.name,
        "title": scenario.title,
        "label": LABEL,
        "quick": quick,
        "dit_batch": dit_batch,
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
    plot_load(runs, out / "load.png", title=f"{scenario.name}: {scenario.title}")
    plot_pools(runs, out / "pools.png", title=f"{scenario.name}: {scenario.title}")
    return results


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
