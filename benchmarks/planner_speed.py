"""How long the planner takes to decide, at 10, 100 and 1,000 workers.

A mixed fleet (H200, A100-80GB, L4) serves six pools: the encoder, DiT and VAE of
Flux.1-dev and Wan2.1-T2V-14B, with the memory needs of the H200 profile (an L4
cannot hold either DiT). Three decisions are timed:

- cold: every worker unassigned (a fleet starting up);
- steady: the fleet as the cold plan left it, demand jittered by 10% (no move);
- shift: the demand mix flips from Flux to Wan (many moves).

With ``--deadlines`` every pool's demand also carries deadlines (the
planner then counts the requests that meet them): 20 s of owed tasks due in
2-58 s, and arrivals with a 60 s SLO.

Run with ``python benchmarks/planner_speed.py [--repeats N] [--deadlines]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Iterator

from dflow.planner import Demand, PlannerWorker, PoolCost, plan
from dflow.pools import Pool

GIB = 2**30
MODELS = ("flux.1-dev", "wan2.1-t2v-14b")
#: GPU type: (memory, DiT speed relative to an H200)
GPUS = {"h200": (141 * GIB, 1.0), "a100-80gb": (80 * GIB, 0.5), "l4": (24 * GIB, 0.15)}
#: bytes each pool needs: weights plus peak activations
MEMORY = {
    ("encoder", "flux.1-dev"): 10 * GIB,
    ("dit", "flux.1-dev"): 25 * GIB,
    ("vae", "flux.1-dev"): 3 * GIB,
    ("encoder", "wan2.1-t2v-14b"): 12 * GIB,
    ("dit", "wan2.1-t2v-14b"): 34 * GIB,
    ("vae", "wan2.1-t2v-14b"): 5 * GIB,
}


def costs() -> dict[Pool, PoolCost]:
    # the encoder and VAE are memory-bound: slow types lose less there
    return {
        pool: PoolCost(
            speeds={
                gpu: speed if pool[0] == "dit" else speed**0.6
                for gpu, (_, speed) in GPUS.items()
            },
            memory_bytes=memory,
            switch_seconds=dict.fromkeys(GPUS, 20.0 if pool[0] == "dit" else 8.0),
        )
        for pool, memory in MEMORY.items()
    }


#: reference seconds of one task of each stage, with ``--deadlines``
TASK_SECONDS = {"encoder": 0.5, "dit": 10.0, "vae": 1.0}


def demands(
    workers: int,
    flux_share: float,
    rng: random.Random,
    jitter: float,
    deadlines: bool = False,
) -> dict[Pool, Demand]:
    """Reference seconds of work per second, 95% of it on the DiTs; with
    ``deadlines``, 20 s of it owed, due in 2-58 s, and a 60 s SLO."""
    total = 0.7 * workers * 0.6
    shares = {"encoder": 0.02, "dit": 0.95, "vae": 0.03}
    result = {}
    for stage, model in MEMORY:
        rate = (
            total
            * shares[stage]
            * (flux_share if model == MODELS[0] else 1 - flux_share)
            * rng.uniform(1 - jitter, 1 + jitter)
        )
        if not deadlines:
            result[Pool(stage, model)] = Demand(rate=rate)
            continue
        task = TASK_SECONDS[stage]
        owed = rate * 20.0 / task
        result[Pool(stage, model)] = Demand(
            rate=rate,
            backlog=owed * task,
            task_seconds=task,
            due=tuple((2.0 + 8.0 * k, owed / 8) for k in range(8)),
            slo=60.0,
        )
    return result


def timed(repeats: int, *args, **kwargs):
    """Median wall and CPU seconds of a decision, and the plan. CPU time is
    the steadier figure on a shared machine."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        result = plan(*args, **kwargs)
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return (
        f"{statistics.median(wall) * 1e3:.2f} ({statistics.median(cpu) * 1e3:.2f})",
        result,
    )


def scenarios(
    n: int, rng: random.Random, deadlines: bool = False
) -> Iterator[tuple[str, list[PlannerWorker], dict[Pool, Demand], float]]:
    """The three decisions at ``n`` workers: name, fleet, demand and time."""
    pool_costs = costs()
    fleet = [
        PlannerWorker(f"gpu-{i:04d}", gpu, GPUS[gpu][0])
        for i, gpu in enumerate(rng.choice(list(GPUS)) for _ in range(n))
    ]
    before = demands(n, 0.8, rng, 0.0, deadlines)
    yield "cold", fleet, before, 0.0
    cold = plan(fleet, before, pool_costs, now=0.0)
    placed = [
        PlannerWorker(w.name, w.gpu_type, w.memory_bytes, cold.assignment[w.name])
        for w in fleet
    ]
    yield "steady", placed, demands(n, 0.8, rng, 0.1, deadlines), 100.0
    yield "shift", placed, demands(n, 0.2, rng, 0.0, deadlines), 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument(
        "--deadlines", action="store_true", help="demand with deadlines"
    )
    args = parser.parse_args()
    rng = random.Random(0)
    pool_costs = costs()
    print("median decision time, wall ms (CPU ms)")
    print(
        f"{'workers':>8} {'cold':>14} {'steady':>14} {'shift':>14} "
        f"{'moves':>6} {'bottleneck':>11}"
    )
    for n in (10, 100, 1000):
        times, plans = {}, {}
        for name, workers, demand, now in scenarios(n, rng, args.deadlines):
            times[name], plans[name] = timed(
                args.repeats, workers, demand, pool_costs, now=now
            )
        steady, shift = plans["steady"], plans["shift"]
        assert not steady.moves, steady.reason
        met = f" {shift.met:.0f} of {shift.due:.0f}" if args.deadlines else ""
        print(
            f"{n:>8} {times['cold']:>14} {times['steady']:>14} {times['shift']:>14} "
            f"{len(shift.moves):>6} {shift.utilization[shift.bottleneck]:>11.2f}{met}"
        )


if __name__ == "__main__":
    main()
