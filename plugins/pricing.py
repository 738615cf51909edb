"""Observing and pricing: the fleet and its load as the planner takes them.

The elastic controller reads the scheduler into an :class:`Observation` (plain
data: workers, and per pool the work owed, arrivals and observed times), then
everything here is a pure function of it: the planner's view of each worker
(:func:`planner_workers`, :func:`dwelling`, :func:`barring`, :func:`timing`),
what each pool costs (:func:`price_pools`), the demand on it (:func:`demands`),
the plan (:func:`plan_pools`, around :func:`dflow.planner.plan`) and the
workers a growing cluster should give each pool (:func:`pool_targets`). No
scheduler: the controller passes its :class:`Settings` and its :class:`Memory`
of past moves.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import dask.config
from dask.utils import parse_timedelta

import dflow.config  # noqa: F401
from dflow.planner import Demand, Plan, PlannerWorker, PoolCost, plan
from dflow.pools import MONOLITHIC, Pool
from dflow.predictor import Predictor

#: Service times the controller can plan with (``dflow.elastic.pricing``):
#: the predictor's, observed ones where no profile covers a pool; the
#: predictor's alone; observed ones alone
PRICING = ("hybrid", "prediction", "feedback")


@dataclass(frozen=True)
class Settings:
    """The controller's settings (``dflow.elastic``, ``dflow.planner``,
    ``dflow.telemetry``), in seconds."""

    horizon: float
    cooldown: float
    dwell: float
    default_switch: float
    window: float
    target_utilization: float
    #: service times planned with (:data:`PRICING`)
    pricing: str = "hybrid"

    @classmethod
    def from_config(cls) -> Settings:
        return cls(
            horizon=parse_timedelta(dask.config.get("dflow.planner.horizon")),
            cooldown=parse_timedelta(dask.config.get("dflow.planner.cooldown")),
            dwell=float(dask.config.get("dflow.elastic.dwell")),
            default_switch=parse_timedelta(
                dask.config.get("dflow.elastic.default-switch")
            ),
            window=parse_timedelta(dask.config.get("dflow.telemetry.window")),
            target_utilization=float(
                dask.config.get("dflow.elastic.target-utilization")
            ),
            pricing=pricing(dask.config.get("dflow.elastic.pricing")),
        )


def pricing(value: str) -> str:
    """``dflow.elastic.pricing``, checked."""
    if value not in PRICING:
        raise ValueError(
            f"dflow.elastic.pricing must be one of {', '.join(PRICING)}, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class WorkerView:
    """A worker as the controller sees it."""

    address: str
    name: str
    state: str  # loading | ready | draining | failed
    pool: Pool | None
    gpu_type: str
    memory: int
    #: tasks are placed on it (running or queued)
    busy: bool = False
    #: seconds its longest-running task has run (``None``: none runs)
    running_s: float | None = None
    #: the pool the actuator is moving it to (``None``: it stays)
    moving_to: Pool | None = None
    #: its speed relative to its GPU type (``None``: not measured yet)
    speed: float | None = None
    #: pools whose weights it keeps in host memory (a fast switch back)
    parked: frozenset[Pool] = frozenset()


@dataclass(frozen=True)
class PoolView:
    """A pool's load as the controller sees it."""

    #: stage tasks that requests in flight still owe
    owed: int = 0
    #: features of the newest owed task, and of the latest finished one
    newest: Mapping[str, Any] | None = None
    #: the owed tasks' distinct features, each with how many tasks owe it
    shapes: Sequence[tuple[Mapping[str, Any], int]] = ()
    recent: Mapping[str, Any] | None = None
    #: observed seconds per request (telemetry's moving average)
    observed_s: float | None = None
    #: stage tasks arriving per second over the telemetry window
    rate: float = 0.0
    #: seconds since each arrival over the planning horizon (at least the
    #: window), youngest first
    arrivals: Sequence[float] = ()
    #: stage tasks waiting for a worker of the pool
    waiting: int = 0
    #: bytes of the pool's weights on a device
    weight_bytes: int = 0
    #: seconds left to the deadline of each owed task's request (those with one)
    due: Sequence[float] = ()
    #: the SLO of the newest owed task's request (``inf``: none)
    slo: float = math.inf


@dataclass(frozen=True)
class Observation:
    """The fleet and its load at ``now``."""

    now: float
    workers: tuple[WorkerView, ...]
    pools: Mapping[Pool, PoolView]
    #: measured seconds to load and warm a pool, per (pool, GPU type)
    load_seconds: Mapping[tuple[Pool, str], float] = field(default_factory=dict)
    #: measured seconds to resume a pool's parked weights, per (pool, GPU type)
    resume_seconds: Mapping[tuple[Pool, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class Memory:
    """What the controller remembers of its moves."""

    #: time of each worker's last move (address -> time)
    moved: Mapping[str, float] = field(default_factory=dict)
    #: when each moved worker should serve its new pool
    ready_at: Mapping[str, float] = field(default_factory=dict)
    #: until when a move from a source to a target pool bars the way back
    flows: Mapping[tuple[Pool, Pool], float] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanStep:
    """A plan and what it was made of."""

    #: ``None``: no fleet, or a served pool's demand cannot be priced yet
    plan: Plan | None
    #: for status and dashboards: time, utilization per pool, bottleneck,
    #: feasible, reason
    summary: dict[str, Any]
    #: the planner's view of each worker (by address) and each pool's cost
    workers: Mapping[str, PlannerWorker] = field(default_factory=dict)
    costs: Mapping[Pool, PoolCost] = field(default_factory=dict)


@dataclass(frozen=True)
class Price:
    """What a pool's requests cost: seconds per request on the reference GPU
    type (0: unknown yet), and the planner's cost of hosting the pool."""

    seconds: float
    cost: PoolCost
    #: seconds of the work owed on the reference GPU type
    backlog: float = 0.0


# -- workers ---------------------------------------------------------------------------


def speed_factor(speed: float | None) -> float:
    """A worker's speed as the planner counts it: its measured speed against
    its GPU type once it is clearly below (under 0.9), in steps of 0.05, so
    that noise does not split workers into classes; 1.0 otherwise."""
    if speed is None or speed >= 0.9:
        return 1.0
    return max(0.05, round(speed * 20) / 20)


def planner_workers(
    observation: Observation, moved: Mapping[str, float]
) -> list[PlannerWorker]:
    """The fleet as the planner sees it (:func:`planner_worker` of each worker);
    ``moved`` is the time of each worker's last move."""
    return [planner_worker(v, observation.now, moved) for v in observation.workers]


def planner_worker(
    view: WorkerView, now: float, moved: Mapping[str, float]
) -> PlannerWorker:
    """A worker as the planner sees it: loading or being moved, it stays put
    (its cooldown starts ``now``); failed, it serves no pool; slow, it counts
    at its speed (:func:`speed_factor`)."""
    return PlannerWorker(**_seen(view, now, moved))


def _seen(view: WorkerView, now: float, moved: Mapping[str, float]) -> dict[str, Any]:
    pool = view.moving_to or view.pool
    if view.state == "failed":
        pool = None
    settling = view.state != "ready" or view.moving_to is not None
    return {
        "name": view.address,
        "gpu_type": view.gpu_type,
        "memory_bytes": view.memory,
        "pool": pool,
        "busy": view.busy,
        "last_move": now if settling else moved.get(view.address),
        "speed": speed_factor(view.speed),
        "parked": view.parked,
    }


def dwelling(
    worker: PlannerWorker, prices: Mapping[Pool, Price], settings: Settings
) -> PlannerWorker:
    """``worker`` with its cooldown stretched to ``dwell`` of its pool's
    requests: a worker that moved serves its new pool at least that many
    requests' time before it may move again, so pools of long requests (a
    video on a slow card takes minutes) do not trade workers back and forth
    faster than either can use them."""
    changes = _dwelt(worker.last_move, worker.pool, worker.gpu_type, prices, settings)
    return dataclasses.replace(worker, **changes) if changes else worker


def _dwelt(
    last_move: float | None,
    pool: Pool | None,
    gpu_type: str,
    prices: Mapping[Pool, Price],
    settings: Settings,
) -> dict[str, Any]:
    if last_move is None or pool is None or pool not in prices:
        return {}
    price = prices[pool]
    speed = price.cost.speeds.get(gpu_type) or 1.0
    dwell = settings.dwell * price.seconds / speed
    if dwell <= settings.cooldown:
        return {}
    return {"last_move": last_move + dwell - settings.cooldown}


def barring(
    worker: PlannerWorker, flows: Mapping[tuple[Pool, Pool], float], now: float
) -> PlannerWorker:
    """``worker`` barred from the pools that gave its pool a worker whose move
    has not taken effect yet (``flows``: until when each move from a source to
    a target pool is settling). The mover itself is in cooldown, but its new
    pool's other workers are not: without this, a swing of demand shorter than
    the requests sends one worker there and, a plan later, another back, each
    paying a drain and a load before it serves. Once the mover serves, the way
    back opens: a real reversal is followed without waiting out a cooldown."""
    changes = _barred(worker.pool, flows, now)
    return dataclasses.replace(worker, **changes) if changes else worker


def _barred(
    pool: Pool | None, flows: Mapping[tuple[Pool, Pool], float], now: float
) -> dict[str, Any]:
    if pool is None or not flows:
        return {}
    barred = frozenset(
        source
        for (source, target), until in flows.items()
        if target == pool and now < until
    )
    return {"barred": barred} if barred else {}


def timing(
    worker: PlannerWorker,
    view: WorkerView,
    prices: Mapping[Pool, Price],
    ready_at: Mapping[str, float],
    now: float,
) -> PlannerWorker:
    """``worker`` with how long a move would take it: a worker still moving
    serves its new pool only once its drain and load are done (``ready_in``,
    as the plan that moved it priced them: ``ready_at``); a busy worker must
    first finish its running task (``drain_seconds``: that task's predicted
    time on the worker less the time it has run; a whole task when it has not
    started). So the planner weighs a move's gain against the drain as well as
    the load, and, the step after, sees the mover as the plan that moved it did."""
    changes = _timed(
        worker.pool, worker.name, worker.gpu_type, view, prices, ready_at, now
    )
    return dataclasses.replace(worker, **changes) if changes else worker


def _timed(
    pool: Pool | None,
    name: str,
    gpu_type: str,
    view: WorkerView,
    prices: Mapping[Pool, Price],
    ready_at: Mapping[str, float],
    now: float,
) -> dict[str, Any]:
    if pool is None:
        return {}
    if view.state != "ready" or view.moving_to is not None:
        return {"ready_in": max(0.0, ready_at.get(name, now) - now)}
    price = prices.get(pool)
    if not view.busy or price is None or not price.seconds:
        return {}
    speed = price.cost.speeds.get(gpu_type) or 1.0
    service = price.seconds / speed
    if view.running_s is None:
        return {"drain_seconds": service}
    return {"drain_seconds": max(0.0, service - view.running_s)}


def planned(
    view: WorkerView,
    prices: Mapping[Pool, Price],
    memory: Memory,
    settings: Settings,
    now: float,
    barred: Mapping[Pool, frozenset[Pool]] | None = None,
) -> PlannerWorker:
    """A worker as the planner takes it: :func:`planner_worker`, its cooldown
    stretched (:func:`dwelling`), its drain or settling time (:func:`timing`)
    and the pools it is barred from (:func:`barring`; ``barred``: those of
    each pool, from ``memory.flows`` at ``now``), made in one go."""
    fields = _seen(view, now, memory.moved)
    pool, gpu_type = fields["pool"], fields["gpu_type"]
    fields.update(_dwelt(fields["last_move"], pool, gpu_type, prices, settings))
    fields.update(
        _timed(pool, fields["name"], gpu_type, view, prices, memory.ready_at, now)
    )
    if barred is None:
        fields.update(_barred(pool, memory.flows, now))
    elif pool in barred:
        fields["barred"] = barred[pool]
    return PlannerWorker(**fields)


class PlannerRecords:
    """The planner's view of every worker (:func:`planned`), kept from one
    control step to the next: a worker keeps its record while what the record
    is made of is unchanged (its :class:`WorkerView`, its last move, its pool's
    price on its GPU type, the pools its pool is barred from; for a worker
    settling into a pool, the time too), and gets a new one as soon as any of
    it changes. At a thousand workers, building every record anew was most of
    a step's cost; a steady fleet changes a few a step (the busy ones)."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[Any, ...], PlannerWorker]] = {}
        self._settings: Settings | None = None

    def __call__(
        self,
        observation: Observation,
        prices: Mapping[Pool, Price],
        memory: Memory,
        settings: Settings,
    ) -> list[PlannerWorker]:
        """:func:`planned` of every worker of ``observation``."""
        now = observation.now
        if settings != self._settings:
            self._kept, self._settings = {}, settings
        sources: dict[Pool, set[Pool]] = {}
        for (source, target), until in memory.flows.items():
            if now < until:
                sources.setdefault(target, set()).add(source)
        barred = {target: frozenset(s) for target, s in sources.items()}
        kept, self._kept = self._kept, {}
        workers = []
        for view in observation.workers:
            address = view.address
            settling = view.state != "ready" or view.moving_to is not None
            pool = None if view.state == "failed" else view.moving_to or view.pool
            price = prices.get(pool) if pool is not None else None
            key = (
                view,
                now if settling else memory.moved.get(address),
                memory.ready_at.get(address) if settling else None,
                None
                if price is None
                else (price.seconds, price.cost.speeds.get(view.gpu_type)),
                None if pool is None else barred.get(pool),
            )
            old = kept.get(address)
            if old is not None and old[0] == key:
                worker = old[1]
            else:
                worker = planned(view, prices, memory, settings, now, barred)
            self._kept[address] = key, worker
            workers.append(worker)
        return workers


def reference_type(workers: Collection[WorkerView]) -> str:
    """The GPU type most workers have: demand is priced in its seconds."""
    counts = Counter(w.gpu_type for w in workers)
    return counts.most_common(1)[0][0] if counts else "cpu"


# -- pools -----------------------------------------------------------------------------


def service(
    pool: Pool,
    view: PoolView,
    gpu_type: str,
    features: Mapping[str, Any] | None,
    predictor: Predictor | None,
    observed: bool = True,
) -> float | None:
    """Predicted seconds of one task of ``pool`` on ``gpu_type``: the predictor
    where a profile covers the pool, else (with ``observed``) the observed
    average."""
    if predictor is not None and features:
        try:
            return predictor.predict(pool.model, pool.stage, gpu_type, features).seconds
        except LookupError:
            pass
    return view.observed_s if observed else None


def price(
    pool: Pool,
    view: PoolView,
    reference: str,
    gpu_types: Collection[str],
    predictor: Predictor | None,
    load_seconds: Mapping[tuple[Pool, str], float],
    default_switch: float,
    observed: bool = True,
    resume_seconds: Mapping[tuple[Pool, str], float] | None = None,
) -> Price:
    """Service time on the reference GPU type, speeds, memory and switch times
    of ``pool`` (a load, where measured a resume of parked weights), priced by the features of the newest task it owes (else of its
    latest finished one), and the work it owes, each task priced by its own
    features: the work ahead is priced by its own requests, so a new mix is
    priced as itself before its first task finishes, and a backlog of the old
    mix as the old mix."""
    features = view.newest if view.newest is not None else view.recent
    base = service(pool, view, reference, features, predictor, observed)
    backlog = (view.owed - sum(n for _, n in view.shapes)) * (base or 0.0)
    for shape, count in view.shapes:
        if shape == features:
            backlog += count * (base or 0.0)
            continue
        seconds = service(pool, view, reference, shape, predictor, observed)
        backlog += count * (seconds if seconds is not None else base or 0.0)
    speeds = {}
    for gpu_type in gpu_types:
        seconds = (
            service(pool, view, gpu_type, features, predictor, observed)
            if base
            else None
        )
        speeds[gpu_type] = base / seconds if base and seconds else 1.0
    # the predicted peak counts the weights as the workers hold them (8-bit,
    # offloaded); the spec's bf16 weights bound it only without a prediction
    memory = view.weight_bytes
    if predictor is not None and features:
        try:
            peak = predictor.predict(
                pool.model, pool.stage, reference, features
            ).peak_bytes
        except LookupError:
            peak = None
        memory = memory if peak is None else peak
    known = [s for (p, _), s in load_seconds.items() if p == pool]
    switch = {
        g: load_seconds.get((pool, g), max(known, default=default_switch))
        for g in gpu_types
    }
    resumes = {
        g: seconds
        for (p, g), seconds in (resume_seconds or {}).items()
        if p == pool and g in switch
    }
    return Price(
        seconds=base or 0.0,
        cost=PoolCost(
            speeds=speeds,
            memory_bytes=memory,
            switch_seconds=switch,
            resume_seconds=resumes,
        ),
        backlog=backlog,
    )


def price_pools(
    observation: Observation,
    pools: Collection[Pool],
    reference: str,
    gpu_types: Collection[str],
    predictor: Predictor | None,
    settings: Settings,
) -> dict[Pool, Price]:
    """:func:`price` of each of ``pools``, with the service times
    ``settings.pricing`` names (feedback: a GPU type's speed is then unknown,
    1)."""
    if settings.pricing == "feedback":
        predictor = None
    return {
        pool: price(
            pool,
            observation.pools.get(pool, PoolView()),
            reference,
            gpu_types,
            predictor,
            observation.load_seconds,
            settings.default_switch,
            observed=settings.pricing != "prediction",
            resume_seconds=observation.resume_seconds,
        )
        for pool in pools
    }


#: Splits of the forecast's span tried as change points, and twice the
#: log-likelihood ratio past which the arrival rates before and after one
#: differ (chi-square of one degree of freedom at p = 0.0002: about 0.004
#: over the splits tried, so a steady load is seldom split)
CHANGE_SPLITS = 20
CHANGE_THRESHOLD = 13.8
#: Splits younger than the grid's youngest, as fractions of it: a rate
#: that fell to nothing a few seconds ago (a phase ended) is plain within
#: seconds, and a worker held for it meanwhile may move against the new phase
YOUNG_SPLITS = (0.5, 0.25, 0.125)


def forecast_rate(view: PoolView, settings: Settings) -> float:
    """Tasks of a pool arriving per second, the forecast for the horizon, from
    the arrivals over the planning horizon (at least the telemetry window):
    the rate since their last change point (:func:`change_point`), or, where
    a rate that changes along a line explains them better (:func:`trend`: a
    ramp of load), that line's mean over the horizon ahead.

    With neither, the whole span's rate: over a short window the randomness
    of arrivals swings demand, and moves workers. After a shift (a phase of a
    moving mix began or ended) the rate since it, as soon as the test sees it:
    a phase shift moves workers once, and the old phase's rate no longer
    holds them back. (At a cold start the rate reads low, which the backlog
    makes up for.)
    """
    span = max(settings.window, settings.horizon)
    ages = view.arrivals
    # the tests count arrival instants: a client's batch of requests at once
    # is one event, not evidence of a rate that many times higher
    events = arrival_events(ages)
    since, step = latest_change(events, span, least=settings.window / 6)
    line, now, slope = trend(events, span)
    if 2 * line > CHANGE_THRESHOLD and line > step:
        tasks = bisect.bisect_right(ages, span)
        per_event = tasks / max(1, bisect.bisect_right(events, span))
        return max(0.0, (now + slope * settings.horizon / 2) * per_event)
    return bisect.bisect_left(ages, since) / since if since > 0 else 0.0


#: Arrivals closer together than this are one event to the change-point test
SIMULTANEOUS = 0.01


def arrival_events(ages: Sequence[float]) -> list[float]:
    """``ages`` (youngest first) less those within :data:`SIMULTANEOUS`
    seconds of the arrival before them."""
    events: list[float] = []
    for age in ages:
        if not events or age - events[-1] >= SIMULTANEOUS:
            events.append(age)
    return events


def rate_since_change(ages: Sequence[float], span: float, least: float) -> float:
    """Arrivals per second since the latest change point of their Poisson
    rate within the last ``span`` seconds (:func:`latest_change`)."""
    since, _ = latest_change(arrival_events(ages), span, least)
    return bisect.bisect_left(ages, since) / since if since > 0 else 0.0


def latest_change(
    ages: Sequence[float], span: float, least: float
) -> tuple[float, float]:
    """Seconds since the latest change point of the arrivals' Poisson rate
    within the last ``span`` seconds: the likeliest one (:func:`change_point`),
    then the likeliest within the time since it, and so on while one passes
    the test. A phase that began and ended within the span (a burst of
    PixArt that gave way to Flux a few seconds ago) then ends the rate the
    forecast holds, rather than begins it. Returns it and the first split's
    log-likelihood ratio (``(span, 0)``: no change)."""
    since, ratio = change_point(ages, span, least)
    while since < span:
        span = since
        since, _ = change_point(ages, span, least)
    return since, ratio


def trend(ages: Sequence[float], span: float) -> tuple[float, float, float]:
    """A Poisson rate along a line through the arrivals of the last ``span``
    seconds (``ages``: seconds since each, youngest first), fitted through
    the rates of its two halves: how much likelier it makes them than one
    rate (log-likelihood, as :func:`change_point`'s), its rate now and its
    slope per second."""
    total = bisect.bisect_right(ages, span)
    if span <= 0 or total < 2:
        return 0.0, 0.0, 0.0
    half = span / 2
    newer = bisect.bisect_left(ages, half)
    old_rate, new_rate = (total - newer) / half, newer / half
    slope = (new_rate - old_rate) / half
    # the halves' rates hold at their middles; the line must stay above 0
    now = new_rate + slope * span / 4
    if slope == 0 or min(now, now - slope * span) <= 0:
        return 0.0, now, slope
    rates = now - slope * np.asarray(ages[:total])
    gain = float(np.log(rates).sum()) - _poisson_fit(total, span)
    return gain, now, slope


def change_point(
    ages: Sequence[float], span: float, least: float
) -> tuple[float, float]:
    """Seconds since the likeliest change point of the arrivals' Poisson rate
    within the last ``span`` seconds, and how much likelier the split makes
    them (log-likelihood ratio); ``(span, 0)`` when no split passes the
    likelihood-ratio test (:data:`CHANGE_THRESHOLD`).

    ``ages`` are seconds since each arrival, youngest first. The splits tried
    are a grid of :data:`CHANGE_SPLITS` that leaves at least ``least``
    seconds on either side, and :data:`YOUNG_SPLITS` of its youngest: the
    test itself keeps a few seconds' chance swing from passing.
    """
    if span <= 0:
        return 0.0, 0.0
    total = bisect.bisect_right(ages, span)
    whole = _poisson_fit(total, span)
    best, split = 0.0, span
    step = span / CHANGE_SPLITS
    grid = [
        step * index
        for index in range(1, CHANGE_SPLITS)
        if least <= step * index <= span - least
    ]
    if grid:
        grid += [grid[0] * fraction for fraction in YOUNG_SPLITS]
    for age in grid:
        recent = bisect.bisect_left(ages, age)
        ratio = _poisson_fit(recent, age) + _poisson_fit(total - recent, span - age)
        ratio -= whole
        if 2 * ratio > CHANGE_THRESHOLD and ratio > best:
            best, split = ratio, age
    return split, best


def _poisson_fit(count: int, seconds: float) -> float:
    """The Poisson log-likelihood of ``count`` arrivals in ``seconds`` at their
    own rate, less the terms every split shares."""
    return count * math.log(count / seconds) if count else 0.0


#: Where each stage runs in a request's chain (a plain DiT where the experts would)
CHAIN_ORDER = {"encoder": 0, "dit": 1, "dit-high": 1, "dit-low": 2, "vae": 3}
#: Groups the owed tasks' deadlines are counted in, per pool (the late ones
#: in one of their own)
DUE_GROUPS = 8


def demands(
    observation: Observation, prices: Mapping[Pool, Price], settings: Settings
) -> dict[Pool, Demand]:
    """Arrivals times service, plus the work owed by requests in flight, per
    pool; and their deadlines for this stage: a request's deadline less the
    predicted seconds of its later stages (of its other stages, for one
    arriving)."""
    result = {}
    for pool, pool_price in prices.items():
        view = observation.pools.get(pool, PoolView())
        seconds = pool_price.seconds
        later, others = chain_seconds(pool, prices)
        due = due_groups([left - later for left in view.due])
        slo = view.slo - others
        timed = seconds > 0 and (due or slo < math.inf)
        result[pool] = Demand(
            rate=forecast_rate(view, settings) * seconds,
            backlog=pool_price.backlog,
            task_seconds=seconds if timed else 0.0,
            due=due,
            slo=slo,
        )
    return result


def chain_seconds(pool: Pool, prices: Mapping[Pool, Price]) -> tuple[float, float]:
    """Predicted seconds of a request's stages after ``pool``'s, and of all its
    stages but ``pool``'s, on the reference GPU type (0 for a monolithic pool)."""
    order = CHAIN_ORDER.get(pool.stage)
    if order is None:
        return 0.0, 0.0
    later = others = 0.0
    for other, other_price in prices.items():
        place = CHAIN_ORDER.get(other.stage)
        if other.model != pool.model or place is None or other == pool:
            continue
        others += other_price.seconds
        if place > order:
            later += other_price.seconds
    return later, others


def due_groups(left: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """Seconds left to deadlines, as at most :data:`DUE_GROUPS` groups of
    ``(mean seconds left, tasks)``, earliest first: the late ones (none left)
    in one group, the rest in groups of equal count."""
    ordered = sorted(left)
    late = bisect.bisect_right(ordered, 0.0)
    groups = [(ordered[0], float(late))] if late else []
    rest = ordered[late:]
    size = math.ceil(len(rest) / (DUE_GROUPS - 1)) if rest else 1
    for start in range(0, len(rest), size):
        chunk = rest[start : start + size]
        groups.append((sum(chunk) / len(chunk), float(len(chunk))))
    return tuple(groups)


def unpriced(
    observation: Observation, served: Collection[Pool], prices: Mapping[Pool, Price]
) -> list[Pool]:
    """Served pools that owe work they cannot price (no profile covers them and
    none of their tasks has finished): their demand is unknown, not none."""
    return sorted(
        p
        for p in served
        if observation.pools.get(p, PoolView()).owed and not prices[p].seconds
    )


def plan_pools(
    observation: Observation,
    predictor: Predictor | None,
    memory: Memory,
    settings: Settings,
    records: PlannerRecords | None = None,
) -> PlanStep:
    """Observe -> price -> plan: the planner's plan for the observed fleet and
    demand, every pool priced on every GPU type of the fleet. ``records``
    keeps the planner's view of the workers between calls."""
    now = observation.now
    if not observation.workers:
        return PlanStep(None, {})
    served = {
        pool
        for view in observation.workers
        if view.state != "failed" and (pool := view.moving_to or view.pool)
    }
    # pools nobody serves enter the plan only while they have work
    pools = served | {
        p
        for p, view in observation.pools.items()
        if p.stage != MONOLITHIC and (view.rate or view.waiting)
    }
    prices = price_pools(
        observation,
        pools,
        reference_type(observation.workers),
        {view.gpu_type for view in observation.workers},
        predictor,
        settings,
    )
    waiting_for = unpriced(observation, served, prices)
    if waiting_for:
        reason = "no move: waiting for a first service time of " + ", ".join(
            f"{p.stage} of {p.model}" for p in waiting_for
        )
        summary = {
            "time": now,
            "utilization": {},
            "bottleneck": None,
            "feasible": True,
            "reason": reason,
        }
        return PlanStep(None, summary)
    if records is None:
        workers = [
            planned(view, prices, memory, settings, now) for view in observation.workers
        ]
    else:
        workers = records(observation, prices, memory, settings)
    costs = {pool: p.cost for pool, p in prices.items()}
    # below the target utilization every pool keeps up: no move pays then
    result = plan(
        workers,
        demands(observation, prices, settings),
        costs,
        now=now,
        horizon=settings.horizon,
        cooldown=settings.cooldown,
        target_utilization=settings.target_utilization,
    )
    summary = {
        "time": now,
        "utilization": {str(p): u for p, u in result.utilization.items()},
        "bottleneck": list(result.bottleneck) if result.bottleneck else None,
        "feasible": result.feasible,
        "reason": result.reason,
    }
    return PlanStep(result, summary, {w.name: w for w in workers}, costs)


def target_sizes(
    observation: Observation,
    predictor: Predictor | None,
    settings: Settings,
    utilization: float | None = None,
) -> dict[Pool, int]:
    """Observe -> price -> size: workers each pool needs at ``utilization``
    (default the target utilization) over the horizon, every pool priced on
    the reference GPU type."""
    reference = reference_type(observation.workers)
    prices = price_pools(
        observation, observation.pools, reference, {reference}, predictor, settings
    )
    return pool_targets(
        demands(observation, prices, settings),
        settings.horizon,
        settings.target_utilization if utilization is None else utilization,
    )


def pool_targets(
    demands: Mapping[Pool, Demand], horizon: float, utilization: float
) -> dict[Pool, int]:
    """Workers each pool needs to run at ``utilization`` over the horizon."""
    targets = {}
    for pool, demand in demands.items():
        load = demand.rate * horizon + demand.backlog
        targets[pool] = math.ceil(load / (horizon * utilization)) if load else 0
    return targets
