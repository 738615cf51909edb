"""Physical bounds of a fleet: the best allocation's throughput, from the profile.

A pool is a stage of a model (``("dit", "flux.1-dev")``; ``("all", model)`` for a
monolithic replica). :func:`pool_work` prices, per pool and GPU type, the seconds
one request *of the mix* costs there: a mix-weighted sum over the request
templates of the emulated cost model's time (:mod:`dflow.emulation`), with the
encoder and VAE at their best batch (up to ``dflow.runtime.max-batch`` requests
whose activations fit the card), the DiT at batch 1 (dflow never batches it) and
a monolithic replica at its placement (resident, or the cheaper offload when the
pipeline does not fit). A type whose memory cannot hold a pool's request costs
``inf`` there.

:func:`best_allocation` then finds the largest request rate ``lam`` of the mix
that some integer assignment of the fleet's workers to pools sustains, every pool
``p`` with work getting workers whose summed speed covers it::

    sum over GPU types g of n[p, g] / work[p, g] >= lam

It is exact: a bisection on ``lam`` over a dynamic programme on the workers left
per GPU type (a handful of types, so the states stay few). This is the bound the
benchmark divides achieved throughput by (``bound_ratio``): the best allocation's
bottleneck stage, for the mode's physics (monolithic replicas or stage pools).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

import dask.config

from dflow.errors import StageOutOfMemory
from dflow.spec import STAGES

#: (stage, model)
Pool = tuple[str, str]
#: {pool: {gpu type: workers}}
Allocation = dict[Pool, dict[str, int]]


def request_seconds(
    cost: Any, request: Any, pool: Pool, gpu_type: str, max_batch: int | None = None
) -> float:
    """Emulated seconds one request costs ``pool`` on ``gpu_type`` (``inf``: does
    not fit). Encoder and VAE calls take the cheapest per-request batch up to
    ``max_batch`` (config ``dflow.runtime.max-batch``) that fits."""
    stage, _ = pool
    spec, features = request.spec, request.features
    try:
        if stage == "all":
            return cost.placement(spec, STAGES, gpu_type, features).seconds
        if stage == "dit":
            return cost.placement(spec, [stage], gpu_type, features).seconds
        if max_batch is None:
            max_batch = int(dask.config.get("dflow.runtime.max-batch"))
        best = math.inf
        for batch in range(1, max_batch + 1):
            try:
                seconds = cost.placement(spec, [stage], gpu_type, features, batch)
            except StageOutOfMemory:
                break
            best = min(best, seconds.seconds / batch)
        return best
    except StageOutOfMemory:
        return math.inf


def pool_work(
    cost: Any,
    mix: Sequence[tuple[Any, float]],
    gpu_types: Iterable[str],
    monolithic: bool,
) -> dict[Pool, dict[str, float]]:
    """Seconds per request of ``mix`` (``(request, weight)`` pairs, weights
    summing to 1) that each pool costs on each GPU type."""
    gpu_types = sorted(set(gpu_types))
    stages = ("all",) if monolithic else STAGES
    total = sum(w for _, w in mix)
    work: dict[Pool, dict[str, float]] = {}
    for request, weight in mix:
        if weight <= 0:
            continue
        for stage in stages:
            pool = (stage, request.model)
            entry = work.setdefault(pool, dict.fromkeys(gpu_types, 0.0))
            for gpu in gpu_types:
                entry[gpu] += weight / total * request_seconds(cost, request, pool, gpu)
    return work


def capacity(allocation: Mapping[Pool, Mapping[str, int]], work) -> float:
    """Requests per second of the mix a fixed allocation sustains: its
    bottleneck pool's."""
    rates = []
    for pool, per_type in work.items():
        speed = sum(
            n / per_type[g]
            for g, n in allocation.get(pool, {}).items()
            if n and per_type.get(g, math.inf) > 0
        )
        if any(0 < w < math.inf for w in per_type.values()) or speed:
            rates.append(speed)
    return min(rates, default=math.inf)


def best_allocation(
    fleet: Mapping[str, int],
    work: Mapping[Pool, Mapping[str, float]],
    *,
    fill: bool = True,
) -> tuple[float, Allocation]:
    """The largest rate of the mix the fleet sustains, and an allocation that does.

    Parameters
    ----------
    fleet
        Workers per GPU type.
    work
        :func:`pool_work`.
    fill
        Give the workers the bottleneck does not need to the pools with the
        least headroom (a static deployment uses its whole fleet); otherwise
        they stay unassigned.

    Returns ``(0.0, {})`` when some pool with work fits no GPU type or there are
    fewer workers than pools.
    """
    types = sorted(g for g, n in fleet.items() if n > 0)
    pools = sorted(p for p, w in work.items() if any(v > 0 for v in w.values()))
    if not pools:
        return math.inf, {}
    speed = {p: [1 / work[p].get(g, math.inf) for g in types] for p in pools}
    counts = [fleet[g] for g in types]
    high = min(sum(n * s for n, s in zip(counts, speed[p])) for p in pools)
    if high <= 0 or _feasible(counts, pools, speed, 1e-12 * high) is None:
        return 0.0, {}
    low = 0.0
    best = _feasible(counts, pools, speed, low)
    for _ in range(60):
        middle = (low + high) / 2
        found = _feasible(counts, pools, speed, middle)
        if found is None:
            high = middle
        else:
            low, best = middle, found
        if high - low <= 1e-9 * high:
            break
    assert best is not None
    allocation: Allocation = {
        p: {g: n for g, n in zip(types, best[p]) if n} for p in pools
    }
    if fill:
        _fill(allocation, fleet, work)
    return capacity(allocation, work) if fill else low, allocation


def _options(speeds: list[float], left: tuple[int, ...], rate: float):
    """Minimal worker counts per type (within ``left``) whose speed covers ``rate``."""
    *firsts, last = range(len(left))
    for head in itertools.product(*(range(left[i] + 1) for i in firsts)):
        covered = sum(n * speeds[i] for n, i in zip(head, firsts))
        missing = rate - covered
        if missing <= rate * 1e-12:
            tail = 0
        elif speeds[last] <= 0:
            continue
        else:
            tail = math.ceil(missing / speeds[last] - 1e-9)
        if tail <= left[last]:
            yield (*head, tail)


def _feasible(
    counts: list[int], pools: list[Pool], speed: dict[Pool, list[float]], rate: float
) -> dict[Pool, tuple[int, ...]] | None:
    """An allocation sustaining ``rate`` (every pool at least one worker), or None."""
    states: dict[tuple[int, ...], dict[Pool, tuple[int, ...]]] = {tuple(counts): {}}
    # the pools with the fewest capable types first: fewer states early
    order = sorted(pools, key=lambda p: (sum(s > 0 for s in speed[p]), p))
    for pool in order:
        following: dict[tuple[int, ...], dict[Pool, tuple[int, ...]]] = {}
        for left, chosen in states.items():
            for option in _options(speed[pool], left, rate):
                if not any(option):
                    option = _one_worker(speed[pool], left)
                    if option is None:
                        continue
                rest = tuple(a - b for a, b in zip(left, option))
                if rest not in following:
                    following[rest] = {**chosen, pool: option}
        if not following:
            return None
        states = _undominated(following)
    return next(iter(states.values()))


def _one_worker(speeds: list[float], left: tuple[int, ...]) -> tuple[int, ...] | None:
    """The slowest capable worker left: a pool with work needs one."""
    capable = [i for i, s in enumerate(speeds) if s > 0 and left[i] > 0]
    if not capable:
        return None
    i = min(capable, key=lambda i: speeds[i])
    return tuple(int(j == i) for j in range(len(left)))


def _undominated(states: dict[tuple[int, ...], Any]) -> dict[tuple[int, ...], Any]:
    """Drop states with no more workers of any type left than another state."""
    keys = sorted(states, key=lambda k: -sum(k))
    kept: list[tuple[int, ...]] = []
    for key in keys:
        if not any(all(a >= b for a, b in zip(other, key)) for other in kept):
            kept.append(key)
    return {k: states[k] for k in kept}


def _fill(allocation: Allocation, fleet: Mapping[str, int], work) -> None:
    """Assign the workers left to the pool whose rate gains most relative to the
    current bottleneck (largest-remainder style, one worker at a time)."""
    used = {g: sum(a.get(g, 0) for a in allocation.values()) for g in fleet}
    pools = list(allocation)
    for gpu in sorted(fleet):
        for _ in range(fleet[gpu] - used[gpu]):
            capable = [p for p in pools if 0 < work[p].get(gpu, math.inf) < math.inf]
            if not capable:
                break

            def rate(p: Pool) -> float:
                return sum(n / work[p][g] for g, n in allocation[p].items())

            # the pool with the least headroom that this type can serve
            target = min(capable, key=lambda p: (rate(p), p))
            allocation[target][gpu] = allocation[target].get(gpu, 0) + 1


def fluid_departures(
    arrivals: Sequence[float],
    capacities: Sequence[tuple[float, float]],
    horizon: float,
    step: float = 1.0,
) -> np.ndarray:
    """Most requests done by each ``step`` up to ``horizon`` (a fluid queue).

    ``arrivals`` are arrival times; ``capacities`` ``(start, rate)`` pieces of the
    rate the fleet can serve from ``start`` on. Departures by ``t`` are at most
    ``min over s <= t of A(s-) + C(t) - C(s)``: what arrived before ``s`` plus all the
    capacity since (the queue starts empty; service takes no time).
    """
    grid = np.arange(0.0, horizon + step, step)
    # A(s-): what arrived before s, so nothing is done before capacity exists
    counts = np.searchsorted(np.sort(np.asarray(arrivals)), grid, side="left")
    starts = [s for s, _ in capacities]
    rates = np.array([r for _, r in capacities])
    index = np.searchsorted(starts, grid[:-1], side="right") - 1
    served = np.concatenate([[0.0], np.cumsum(rates[np.maximum(index, 0)] * step)])
    # D(t) = C(t) + min over s <= t of (A(s) - C(s))
    return served + np.minimum.accumulate(counts - served)
