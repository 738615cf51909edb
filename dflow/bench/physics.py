"""The physics of a benchmark fleet (pure): what the profile says it can serve.

Prices each pool of a request mix per GPU type from the emulated cost model
(:func:`pool_work`), finds the best integer allocation of the fleet's workers to
pools (:func:`best_allocation`), and bounds a run's throughput and latency with
fluid queues over its trace (:func:`bound`, :func:`fluid_latencies`). The method
is in ``benchmarks/results-bench.md`` ("Bound").
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

import dask.config

from dflow import families
from dflow.errors import StageOutOfMemory
from dflow.pools import MONOLITHIC, STAGES, Pool, base_stage
from dflow.predictor import batch_limit
from dflow.quantization import configured

if TYPE_CHECKING:
    from dflow.bench.scenarios import Scenario
    from dflow.bench.workload import TraceEntry

#: {pool: {gpu type: workers}}
Allocation = dict[Pool, dict[str, int]]

#: The ways a fleet serves a request: whole-pipeline replicas, stage pools, and
#: stage pools with a two-expert model's DiT split into one pool per expert
#: (the chain :data:`~dflow.pools.EXPERT_CHAIN`; a model of one DiT runs the
#: stage pools' chain there too)
KINDS = ("monolithic", "disaggregated", "experts")

#: Each mode's physical ceiling: (kind, whether its allocation is the static
#: one for the run's average mix). A static mode cannot follow the phases, so
#: its bound is its own allocation's capacity per phase; a mode that moves
#: workers is bounded by the best allocation of each phase.
BOUNDS = {
    "monolithic": ("monolithic", True),
    "monolithic_autoscaled": ("monolithic", False),
    "static": ("disaggregated", True),
    "disagfusion": ("disaggregated", False),
    "prediction_only": ("disaggregated", False),
    "feedback_only": ("disaggregated", False),
    "elastic": ("disaggregated", False),
    "synchronous": ("disaggregated", True),
    "static_experts": ("experts", True),
}


# -- a pool's work and the best allocation ---------------------------------------------


def request_seconds(
    cost: Any,
    request: Any,
    pool: Pool,
    gpu_type: str,
    max_batch: int | None = None,
    quantize: str | None = None,
) -> float:
    """Emulated seconds one request costs ``pool`` on ``gpu_type`` (``inf``: does
    not fit), at the cheapest per-request batch up to ``max_batch`` that fits:
    default ``dflow.runtime.max-batch`` for encoder and VAE calls,
    ``dflow.runtime.max-dit-batch`` for DiT and monolithic ones, whose batches
    stop where the runtime's would (:func:`~dflow.predictor.batch_limit`: no
    more than gains ``dflow.runtime.dit-batch-min-gain``); an expert's pool
    runs one request at a time. ``quantize``: the DiT's weights in 8 bits
    (int8, fp8; default the pool's stage's ``dflow.runtime.quantize``)."""
    stage, _ = pool
    spec, features = request.spec, request.features
    quantize = quantize or configured(stage)
    stages = STAGES if stage == MONOLITHIC else (stage,)
    denoises = stage in ("dit", MONOLITHIC)
    if max_batch is None:
        setting = "max-dit-batch" if denoises else "max-batch"
        max_batch = int(dask.config.get(f"dflow.runtime.{setting}"))
    if base_stage(stage) == "dit" and not denoises:
        max_batch = 1
    if denoises and max_batch > 1:
        price = cost.dit_batch_price(spec, stages, gpu_type)
        max_batch = batch_limit(
            lambda batch: price(features, batch),
            max_batch,
            min_gain=float(dask.config.get("dflow.runtime.dit-batch-min-gain")),
        )
    best = math.inf
    for batch in range(1, max_batch + 1):
        try:
            seconds = cost.placement(
                spec, stages, gpu_type, features, batch, quantize=quantize
            )
        except StageOutOfMemory:
            break
        best = min(best, seconds.seconds / batch)
    return best


def pool_work(
    cost: Any,
    mix: Sequence[tuple[Any, float]],
    gpu_types: Iterable[str],
    monolithic: bool,
    chain: Sequence[str] = STAGES,
    quantize: str | None = None,
    *,
    experts: bool = False,
) -> dict[Pool, dict[str, float]]:
    """Seconds per request of ``mix`` (``(request, weight)`` pairs, weights
    summing to 1) that each pool costs on each GPU type; a disaggregated
    request runs through ``chain`` (:data:`~dflow.pools.EXPERT_CHAIN`: one
    pool per expert), or with ``experts`` through its model's expert chain
    where it has one (:func:`expert_chain`)."""
    gpu_types = sorted(set(gpu_types))
    total = sum(w for _, w in mix)
    work: dict[Pool, dict[str, float]] = {}
    for request, weight in mix:
        if weight <= 0:
            continue
        if monolithic:
            stages: Sequence[str] = (MONOLITHIC,)
        else:
            stages = expert_chain(request.spec) if experts else chain
        for stage in stages:
            pool = Pool(stage, request.model)
            entry = work.setdefault(pool, dict.fromkeys(gpu_types, 0.0))
            for gpu in gpu_types:
                entry[gpu] += (
                    weight
                    / total
                    * request_seconds(cost, request, pool, gpu, quantize=quantize)
                )
    return work


def expert_chain(spec: Any) -> tuple[str, ...]:
    """The chain of a request of ``spec`` whose experts run in pools of their
    own (:data:`~dflow.pools.EXPERT_CHAIN`), or :data:`~dflow.pools.STAGES`
    for a model of one DiT."""
    return families.of(spec).chains(spec)[-1]


def has_experts(spec: Any) -> bool:
    """Whether a request of ``spec`` can run its experts in pools of their own."""
    return expert_chain(spec) != STAGES


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


# -- a scenario's physics ---------------------------------------------------------------


@dataclass
class Physics:
    """What the profile says a scenario's fleet can do.

    ``kind`` is one of :data:`KINDS`: ``capacity[kind]`` is
    the best allocation's rate of each phase's mix (what a mode that follows the
    phases could sustain), ``allocation[kind]`` the best static allocation for
    the run's average mix and ``static_capacity[kind]`` its rate of each phase's
    mix (what a static deployment sustains as the mix moves away from it: the
    rate at which its first model saturates). ``model_capacity[kind]`` is the
    static allocation's rate of each model's requests alone: its models' pools
    are separate, so each model is a queue of its own.
    """

    fleet: dict[str, int]
    phases: list[tuple[float, float]]  # (start, end)
    mixes: list[list[tuple[Any, float]]]
    average: list[tuple[Any, float]]
    #: requests per second each phase offers (arrivals times images)
    rates: list[float] = field(default_factory=list)
    capacity: dict[str, list[float]] = field(default_factory=dict)
    allocation: dict[str, Allocation] = field(default_factory=dict)
    average_capacity: dict[str, float] = field(default_factory=dict)
    static_capacity: dict[str, list[float]] = field(default_factory=dict)
    model_capacity: dict[str, dict[str, float]] = field(default_factory=dict)
    reference_latency: dict[str, float] = field(default_factory=dict)
    #: per model, seconds a request costs one replica of each GPU type
    replica_seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    def mode_capacity(self, mode: str) -> list[float]:
        """Per phase, the rate ``mode``'s physics sustains (see ``BOUNDS``)."""
        kind, static = BOUNDS[mode]
        return (self.static_capacity if static else self.capacity)[kind]

    def saturation(self, mode: str) -> float | None:
        """The multiple of the workload's rates at which ``mode``'s physics
        saturates in its tightest phase (``None``: no arrivals)."""
        multiples = [
            c / r for c, r in zip(self.mode_capacity(mode), self.rates) if r > 0
        ]
        return min(multiples, default=None)

    def mode_bound(
        self, mode: str, entries: Sequence[TraceEntry], window: tuple[float, float]
    ) -> float:
        """Most requests per second ``mode``'s physics completes in ``window``
        (:func:`bound`). A mode that moves workers: one fluid queue drained at
        the best allocation's rate of each phase's mix. A static mode: one
        fluid queue per model at its pools' rate (a model's requests queue for
        its own pools, which serve them whatever the others do), summed: an
        upper bound for the static allocation."""
        kind, static = BOUNDS[mode]
        if not static:
            return bound(
                [e.t for e in entries], self.phases, self.capacity[kind], window
            )
        total = 0.0
        for model, rate in self.model_capacity[kind].items():
            times = [e.t for e in entries if e.model == model]
            if times:
                total += bound(times, [(0.0, window[1])], [rate], window)
        return total


#: The template fields that shape a request's cost
SHAPE = ("height", "width", "num_frames", "steps", "guidance_scale")


def template_request(template: Any) -> Any:
    """The request a template (or trace entry) makes, model defaults filled
    (an image-to-video template's with a blank input image)."""
    from dflow.bench.workload import BLANK_IMAGE
    from dflow.request import Request

    fields = {
        k: getattr(template, k) for k in SHAPE if getattr(template, k) is not None
    }
    if getattr(template, "image", False):
        fields["image"] = BLANK_IMAGE
    return Request(model=template.model, prompt="x", seed=0, **fields)


def mix_of(
    templates: Sequence[Any], weights: Sequence[float]
) -> list[tuple[Any, float]]:
    """``(request, weight)`` pairs of a phase's templates (model defaults
    filled), weighted by requests: a template of ``k`` images per prompt makes
    ``k`` requests an arrival. (Its requests share one text encoding; the
    bounds price an encoding each, which costs the encoder pool a few percent of
    its work at most and never makes it the bottleneck.)"""
    weights = [w * getattr(t, "mean_images", 1.0) for t, w in zip(templates, weights)]
    total = sum(weights)
    return [(template_request(t), w / total) for t, w in zip(templates, weights)]


def physics(scenario: Scenario, cost: Any) -> Physics:
    """Bounds and best static allocations of ``scenario``'s fleet (emulated
    costs), under the scenario's dask config (its 8-bit DiT weights)."""
    with dask.config.set(scenario.config):
        return _physics(scenario, cost)


def _physics(scenario: Scenario, cost: Any) -> Physics:
    workload = scenario.workload
    phases = workload.phases
    duration = scenario.duration
    spans, mixes, rates = [], [], []
    expected: dict[int, float] = defaultdict(float)
    requests: dict[int, Any] = {}
    for index, phase in enumerate(phases):
        end = phases[index + 1].start if index + 1 < len(phases) else duration
        end = min(end, duration)
        if end <= phase.start:
            continue
        spans.append((phase.start, end))
        mix = mix_of(phase.mix, [t.weight for t in phase.mix])
        mixes.append(mix)
        images = sum(t.weight * t.mean_images for t in phase.mix) / sum(
            t.weight for t in phase.mix
        )
        rates.append(phase.arrivals.rate * images)
        for (request, weight), template in zip(mix, phase.mix):
            key = hash((template.model, *(getattr(template, k) for k in SHAPE)))
            requests[key] = request
            expected[key] += phase.arrivals.rate * images * (end - phase.start) * weight
    total = sum(expected.values()) or 1.0
    average = [(requests[k], v / total) for k, v in expected.items() if v > 0]
    result = Physics(dict(scenario.fleet), spans, mixes, average, rates)
    split = any(has_experts(r.spec) for r, _ in average)
    fleet = scenario.fleet
    for kind in KINDS:
        if kind == "experts" and not split:
            # no model splits its experts: the stage pools' physics
            result.allocation[kind] = result.allocation["disaggregated"]
            result.average_capacity[kind] = result.average_capacity["disaggregated"]
            result.capacity[kind] = result.capacity["disaggregated"]
            result.static_capacity[kind] = result.static_capacity["disaggregated"]
            result.model_capacity[kind] = result.model_capacity["disaggregated"]
            continue

        def work(mix: Sequence[tuple[Any, float]], kind: str = kind) -> Any:
            return pool_work(
                cost, mix, fleet, kind == "monolithic", experts=kind == "experts"
            )

        rate, allocation = best_allocation(fleet, work(average))
        result.allocation[kind] = allocation
        result.average_capacity[kind] = rate
        result.capacity[kind] = [best_allocation(fleet, work(mix))[0] for mix in mixes]
        result.static_capacity[kind] = [
            capacity(allocation, work(mix)) for mix in mixes
        ]
        # a model's requests of several shapes: its own mix of them
        result.model_capacity[kind] = {
            model: capacity(
                allocation, work([(r, w) for r, w in average if r.model == model])
            )
            for model in {r.model for r, _ in average}
        }
    result.reference_latency = reference_latency(cost, average, scenario.fleet)
    for model in {r.model for r, _ in average}:
        shapes = [(r, w) for r, w in average if r.model == model]
        total = sum(w for _, w in shapes)
        result.replica_seconds[model] = {
            g: sum(
                w / total * request_seconds(cost, r, Pool(MONOLITHIC, model), g, 1)
                for r, w in shapes
            )
            for g in scenario.fleet
        }
    return result


def reference_latency(
    cost: Any, mix: Sequence[tuple[Any, float]], fleet: Mapping[str, int]
) -> dict[str, float]:
    """Per model, the latency of one request alone on the fleet's best deployment:
    the lesser of a monolithic replica and a stage per GPU, on the fastest type
    that holds it (the SLOs are multiples of it)."""
    latency: dict[str, float] = {}
    for request, _ in mix:
        best = latency_alone(cost, request, fleet)
        latency[request.model] = max(latency.get(request.model, 0.0), best)
    return latency


def latency_alone(cost: Any, request: Any, fleet: Mapping[str, int]) -> float:
    """The latency of ``request`` alone on the fleet's best deployment: the
    lesser of a monolithic replica and a stage per GPU, on the fastest type
    that holds each."""
    mono = min(
        request_seconds(cost, request, Pool(MONOLITHIC, request.model), g, 1)
        for g in fleet
    )
    split = sum(
        min(request_seconds(cost, request, Pool(s, request.model), g, 1) for g in fleet)
        for s in STAGES
    )
    return min(mono, split)


def bound(
    arrivals: Sequence[float],
    phases: Sequence[tuple[float, float]],
    capacities: Sequence[float],
    window: tuple[float, float],
) -> float:
    """Most requests per second any allocation could complete in ``window``: a
    fluid queue fed by the trace's ``arrivals`` and drained at each phase's
    best-allocation rate (:func:`fluid_departures`)."""
    start, end = window
    pieces = [(s, c) for (s, _), c in zip(phases, capacities)]
    departures = fluid_departures(arrivals, pieces, end, step=0.5)
    grid = np.arange(0.0, end + 0.5, 0.5)
    done = np.interp([start, end], grid, departures)
    return float(done[1] - done[0]) / (end - start)


def fluid_latencies(
    arrivals: Sequence[float], rate: float, service: float, horizon: float
) -> list[float]:
    """Least latency of each of ``arrivals`` (sorted) at a server of ``rate``
    requests per second taking ``service`` seconds each: the fluid queue's
    wait (:func:`fluid_departures`) plus the service. A
    lower bound: it ignores that arrivals are discrete and service varies."""
    if not len(arrivals):
        return []
    if rate <= 0:
        return [math.inf] * len(arrivals)
    step = 0.5
    end = max(horizon, arrivals[-1]) + len(arrivals) / rate + step
    departures = fluid_departures(arrivals, [(0.0, rate)], end, step=step)
    grid = np.arange(0.0, end + step, step)
    index = np.searchsorted(departures, np.arange(1, len(arrivals) + 1) - 1e-9)
    done = grid[np.minimum(index, len(grid) - 1)]
    return [max(0.0, d - a) + service for a, d in zip(arrivals, done)]


def static_monolithic_latencies(
    p: Physics,
    entries: Sequence[TraceEntry],
    window: tuple[float, float],
    stop: float = math.inf,
) -> list[tuple[str, float]]:
    """Lower bounds on the latencies of (a), the static monolithic partition:
    each model's replicas are a fluid server of their summed rate (a model's
    requests queue for its own replicas only), plus the request's time on a
    replica. ``(model, latency)`` of the requests arriving in ``window``, a
    latency capped at the request's age at ``stop`` (what a run that stops then
    can measure)."""
    allocation = p.allocation["monolithic"]
    start, end = window
    latencies: list[tuple[str, float]] = []
    for model, seconds in p.replica_seconds.items():
        replicas = allocation.get(Pool(MONOLITHIC, model), {})
        rate = sum(n / seconds[g] for g, n in replicas.items() if seconds[g] > 0)
        service = min((seconds[g] for g, n in replicas.items() if n), default=math.inf)
        times = sorted(e.t for e in entries if e.model == model)
        for t, latency in zip(times, fluid_latencies(times, rate, service, end)):
            if start <= t < end:
                latencies.append((model, min(latency, stop - t)))
    return latencies
