"""The elastic controller: how many workers serve each pool follows the load.

Every ``dflow.elastic.interval`` the controller prices the demand of each pool
(a stage of a model) from telemetry and the predictor, asks the planner
(:func:`dflow.planner.plan`, a pure function) for a target assignment, and
applies the planner's moves by switching idle workers' roles:

1. *drain*: the worker's pool resources drop to zero, on the worker and the
   scheduler, so none of its queued tasks starts there any more;
2. the pool's tasks queued on the worker (placed but not running) go back to the
   scheduler, which places them on the pool's other workers;
3. the running task finishes; the worker unloads the old model, loads and warms
   up the new one, and advertises its new resources; tasks that waited for that
   pool are then placed (the scheduler does not re-examine them on a resource
   change by itself).

The worker process lives throughout, so the intermediates it holds (embeddings
and latents other stages still need) stay where they are: no request loses
data in a switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import dask.config
from dask.typing import Key
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler, TaskStateState

from dflow.planner import Demand, Plan, PlannerWorker, PoolCost, plan
from dflow.plugins.extension import DflowExtension, _periodic, _pool_of
from dflow.predictor import Predictor, load_profile, shipped_rows

logger = logging.getLogger(__name__)

Pool = tuple[str, str]


@dataclass(frozen=True)
class Decision:
    """One applied move and why."""

    time: float
    worker: str
    source: Pool | None
    target: Pool | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "worker": self.worker,
            "source": list(self.source) if self.source else None,
            "target": list(self.target) if self.target else None,
            "reason": self.reason,
        }


class RoleSwitcher:
    """Switches a worker from its pool to another: drain, requeue, reload."""

    def __init__(self, scheduler: Scheduler, extension: DflowExtension):
        self.scheduler = scheduler
        self.extension = extension
        #: workers being switched and their target pool
        self.switching: dict[str, Pool] = {}

    async def switch(self, address: str, target: Pool) -> None:
        record = self.extension.workers.get(address)
        if record is None or address in self.switching:
            return
        self.switching[address] = target
        try:
            source = record.pool
            running = set(await self.scheduler.rpc(address).dflow_drain())
            self.requeue(address, source, running)
            await self.scheduler.rpc(address).dflow_assign(
                stage=target[0], model=target[1]
            )
        except Exception:
            logger.exception("Switching %s to %s failed", address, target)
            self.switching.pop(address, None)
            raise

    def requeue(self, address: str, pool: Pool | None, running: set[str]) -> None:
        """Send the pool's tasks placed on ``address`` but not running back to the
        scheduler, which places them on the pool's other workers."""
        ws = self.scheduler.workers.get(address)
        if ws is None or pool is None:
            return
        queued: dict[Key, TaskStateState] = {
            ts.key: "released"
            for ts in ws.processing
            if _pool_of(ts) == pool and ts.key not in running
        }
        if queued:
            self.scheduler.transitions(
                queued, stimulus_id=f"dflow-requeue-{time.time()}"
            )

    def finished(self, address: str) -> None:
        """The worker reported ready (or left): its switch is over."""
        self.switching.pop(address, None)


class ElasticController(SchedulerPlugin):
    """Scheduler-side control loop: telemetry -> predictor -> planner -> switches.

    Configured under ``dflow.elastic`` (``enabled``, ``interval``) and
    ``dflow.planner`` (horizon, cooldown, hysteresis, min and max per pool).
    """

    name = "dflow-elastic"

    def __init__(self, extension: DflowExtension, predictor: Any = None):
        self.extension = extension
        self.predictor = predictor
        self.scheduler: Scheduler | None = None
        self.switcher: RoleSwitcher | None = None
        self.enabled = bool(dask.config.get("dflow.elastic.enabled"))
        self._decisions: deque[Decision] = deque(
            maxlen=dask.config.get("dflow.scheduler.history")
        )
        #: last plan's summary, for status and dashboards
        self.last_plan: dict[str, Any] = {}
        #: time of each worker's last move (planner cooldown)
        self.moved: dict[str, float] = {}
        #: measured seconds to load and warm a pool, per (pool, gpu type)
        self.load_seconds: dict[tuple[Pool, str], float] = {}
        #: when each moved worker should serve its new pool (its drain and
        #: load as the plan that moved it priced them)
        self.ready_at: dict[str, float] = {}
        #: until when a move from one pool to another bars the way back, per
        #: (source, target): the mover's ready time (a cooldown when unpriced)
        self.flows: dict[tuple[Pool, Pool], float] = {}
        #: the last plan's workers and pool costs, which ``apply`` times moves by
        self._planned: dict[str, PlannerWorker] = {}
        self._costs: dict[Pool, PoolCost] = {}
        self._step_seconds: deque[float] = deque(maxlen=1000)
        #: CPU seconds of the same steps (the scheduler's thread alone: on a
        #: busy host the wall time also counts waiting for a core)
        self._step_cpu_seconds: deque[float] = deque(maxlen=1000)
        self.refit_every = parse_timedelta(
            dask.config.get("dflow.predictor.refit-interval")
        )
        self._refitted = time.time()
        self._tasks: set[asyncio.Task] = set()

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.switcher = RoleSwitcher(scheduler, self.extension)
        self.extension.elastic = self
        scheduler.handlers["dflow_pool_targets"] = self.pool_targets
        if self.predictor is None:
            # Seeding imports torch and diffusers and resolves the real-size
            # presets: seconds, so off the event loop; until it is done the
            # controller prices pools by their observed service times. A daemon
            # thread, so closing the scheduler does not wait for it.
            loop = asyncio.get_running_loop()
            threading.Thread(
                target=self._seed_predictor, args=(loop,), daemon=True
            ).start()
        interval = parse_timedelta(dask.config.get("dflow.elastic.interval"))
        scheduler.periodic_callbacks["dflow-elastic"] = pc = _periodic(
            self.step, interval
        )
        pc.start()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _seed_predictor(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            predictor = default_predictor()
        except Exception:
            logger.exception("No stage-cost predictor; pricing by observed times")
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._use_predictor, predictor)

    def _use_predictor(self, predictor: Predictor) -> None:
        self.predictor = predictor
        if self.telemetry is not None:
            self.telemetry.predictor = predictor

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        if self.switcher is not None:
            self.switcher.finished(worker)
        self.ready_at.pop(worker, None)

    def decisions(self, last: int | None = None) -> list[dict[str, Any]]:
        """Applied moves, oldest first (the ``last`` ones if given)."""
        decisions = list(self._decisions)[-last:] if last else self._decisions
        return [d.to_dict() for d in decisions]

    def worker_ready(
        self, address: str, pool: Pool | None, gpu_type: str, seconds: float | None
    ) -> None:
        """The extension heard a worker report ready (or failed)."""
        if self.switcher is not None:
            self.switcher.finished(address)
        if pool is not None and seconds is not None:
            self.load_seconds[pool, gpu_type] = seconds

    def step(self) -> None:
        """One control interval: plan and apply."""
        if not self.enabled:
            return
        start, cpu = time.perf_counter(), time.thread_time()
        plan = self.plan()
        self._step_seconds.append(time.perf_counter() - start)
        self._step_cpu_seconds.append(time.thread_time() - cpu)
        if plan is None:
            return
        for move in plan.moves:
            if move.target is not None:
                self.apply(move.worker, move.source, move.target, move.reason)
        if (
            self.predictor is not None
            and time.time() - self._refitted > self.refit_every
        ):
            self.predictor.refit()
            self._refitted = time.time()

    def apply(
        self, address: str, source: Pool | None, target: Pool, reason: str
    ) -> None:
        assert self.switcher is not None
        now = time.time()
        self.moved[address] = now
        planned, cost = self._planned.get(address), self._costs.get(target)
        if planned is not None and cost is not None:
            switch = cost.switch_seconds.get(planned.gpu_type, 0.0)
            self.ready_at[address] = now + planned.drain_seconds + switch
        if source is not None:
            cooldown = parse_timedelta(dask.config.get("dflow.planner.cooldown"))
            until = self.ready_at.get(address, now + cooldown)
            previous = self.flows.get((source, target), 0.0)
            self.flows[source, target] = max(previous, until)
        record = self.extension.workers.get(address)
        name = record.name if record else address
        self._decisions.append(Decision(now, name, source, target, reason))
        logger.info("Switching %s from %s to %s: %s", name, source, target, reason)
        task = asyncio.ensure_future(self.switcher.switch(address, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def plan(self) -> Plan | None:
        """The planner's plan for the current fleet and demand (None: no fleet, or
        the demand of a pool cannot be priced yet)."""
        assert self.scheduler is not None and self.switcher is not None
        now = time.time()
        workers = self.planner_workers(now)
        if not workers:
            return None
        served = {w.pool for w in workers if w.pool is not None}
        pools = set(served)
        # pools nobody serves enter the plan only while they have work
        pools |= {
            p
            for p in self.telemetry.pools()
            if p[0] != "all"
            and (self.telemetry.arrival_rate(p) or self.telemetry.queue(p))
        }
        reference = Counter(w.gpu_type for w in workers).most_common(1)[0][0]
        gpu_types = {w.gpu_type for w in workers}
        owed, newest = self.owed_work()
        prices = {
            pool: self.price(pool, reference, gpu_types, self.features(pool, newest))
            for pool in pools
        }
        # A served pool that owes work it cannot price (no profile covers it and
        # none of its tasks has finished) has unknown demand, not none: planning
        # without it would give its workers to the pools that are priced.
        unpriced = sorted(p for p in served if owed[p] and not prices[p].seconds)
        if unpriced:
            self.last_plan = {
                "time": now,
                "utilization": {},
                "bottleneck": None,
                "feasible": True,
                "reason": "no move: waiting for a first service time of "
                + ", ".join(f"{stage} of {model}" for stage, model in unpriced),
            }
            return None
        costs = {pool: price.cost for pool, price in prices.items()}
        demands = self.demands(prices, owed)
        workers = [
            self.barring(self.timing(self.dwelling(w, prices), prices, now), now)
            for w in workers
        ]
        self._planned, self._costs = {w.name: w for w in workers}, costs
        # below the target utilization every pool keeps up: no move pays then
        target = float(dask.config.get("dflow.elastic.target-utilization"))
        result = plan(workers, demands, costs, now=now, target_utilization=target)
        self.last_plan = {
            "time": now,
            "utilization": {"/".join(p): u for p, u in result.utilization.items()},
            "bottleneck": list(result.bottleneck) if result.bottleneck else None,
            "feasible": result.feasible,
            "reason": result.reason,
        }
        return result

    def planner_workers(self, now: float) -> list[PlannerWorker]:
        """The fleet as the planner sees it; workers loading or switching stay put."""
        assert self.scheduler is not None and self.switcher is not None
        workers = []
        for address, record in self.extension.workers.items():
            ws = self.scheduler.workers.get(address)
            if ws is None or record.state not in (
                "ready",
                "loading",
                "draining",
                "failed",
            ):
                continue
            pool = self.switcher.switching.get(address, record.pool)
            if record.state == "failed":
                pool = None
            settling = record.state != "ready" or address in self.switcher.switching
            workers.append(
                PlannerWorker(
                    name=address,
                    gpu_type=record.gpu_type,
                    memory_bytes=record.memory,
                    pool=pool,
                    busy=bool(ws.processing),
                    last_move=now if settling else self.moved.get(address),
                )
            )
        return workers

    def dwelling(
        self, worker: PlannerWorker, prices: dict[Pool, Price]
    ) -> PlannerWorker:
        """``worker`` with its cooldown stretched to ``dflow.elastic.dwell`` of its
        pool's requests: a worker that moved serves its new pool at least that
        many requests' time before it may move again, so pools of long requests
        (a video on a slow card takes minutes) do not trade workers back and
        forth faster than either can use them."""
        if worker.last_move is None or worker.pool not in prices:
            return worker
        price = prices[worker.pool]
        speed = price.cost.speeds.get(worker.gpu_type) or 1.0
        dwell = float(dask.config.get("dflow.elastic.dwell")) * price.seconds / speed
        cooldown = parse_timedelta(dask.config.get("dflow.planner.cooldown"))
        if dwell <= cooldown:
            return worker
        return dataclasses.replace(
            worker, last_move=worker.last_move + dwell - cooldown
        )

    def barring(self, worker: PlannerWorker, now: float) -> PlannerWorker:
        """``worker`` barred from the pools that gave its pool a worker whose
        move has not taken effect yet (it still drains or loads). The mover
        itself is in cooldown, but its new pool's other workers are not:
        without this, a swing of demand shorter than the requests sends one
        worker there and, a plan later, another back, each paying a drain and a
        load before it serves; by the time either serves, the swing has passed.
        Once the mover serves, the way back opens: a real reversal (a burst
        of the other kind) is followed without waiting out a cooldown."""
        if worker.pool is None:
            return worker
        barred = frozenset(
            source
            for (source, target), until in self.flows.items()
            if target == worker.pool and now < until
        )
        return dataclasses.replace(worker, barred=barred) if barred else worker

    def timing(
        self, worker: PlannerWorker, prices: dict[Pool, Price], now: float
    ) -> PlannerWorker:
        """``worker`` with how long a move would take it: a worker still moving
        serves its new pool only once its drain and load are done
        (``ready_in``, as the plan that moved it priced them); a busy worker
        must first finish its running task (``drain_seconds``: that task's
        predicted time on the worker less the time it has run, as of the
        worker's last heartbeat; a whole task when it started since). So the
        planner weighs a move's gain against the drain as well as the load,
        and, the step after, sees the mover as the plan that moved it did."""
        assert self.scheduler is not None and self.switcher is not None
        record = self.extension.workers.get(worker.name)
        if record is None or worker.pool is None:
            return worker
        if record.state != "ready" or worker.name in self.switcher.switching:
            ready_in = self.ready_at.get(worker.name, now) - now
            return dataclasses.replace(worker, ready_in=max(0.0, ready_in))
        ws = self.scheduler.workers.get(worker.name)
        price = prices.get(worker.pool)
        if ws is None or not ws.processing or price is None or not price.seconds:
            return worker
        speed = price.cost.speeds.get(worker.gpu_type) or 1.0
        service = price.seconds / speed
        ran = max(ws.executing.values(), default=None)
        if ran is None:
            return dataclasses.replace(worker, drain_seconds=service)
        ran += max(0.0, now - ws.last_seen)
        return dataclasses.replace(worker, drain_seconds=max(0.0, service - ran))

    @property
    def telemetry(self) -> Any:
        return self.extension.telemetry

    def service(self, pool: Pool, gpu_type: str, features: dict | None) -> float | None:
        """Predicted seconds of one task of ``pool`` on ``gpu_type``: the predictor
        where a profile covers the pool, else the observed average."""
        stage, model = pool
        if self.predictor is not None and features:
            try:
                return self.predictor.predict(model, stage, gpu_type, features).seconds
            except LookupError:
                pass
        return self.telemetry.service.get(pool)

    def features(self, pool: Pool, newest: dict[Pool, dict]) -> dict | None:
        """Features to price ``pool`` by: of the newest task it owes (``newest``,
        from :meth:`owed_work`), else of its most recent finished one. The work
        ahead is priced by its own requests, so a new mix is priced as itself
        before its first task finishes."""
        if pool in newest:
            return newest[pool]
        recent = self.telemetry.recent.get(pool)
        return recent[-1] if recent else None

    def price(
        self, pool: Pool, reference: str, gpu_types: set[str], features: dict | None
    ) -> Price:
        """Service time on the reference GPU type, speeds and memory of a pool,
        for a request of ``features``."""
        stage, model = pool
        base = self.service(pool, reference, features)
        speeds = {}
        for gpu_type in gpu_types:
            seconds = self.service(pool, gpu_type, features) if base else None
            speeds[gpu_type] = base / seconds if base and seconds else 1.0
        spec = self.extension.specs.get(model, {})
        memory = int(spec.get("weight_bytes", {}).get(stage, 0))
        if self.predictor is not None and features:
            try:
                peak = self.predictor.predict(
                    model, stage, reference, features
                ).peak_bytes
            except LookupError:
                peak = None
            memory = max(memory, peak or 0)
        known = [s for (p, _), s in self.load_seconds.items() if p == pool]
        default = parse_timedelta(dask.config.get("dflow.elastic.default-switch"))
        switch = {
            g: self.load_seconds.get((pool, g), max(known, default=default))
            for g in gpu_types
        }
        return Price(
            seconds=base or 0.0,
            cost=PoolCost(speeds=speeds, memory_bytes=memory, switch_seconds=switch),
        )

    def owed_work(self) -> tuple[Counter[Pool], dict[Pool, dict]]:
        """Tasks of each pool that requests in flight still owe, and the
        features of the newest of them, in one pass over the tasks."""
        assert self.scheduler is not None
        owed: Counter[Pool] = Counter()
        newest: dict[Pool, dict] = {}
        for ts in self.scheduler.tasks.values():
            if ts.state in OWED and (pool := _pool_of(ts)) is not None:
                owed[pool] += 1
                newest[pool] = (ts.annotations or {})["dflow"].get("features", {})
        return owed, newest

    def demands(
        self, prices: dict[Pool, Price], owed: Counter[Pool]
    ) -> dict[Pool, Demand]:
        """Arrivals times service, plus the work owed by requests in flight."""
        return {
            pool: Demand(
                rate=self.arrival_rate(pool) * price.seconds,
                backlog=owed[pool] * price.seconds,
            )
            for pool, price in prices.items()
        }

    def arrival_rate(self, pool: Pool) -> float:
        """Tasks of ``pool`` arriving per second, the forecast for the horizon.

        Counted over the planning horizon (at least the telemetry window): over
        a short window the randomness of arrivals swings demand, and moves
        workers. Unless the last telemetry window's count is one the longer
        window's rate makes unlikely, more than two standard deviations of a
        Poisson count away from it: then the load has shifted (a phase of a
        moving mix began or ended), and the recent rate is the better forecast;
        a long window alone would take half the horizon to see a shift. (At a
        cold start both read low, which the backlog makes up for; a window cut
        to a few seconds would read one early request as a torrent.)
        """
        horizon = parse_timedelta(dask.config.get("dflow.planner.horizon"))
        short = self.telemetry.window
        long = max(short, horizon)
        recent = self.telemetry.arrival_rate(pool, short)
        if long <= short:
            return recent
        rate = self.telemetry.arrival_rate(pool, long)
        expected = rate * short
        if abs(recent * short - expected) > 2 * math.sqrt(max(expected, 1.0)):
            return recent
        return rate

    def pool_targets(self, utilization: float | None = None) -> dict[str, int]:
        """Workers each pool needs to run at ``utilization`` over the horizon: the
        sizes a cluster manager that can grow pools should scale them to (see
        :class:`dflow.cluster.PoolAdaptive`). Keys are ``"stage/model"``."""
        assert self.scheduler is not None
        if utilization is None:
            utilization = float(dask.config.get("dflow.elastic.target-utilization"))
        horizon = parse_timedelta(dask.config.get("dflow.planner.horizon"))
        workers = self.planner_workers(time.time())
        pools = {w.pool for w in workers if w.pool is not None} | self.telemetry.pools()
        reference = (
            Counter(w.gpu_type for w in workers).most_common(1)[0][0]
            if workers
            else "cpu"
        )
        owed, newest = self.owed_work()
        prices = {
            p: self.price(p, reference, {reference}, self.features(p, newest))
            for p in pools
        }
        targets = {}
        for pool, demand in self.demands(prices, owed).items():
            load = demand.rate * horizon + demand.backlog
            needed = math.ceil(load / (horizon * utilization)) if load else 0
            targets["/".join(pool)] = needed
        return targets

    def planning_seconds(self, cpu: bool = False) -> list[float]:
        """Recent control steps' durations (planning only, not the switches):
        wall seconds, or with ``cpu`` the scheduler thread's CPU seconds."""
        return list(self._step_cpu_seconds if cpu else self._step_seconds)


def default_predictor() -> Predictor:
    """A predictor seeded with the shipped H200 measurements and the profiles
    named in ``dflow.elastic.profiles``."""
    rows = shipped_rows()
    for path in dask.config.get("dflow.elastic.profiles"):
        rows += load_profile(path)
    return Predictor(rows)


#: task states whose work is still owed
OWED = ("waiting", "no-worker", "queued", "processing")


@dataclass(frozen=True)
class Price:
    seconds: float
    cost: PoolCost
