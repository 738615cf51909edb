"""Placement by speed: a worker at 0.3x its GPU type's speed gets 0.3x the work.

Dask places a resource-restricted task on a worker as soon as its inputs exist,
on the worker where it would *start* soonest (its occupancy: the tasks placed
on it, each priced at its prefix's average duration), and its work stealing
later moves queued tasks from busy workers to idle ones by the same measure.
Both take every worker of a pool for equally fast, so a slow worker gets as
many tasks as the others, and stealing hands it more each time it looks idle.

:class:`SpeedPlacement` makes both follow the workers' measured speeds
(:class:`~dflow.plugins.speeds.WorkerSpeeds`):

- the scheduler's worker objective, for stage tasks, becomes the time the
  task would *finish* on the worker, its backlog and the task itself divided
  by the worker's speed (the same choice as Dask's while speeds are equal);
- stage tasks leave Dask's work stealing, and every ``dflow.health.interval``
  a rebalance moves a pool's queued (not started) tasks, latest first, from
  the worker that would finish its backlog last to the one that would finish
  the task soonest, while that gains at least half a task. Moves go through
  Dask's stealing protocol, so a task the worker has started meanwhile stays.
- a denoising task's objective counts a worker's backlog whole, where Dask
  divides it by the worker's task slots: with DiT batching
  (``dflow.runtime.max-dit-batch``) a worker has several slots, yet a task
  shares a step only with requests of its shape;
- a worker with several task slots starts only denoising tasks that can join
  the batch it runs (:meth:`dflow.worker.StagePlugin.next_ready_task`); one
  that then waits in its step loop (its batch is full) is executing to Dask, so neither stealing nor the rebalance can move
  it. Whenever a worker of the pool is idle, the busiest worker where a task
  would finish later is asked to give a batch of them back
  (``dflow_give_back``); the scheduler places them again, never on a worker
  that gave them back (a restriction: Dask would otherwise send a task back to
  the worker holding its inputs).

Off with ``dflow.health.placement: false`` (and without Dask's stealing
extension, nothing is rebalanced).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tornado.ioloop import PeriodicCallback

import dask.config
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler, TaskState, WorkerState

import dflow.config  # noqa: F401
from dflow.plugins.extension import DflowExtension
from dflow.plugins.speeds import WorkerSpeeds
from dflow.pools import MONOLITHIC, Pool, task_pool

logger = logging.getLogger(__name__)

#: Most tasks one rebalance moves per pool
MAX_MOVES = 32
#: Stages whose workers batch denoising steps (:mod:`dflow.runtime`)
BATCHING_STAGES = ("dit", MONOLITHIC)


class SpeedPlacement(SchedulerPlugin):
    """Stage tasks placed and rebalanced by worker speed."""

    name = "dflow-placement"

    def __init__(self, extension: DflowExtension, speeds: WorkerSpeeds):
        self.extension = extension
        self.speeds = speeds
        self.scheduler: Scheduler | None = None
        self._objective: Callable[[TaskState, WorkerState], tuple] | None = None
        #: tasks moved by the rebalance, for tests and benchmarks
        self.moved = 0
        #: denoising tasks given back by busy workers for idle ones
        self.given_back = 0
        #: pools with a look for idle workers pending
        self._looking: set[Pool] = set()
        #: each worker's pool tasks when last asked to give some back
        self._asked: dict[str, frozenset] = {}
        #: pools with a worker of several task slots (as of the last rebalance):
        #: only those have tasks waiting in a step loop to give back
        self._batching: set[Pool] = set()

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._objective = scheduler.worker_objective
        # the scheduler looks the objective up on itself at each decision
        scheduler.worker_objective = self.objective  # type: ignore[method-assign]
        interval = parse_timedelta(dask.config.get("dflow.health.interval"))
        scheduler.periodic_callbacks["dflow-placement"] = pc = PeriodicCallback(
            self.rebalance, interval * 1000
        )
        pc.start()

    async def close(self) -> None:
        if self.scheduler is not None and self._objective is not None:
            self.scheduler.worker_objective = self._objective  # type: ignore[method-assign,assignment]

    # -- placement -------------------------------------------------------------------

    def factor(self, address: str) -> float:
        """The worker's speed as placement weighs it (1.0 while unknown)."""
        return self.speeds.speed(address) or 1.0

    def objective(self, ts: TaskState, ws: WorkerState) -> tuple:
        """Dask's objective for other tasks; for a stage task, when it would
        finish on ``ws`` at the worker's speed."""
        assert self.scheduler is not None and self._objective is not None
        # called once per candidate worker of each placement: the stage from
        # the annotation, without a Pool
        info = (ts.annotations or {}).get("dflow")
        if not info:
            return self._objective(ts, ws)
        start, *rest = self._objective(ts, ws)
        if ws.nthreads > 1 and info["stage"] in BATCHING_STAGES:
            # Dask shares the backlog among the task slots; a denoising task
            # shares a step only with its own shape, so count it whole: an
            # idle worker beats a busy one, whose extra slots are for batching
            start += ws.occupancy * (1 - 1 / ws.nthreads)
        duration = self.scheduler._get_prefix_duration(ts.prefix)
        return ((start + duration) / self.factor(ws.address), *rest)

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        assert self.scheduler is not None
        if finish != "processing" and start != "processing":
            return
        ts = self.scheduler.tasks.get(key)
        pool = task_pool(ts.annotations) if ts is not None else None
        if pool is None:
            return
        if finish == "processing":
            stealing = self._stealing()
            if stealing is not None:
                stealing.remove_key_from_stealable(ts)
        elif pool in self._batching:
            # a worker of the pool may have fallen idle
            self._look_for_idle(pool)

    # -- idle workers ------------------------------------------------------------------

    def _look_for_idle(self, pool: Pool) -> None:
        assert self.scheduler is not None
        if pool not in self._looking:
            self._looking.add(pool)
            self.scheduler._ongoing_background_tasks.call_soon(self.fill_idle, pool)

    async def fill_idle(self, pool: Pool) -> None:
        """While a worker of ``pool`` is idle, ask the busiest worker where a
        task of the pool would finish later than on the idle one to give back
        a batch of the denoising tasks waiting in its step loop; each task
        given back leaves processing, which looks again."""
        assert self.scheduler is not None
        self._looking.discard(pool)
        workers = self._members().get(pool, [])
        tasks = {
            ws: [ts for ts in ws.processing if task_pool(ts.annotations) == pool]
            for ws in workers
        }
        idle = [ws for ws in workers if not tasks[ws]]
        if not idle:
            return
        victims = [
            ws
            for ws in workers
            if ws.nthreads > 1
            and len(tasks[ws]) > 1
            and self._asked.get(ws.address) != frozenset(tasks[ws])
        ]
        for victim in sorted(victims, key=lambda ws: len(tasks[ws]), reverse=True):
            last = tasks[victim][-1]
            best = min(self.objective(last, ws) for ws in idle)
            if best >= self.objective(last, victim):
                continue
            self._asked[victim.address] = frozenset(tasks[victim])
            try:
                keys = await self.scheduler.rpc(victim.address).dflow_give_back()
            except Exception:
                logger.debug("%s gave nothing back", victim.address, exc_info=True)
                continue
            for key in keys:
                self._restrict(key, victim.address)
            if keys:
                self.given_back += len(keys)
                return

    def _restrict(self, key: Any, gave_back: str) -> None:
        """Keep a task given back off the worker that gave it back: that worker
        holds its inputs, which Dask's placement prefers over any objective.
        The worker sends the task back after its answer, so this comes first."""
        assert self.scheduler is not None
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return
        allowed = (ts.worker_restrictions or set(self.scheduler.workers)) - {gave_back}
        if allowed:
            ts.worker_restrictions = allowed

    # -- rebalancing -----------------------------------------------------------------

    def rebalance(self) -> None:
        """Move queued stage tasks to where they finish sooner, pool by pool."""
        assert self.scheduler is not None
        members = self._members()
        self._batching = {
            pool
            for pool, workers in members.items()
            if pool.stage in BATCHING_STAGES and any(ws.nthreads > 1 for ws in workers)
        }
        # a worker asked in vain may have requests waiting by now
        self._asked.clear()
        for pool in self._batching:
            self._look_for_idle(pool)
        stealing = self._stealing()
        if stealing is None:
            return
        # stealing puts tasks back when their prefix's duration becomes known
        # and when it moves one: take stage tasks out again
        for ts in [t for t in stealing.key_stealable if task_pool(t.annotations)]:
            stealing.remove_key_from_stealable(ts)
        for pool, workers in members.items():
            if len(workers) > 1:
                self._rebalance_pool(pool, workers, stealing)

    def _members(self) -> dict[Pool, list[WorkerState]]:
        """The ready workers of each pool that take its tasks."""
        assert self.scheduler is not None
        # by (stage, model) pairs: a thousand workers serve a handful of pools
        members: dict[tuple[str, str], list[WorkerState]] = {}
        resources: dict[tuple[str, str], str] = {}
        for record in self.extension.workers.values():
            if record.stage is None or record.model is None or record.state != "ready":
                continue
            ws = self.scheduler.workers.get(record.address)
            if ws is None:
                continue
            pair = (record.stage, record.model)
            if pair not in resources:
                resources[pair] = Pool(*pair).resource
            if ws.resources.get(resources[pair], 0) > 0:
                members.setdefault(pair, []).append(ws)
        return {Pool(*pair): workers for pair, workers in members.items()}

    def _rebalance_pool(
        self, pool: Pool, workers: list[WorkerState], stealing: Any
    ) -> None:
        assert self.scheduler is not None
        scheduler = self.scheduler
        queued = {
            ws: sorted(
                (
                    ts
                    for ts in ws.processing
                    if ts not in ws.executing
                    and ts not in stealing.in_flight
                    and task_pool(ts.annotations) == pool
                ),
                key=lambda ts: ts.priority or (),
            )
            if ws.processing
            else []
            for ws in workers
        }
        if not any(queued.values()):
            return  # nothing to move: most pools, most of the time
        # seconds until each worker has cleared its backlog, at its speed
        backlog = {
            ws: (ws.occupancy + stealing.in_flight_occupancy[ws])
            / ws.nthreads
            / self.factor(ws.address)
            for ws in workers
        }
        for _ in range(MAX_MOVES):
            victims = [ws for ws in workers if queued[ws]]
            if not victims:
                return
            victim = max(victims, key=backlog.__getitem__)
            ts = queued[victim][-1]
            duration = scheduler._get_prefix_duration(ts.prefix)

            def seconds(ws: WorkerState, duration: float = duration) -> float:
                """The task's share of the worker's time, at its speed."""
                return duration / ws.nthreads / self.factor(ws.address)

            valid = scheduler.valid_workers(ts)
            thieves = [
                ws
                for ws in workers
                if ws is not victim and (valid is None or ws in valid)
            ]
            if not thieves:
                return
            thief = min(thieves, key=lambda ws: backlog[ws] + seconds(ws))
            finish = backlog[thief] + seconds(thief)
            # the task would finish at the end of the victim's backlog: move it
            # if that gains at least half of it
            if finish > backlog[victim] - seconds(victim) / 2:
                return
            queued[victim].pop()
            stealing.move_task_request(ts, victim, thief)
            backlog[victim] -= seconds(victim)
            backlog[thief] = finish
            self.moved += 1

    def _stealing(self) -> Any:
        assert self.scheduler is not None
        return self.scheduler.extensions.get("stealing")
