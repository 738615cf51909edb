"""S4: 1,000 emulated workers on one scheduler with the elastic controller on.

The scheduler runs in its own process (``dask scheduler --preload dflow.preload``,
:func:`dflow.testing.scheduler_process`), so its CPU time is its own. The
workers are in-process Dask workers, ``--hosts`` processes of several hundred
each (``python -m dflow.bench.scale host``), every one a real
:class:`~dflow.worker.StagePlugin` worker on the emulated backend: it reports to
dflow's extension, advertises its pool, runs stage tasks and can be switched.
Emulated loads are made near-instant (``load-bandwidth`` 1 TiB/s): workers of
one process load one at a time, and S4 measures the scheduler, not loads.

Time runs at scale 1 (emulated seconds are wall seconds), so the controller's
defaults apply as they are. The run measures the scheduler process's CPU time
(user + system, psutil) over an idle minute with the fleet up, then under a
paced load, and the controller's planning time per step
(:meth:`~dflow.plugins.elastic.ElasticController.planning_seconds`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from distributed import Client

from dflow.bench import LABEL
from dflow.bench.report import write_results

FLUX = "flux.1-dev"
PIXART = "pixart-sigma-1024"
#: dask config of every S4 process (environment variables)
ENV = {
    "DASK_DFLOW__RUNTIME__BACKEND": "emulated",
    "DASK_DFLOW__RUNTIME__GPU_TYPE": "h200",
    "DASK_DFLOW__EMULATION__LOAD_BANDWIDTH": "1TiB",
    "DASK_DFLOW__EMULATION__FIRST_CALL": "0s",
    "DASK_DFLOW__TELEMETRY__MAX_RECORDS": "20000",
    "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error",
    "DASK_DISTRIBUTED__LOGGING__DFLOW": "warning",
}


def layout(workers: int) -> list[tuple[str, str]]:
    """Pools of the fleet: Flux and PixArt, a DiT-heavy split (1 in 20 workers
    on each encoder and VAE pool)."""
    small = max(1, workers // 20)
    pools = [
        ("encoder", FLUX, small),
        ("vae", FLUX, small),
        ("encoder", PIXART, small),
        ("vae", PIXART, small),
    ]
    dit = workers - 4 * small
    pools += [("dit", FLUX, dit * 3 // 4), ("dit", PIXART, dit - dit * 3 // 4)]
    return [(stage, model) for stage, model, n in pools for _ in range(n)]


async def _host(address: str, pools: list[tuple[str, str]]) -> None:
    from distributed import Worker

    from dflow.worker import StagePlugin, stage_slots

    workers = [
        Worker(
            address,
            nthreads=stage_slots(stage),
            memory_limit=0,
            name=f"{os.getpid()}-{i}",
            plugins=(StagePlugin(stage, model, "h200"),),
            host="127.0.0.1",
        )
        for i, (stage, model) in enumerate(pools)
    ]
    # start in batches: a thousand registrations at once swamp the scheduler
    for first in range(0, len(workers), 25):
        await asyncio.gather(*workers[first : first + 25])
    await asyncio.gather(*(w.finished() for w in workers))


def host_main(argv: list[str]) -> None:
    """``python -m dflow.bench.scale host ADDRESS POOLS_JSON``: run the workers."""
    address, pools = argv[0], json.loads(argv[1])
    from dflow.emulation import cost_model

    cost_model()  # build the cost model once, before the workers load
    asyncio.run(_host(address, [tuple(p) for p in pools]))


def _pid(dask_scheduler: Any = None) -> int:
    return os.getpid()


def _ready(dask_scheduler: Any = None) -> int:
    extension = dask_scheduler.extensions["dflow"]
    return sum(r.state == "ready" for r in extension.workers.values())


def _controller_stats(dask_scheduler: Any = None) -> dict[str, Any]:
    controller = dask_scheduler.plugins["dflow-elastic"]
    return {
        "planning_seconds": controller.planning_seconds(),
        "planning_cpu_seconds": controller.planning_seconds(cpu=True),
        "decisions": len(dask_scheduler.extensions["dflow"].decisions),
        "predictor": controller.predictions.predictor is not None,
        "workers": len(dask_scheduler.workers),
        "last_plan": controller.last_plan.get("reason"),
    }


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_scale(
    out: Path,
    *,
    quick: bool = False,
    workers: int | None = None,
    hosts: int | None = None,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Start the fleet, measure, write ``out/results.json``; return the results."""
    from dflow.bench.workload import Arrivals, Phase, Template, Workload, generate
    from dflow.client import map as submit_many
    from dflow.testing import scheduler_process, stop

    workers = workers or (300 if quick else 1000)
    hosts = hosts or (2 if quick else 4)
    idle_s, load_s, rate = (20, 30, 5.0) if quick else (60, 60, 10.0)
    out.mkdir(parents=True, exist_ok=True)
    pools = layout(workers)
    env = {k: v for k, v in ENV.items()}
    results: dict[str, Any] = {
        "scenario": "S4",
        "label": LABEL,
        "quick": quick,
        "workers": workers,
        "worker_processes": hosts,
        "pools": {f"{s}/{m}": pools.count((s, m)) for s, m in sorted(set(pools))},
    }
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        logs = stack.enter_context(tempfile.TemporaryDirectory(prefix="dflow-s4-"))
        address = stack.enter_context(scheduler_process(env=env, log_dir=logs))
        environment = {**os.environ, **env}
        for index in range(hosts):
            mine = pools[index::hosts]
            log = open(Path(logs) / f"host-{index}.log", "w")  # noqa: SIM115
            stack.callback(log.close)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "dflow.bench.scale",
                        "host",
                        address,
                        json.dumps(mine),
                    ],
                    env=environment,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        stack.callback(_stop_hosts, procs)
        client = stack.enter_context(Client(address))
        started = time.monotonic()
        echo(f"S4: starting {workers} emulated workers in {hosts} processes")
        while (ready := client.run_on_scheduler(_ready)) < workers:
            if time.monotonic() - started > 900:
                raise TimeoutError(f"{ready} of {workers} workers ready in 900 s")
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker process exited; logs in {logs}")
            time.sleep(2)
        results["startup_s"] = time.monotonic() - started
        echo(f"S4: {workers} workers ready in {results['startup_s']:.0f} s")
        scheduler = psutil.Process(client.run_on_scheduler(_pid))
        # idle: heartbeats, the controller planning with no demand
        before, t0 = _cpu(scheduler), time.monotonic()
        time.sleep(idle_s)
        idle_cpu = _cpu(scheduler) - before
        idle_wall = time.monotonic() - t0
        steps_idle = client.run_on_scheduler(_controller_stats)["planning_seconds"]
        # load: Flux and PixArt, paced
        workload = Workload(
            [
                Phase(
                    0,
                    Arrivals("poisson", rate=rate),
                    [Template(FLUX, weight=1), Template(PIXART, weight=1)],
                )
            ],
            seed=4,
        )
        entries = generate(workload, load_s)
        futures = []
        before, t0 = _cpu(scheduler), time.monotonic()
        for entry in entries:
            wait = t0 + entry.t - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            futures += submit_many(client, [entry.request()], mode="disaggregated")
        done = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = sum(f.status == "finished" for f in futures)
            if done == len(futures):
                break
            time.sleep(0.5)
        load_cpu = _cpu(scheduler) - before
        load_wall = time.monotonic() - t0
        stats = client.run_on_scheduler(_controller_stats)
        steps = stats["planning_seconds"]
        cpu_steps = stats["planning_cpu_seconds"]
        client.cancel(futures)
        ordered = sorted(steps)
        results.update(
            {
                "idle": {
                    "wall_s": idle_wall,
                    "scheduler_cpu_s": idle_cpu,
                    "scheduler_cpu_percent": 100 * idle_cpu / idle_wall,
                },
                "load": {
                    "requests": len(entries),
                    "completed": done,
                    "rate_rps": rate,
                    "wall_s": load_wall,
                    "scheduler_cpu_s": load_cpu,
                    "scheduler_cpu_percent": 100 * load_cpu / load_wall,
                    "scheduler_cpu_ms_per_request": 1000 * load_cpu / len(entries),
                },
                "planning": {
                    "steps": len(steps),
                    "steps_idle": len(steps_idle),
                    "median_ms": 1000 * statistics.median(steps) if steps else None,
                    "p95_ms": 1000 * ordered[int(0.95 * (len(ordered) - 1))]
                    if steps
                    else None,
                    "max_ms": 1000 * max(steps) if steps else None,
                    "cpu_median_ms": 1000 * statistics.median(cpu_steps)
                    if cpu_steps
                    else None,
                },
                "decisions": stats["decisions"],
                "last_plan": stats["last_plan"],
            }
        )
        stop([])
    results["summary"] = {
        "workers": workers,
        "startup_s": round(results["startup_s"], 1),
        "idle_scheduler_cpu_percent": round(
            results["idle"]["scheduler_cpu_percent"], 1
        ),
        "load_scheduler_cpu_percent": round(
            results["load"]["scheduler_cpu_percent"], 1
        ),
        "cpu_ms_per_request": round(results["load"]["scheduler_cpu_ms_per_request"], 2),
        "planning_median_ms": results["planning"]["median_ms"],
        "planning_p95_ms": results["planning"]["p95_ms"],
        "planning_cpu_median_ms": results["planning"]["cpu_median_ms"],
        "completed": f"{done}/{len(entries)}",
    }
    write_results(out / "results.json", results)
    return results


def _stop_hosts(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="S4 worker host")
    parser.add_argument("command", choices=["host"])
    parser.add_argument("args", nargs="*")
    parsed = parser.parse_args()
    host_main(parsed.args)
