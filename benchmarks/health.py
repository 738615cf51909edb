"""Slow worker: throughput of an emulated fleet with one DiT card at 0.3x speed.

One scheduler and emulated workers in this process (``dflow.runtime.backend:
emulated``, every stage call sleeping its H200 profile cost times
``--time-scale``; a predictor that prices every pool as the emulation charges
it): one encoder, ``--dits`` DiT workers and one VAE worker serving
PixArt-Sigma-1024. One DiT card runs at ``--slow`` times its speed
(:func:`dflow.emulation.adapter.set_speed`). A warm-up burst lets the health
collaborator learn the workers' speeds; then a burst of ``--requests`` arrives
at once, and throughput is taken over its middle (from the 10th to the 90th
percentile completion, where every worker is busy).

The physical bound is the fleet's, with that card at its real speed: the DiT
pool clears ``(dits - 1 + slow) / t`` requests a second, ``t`` the emulated DiT
time of one request (the encoder and VAE, batched, are far from binding; their
bound is computed too and the least is taken). Modes:

``speed-aware``
    dflow's defaults: stage tasks placed and rebalanced by worker speed
    (``dflow.health.placement``).
``stock``
    ``dflow.health.placement: false``: Dask's placement (where a task starts
    soonest) and work stealing, which take every DiT worker for equally fast.

    python benchmarks/health.py                  # 8 DiT workers, one at 0.3x
    python benchmarks/health.py --quick          # a smaller burst

Figures are emulated; quote them so. Writes ``health.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client, as_completed

import dflow
from dflow import testing
from dflow.bench.env import machine
from dflow.bench.physics import request_seconds
from dflow.emulation import cost_model
from dflow.emulation.adapter import set_speed
from dflow.pools import Pool
from dflow.request import Request

MODEL = "pixart-sigma-1024"
GPU = "h200"


def denoise_calls(ids: list[str], dask_scheduler: Any = None) -> list[tuple]:
    """(worker, start, end) of the denoise call of each of the requests ``ids``,
    from telemetry (wall seconds on the scheduler's clock)."""
    wanted = set(ids)
    telemetry = dask_scheduler.plugins["dflow-telemetry"]
    return [
        (r.worker, r.finished - r.compute_s, r.finished)
        for r in telemetry.records
        if r.stage == "dit" and r.request in wanted
    ]


@contextlib.contextmanager
def fleet(dits: int, config: dict[str, Any]) -> Iterator[tuple[Client, list[str]]]:
    """An emulated fleet in this process: its client and DiT addresses."""
    with dask.config.set(config):
        predictor = testing.emulated_predictor([GPU])
        layout = {"encoder": 1, "dit": dits, "vae": 1}
        with testing.emulated_fleet(MODEL, layout, predictor, GPU, timeout=600) as (
            _,
            client,
        ):
            addresses = sorted(
                r["address"]
                for r in client.sync(client.scheduler.dflow_workers)
                if r["stage"] == "dit"
            )
            yield client, addresses


def burst(client: Client, requests: list[Request]) -> tuple[list[float], list]:
    """Submit ``requests`` at once; their latencies (wall seconds from the
    submission to each completion, in order) and futures."""
    start = time.monotonic()
    futures = dflow.map(client, requests)
    times = []
    for future in as_completed(futures):
        assert future.result().request is not None
        times.append(time.monotonic() - start)
    return sorted(times), futures


def discrete_makespan(n: int, speeds: list[float], seconds: float) -> float:
    """The least time in which workers of ``speeds`` finish ``n`` calls of
    ``seconds`` (at speed 1) between them, whole calls each."""
    candidates = sorted(k * seconds / s for s in speeds for k in range(1, n + 1))
    for end in candidates:
        if sum(int(end * s / seconds + 1e-9) for s in speeds) >= n:
            return end
    raise ValueError("no workers")


def bound(requests: list[Request], dits: int, slow: float, scale: float) -> dict:
    """Requests per wall second each stage pool clears, and the least."""
    cost = cost_model()
    request = requests[0]
    seconds = {
        stage: request_seconds(cost, request, Pool(stage, MODEL), GPU) * scale
        for stage in ("encoder", "dit", "vae")
    }
    rates = {
        "encoder": 1 / seconds["encoder"],
        "dit": (dits - 1 + slow) / seconds["dit"],
        "vae": 1 / seconds["vae"],
    }
    return {"seconds": seconds, "rates": rates, "bound": min(rates.values())}


def run_mode(name: str, settings: argparse.Namespace) -> dict[str, Any]:
    config = {
        "dflow.elastic.enabled": False,
        "dflow.runtime.backend": "emulated",
        "dflow.emulation.time-scale": settings.time_scale,
        "dflow.client.model-timeout": "600s",
        "dflow.health.placement": name == "speed-aware",
    }

    def requests(n: int, seed: int) -> list[Request]:
        return [
            Request(
                model=MODEL,
                prompt=f"a lighthouse {seed + i}",
                seed=seed + i,
                steps=settings.steps,
            )
            for i in range(n)
        ]

    with fleet(settings.dits, config) as (client, dits):
        slow = dits[0]
        client.run(set_speed, settings.slow, workers=[slow])
        burst(client, requests(settings.warmup, 0))
        measured = requests(settings.requests, 10_000)
        latencies, futures = burst(client, measured)
        ids = [str(f.key).partition("-")[2] for f in futures]
        calls = client.run_on_scheduler(denoise_calls, ids)
        health = dflow.status(client)["health"]["workers"]
        speeds = {w["address"]: w["speed"] for w in health.values()}
    limits = bound(measured, settings.dits, settings.slow, settings.time_scale)
    placed = Counter(worker for worker, _, _ in calls)
    # the DiT pool's throughput: its calls over the span they took, from the
    # first start to the last end (the encoder's ramp and the VAE's tail
    # left out)
    span = max(end for _, _, end in calls) - min(start for _, start, _ in calls)
    throughput = len(calls) / span
    fleet_speeds = [settings.slow] + [1.0] * (settings.dits - 1)
    best = discrete_makespan(len(calls), fleet_speeds, limits["seconds"]["dit"])
    n = len(latencies)
    return {
        "mode": name,
        "throughput": throughput,
        "bound": limits["bound"],
        "ratio": throughput / limits["bound"],
        "dit_span": span,
        "dit_span_bound": best,
        "latency_p50": latencies[n // 2],
        "latency_p95": latencies[int(0.95 * n) - 1],
        "latency_max": latencies[-1],
        "slow_share": placed[slow] / sum(placed.values()),
        "fair_share": settings.slow / (settings.dits - 1 + settings.slow),
        "slow_speed_measured": speeds.get(slow),
        "dit_calls": dict(placed),
        "stage_seconds": limits["seconds"],
        "stage_rates": limits["rates"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dits", type=int, default=8)
    parser.add_argument("--slow", type=float, default=0.3)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=48)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--time-scale", type=float, default=0.25)
    parser.add_argument("--modes", default="speed-aware,stock")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    settings = parser.parse_args()
    if settings.quick:
        settings.requests, settings.warmup = 120, 24
    host = machine()
    results = [run_mode(m, settings) for m in settings.modes.split(",")]
    host["loadavg_end"] = list(os.getloadavg())
    print(
        f"\nEmulated: {settings.dits} H200 DiT workers of {MODEL}, one at "
        f"{settings.slow}x; {settings.requests} requests of {settings.steps} steps "
        f"at once; time scale {settings.time_scale}; dflow {host['revision']}\n"
    )
    print(
        "| mode | DiT throughput (req/s, wall) | bound | ratio | DiT span (best) "
        "| slow worker's share (fair) | its measured speed | latency p50 / p95 / "
        "max (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        speed = r["slow_speed_measured"]
        print(
            f"| {r['mode']} | {r['throughput']:.2f} | {r['bound']:.2f} "
            f"| {r['ratio']:.3f} | {r['dit_span']:.1f}s ({r['dit_span_bound']:.1f}s) "
            f"| {r['slow_share']:.3f} ({r['fair_share']:.3f}) "
            f"| {'-' if speed is None else f'{speed:.2f}'} "
            f"| {r['latency_p50']:.1f} / {r['latency_p95']:.1f} / "
            f"{r['latency_max']:.1f} |"
        )
    settings.out.mkdir(parents=True, exist_ok=True)
    path = settings.out / "health.json"
    path.write_text(
        json.dumps(
            {
                "settings": {**vars(settings), "out": str(settings.out)},
                "host": host,
                "results": results,
            },
            indent=1,
        )
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
