"""The planner: how many workers serve each pool, and which workers move.

A pool is a stage of a model (``Pool("dit", "flux.1-dev")``): fleets serve several
models. :func:`plan` is a pure function of the fleet, the demand on each pool
and what each pool costs on each GPU type; the elastic plugin feeds it and
applies its moves, the emulated benchmarks and the tests call it directly.

The objective is the number of requests predicted to meet their deadlines
over the horizon (queued ones and those arriving), then the largest predicted
utilization::

    utilization(pool) = (rate x horizon + backlog) / (horizon x sum of its workers' speeds)

with demand in *reference seconds* (seconds of work on the reference GPU type)
and speeds relative to that type, so a worker of speed 2 clears two reference
seconds of work per second. Without deadlines (or when every request meets
its deadline either way) the utilization alone decides.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dask.config
from dask.utils import parse_timedelta

import dflow.config  # noqa: F401
from dflow.pools import MONOLITHIC, Pool

GIB = 2**30


@dataclass(frozen=True)
class PlannerWorker:
    """What the planner knows of a worker.

    Parameters
    ----------
    pool
        The pool it serves now; ``None`` while it serves none (new, or between pools).
    busy
        Whether it is running a task: moves take idle workers first.
    last_move
        When it last changed pool (same clock as ``plan``'s ``now``); ``None``: never.
    drain_seconds
        Seconds its running task still needs (0 when idle). A worker that moves
        finishes that task first (its queued ones go back to the pool), so the
        target gains it only after the drain *and* the load.
    ready_in
        Seconds until it serves ``pool`` at all: a worker still draining for,
        or loading, the pool it was just moved to. It counts there for the
        part of the horizon left after that, and stays where it is.
    barred
        Pools it may not move to: pools that recently gave its pool a worker
        (see :class:`~dflow.plugins.elastic.ElasticController`). Undoing a
        move before it took effect pays two drains and loads for one swing
        of demand.
    speed
        Its speed relative to its GPU type (a throttled card, a noisy
        neighbour: :mod:`dflow.plugins.health`); its speed on each pool is its
        type's times this.
    parked
        Pools whose weights it keeps in host memory: it switches to them in
        their ``resume_seconds`` (:class:`PoolCost`).
    """

    name: str
    gpu_type: str
    memory_bytes: int
    pool: Pool | None = None
    busy: bool = False
    last_move: float | None = None
    drain_seconds: float = 0.0
    ready_in: float = 0.0
    barred: frozenset[Pool] = frozenset()
    speed: float = 1.0
    parked: frozenset[Pool] = frozenset()


@dataclass(frozen=True)
class Demand:
    """Work on a pool, in reference seconds: ``rate`` arriving per second, and
    ``backlog`` already owed by requests in flight (a request still encoding
    owes its DiT and VAE work too).

    Deadlines, counted when ``task_seconds`` is above 0: ``due`` holds the
    owed tasks that have one, as ``(seconds left to finish this stage,
    tasks)`` groups; an arriving task has ``slo`` seconds to finish this
    stage (``inf``: none). Each task is ``task_seconds`` of work.
    """

    rate: float = 0.0
    backlog: float = 0.0
    task_seconds: float = 0.0
    due: tuple[tuple[float, float], ...] = ()
    slo: float = math.inf


@dataclass(frozen=True)
class PoolCost:
    """What hosting a pool takes.

    Parameters
    ----------
    speeds
        Speed of each GPU type on this pool relative to the reference type;
        missing or 0: that type cannot run it.
    memory_bytes
        Device memory the pool needs (weights plus peak activations); a worker
        with less cannot host it.
    switch_seconds
        Per GPU type, the time a worker needs to start serving this pool (model
        load and warm-up), during which it serves nothing; missing: 0.
    resume_seconds
        Per GPU type, the same for a worker that keeps the pool's weights in
        host memory (:attr:`PlannerWorker.parked`); missing: ``switch_seconds``.
    """

    speeds: Mapping[str, float]
    memory_bytes: int = 0
    switch_seconds: Mapping[str, float] = field(default_factory=dict)
    resume_seconds: Mapping[str, float] = field(default_factory=dict)

    def switch(self, gpu_type: str, parked: bool = False) -> float:
        """Seconds a worker of ``gpu_type`` takes to start serving the pool."""
        load = self.switch_seconds.get(gpu_type, 0.0)
        return self.resume_seconds.get(gpu_type, load) if parked else load


@dataclass(frozen=True)
class Move:
    """Move ``worker`` from pool ``source`` to pool ``target`` (either may be ``None``)."""

    worker: str
    source: Pool | None
    target: Pool | None
    reason: str


@dataclass(frozen=True)
class Plan:
    """The planner's decision.

    Parameters
    ----------
    assignment
        The pool of every worker once the moves are done.
    moves
        The moves, most urgent target first.
    utilization
        Predicted load over capacity of every pool over the horizon, after the
        plan (movers count from the end of their switch); ``inf`` for a pool
        with demand and no capacity.
    bottleneck
        The pool of largest utilization; ``None`` without demand.
    feasible
        False when a pool has demand but no worker can serve it; ``reason`` says
        which and why.
    met, due
        Requests predicted to meet their deadlines over the horizon after the
        plan, of those with a deadline (queued, and arriving over the horizon;
        fractions of requests count).
    """

    assignment: dict[str, Pool | None]
    moves: list[Move]
    utilization: dict[Pool, float]
    bottleneck: Pool | None
    feasible: bool
    reason: str
    met: float = 0.0
    due: float = 0.0


def plan(
    workers: Sequence[PlannerWorker],
    demands: Mapping[Pool, Demand],
    costs: Mapping[Pool, PoolCost],
    *,
    now: float,
    horizon: str | float | None = None,
    cooldown: str | float | None = None,
    hysteresis: float | None = None,
    min_per_pool: int | Mapping[Pool, int] | None = None,
    max_per_pool: int | Mapping[Pool, int | None] | None = None,
    prefer_idle: bool = True,
    target_utilization: float = 0.0,
) -> Plan:
    """Decide which pool each worker serves.

    Parameters
    ----------
    workers
        The fleet.
    demands
        Work per pool; pools left out have none.
    costs
        Every pool the fleet serves; a worker's pool must be one of them.
    now
        The current time, on the clock of the workers' ``last_move``.
    horizon
        How far ahead demand and capacity are weighed (config
        ``dflow.planner.horizon``).
    cooldown
        A worker that moved less than this long ago stays (config
        ``dflow.planner.cooldown``).
    hysteresis
        Least relative improvement of the largest utilization worth any move
        (config ``dflow.planner.hysteresis``).
    min_per_pool, max_per_pool
        Workers kept on each pool even without demand, and most workers per
        pool: a number for all pools or a mapping per pool, pools left out
        taking the config (``dflow.planner.min-per-pool``, ``max-per-pool``).
    prefer_idle
        Move idle workers before busy ones.
    target_utilization
        Largest utilization at which every pool keeps up: while no pool is
        above it, workers stay where they are (moves only cost then), but
        for starved pools, pool minimums and unassigned workers. 0: any
        improvement beyond the hysteresis is worth moving for.

    Notes
    -----
    The target is built in two passes. A greedy pass gives every pool with
    demand one worker and every pool its minimum (the pool with the fewest
    candidates first, so none takes the only worker another can use), then
    the next worker always to the pool of worst utilization that it can serve
    (memory fits, speed above 0). A pool takes the worker class of best
    *comparative advantage*: its speed there over its demand-weighted speed
    on all pools, so a fast type goes where it gains most over a slow one and
    a type that cannot hold the DiT is spent on the encoder and VAE. A local
    search then moves or swaps single workers into the bottleneck while that
    lowers the largest utilization, which repairs the greedy order where GPU
    types rank differently per pool.

    A worker that would switch counts at its speed times
    ``1 - (drain_seconds + switch_seconds) / horizon``: a busy worker first
    finishes its running task (a video on a slow card: minutes), then serves
    nothing while it loads, so the target gains it only for what is left of
    the horizon; its source loses it at once. (Drains are rounded up to a
    sixteenth of the horizon, so that workers still form a few classes.) A
    worker still settling into the pool it was moved to (``ready_in``) counts
    there for the rest of the horizon, so the plan after a move sees what the
    plan that made it predicted, and does not undo it because the mover is
    not serving yet. Ties keep workers where they are, then take them from
    the least loaded pool (the unassigned first), then by name. A worker
    never moves to a pool it is ``barred`` from.

    The target replaces the current assignment only when it starves fewer
    pools with demand, fills more pool minimums, or lowers the largest
    utilization by more than ``hysteresis`` *after* switch costs (so a move
    whose drain and switch eat its gain over the horizon is never made) from
    above ``target_utilization``. (A relative bar alone would move workers
    for 0.10 -> 0.08 when hardly any work has arrived yet: nothing to gain.)
    Otherwise only unassigned workers are placed. Workers in cooldown stay
    where they are in either case.

    A pool that needs a worker (it has demand, or a minimum) keeps one of its
    own ready workers: the plan may add workers to it, or take all but one,
    but never replaces the last one that serves it now by another that must
    first drain and load. The utilization over the horizon would hardly see
    that gap (a small pool's work fits in the rest of the horizon); its
    requests would: they wait for the drain and the load. (This also keeps a
    pool's only worker from being swapped for a better-suited GPU type.)

    Every move must pay for itself: of the target's moves, each one whose
    undoing leaves the plan's score (starved pools, missing minimums, deadlines
    met, largest utilization) no worse is undone, least urgent first. A target built from
    scratch can differ from the current assignment in places the bottleneck
    does not care about (ties, reshuffles between pools with headroom); those
    moves would cost drains and loads for nothing, and are what trades
    workers back and forth between pools as demand wobbles.

    Deadlines come before the utilization: each pool serves its tasks earliest
    deadline first at the capacity the plan gives it, a mover adding its speed
    only once its drain and load are done, and a task that cannot make its
    deadline yields to those that can (:meth:`_Problem.met`). After the local
    search, workers move one at a time to pools that miss deadlines while that
    meets more of them than it loses where they come from. A target that meets
    :data:`MET_MARGIN` more requests replaces the current assignment whatever
    the utilization; one that meets fewer never does; otherwise the
    utilization decides as above. So a small pool whose queued requests are
    near their deadlines gets a worker from a larger pool with slack, and a
    backlog that its pool drains by its deadlines pulls no worker away from a
    pool that would then miss some.
    """
    if horizon is None:
        horizon = dask.config.get("dflow.planner.horizon")
    if cooldown is None:
        cooldown = dask.config.get("dflow.planner.cooldown")
    if hysteresis is None:
        hysteresis = dask.config.get("dflow.planner.hysteresis")
    problem = _Problem(
        workers,
        demands,
        costs,
        horizon=parse_timedelta(horizon),
        mins=_per_pool(costs, min_per_pool, "min-per-pool"),
        maxs=_per_pool(costs, max_per_pool, "max-per-pool"),
    )
    since = parse_timedelta(cooldown)
    pinned: list[int] = []
    free: list[int] = []
    for i, w in enumerate(problem.workers):
        cooling = w.last_move is not None and now - w.last_move < since
        (pinned if cooling or w.ready_in > 0 else free).append(i)
    problem.keep_one(pinned, free)
    before = problem.current
    target = problem.place(pinned, free, prefer_idle)
    old, new = before.score(), target.score()
    if _better(new, old, float(hysteresis), target_utilization):
        problem.prune(target)
        return problem.decide(target, None, hysteresis, target_utilization)
    # not worth moving anyone: only place the workers that serve no pool yet
    unassigned = [i for i in free if problem.home[i] < 0]
    if not unassigned:
        return problem.decide(before, target, hysteresis, target_utilization)
    assigned = [i for i in free if problem.home[i] >= 0]
    after = problem.place([*pinned, *assigned], unassigned, prefer_idle)
    return problem.decide(after, target, hysteresis, target_utilization)


#: Requests (fractions count) more a target must meet to replace the
#: current assignment whatever the utilization; a single move of the
#: deadline search must meet at least :data:`MET_STEP` more
MET_MARGIN = 1.0
MET_STEP = 0.25
#: Rounding below which two counts of requests met are equal
MET_TOLERANCE = 1e-6
#: Pieces the arrivals over the horizon are counted in, each arriving at
#: its piece's middle
ARRIVAL_PIECES = 4

Score = tuple[int, int, float, float]


def _better(new: Score, old: Score, hysteresis: float, target: float) -> bool:
    """Whether the plan scored ``new`` replaces the one scored ``old``: fewer
    pools starved or minimums missed; else :data:`MET_MARGIN` more deadlines
    met; else, meeting no fewer, a largest utilization above ``target``
    lowered by more than ``hysteresis``."""
    if new[:2] != old[:2]:
        return new[:2] < old[:2]
    gained = new[2] - old[2]
    if gained >= MET_MARGIN:
        return True
    if gained < -MET_TOLERANCE:
        return False
    return old[3] > target and new[3] < old[3] * (1 - hysteresis)


def _per_pool(
    costs: Mapping[Pool, PoolCost],
    value: int | Mapping[Pool, int | None] | None,
    key: str,
) -> dict[Pool, int | None]:
    default = dask.config.get(f"dflow.planner.{key}")
    if value is None or isinstance(value, Mapping):
        given = value or {}
        return {p: given.get(p, default) for p in costs}
    return dict.fromkeys(costs, value)


class _State:
    """Workers (by index) placed on pools (by index; -1 for none), and the
    capacity that gives each pool: its workers' speeds over the horizon net
    of switches (``capacity``), their speeds once all serve (``full``) and
    those serving from now (``ready``)."""

    def __init__(self, problem: _Problem):
        self.problem = problem
        self.assignment = [-1] * len(problem.workers)
        self.capacity = [0.0] * len(problem.pools)
        self.full = [0.0] * len(problem.pools)
        self.ready = [0.0] * len(problem.pools)
        self.count = [0] * len(problem.pools)
        #: deadlines met per pool, as of the last :meth:`score`
        self.mets = [0.0] * len(problem.pools)

    def stay(self, worker: int) -> None:
        problem = self.problem
        home = self.assignment[worker] = problem.home[worker]
        if home >= 0:
            self.capacity[home] += problem.home_speed[worker]
            self.full[home] += problem.home_full[worker]
            self.ready[home] += problem.home_ready[worker]
            self.count[home] += 1

    def add(self, group: _Group, pool: int, n: int = 1) -> None:
        """``n`` of ``group``'s workers join ``pool`` (negative: leave it)."""
        self.capacity[pool] += n * group.effective[pool]
        self.full[pool] += n * group.full[pool]
        self.ready[pool] += n * group.ready[pool]
        self.count[pool] += n

    def met(self, pool: int) -> float:
        return self.problem.met(
            pool, self.capacity[pool], self.full[pool], self.ready[pool]
        )

    def utilization(self, pool: int) -> float:
        return self.problem.utilization(pool, self.capacity[pool])

    def largest(self, pools: list[int]) -> float:
        return max(map(self.utilization, pools), default=0.0)

    def score(self) -> Score:
        """Pools starved (demand, no capacity), workers missing from pool
        minimums, deadlines met, largest utilization otherwise (see
        :func:`_better`)."""
        problem = self.problem
        pools = range(len(problem.pools))
        utilization = [self.utilization(p) for p in pools]
        starved = sum(u == math.inf for u in utilization)
        short = sum(max(0, problem.floor(p) - self.count[p]) for p in pools)
        worst = max((u for u in utilization if u < math.inf), default=0.0)
        if problem.timed:
            self.mets = [self.met(p) for p in pools]
        return starved, short, problem.total(self.mets), worst


@dataclass
class _Group:
    """Free workers of one class serving the same pool now (``home``; -1: none),
    and the speed one of them adds to each pool over the horizon, net of the
    time it spends switching.

    Workers leave from the left (idle first) and stay from the right (busy first).
    """

    kind: int
    home: int
    effective: list[float]
    #: a member's speed on each pool once it serves there (0 where it never
    #: does within the horizon), and from now (its home alone)
    full: list[float]
    ready: list[float]
    #: seconds its members' running tasks still need (rounded up)
    drain: float = 0.0
    members: deque[int] = field(default_factory=deque)
    #: workers not placed yet, and how many are placed on each pool
    left: int = 0
    placed: list[int] = field(default_factory=list)


class _Problem:
    """The fleet as classes of interchangeable workers (equal speed, switch time
    and fit on every pool); workers and pools are indices into sorted lists."""

    def __init__(
        self,
        workers: Sequence[PlannerWorker],
        demands: Mapping[Pool, Demand],
        costs: Mapping[Pool, PoolCost],
        horizon: float,
        mins: dict[Pool, int | None],
        maxs: dict[Pool, int | None],
    ):
        self.costs = costs
        self.horizon = horizon
        self.pools = sorted(costs)
        index = {p: i for i, p in enumerate(self.pools)}
        self.workers = sorted(workers, key=operator.attrgetter("name"))
        none = Demand()
        self.loads = [
            demands.get(p, none).rate * horizon + demands.get(p, none).backlog
            for p in self.pools
        ]
        self.uncosted = sorted(
            p for p, d in demands.items() if p not in index and (d.rate or d.backlog)
        )
        #: per pool, its tasks with a deadline over the horizon, earliest
        #: first: (seconds from now, tasks, reference seconds of one)
        self.due = [self.deadlines(demands.get(p, none)) for p in self.pools]
        self.timed = any(self.due)
        self.wanted = [sum(n for _, n, _ in items) for items in self.due]
        # a request meets its deadline only if each of its stages does: the
        # pools of a model count together (see total)
        families: dict[tuple[str, bool], list[int]] = {}
        for p, (stage, model) in enumerate(self.pools):
            if self.wanted[p]:
                family = (model, stage == MONOLITHIC)
                families.setdefault(family, []).append(p)
        self.families = list(families.values())
        self.family = [-1] * len(self.pools)
        for f, members in enumerate(self.families):
            for p in members:
                self.family[p] = f
        self.requests = [max(self.wanted[p] for p in f) for f in self.families]
        self.mins: list[int] = [mins[p] or 0 for p in self.pools]
        self.maxs: list[int] = [
            len(workers) if (m := maxs[p]) is None else m for p in self.pools
        ]
        self.floors = [min(n, m) for n, m in zip(self.mins, self.maxs)]
        #: a pool with demand needs at least one worker
        self.served = [
            int(load > 0 and m > 0) for load, m in zip(self.loads, self.maxs)
        ]
        self.speed: list[tuple[float, ...]] = []
        self.switch: list[tuple[float, ...]] = []
        self.home: list[int] = []
        self.kind: list[int] = []
        self.home_speed: list[float] = []
        #: its speed at home once serving, and from now (0 while settling)
        self.home_full: list[float] = []
        self.home_ready: list[float] = []
        #: seconds each worker's running task still needs, rounded up to a
        #: sixteenth of the horizon (at most the horizon)
        self.drain: list[float] = []
        step = horizon / 16 if horizon > 0 else 0.0
        kinds: dict[tuple, int] = {}
        by_type: dict[tuple[str, int, float, frozenset[Pool]], int] = {}
        # a pool's memory is an estimate (the spec's weights where no profile
        # predicts a peak); a worker serving the pool shows its GPU holds it
        fits: dict[tuple[str, int], set[Pool]] = {}
        for w in self.workers:
            if w.pool is not None and w.pool not in index:
                raise ValueError(
                    f"worker {w.name!r} serves {_label(w.pool)}, which costs lacks"
                )
            if w.pool is not None and w.ready_in <= 0:
                fits.setdefault((w.gpu_type, w.memory_bytes), set()).add(w.pool)
        #: what a worker's fields make of it (class, home, speed there,
        #: drain): alike workers share it, so the fleet is read in one pass
        made: dict[tuple, tuple[int, int, float, float, float, float]] = {}
        for w in self.workers:
            fields = (
                w.gpu_type,
                w.memory_bytes,
                w.speed,
                w.pool,
                w.ready_in,
                w.drain_seconds,
                w.parked,
            )
            known = made.get(fields)
            if known is None:
                key = (w.gpu_type, w.memory_bytes, w.speed, w.parked)
                if key not in by_type:
                    held = fits.get((w.gpu_type, w.memory_bytes), set())
                    speeds = tuple(
                        costs[p].speeds.get(w.gpu_type, 0.0) * w.speed
                        if w.memory_bytes >= costs[p].memory_bytes or p in held
                        else 0.0
                        for p in self.pools
                    )
                    switches = tuple(
                        costs[p].switch(w.gpu_type, p in w.parked) for p in self.pools
                    )
                    if (speeds, switches) not in kinds:
                        kinds[speeds, switches] = len(self.speed)
                        self.speed.append(speeds)
                        self.switch.append(switches)
                    by_type[key] = kinds[speeds, switches]
                kind = by_type[key]
                home = -1 if w.pool is None else index[w.pool]
                # a worker settling into its pool serves it for the rest of the horizon
                settled = max(0.0, 1 - w.ready_in / horizon) if w.ready_in > 0 else 1.0
                drain = max(0.0, w.drain_seconds) if home >= 0 else 0.0
                if drain and step:
                    drain = min(horizon, math.ceil(drain / step - 1e-9) * step)
                full = self.speed[kind][home] if home >= 0 and settled else 0.0
                known = made[fields] = (
                    kind,
                    home,
                    full * settled,
                    drain,
                    full,
                    full if w.ready_in <= 0 else 0.0,
                )
            self.kind.append(known[0])
            self.home.append(known[1])
            self.home_speed.append(known[2])
            self.drain.append(known[3])
            self.home_full.append(known[4])
            self.home_ready.append(known[5])
        total = sum(self.loads)
        weights = [
            load / total if total else 1 / len(self.pools) for load in self.loads
        ]
        # a class's speed over the whole demand: the yardstick of comparative advantage
        self.value = [
            sum(w * s for w, s in zip(weights, speeds)) for speeds in self.speed
        ]
        self.current = current = _State(self)
        for i in range(len(self.workers)):
            current.stay(i)

    def deadlines(self, demand: Demand) -> list[tuple[float, float, float]]:
        """``demand``'s tasks with a deadline: the owed ones, and those
        arriving over the horizon in :data:`ARRIVAL_PIECES` pieces."""
        work = demand.task_seconds
        if work <= 0:
            return []
        items = [(left, n, work) for left, n in demand.due if n > 0]
        if demand.slo < math.inf and demand.rate > 0 and self.horizon > 0:
            piece = self.horizon / ARRIVAL_PIECES
            tasks = demand.rate * piece / work
            items += [
                ((k + 0.5) * piece + demand.slo, tasks, work)
                for k in range(ARRIVAL_PIECES)
            ]
        return sorted(items)

    def total(self, mets: Sequence[float]) -> float:
        """Requests that meet their deadlines, given the tasks each pool meets:
        a model's requests miss as many as its worst stage misses (a request
        misses if any of its stages does; a cheap stage's tasks count no
        more than an expensive one's)."""
        wanted = self.wanted
        return sum(
            requests - max(wanted[p] - mets[p] for p in members)
            for requests, members in zip(self.requests, self.families)
        )

    def missing(self, mets: Sequence[float], pool: int) -> bool:
        """Whether ``pool`` is the worst stage of its model (more met there
        meets more requests)."""
        f = self.family[pool]
        if f < 0:
            return False
        wanted = self.wanted
        miss = wanted[pool] - mets[pool]
        worst = max(wanted[p] - mets[p] for p in self.families[f])
        return miss > MET_TOLERANCE and miss >= worst - MET_TOLERANCE

    def met(self, pool: int, capacity: float, full: float, ready: float) -> float:
        """Tasks of ``pool`` that meet their deadlines, served earliest
        deadline first by workers of these speeds (:class:`_State`): by ``t``
        seconds from now they clear at least ``max(ready t, full t - late)``,
        ``late`` being the work lost to the movers' drains and loads (exact
        before the first mover serves and after the last does). A task that
        cannot make its deadline yields to those that can."""
        items = self.due[pool]
        if not items:
            return 0.0
        late = (full - capacity) * self.horizon
        done = met = 0.0
        for deadline, tasks, work in items:
            if deadline <= 0:
                continue
            room = max(ready * deadline, full * deadline - late) - done
            if room > 0:
                served = min(tasks, room / work)
                met += served
                done += served * work
        return met

    def keep_one(self, pinned: list[int], free: list[int]) -> None:
        """Pin one ready worker of each pool that needs a worker and has no
        ready worker pinned on it already: the worst mover (:meth:`stays`; see
        :func:`plan`)."""
        ready = {
            self.home[i]
            for i in pinned
            if self.home[i] >= 0 and self.workers[i].ready_in <= 0
        }
        keep: dict[int, int] = {}
        worst: dict[int, tuple[float, int, bool, int]] = {}
        for i in free:
            p = self.home[i]
            if p < 0 or p in ready or not (self.loads[p] or self.floors[p]):
                continue
            stays = self.stays(i)
            if p not in keep or stays >= worst[p]:
                keep[p], worst[p] = i, stays
        for i in sorted(keep.values()):
            free.remove(i)
            pinned.append(i)

    def stays(self, i: int) -> tuple[float, int, bool, int]:
        """Order of workers of a pool by how badly they move (longest drain,
        most pools barred, busy, last by name): the largest last."""
        w = self.workers[i]
        return self.drain[i], len(w.barred), w.busy, i

    def floor(self, pool: int) -> int:
        return self.floors[pool]

    def utilization(self, pool: int, capacity: float) -> float:
        """Load over capacity across the horizon: 0 without load, inf without
        capacity."""
        load = self.loads[pool]
        if load == 0:
            return 0.0
        if capacity <= 0:  # rounding can leave an emptied pool a hair below 0
            return math.inf
        return load / (self.horizon * capacity)

    def group(
        self, kind: int, home: int, drain: float = 0.0, barred: frozenset = frozenset()
    ) -> _Group:
        speed, switch = self.speed[kind], self.switch[kind]
        effective = [
            speed[p]
            if p == home
            else 0.0
            if self.pools[p] in barred
            else speed[p] * self.after_switch(switch[p] + drain)
            for p in range(len(self.pools))
        ]
        # a mover's speed counts once it serves, if it does within the horizon
        full = [speed[p] if effective[p] > 0 else 0.0 for p in range(len(speed))]
        ready = [speed[p] if p == home else 0.0 for p in range(len(speed))]
        return _Group(
            kind, home, effective, full, ready, drain, placed=[0] * len(self.pools)
        )

    def after_switch(self, seconds: float) -> float:
        """Share of the horizon left to a worker that starts serving in ``seconds``."""
        if self.horizon <= 0:
            return 0.0 if seconds > 0 else 1.0
        return max(0.0, 1 - seconds / self.horizon)

    def place(self, fixed: list[int], free: list[int], prefer_idle: bool) -> _State:
        """``fixed`` workers where they are, ``free`` ones placed: greedily, then
        improved one move or swap at a time."""
        state = _State(self)
        for i in fixed:
            state.stay(i)
        workers = self.workers
        if prefer_idle:
            busy = [w.busy for w in workers]
            free = sorted(free, key=busy.__getitem__)  # stable: then by name
        by_key: dict[tuple[int, int, float, frozenset], _Group] = {}
        for i in free:
            key = (self.kind[i], self.home[i], self.drain[i], workers[i].barred)
            if key not in by_key:
                by_key[key] = self.group(*key)
            by_key[key].members.append(i)
        groups = list(by_key.values())
        for group in groups:
            group.left = len(group.members)
        self.fill(state, groups)
        self.improve(state, groups)
        if self.timed:
            self.meet(state, groups)
        for group in groups:
            members, home = group.members, group.home
            for _ in range(group.placed[home] if home >= 0 else 0):
                state.assignment[members.pop()] = home
            for p, count in enumerate(group.placed):
                if p != home:
                    for _ in range(count):
                        state.assignment[members.popleft()] = p
        return state

    def fill(self, state: _State, groups: list[_Group]) -> None:
        """Greedy: a worker for every pool with demand and the minimums, then
        the next worker always to the pool of worst utilization."""
        current, loads, maxs = self.current, self.loads, self.maxs
        choices = []
        for p in range(len(self.pools)):
            usable = [g for g in groups if g.effective[p] > 0]
            usable.sort(
                key=lambda g: (
                    -g.effective[p] / self.value[g.kind]
                    if self.value[g.kind]
                    else -math.inf,
                    g.home != p,
                    current.utilization(g.home) if g.home >= 0 else -1.0,
                    g.drain,
                    g.kind,
                    g.home,
                )
            )
            choices.append(deque(usable))

        def take(p: int) -> bool:
            """Give ``p`` the best free worker for it, if any is left."""
            usable = choices[p]
            while usable and not usable[0].left:
                usable.popleft()
            if not usable:
                return False
            group = usable[0]
            group.left -= 1
            group.placed[p] += 1
            state.add(group, p)
            return True

        # the pool with the fewest candidates left goes first, so none takes
        # the only worker another can use
        for wanted in (self.served, [self.floor(p) for p in range(len(self.pools))]):
            while True:
                candidates = {
                    p: sum(g.left for g in usable)
                    for p, usable in enumerate(choices)
                    if state.count[p] < wanted[p]
                }
                if not any(candidates.values()):
                    break
                take(min((n, p) for p, n in candidates.items() if n)[1])
        # ties: the most loaded pool, then the first
        heap = [
            (-state.utilization(p), -loads[p], p)
            for p in range(len(self.pools))
            if loads[p] > 0 and state.count[p] < maxs[p]
        ]
        heapq.heapify(heap)
        while heap:
            p = heapq.heappop(heap)[2]
            while take(p) and state.count[p] < maxs[p]:
                entry = (-state.utilization(p), -loads[p], p)
                # still the worst pool: it takes the next worker too
                if heap and heap[0] < entry:
                    heapq.heappush(heap, entry)
                    break
        # workers no pool with demand took stay where they are, within the maximum
        for group in groups:
            home = group.home
            if home >= 0 and group.effective[home]:
                stay = min(group.left, maxs[home] - state.count[home])
                group.left -= stay
                group.placed[home] += stay
                state.add(group, home, stay)

    def improve(self, state: _State, groups: list[_Group]) -> None:
        """Move or swap workers into the bottleneck while that lowers the largest
        utilization: the greedy's order can spend a class of workers on a pool
        that needed it less than a pool served later (speeds that rank GPU types
        differently per pool)."""
        pools = range(len(self.pools))
        utilization, maxs = self.utilization, self.maxs
        capacity, count = state.capacity, state.count
        # never below the minimum, never empty a pool with demand
        least = [max(self.floor(p), self.served[p]) for p in pools]
        while True:
            now = [utilization(p, capacity[p]) for p in pools]
            # a starved pool has no candidate left: better the others
            ranked = sorted(
                (p for p in pools if now[p] < math.inf), key=lambda p: (-now[p], p)
            )[:3]
            if not ranked or now[ranked[0]] == 0:
                return
            b, peak = ranked[0], now[ranked[0]]
            change: tuple[_Group, int, _Group | None] | None = None
            best = peak
            for g in groups:
                into = g.effective[b]
                for q in pools:
                    if q == b or not g.placed[q]:
                        continue
                    rest = next((now[p] for p in ranked if p not in (b, q)), 0.0)
                    # g's worker in q moves to b, or trades places with one of h's
                    if into and count[q] > least[q] and count[b] < maxs[b]:
                        new = max(
                            utilization(b, capacity[b] + into),
                            utilization(q, capacity[q] - g.effective[q]),
                            rest,
                        )
                        if new < best:
                            best, change = new, (g, q, None)
                    for h in groups:
                        if h is g or not h.placed[b] or not h.effective[q] or not into:
                            continue
                        new = max(
                            utilization(b, capacity[b] - h.effective[b] + into),
                            utilization(
                                q, capacity[q] - g.effective[q] + h.effective[q]
                            ),
                            rest,
                        )
                        if new < best:
                            best, change = new, (g, q, h)
            # a relative margin, so rounding cannot trade places forever
            if change is None or best > peak * (1 - 1e-9):
                return
            mover, source, partner = change
            mover.placed[source] -= 1
            mover.placed[b] += 1
            state.add(mover, source, -1)
            state.add(mover, b)
            if partner is not None:
                partner.placed[b] -= 1
                partner.placed[source] += 1
                state.add(partner, b, -1)
                state.add(partner, source)

    def meet(self, state: _State, groups: list[_Group]) -> None:
        """Move workers to the worst stages of models that miss deadlines while
        each move meets at least :data:`MET_STEP` more requests than it loses:
        the best move (of equal gains, from the least utilized source),
        repeated while it still gains, then the next best."""
        pools = range(len(self.pools))
        maxs, total = self.maxs, self.total
        count = state.count
        least = [max(self.floor(p), self.served[p]) for p in pools]
        mets = [state.met(p) for p in pools]

        def joined(g: _Group, p: int, n: int) -> float:
            """Tasks ``p`` meets with ``n`` of ``g``'s workers more."""
            return self.met(
                p,
                state.capacity[p] + n * g.effective[p],
                state.full[p] + n * g.full[p],
                state.ready[p] + n * g.ready[p],
            )

        def movable(g: _Group, q: int, b: int) -> bool:
            """Whether one of ``g``'s workers in ``q`` may go to ``b``: never
            below ``q``'s minimum, nor leaving it more work than it can keep
            up with (its requests would miss their deadlines after the
            horizon)."""
            return (
                bool(g.placed[q])
                and count[q] > least[q]
                and count[b] < maxs[b]
                and self.utilization(q, state.capacity[q] - g.effective[q]) <= 1
            )

        def gained(g: _Group, q: int, b: int) -> float:
            trial = list(mets)
            trial[b], trial[q] = joined(g, b, 1), joined(g, q, -1)
            return total(trial) - total(mets)

        for _ in range(len(self.workers)):
            best: tuple[float, float] = (MET_STEP, 0.0)
            change: tuple[_Group, int, int] | None = None
            now = total(mets)
            # groups alike on a pool gain or lose alike there
            into: dict[tuple[int, float, float, float], float] = {}
            out: dict[tuple[int, float, float, float], float] = {}
            for b in pools:
                if count[b] >= maxs[b] or not self.missing(mets, b):
                    continue
                for g in groups:
                    if not g.effective[b]:
                        continue
                    key = (b, g.effective[b], g.full[b], g.ready[b])
                    if key not in into:
                        into[key] = joined(g, b, 1)
                    trial = list(mets)
                    trial[b] = into[key]
                    # what b gains bounds what the move gains
                    if total(trial) - now < best[0]:
                        continue
                    for q in pools:
                        if q == b or not movable(g, q, b):
                            continue
                        key = (q, g.effective[q], g.full[q], g.ready[q])
                        if key not in out:
                            out[key] = joined(g, q, -1)
                        kept, trial[q] = trial[q], out[key]
                        net = (total(trial) - now, -state.utilization(q))
                        trial[q] = kept
                        if net > best:
                            best, change = net, (g, q, b)
            if change is None:
                return
            mover, source, target = change
            while True:
                mover.placed[source] -= 1
                mover.placed[target] += 1
                state.add(mover, source, -1)
                state.add(mover, target)
                mets[source], mets[target] = state.met(source), state.met(target)
                if not movable(mover, source, target):
                    break
                if gained(mover, source, target) < MET_STEP:
                    break

    def prune(self, state: _State) -> None:
        """Undo each move of ``state`` whose undoing leaves its score no worse,
        least urgent target first, until every move left is needed (see
        :func:`plan`)."""
        score = state.score()
        moved = [
            i
            for i, (home, target) in enumerate(zip(self.home, state.assignment))
            if home >= 0 and target >= 0 and target != home
        ]
        # the least urgent target first: the lowest utilization after the plan
        moved.sort(key=lambda i: (state.utilization(state.assignment[i]), -i))
        # Movers alike (same home, target, class, drain and settling) undo
        # alike: one whose undoing was refused is refused again until some
        # other undo changes the state, so the refusal is remembered till then.
        alike = {
            i: (
                self.home[i],
                state.assignment[i],
                self.kind[i],
                self.drain[i],
                self.home_speed[i],
            )
            for i in moved
        }
        refused: set[tuple] = set()
        while moved:
            kept = []
            for i in moved:
                if alike[i] in refused:
                    kept.append(i)
                elif self.undo(state, i, score):
                    refused.clear()
                else:
                    refused.add(alike[i])
                    kept.append(i)
            if len(kept) == len(moved):
                return
            moved = kept

    def undo(self, state: _State, i: int, score: Score) -> bool:
        """Send worker ``i`` of ``state`` back home if that leaves ``score`` no
        worse; whether it did."""
        home, target = self.home[i], state.assignment[i]
        capacity, count = state.capacity, state.count
        if count[home] >= self.maxs[home]:
            return False
        kind = self.kind[i]
        into = self.speed[kind][target] * self.after_switch(
            self.switch[kind][target] + self.drain[i]
        )
        # the score with the two pools changed, computed without changing state
        loads, floors, horizon = self.loads, self.floors, self.horizon
        starved = short = 0
        worst = 0.0
        for p in range(len(loads)):
            if p == target:
                room, n = capacity[p] - into, count[p] - 1
            elif p == home:
                room, n = capacity[p] + self.home_speed[i], count[p] + 1
            else:
                room, n = capacity[p], count[p]
            if n < floors[p]:
                short += floors[p] - n
            if loads[p]:
                u = loads[p] / (horizon * room) if room > 0 else math.inf
                if u == math.inf:
                    starved += 1
                elif u > worst:
                    worst = u
        gone = self.speed[kind][target] if into > 0 else 0.0
        back = self.home_full[i], self.home_ready[i]
        mets = state.mets
        met = was = score[2]
        if self.timed:
            left = self.met(
                target,
                capacity[target] - into,
                state.full[target] - gone,
                state.ready[target],
            )
            returned = self.met(
                home,
                capacity[home] + self.home_speed[i],
                state.full[home] + back[0],
                state.ready[home] + back[1],
            )
            trial = list(mets)
            trial[target], trial[home] = left, returned
            met, was = self.total(trial), self.total(mets)
        # as in _better: this undo's own gain in deadlines, the plan's utilization
        if (starved, short) < score[:2] or (
            (starved, short) == score[:2]
            and (
                met - was >= MET_MARGIN
                or (met >= was - MET_TOLERANCE and worst <= score[3] * (1 + 1e-9))
            )
        ):
            state.assignment[i] = home
            capacity[target] -= into
            capacity[home] += self.home_speed[i]
            state.full[target] -= gone
            state.full[home] += back[0]
            state.ready[home] += back[1]
            count[target] -= 1
            count[home] += 1
            if self.timed:
                mets[target], mets[home] = left, returned
            return True
        return False

    def decide(
        self,
        after: _State,
        rejected: _State | None,
        hysteresis: float,
        target_utilization: float = 0.0,
    ) -> Plan:
        """The plan of moving from the current assignment to ``after``;
        ``rejected`` is the better-looking target that did not clear the bar."""
        pools, before = self.pools, self.current
        # index -1 (no pool) reads None
        pool_of: list[Pool | None] = [*pools, None]
        urgency = [-before.utilization(i) for i in range(len(pools))] + [0.0]
        why: dict[tuple[int, int], str] = {}
        moves = []
        for i, w in enumerate(self.workers):
            source, target = self.home[i], after.assignment[i]
            if source != target:
                if (source, target) not in why:
                    why[source, target] = self.why_move(after, source, target)
                move = Move(
                    w.name, pool_of[source], pool_of[target], why[source, target]
                )
                moves.append((urgency[target], move))
        # the most urgent target first (the sort is stable: then by name)
        moves.sort(key=lambda m: m[0])
        utilization = {p: after.utilization(i) for i, p in enumerate(pools)}
        utilization.update(dict.fromkeys(self.uncosted, math.inf))
        loaded = [p for i, p in enumerate(pools) if self.loads[i]] + self.uncosted
        bottleneck = min(loaded, key=lambda p: (-utilization[p], p), default=None)
        starved = sorted(p for p in loaded if utilization[p] == math.inf)
        reasons = [
            f"{_label(p)} cannot be served: {self.why_starved(p)}" for p in starved
        ]
        # over the pools that can be served, so an unservable one does not hide the rest
        served = [i for i, p in enumerate(pools) if p not in starved]
        old = before.largest(served)
        met_before, met_after = self.total_met(before), self.total_met(after)
        due = sum(self.requests)
        deadlines = (
            f"deadlines met {met_before:.1f} -> {met_after:.1f} of {due:.1f}; "
            if self.timed
            else ""
        )
        if moves:
            reasons.append(
                f"{len(moves)} move{'s' if len(moves) > 1 else ''}; {deadlines}"
                f"largest utilization {old:.2f} -> {after.largest(served):.2f}"
            )
        elif (
            rejected is not None
            and self.total_met(rejected) < met_before - MET_TOLERANCE
        ):
            reasons.append(
                f"no move: the best plan found meets fewer deadlines "
                f"({self.total_met(rejected):.1f} against {met_before:.1f})"
            )
        elif rejected is not None and rejected.largest(served) < old * (1 - 1e-9):
            if old <= target_utilization:
                reasons.append(
                    f"no move: the largest utilization {old:.2f} is within the "
                    f"target of {target_utilization:g}"
                )
            else:
                reasons.append(
                    f"no move: the best plan found takes the largest utilization "
                    f"{old:.2f} -> {rejected.largest(served):.2f} after switch costs, "
                    f"not better by more than the hysteresis of {hysteresis:g}"
                )
        elif bottleneck is None:
            reasons.append("no move: no demand")
        else:
            reasons.append("no move: the current assignment is the best plan found")
        return Plan(
            assignment={
                w.name: pool_of[after.assignment[i]] for i, w in enumerate(self.workers)
            },
            moves=[move for _, move in moves],
            utilization=utilization,
            bottleneck=bottleneck,
            feasible=not starved,
            reason="; ".join(reasons),
            met=met_after,
            due=due,
        )

    def total_met(self, state: _State) -> float:
        if not self.timed:
            return 0.0
        return self.total([state.met(p) for p in range(len(self.pools))])

    def why_move(self, after: _State, source: int, target: int) -> str:
        before = self.current
        if target < 0:
            return (
                f"no pool with demand can use it and {_label(self.pools[source])} "
                "is at its maximum"
            )
        if self.loads[target]:
            reason = (
                f"{_label(self.pools[target])} utilization "
                f"{before.utilization(target):.2f} -> {after.utilization(target):.2f}"
            )
        else:
            reason = (
                f"keeps {_label(self.pools[target])} at its minimum of "
                f"{self.floor(target)}"
            )
        if source >= 0 and self.loads[source]:
            reason += (
                f"; {_label(self.pools[source])} "
                f"{before.utilization(source):.2f} -> {after.utilization(source):.2f}"
            )
        if self.wanted[target]:
            reason += (
                f"; {_label(self.pools[target])} meets {before.met(target):.1f} -> "
                f"{after.met(target):.1f} of {self.wanted[target]:.1f} deadlines"
            )
        return reason

    def why_starved(self, pool: Pool) -> str:
        cost = self.costs.get(pool)
        if cost is None:
            return "no cost is known for it"
        if self.maxs[self.pools.index(pool)] == 0:
            return "its max-per-pool is 0"
        if not self.workers:
            return "there are no workers"
        fit = [w for w in self.workers if w.memory_bytes >= cost.memory_bytes]
        if not fit:
            largest = max(w.memory_bytes for w in self.workers)
            return (
                f"it needs {cost.memory_bytes / GIB:.1f} GiB and the largest worker "
                f"has {largest / GIB:.1f} GiB"
            )
        if not any(cost.speeds.get(w.gpu_type, 0) > 0 for w in fit):
            types = ", ".join(sorted({w.gpu_type for w in fit}))
            return (
                f"no speed is known for the GPU types with the memory for it ({types})"
            )
        return (
            "its capable workers are in cooldown, cannot switch within the "
            "horizon, or are needed where they are"
        )


def _label(pool: Pool) -> str:
    stage, model = pool
    return f"{stage} of {model}"
