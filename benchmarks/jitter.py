"""Network jitter against the hand-off (issue 14, item 5), emulated.

The S8 scenario (``configs/scenarios/S8.yaml``: PixArt-Sigma 512px on
three emulated H200s, 1 encoder / 1 DiT / 1 VAE) served two ways on the same
trace: ``static``, dflow's ahead-of-need chaining (a request's three stage
tasks sent as one graph), and ``synchronous``, each stage task submitted when
the client hears the previous one finished (:mod:`dflow.bench.handoff`). Each
under three settings of ``dflow.emulation.transfer-delay`` (none; uniform
0-50 ms; lognormal, median 10 ms and p99 250 ms, about the uniform's mean with
a heavy tail) and at two loads (the file's rate, 0.9 of the DiT pool's
capacity, and half of it). Per run: the DiT pool's busy fraction, throughput
and p50 / p95 / p99 latency (emulated seconds).

    python benchmarks/jitter.py --quick --out /tmp/jitter
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask.config

from dflow.bench import LABEL
from dflow.bench.env import machine
from dflow.bench.report import quiet, run_once, write_results
from dflow.bench.scenarios import get

#: ``dflow.emulation.transfer-delay`` of each jitter setting
JITTERS: dict[str, dict[str, Any]] = {
    "none": {"distribution": "none"},
    "uniform 0-50 ms": {"distribution": "uniform", "low": "0ms", "high": "50ms"},
    "lognormal, median 10 ms, p99 250 ms": {
        "distribution": "lognormal",
        "median": "10ms",
        "p99": "250ms",
    },
}
#: Multiples of the scenario's arrival rate
LOADS = {"near saturation": 1.0, "half": 0.5}
MODES = ("static", "synchronous")
#: What each mode is in the table
HANDOFF = {"static": "ahead of need", "synchronous": "synchronous"}


def run(quick: bool, seed: int) -> list[dict[str, Any]]:
    """Every load, jitter and mode on the same trace per load."""
    from dflow.emulation import cost_model

    scenario = get("S8")
    if quick:
        scenario = scenario.quick_variant()
    scenario = scenario.reseeded(seed)
    with dask.config.set({"dflow.runtime.backend": "emulated"}):
        cost = cost_model()
    rows = []
    for load, multiple in LOADS.items():
        for jitter, delay in JITTERS.items():
            config = {
                **scenario.config,
                "dflow.emulation.transfer-delay": {**delay, "seed": seed},
            }
            one = replace(scenario.at_rate(multiple), config=config)
            started = time.monotonic()
            result = run_once(one, MODES, cost)
            print(
                f"{load}, {jitter}: {time.monotonic() - started:.0f} s wall, "
                f"load average {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
            )
            for mode in MODES:
                m = result["modes"][mode]
                rows.append(
                    {
                        "load": load,
                        "rate_multiple": multiple,
                        "offered_rps": one.workload.phases[0].arrivals.rate,
                        "jitter": jitter,
                        "transfer_delay": delay,
                        "mode": mode,
                        "dit_busy": m["utilization"].get("dit"),
                        "throughput_rps": m["throughput_rps"],
                        "p50_s": m["p50_s"],
                        "p95_s": m["p95_s"],
                        "p99_s": m["p99_s"],
                        "bound_ratio": m["bound_ratio"],
                        "unfinished": m["unfinished"],
                        "requests": result["requests"],
                        "load_average": m["load_average"],
                    }
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The runs as a markdown table, with each figure's change from the same
    hand-off and load without jitter."""
    base = {(r["load"], r["mode"]): r for r in rows if r["jitter"] == "none"}
    lines = [
        "| load | jitter | hand-off | DiT busy | throughput rps | p50 s | p95 s "
        "| p99 s | p95 over no jitter | load average |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base[r["load"], r["mode"]]
        p95_change = (
            f"{r['p95_s'] / b['p95_s']:.2f}x" if r["p95_s"] and b["p95_s"] else "-"
        )
        lines.append(
            f"| {r['load']} ({r['offered_rps']:.2f}/s) | {r['jitter']} "
            f"| {HANDOFF[r['mode']]} | {r['dit_busy']:.3f} "
            f"| {r['throughput_rps']:.3f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} "
            f"| {r['p99_s']:.3f} | {p95_change} | {r['load_average'][0]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the scenario's quick variant"
    )
    parser.add_argument("--seed", type=int, default=14, help="trace and delay seed")
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    args = parser.parse_args(argv)
    host = machine()
    with quiet():
        rows = run(args.quick, args.seed)
    result = {
        "benchmark": "jitter",
        "label": LABEL,
        "command": " ".join([sys.executable, *sys.argv]),
        "quick": args.quick,
        "machine": {**host, "loadavg_end": list(os.getloadavg())},
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"jitter{'-quick' if args.quick else ''}.json"
    write_results(path, result)
    print(f"{LABEL}\n")
    print(table(rows))
    print(f"\nload average start {host['loadavg_start']}, end {os.getloadavg()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
