"""The elastic controller: how many workers serve each pool follows the load.

Every ``dflow.elastic.interval`` the controller

1. *observes* the scheduler into an :class:`~dflow.plugins.pricing.Observation`
   (workers, and per pool the work owed, arrivals and observed times);
2. *prices* each pool's demand from it and the predictor (pure functions of
   :mod:`dflow.plugins.pricing`);
3. *plans*: :func:`dflow.planner.plan` (a pure function) assigns workers to
   pools, and each pool gets a target size at the target utilization;
4. *acts* through its :class:`~dflow.plugins.actuators.Actuator`, chosen by
   ``dflow.elastic.actuator``: switching workers' roles on a fixed fleet, or
   sizing pools for a cluster manager that grows and shrinks them.

Its settings and an operator's moves go through scheduler handlers:
``dflow_elastic`` (on or off, the actuator), ``dflow_move`` (switch a worker
now), ``dflow_plan`` (the plan it would make now, applied to nothing),
``dflow_pool_targets`` and ``dflow_pool_sizes`` (what pools need, what a
growing cluster should scale them to).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter, deque
from typing import Any

from tornado.ioloop import PeriodicCallback

import dask.config
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

from dflow.planner import Plan, PlannerWorker, PoolCost
from dflow.plugins.actuators import ACTUATORS, Actuator, ClusterScaler, RoleSwitcher
from dflow.plugins.extension import TOPIC, Decision, DflowExtension
from dflow.plugins.predictions import Predictions
from dflow.plugins.pricing import (
    Memory,
    Observation,
    PlannerRecords,
    PoolView,
    Settings,
    WorkerView,
    plan_pools,
    target_sizes,
)
from dflow.plugins.telemetry import Telemetry
from dflow.pools import Pool, task_features, task_pool

logger = logging.getLogger(__name__)

#: task states whose work is still owed
OWED = ("waiting", "no-worker", "queued", "processing")
#: worker states the controller plans with
PLANNED_STATES = ("ready", "loading", "draining", "failed")


class ElasticController(SchedulerPlugin):
    """Scheduler-side control loop: observe -> price -> plan -> act.

    Configured under ``dflow.elastic`` (``enabled``, ``interval``, ``actuator``)
    and ``dflow.planner`` (horizon, cooldown, hysteresis, min and max per pool).
    """

    name = "dflow-elastic"

    def __init__(
        self,
        scheduler: Scheduler,
        extension: DflowExtension,
        telemetry: Telemetry,
        predictions: Predictions,
        actuator: Actuator,
    ):
        self.scheduler = scheduler
        self.extension = extension
        self.telemetry = telemetry
        self.predictions = predictions
        self.actuator = actuator
        self.enabled = bool(dask.config.get("dflow.elastic.enabled"))
        #: last plan's summary, for status and dashboards
        self.last_plan: dict[str, Any] = {}
        #: time of each worker's last move (planner cooldown)
        self.moved: dict[str, float] = {}
        #: measured seconds to load and warm a pool, per (pool, gpu type)
        self.load_seconds: dict[tuple[Pool, str], float] = {}
        #: measured seconds to resume a pool's parked weights, per (pool, gpu type)
        self.resume_seconds: dict[tuple[Pool, str], float] = {}
        #: when each moved worker should serve its new pool (its drain and
        #: load as the plan that moved it priced them)
        self.ready_at: dict[str, float] = {}
        #: until when a move from one pool to another bars the way back, per
        #: (source, target): the mover's ready time (a cooldown when unpriced)
        self.flows: dict[tuple[Pool, Pool], float] = {}
        #: the last plan's workers and pool costs, which moves are timed by
        self._planned: dict[str, PlannerWorker] = {}
        self._costs: dict[Pool, PoolCost] = {}
        #: each worker's view and the planner's record of it, kept between
        #: steps while what they are made of is unchanged
        self._views: dict[str, tuple[tuple[Any, ...], WorkerView]] = {}
        self.records = PlannerRecords()
        self._step_seconds: deque[float] = deque(maxlen=1000)
        #: CPU seconds of the same steps (the scheduler's thread alone: on a
        #: busy host the wall time also counts waiting for a core)
        self._step_cpu_seconds: deque[float] = deque(maxlen=1000)
        self.refit_every = parse_timedelta(
            dask.config.get("dflow.predictor.refit-interval")
        )
        self._refitted = time.time()

    async def start(self, scheduler: Scheduler) -> None:
        scheduler.handlers.update(
            {
                "dflow_elastic": self.configure,
                "dflow_move": self.move,
                "dflow_plan": self.dry_run,
                "dflow_pool_targets": self.pool_targets,
                "dflow_pool_sizes": self.pool_sizes,
            }
        )
        interval = parse_timedelta(dask.config.get("dflow.elastic.interval"))
        scheduler.periodic_callbacks["dflow-elastic"] = pc = PeriodicCallback(
            self.step, interval * 1000
        )
        pc.start()

    async def close(self) -> None:
        if isinstance(self.actuator, RoleSwitcher):
            self.actuator.cancel()

    # -- events ----------------------------------------------------------------------

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or msg.get("action") not in ("worker-ready", "worker-failed"):
            return
        self.actuator.finished(msg["address"])
        if msg["pool"] is not None and msg.get("load_seconds") is not None:
            seconds = self.resume_seconds if msg.get("resumed") else self.load_seconds
            seconds[Pool.parse(msg["pool"]), msg["gpu_type"]] = msg["load_seconds"]

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.actuator.finished(worker)
        self.ready_at.pop(worker, None)

    # -- handlers --------------------------------------------------------------------

    def configure(
        self, enabled: bool | None = None, actuator: str | None = None, **scale: Any
    ) -> dict[str, Any]:
        """Turn the controller on or off and choose its actuator; returns the
        settings now and the workers being switched (address -> pool).
        ``scale`` (``minimum``, ``maximum``, ``wait``, ``utilization``) sets how
        the ``scale-pools`` actuator sizes pools."""
        if enabled is not None:
            self.enabled = bool(enabled)
        if (actuator is not None and actuator != self.actuator.kind) or scale:
            self.actuator = make_actuator(
                actuator or self.actuator.kind, self.scheduler, self.extension, **scale
            )
        return {
            "enabled": self.enabled,
            "actuator": self.actuator.kind,
            "switching": {a: str(p) for a, p in self.actuator.switching.items()},
        }

    def move(self, worker: str, pool: str, reason: str = "operator") -> None:
        """Switch ``worker`` (address or name) to ``pool`` (``"stage:model"``) now,
        whatever the plan: an operator's move, recorded as a decision."""
        if not isinstance(self.actuator, RoleSwitcher):
            raise ValueError(
                f"moving workers needs the switch-roles actuator, not "
                f"{self.actuator.kind} (dflow_elastic(actuator='switch-roles'))"
            )
        address = next(
            (a for a, r in self.extension.workers.items() if worker in (a, r.name)),
            None,
        )
        if address is None:
            raise ValueError(f"worker {worker!r} is not one of dflow's workers")
        source, target = self.extension.workers[address].pool, Pool.parse(pool)
        if not self.actuator.start(address, target):
            raise ValueError(f"worker {worker!r} is being switched already")
        self.record(address, source, target, reason)

    def dry_run(self) -> dict[str, Any]:
        """The plan the controller would make now, applying nothing: its moves
        (pools as ``"stage:model"``; ``None``: no pool) and its summary."""
        settings = self.settings()
        memory = Memory(self.moved, self.ready_at, self.flows)
        step = plan_pools(
            self.observe(time.time(), settings),
            self.predictions.predictor,
            memory,
            settings,
        )
        moves = step.plan.moves if step.plan is not None else []
        return {
            **step.summary,
            "moves": [
                {
                    "worker": m.worker,
                    "source": _text(m.source),
                    "target": _text(m.target),
                    "reason": m.reason,
                }
                for m in moves
            ],
        }

    def pool_targets(self, utilization: float | None = None) -> dict[str, int]:
        """Workers each pool (``"stage:model"``) needs to run at ``utilization``
        (default ``dflow.elastic.target-utilization``) over the horizon."""
        settings = self.settings()
        observation = self.observe(time.time(), settings)
        targets = self.targets(observation, settings, utilization)
        return {str(pool): n for pool, n in targets.items()}

    def pool_sizes(self) -> dict[str, int]:
        """Sizes (``"stage:model"``) a growing cluster should scale its pools to,
        under the ``scale-pools`` actuator (empty under ``switch-roles``)."""
        if not isinstance(self.actuator, ClusterScaler):
            return {}
        return {str(pool): n for pool, n in self.actuator.sizes.items()}

    # -- the control step --------------------------------------------------------------

    def step(self) -> None:
        """One control interval: observe, price, plan, act."""
        if not self.enabled:
            return
        start, cpu = time.perf_counter(), time.thread_time()
        settings = self.settings()
        observation = self.observe(time.time(), settings)
        result = self.plan(observation, settings)
        targets = (
            self.targets(observation, settings, self.actuator.utilization)
            if isinstance(self.actuator, ClusterScaler)
            else {}
        )
        self._step_seconds.append(time.perf_counter() - start)
        self._step_cpu_seconds.append(time.thread_time() - cpu)
        for move in self.actuator.act(result, targets):
            self.record(move.worker, move.source, move.target, move.reason)
        if time.time() - self._refitted > self.refit_every:
            self.predictions.refit()
            self._refitted = time.time()

    def settings(self) -> Settings:
        """The settings of a step: config now, telemetry's window."""
        return dataclasses.replace(Settings.from_config(), window=self.telemetry.window)

    def observe(self, now: float, settings: Settings) -> Observation:
        """The scheduler, read into the plain data the pricing functions take."""
        scheduler, telemetry = self.scheduler, self.telemetry
        switching = self.actuator.switching
        workers = []
        kept, self._views = self._views, {}
        for address, record in self.extension.workers.items():
            ws = scheduler.workers.get(address)
            if ws is None or record.state not in PLANNED_STATES:
                continue
            busy, moving_to = bool(ws.processing), switching.get(address)
            running = None
            if ws.executing:
                running = max(ws.executing.values()) + max(0.0, now - ws.last_seen)
            # what the view is made of: a worker whose record, tasks and move
            # are unchanged keeps its view (and the planner its record of it)
            key = (
                record.name,
                record.state,
                record.stage,
                record.model,
                record.gpu_type,
                record.memory,
                record.speed,
                busy,
                running,
                moving_to,
                record.parked,
            )
            old = kept.get(address)
            if old is not None and old[0] == key:
                view = old[1]
            else:
                view = WorkerView(
                    address=address,
                    name=record.name,
                    state=record.state,
                    pool=record.pool,
                    gpu_type=record.gpu_type,
                    memory=record.memory,
                    busy=busy,
                    running_s=running,
                    moving_to=moving_to,
                    speed=record.speed,
                    parked=frozenset(Pool.parse(p) for p in record.parked),
                )
            self._views[address] = key, view
            workers.append(view)
        owed: Counter[Pool] = Counter()
        # the newest owed task's annotations per pool; its features read once
        latest: dict[Pool, Any] = {}
        # owed tasks per pool and features (as items: the features of one
        # model's tasks list the same names in the same order; a shape's list
        # may arrive as one)
        shapes: dict[Pool, Counter[tuple]] = {}
        # seconds left to each owed task's deadline, and the newest one's SLO
        due: dict[Pool, list[float]] = {}
        slo: dict[Pool, float] = {}
        requests = self.extension.requests
        for ts in scheduler.tasks.values():
            if ts.state in OWED and (pool := task_pool(ts.annotations)) is not None:
                owed[pool] += 1
                latest[pool] = ts.annotations
                info = (ts.annotations or {})["dflow"]
                shape = tuple(
                    (name, tuple(v) if isinstance(v, list) else v)
                    for name, v in info.get("features", {}).items()
                )
                shapes.setdefault(pool, Counter())[shape] += 1
                request = requests.get(info.get("request"))
                if request is not None and request.due is not None:
                    slo[pool] = request.due - request.submitted
                    if request.due < math.inf:
                        due.setdefault(pool, []).append(request.due - now)
        newest = {pool: task_features(a) for pool, a in latest.items()}
        waiting: Counter[Pool] = Counter(
            pool
            for ts in scheduler.unrunnable
            if (pool := task_pool(ts.annotations)) is not None
        )
        long_window = max(settings.window, settings.horizon)
        pools = {}
        # telemetry's pools include every worker's
        for pool in telemetry.pools() | set(owed):
            recent = telemetry.recent.get(pool)
            spec = self.extension.specs.get(pool.model, {})
            pools[pool] = PoolView(
                owed=owed[pool],
                newest=newest.get(pool),
                shapes=tuple(
                    (dict(shape), count)
                    for shape, count in shapes.get(pool, Counter()).items()
                ),
                recent=recent[-1] if recent else None,
                observed_s=telemetry.service.get(pool),
                rate=telemetry.arrival_rate(pool, settings.window),
                arrivals=telemetry.arrival_ages(pool, long_window),
                waiting=waiting[pool],
                weight_bytes=int(spec.get("weight_bytes", {}).get(pool.stage, 0)),
                due=tuple(due.get(pool, ())),
                slo=slo.get(pool, math.inf),
            )
        return Observation(
            now,
            tuple(workers),
            pools,
            dict(self.load_seconds),
            dict(self.resume_seconds),
        )

    def plan(self, observation: Observation, settings: Settings) -> Plan | None:
        """The planner's plan for the observed fleet and demand (None: no fleet,
        or the demand of a served pool cannot be priced yet)."""
        memory = Memory(self.moved, self.ready_at, self.flows)
        step = plan_pools(
            observation, self.predictions.predictor, memory, settings, self.records
        )
        if step.summary:
            self.last_plan = step.summary
        if step.plan is not None:
            self._planned, self._costs = dict(step.workers), dict(step.costs)
        return step.plan

    def targets(
        self,
        observation: Observation,
        settings: Settings,
        utilization: float | None = None,
    ) -> dict[Pool, int]:
        """Workers each pool needs at ``utilization`` over the horizon."""
        return target_sizes(
            observation, self.predictions.predictor, settings, utilization
        )

    def record(
        self, address: str, source: Pool | None, target: Pool | None, reason: str
    ) -> None:
        """A move starts: time it for the next plans and keep it as a decision."""
        now = time.time()
        self.moved[address] = now
        planned = self._planned.get(address)
        cost = self._costs.get(target) if target is not None else None
        if planned is not None and cost is not None:
            switch = cost.switch(planned.gpu_type, target in planned.parked)
            self.ready_at[address] = now + planned.drain_seconds + switch
        if source is not None and target is not None:
            cooldown = parse_timedelta(dask.config.get("dflow.planner.cooldown"))
            until = self.ready_at.get(address, now + cooldown)
            previous = self.flows.get((source, target), 0.0)
            self.flows[source, target] = max(previous, until)
        record = self.extension.workers.get(address)
        name = record.name if record else address
        self.extension.record_decision(Decision(now, name, source, target, reason))
        logger.info("Switching %s from %s to %s: %s", name, source, target, reason)

    def planning_seconds(self, cpu: bool = False) -> list[float]:
        """Recent control steps' durations (observing and planning, not the
        switches): wall seconds, or with ``cpu`` the scheduler thread's CPU
        seconds."""
        return list(self._step_cpu_seconds if cpu else self._step_seconds)


def _text(pool: Pool | None) -> str | None:
    return None if pool is None else str(pool)


def make_actuator(
    kind: str,
    scheduler: Scheduler,
    extension: DflowExtension,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    wait: str | float | None = None,
    utilization: float | None = None,
) -> Actuator:
    """The actuator ``kind`` names (``dflow.elastic.actuator``)."""
    if kind == "switch-roles":
        return RoleSwitcher(scheduler, extension)
    if kind == "scale-pools":
        return ClusterScaler(
            minimum=(
                int(dask.config.get("dflow.planner.min-per-pool"))
                if minimum is None
                else minimum
            ),
            maximum=(
                dask.config.get("dflow.planner.max-per-pool")
                if maximum is None
                else maximum
            ),
            wait=parse_timedelta(
                dask.config.get("dflow.elastic.scale-down-wait")
                if wait is None
                else wait
            ),
            utilization=utilization,
        )
    raise ValueError(
        f"dflow.elastic.actuator must be one of {', '.join(ACTUATORS)}, got {kind!r}"
    )
