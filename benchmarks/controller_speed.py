"""How long the elastic controller's whole step takes at 1,000 workers, in one process.

A real scheduler in this process, with dflow installed, holds S4's fleet
(:func:`dflow.bench.scale.layout`: Flux and PixArt, DiT-heavy) without any
worker process: each worker is registered as the scheduler registers one (its
``WorkerState``, ``Scheduler.add_resources``, the plugins' ``add_worker``) and
reported ready through dflow's ``dflow_worker_state`` handler, as a
``StagePlugin`` reports itself. Two fleet states are timed:

- idle: no request in flight (S4's idle minute);
- load: S4's 10 req/s, half Flux and half PixArt: arrivals over the telemetry
  window, a stage task running on as many workers of each pool as the load keeps
  busy (Little's law on the predictor's service times), each owing the next stage.

Each step is :meth:`~dflow.plugins.elastic.ElasticController.step`, as the
scheduler's periodic callback runs it, timed as S4 times it
(``planning_seconds(cpu=True)``: the scheduler thread's CPU time of observing,
pricing and planning). The fleet keeps up, so no step moves a worker (as in S4).
The health collaborator, work stealing and the active memory manager are off
(no heartbeat arrives, nothing runs the tasks).

Run with ``python benchmarks/controller_speed.py [--workers N] [--steps N] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import statistics
import time
from typing import Any

import dask.config
from distributed.core import Status
from distributed.scheduler import Scheduler, TaskState, WorkerState

from dflow.bench.scale import FLUX, PIXART, layout
from dflow.plugins.install import Installation, install
from dflow.plugins.predictions import default_predictor
from dflow.pools import Pool
from dflow.request import Request

GIB = 2**30
RATE = 10.0  # requests per second, half each model (S4)
MODELS = (FLUX, PIXART)


def register(scheduler: Scheduler, parts: Installation, index: int, pool: Pool) -> None:
    """One stage worker of ``pool``, registered and ready."""
    address, name = f"tcp://127.0.0.1:{20000 + index}", f"worker-{index}"
    ws = WorkerState(
        address=address,
        status=Status.running,
        pid=0,
        name=name,
        nthreads=1,
        memory_limit=0,
        local_directory="",
        nanny=None,
        server_id=name,
        scheduler=scheduler,
    )
    ws.last_seen = time.time()
    scheduler.workers[address] = ws
    scheduler.running.add(ws)
    scheduler.aliases[name] = address
    scheduler.add_resources(worker=address, resources={pool.stage: 1, pool.resource: 1})
    for plugin in list(scheduler.plugins.values()):
        plugin.add_worker(scheduler=scheduler, worker=address)
    parts.extension.worker_state(
        address,
        "ready",
        pool.stage,
        pool.model,
        gpu_type="h200",
        memory=141 * GIB,
        host="127.0.0.1",
    )


def load(scheduler: Scheduler, parts: Installation, rng: random.Random) -> int:
    """S4's load: arrivals over the window, running tasks on busy workers, each
    owing its next stage. Returns the number of tasks running."""
    features = {m: Request(model=m, prompt="a lighthouse").features for m in MODELS}
    telemetry, predictor = parts.telemetry, parts.predictions.predictor
    assert predictor is not None
    now = time.time()
    span = max(telemetry.window, 60.0)
    by_pool: dict[Pool, list[WorkerState]] = {}
    for address, record in parts.extension.workers.items():
        assert record.pool is not None
        by_pool.setdefault(record.pool, []).append(scheduler.workers[address])
    running = 0
    for pool, members in sorted(by_pool.items()):
        rate = RATE / len(MODELS)
        arrivals = telemetry.arrivals[pool]
        t = now - span
        while (t := t + rng.expovariate(rate)) < now:
            arrivals.append(t)
        seconds = predictor.predict(
            pool.model, pool.stage, "h200", features[pool.model]
        ).seconds
        busy = min(len(members), round(rate * seconds))
        for i, ws in enumerate(members[:busy]):
            request = f"{pool.model}-{pool.stage}-{i}"
            info = {"request": request, "features": features[pool.model]}
            ts = task(scheduler, f"{pool.stage}-{request}", "processing", pool, info)
            ts.processing_on = ws
            ws.add_to_processing(ts)
            ws.executing[ts] = rng.uniform(0, seconds)
            running += 1
            if pool.stage != "vae":
                after = Pool("dit" if pool.stage == "encoder" else "vae", pool.model)
                task(scheduler, f"{after.stage}-{request}", "waiting", after, info)
    return running


def task(
    scheduler: Scheduler, key: str, state: str, pool: Pool, info: dict[str, Any]
) -> TaskState:
    """A stage task of ``pool`` in ``state``, annotated as dflow's client does."""
    ts = scheduler.new_task(key, None, state)
    ts.annotations = {"dflow": {"stage": pool.stage, "model": pool.model, **info}}
    return ts


def timed(parts: Installation, steps: int, profile: cProfile.Profile | None) -> str:
    controller = parts.controller
    controller._step_cpu_seconds.clear()
    controller._step_seconds.clear()
    if profile is not None:
        profile.enable()
    for _ in range(steps):
        controller.step()
    if profile is not None:
        profile.disable()
    cpu = sorted(controller.planning_seconds(cpu=True))
    wall = controller.planning_seconds()
    return (
        f"CPU median {statistics.median(cpu) * 1e3:.2f} ms "
        f"(min {cpu[0] * 1e3:.2f}, max {cpu[-1] * 1e3:.2f}), "
        f"wall median {statistics.median(wall) * 1e3:.2f} ms; "
        f"{controller.last_plan.get('reason')}"
    )


async def main(workers: int, steps: int, profile: bool) -> None:
    rng = random.Random(4)
    with dask.config.set(
        {
            "dflow.health.enabled": False,
            "dflow.elastic.interval": "1h",  # steps run here, not on a timer
            "distributed.scheduler.work-stealing": False,
            # it reads the memory of heartbeats, which these workers never send
            "distributed.scheduler.active-memory-manager.start": False,
        }
    ):
        async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
            parts = await install(scheduler, predictor=default_predictor())
            for index, (stage, model) in enumerate(layout(workers)):
                register(scheduler, parts, index, Pool(stage, model))
            profiler = cProfile.Profile() if profile else None
            print(f"{workers} workers, {steps} steps each")
            print(f"idle: {timed(parts, steps, profiler)}")
            running = load(scheduler, parts, rng)
            print(f"load ({running} tasks running): {timed(parts, steps, profiler)}")
            if profiler is not None:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=51)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.workers, args.steps, args.profile))
