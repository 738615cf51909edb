"""Where a scheduler's CPU goes at 1,000 workers: its periodic callbacks, one by one.

S4 (``dflow bench --scenario S4``) measures the scheduler process's CPU as a
whole. This script splits it: a real scheduler in this process, with dflow
installed as ``dflow.preload`` installs it (health, placement and work stealing
on), holds S4's fleet without worker processes (each worker registered as
:mod:`benchmarks.controller_speed` registers it), and times each of the
scheduler's periodic callbacks, dflow's and Dask's, as the scheduler thread's
CPU time per call. Its cost per second of wall time is that over the
callback's interval. Two fleet states, as in ``controller_speed.py``: idle,
and S4's 10 req/s (running stage tasks on as many workers as the load keeps
busy, each request in flight on the extension's records).

Heartbeats, Dask's comms and the stage tasks' transitions are not here: S4
itself (under ``py-spy``) shows those.

Run with ``python benchmarks/scheduler_cost.py [--workers N] [--calls N] [--profile NAME]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import pstats
import random
import statistics
import time
from functools import partial
from typing import Any

from controller_speed import MODELS, load, register

import dask.config
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

from dflow.bench.scale import layout
from dflow.plugins.extension import RequestRecord
from dflow.plugins.install import Installation, install
from dflow.plugins.predictions import default_predictor
from dflow.pools import STAGES, Pool
from dflow.request import Request


def in_flight(scheduler: Scheduler, parts: Installation) -> int:
    """Give every request ``load`` left running a record on the extension and a
    deadline, as its graph's arrival would; returns their number."""
    now = time.time()
    requests: dict[str, tuple[str, dict[str, Any]]] = {}
    for ts in scheduler.tasks.values():
        info = ts.annotations["dflow"]
        requests.setdefault(info["request"], (info["model"], info))
    for request, (model, info) in requests.items():
        final = f"vae-{request}"
        parts.extension.requests[request] = RequestRecord(
            request_id=request,
            model=model,
            mode="disaggregated",
            final_key=final,
            submitted=now - 5.0,
            features=info["features"],
            due=now + 60.0,
        )
        parts.extension.final_keys[final] = request
        if final not in scheduler.tasks:
            ts = scheduler.new_task(final, None, "waiting")
            ts.annotations = {
                "dflow": {"stage": "vae", "model": model, **info, "request": request}
            }
    return len(requests)


async def timed(scheduler: Scheduler, calls: int) -> dict[str, tuple[float, float]]:
    """Per periodic callback: (CPU ms a call, median; CPU ms per second)."""
    costs = {}
    for name, pc in sorted(scheduler.periodic_callbacks.items()):
        pc.stop()  # no call of its own meanwhile
        seconds = []
        for _ in range(calls):
            start = time.thread_time()
            result = pc.callback()
            if inspect.isawaitable(result):
                await result
            seconds.append(time.thread_time() - start)
        median = statistics.median(seconds)
        costs[name] = (1e3 * median, 1e3 * median / (pc.callback_time / 1e3))
    return costs


def arrival(scheduler: Scheduler, parts: Installation, calls: int) -> str:
    """CPU per request of each plugin's ``update_graph`` (a Flux request's
    three stage tasks arriving), and of placing one stage task of each pool
    (the scheduler's worker objective over the pool's workers, dflow's
    placement against Dask's own)."""
    features = Request(model=MODELS[0], prompt="a lighthouse").features
    plugins = [
        p
        for p in scheduler.plugins.values()
        if type(p).update_graph is not SchedulerPlugin.update_graph
    ]
    seconds: dict[str, list[float]] = {p.name: [] for p in plugins}
    for n in range(calls):
        request = f"arrival-{n}"
        annotations = {}
        for order, stage in enumerate(STAGES):
            key = f"{stage}-{request}"
            ts = scheduler.new_task(key, None, "released")
            ts.priority = (0, 1, order)
            annotations[key] = {
                "stage": stage,
                "model": MODELS[0],
                "request": request,
                "mode": "disaggregated",
                "features": features,
                "deadline": None,
                "epoch": parts.extension.epoch,
                "standing": True,
                "slo": None,
            }
        for plugin in plugins:
            start = time.thread_time()
            plugin.update_graph(scheduler, annotations={"dflow": annotations})
            seconds[plugin.name].append(time.thread_time() - start)
    lines = [f"{'update_graph of':<28} {'ms/request':>10}"]
    for name, values in seconds.items():
        lines.append(f"{name:<28} {1e3 * statistics.median(values):10.3f}")
    lines.append(f"{'placing a task of':<28} {'ms dflow':>10} {'ms Dask':>10}")
    pools = {Pool(s, m) for s, m in layout(len(scheduler.workers))}
    for pool in sorted(pools):
        ts = scheduler.new_task(f"{pool.stage}-placed", None, "released")
        ts.annotations = {"dflow": {"stage": pool.stage, "model": pool.model}}
        ts.resource_restrictions = {pool.stage: 1, pool.resource: 1}
        valid = scheduler.valid_workers(ts)
        assert valid is not None
        costs = []
        for objective in (
            scheduler.worker_objective,  # dflow's placement
            partial(Scheduler.worker_objective, scheduler),  # Dask's own
        ):
            start = time.thread_time()
            for _ in range(calls):
                min(valid, key=partial(objective, ts))
            costs.append(1e3 * (time.thread_time() - start) / calls)
        lines.append(
            f"{pool!s:<28} {costs[0]:10.3f} {costs[1]:10.3f}  ({len(valid)} workers)"
        )
    return "\n".join(lines)


def table(costs: dict[str, tuple[float, float]]) -> str:
    lines = [f"{'callback':<28} {'ms/call':>8} {'ms/s':>8}"]
    for name, (call, per_second) in sorted(costs.items(), key=lambda c: -c[1][1]):
        lines.append(f"{name:<28} {call:8.3f} {per_second:8.2f}")
    total = sum(per_second for _, per_second in costs.values())
    lines.append(f"{'total':<28} {'':>8} {total:8.2f}  ({total / 10:.1f}% of a core)")
    return "\n".join(lines)


async def main(workers: int, calls: int, profile: str | None) -> None:
    rng = random.Random(4)
    with dask.config.set(
        # it reads the memory of heartbeats, which these workers never send
        {"distributed.scheduler.active-memory-manager.start": False}
    ):
        async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
            parts = await install(scheduler, predictor=default_predictor())
            for index, (stage, model) in enumerate(layout(workers)):
                register(scheduler, parts, index, Pool(stage, model))
            print(f"{workers} workers, {calls} calls of each callback")
            print(f"idle:\n{table(await timed(scheduler, calls))}")
            running = load(scheduler, parts, rng)
            requests = in_flight(scheduler, parts)
            print(
                f"load ({running} tasks running, {requests} requests of "
                f"{', '.join(MODELS)} in flight):\n{table(await timed(scheduler, calls))}"
            )
            print(arrival(scheduler, parts, calls))
            if profile is not None:
                callback = scheduler.periodic_callbacks[profile].callback
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(calls):
                    result = callback()
                    if inspect.isawaitable(result):
                        await result
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=21)
    parser.add_argument("--profile", help="cProfile this callback under load")
    args = parser.parse_args()
    asyncio.run(main(args.workers, args.calls, args.profile))
