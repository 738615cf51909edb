"""Deadlines: every request gets one, and each pool serves earliest deadline first.

A request's deadline is its arrival plus its SLO: the ``slo`` it was submitted
with (``dflow.submit(..., slo=...)``), else its hard ``deadline``, else
``dflow.slo.seconds`` for its model, else ``dflow.slo.factor`` times its
predicted latency alone (every stage on the fastest GPU type serving it). With
``dflow.slo.order: deadline`` (the default) :class:`Deadlines`

- sets each stage task's Dask priority from its request's deadline when the
  graph arrives (before any task is placed), so a worker runs its queued tasks
  of a pool earliest deadline first;
- every ``dflow.scheduler.check-interval``, moves the tasks of requests past
  saving (now plus their remaining stages' predicted time is past their
  deadline) behind every request that can still make it: their priorities drop
  on the scheduler and, for tasks already queued on a worker, on the worker
  (``dflow_priorities``). Such a request is still served, after the others;
  only its hard ``deadline`` cancels it (:mod:`~dflow.plugins.policing`).

With ``order: arrival`` a pool's tasks run in their requests' submission order
(first come, first served, as the baselines of ``dflow bench`` serve), and no
request is moved back; each request's deadline is still kept (``due`` on its
record).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Any

from tornado.ioloop import PeriodicCallback

import dask.config
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler, TaskState

import dflow.config  # noqa: F401
from dflow.plugins.extension import SERVING, DflowExtension
from dflow.plugins.predictions import Predictions
from dflow.pools import MONOLITHIC, STAGES, Pool, task_pool

logger = logging.getLogger(__name__)

#: task states of work still owed
OWED = ("waiting", "no-worker", "queued", "processing")
#: SLO orders (``dflow.slo.order``)
ORDERS = ("deadline", "arrival")
#: priority class of requests that can still make their deadline, and of
#: those past saving (a Dask priority: smaller runs first)
SAVABLE, PAST_SAVING = 0, 1


class Deadlines(SchedulerPlugin):
    """Each request's deadline, and earliest-deadline-first priorities."""

    name = "dflow-deadlines"

    def __init__(self, extension: DflowExtension, predictions: Predictions):
        self.extension = extension
        self.predictions = predictions
        self.scheduler: Scheduler | None = None
        order = dask.config.get("dflow.slo.order")
        if order not in ORDERS:
            raise ValueError(
                f"dflow.slo.order must be one of {', '.join(ORDERS)}, got {order!r}"
            )
        self.order = order
        #: per request: predicted seconds of each of its stages, alone
        self.stage_seconds: dict[str, dict[str, float]] = {}
        #: requests moved behind the savable ones
        self.past_saving: set[str] = set()

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        interval = parse_timedelta(dask.config.get("dflow.scheduler.check-interval"))
        scheduler.periodic_callbacks["dflow-deadlines"] = pc = PeriodicCallback(
            self.check, interval * 1000
        )
        pc.start()

    # -- arrivals ----------------------------------------------------------------------

    def update_graph(
        self,
        scheduler: Scheduler,
        *,
        annotations: dict | None = None,
        **kwargs: Any,
    ) -> None:
        infos = (annotations or {}).get("dflow") or {}
        if not infos:
            return
        now = time.time()
        requests: dict[str, list[tuple[Any, dict]]] = defaultdict(list)
        for key, info in infos.items():
            requests[info["request"]].append((key, info))
        gpu_types = self.gpu_types()
        for request, tasks in requests.items():
            stages = {info["stage"]: info for _, info in tasks}
            info = next(iter(stages.values()))
            record = self.extension.requests.get(request)
            seconds = self.predict(
                info["model"], stages, info.get("features", {}), gpu_types
            )
            self.stage_seconds[request] = seconds
            due = now + self.slo(info, seconds)
            if record is not None:
                record.due = due
            rank = due if self.order == "deadline" else now
            for key, _ in tasks:
                ts = scheduler.tasks.get(key)
                if ts is None or ts.priority is None:
                    continue
                ours = priority(SAVABLE, rank, ts)
                # a shared encoding keeps its most urgent request's place
                ts.priority = min(ts.priority, ours) if ours_already(ts) else ours

    def slo(self, info: dict[str, Any], seconds: dict[str, float]) -> float:
        """A request's SLO in seconds (``inf``: none)."""
        for given in (info.get("slo"), info.get("deadline")):
            if given is not None:
                return float(given)
        configured = dask.config.get("dflow.slo.seconds") or {}
        if info["model"] in configured:
            return parse_timedelta(configured[info["model"]])
        factor = dask.config.get("dflow.slo.factor")
        if factor is None or not seconds:
            return math.inf
        return float(factor) * sum(seconds.values())

    def gpu_types(self) -> dict[tuple[str, str], set[str]]:
        """GPU types of the workers serving each pool, by (stage, model): read
        once per graph, not once per stage of each of its requests."""
        types: dict[tuple[str, str], set[str]] = defaultdict(set)
        for record in self.extension.workers.values():
            if record.state in SERVING and None not in (record.stage, record.model):
                types[record.stage, record.model].add(record.gpu_type)
        return types

    def predict(
        self,
        model: str,
        stages: dict[str, Any],
        features: dict[str, Any],
        gpu_types: dict[tuple[str, str], set[str]],
    ) -> dict[str, float]:
        """Predicted seconds of each of a request's stages alone, on the fastest
        GPU type serving its pool (:meth:`gpu_types`; empty when a stage cannot
        be priced)."""
        names = (MONOLITHIC,) if MONOLITHIC in stages else STAGES
        seconds = {}
        for stage in names:
            pool = Pool(stage, model)
            types = gpu_types.get((stage, model), ())
            known = [
                s
                for g in types
                if (s := self.predictions.seconds(pool, g, features)) is not None
            ]
            if not known:
                return {}
            seconds[stage] = min(known)
        return seconds

    # -- past saving -------------------------------------------------------------------

    def check(self) -> None:
        """Move the tasks of requests past saving behind the savable ones."""
        if self.order != "deadline" or self.scheduler is None:
            return
        now = time.time()
        scheduler = self.scheduler
        owed: dict[str, list[TaskState]] = defaultdict(list)
        for record in self.extension.in_flight():
            if record.request_id in self.past_saving or record.due is None:
                continue
            ts = scheduler.tasks.get(record.final_key)
            while ts is not None and ts.state in OWED:
                owed[record.request_id].append(ts)
                ts = next(iter(ts.dependencies), None)
        by_worker: dict[str, dict[str, tuple]] = defaultdict(dict)
        for request, tasks in owed.items():
            record = self.extension.requests[request]
            assert record.due is not None
            seconds = self.stage_seconds.get(request, {})
            pools = [task_pool(ts.annotations) for ts in tasks]
            remaining = sum(seconds.get(p.stage, 0.0) for p in pools if p is not None)
            if now + remaining <= record.due:
                continue
            self.past_saving.add(request)
            for ts in tasks:
                running = ts.processing_on is not None and (
                    ts in ts.processing_on.executing
                )
                if ts.priority is None or running:
                    continue
                ts.priority = priority(PAST_SAVING, record.due, ts)
                if ts.processing_on is not None:
                    by_worker[ts.processing_on.address][str(ts.key)] = ts.priority
        for address, priorities in by_worker.items():
            scheduler.worker_send(
                address, {"op": "dflow-priorities", "priorities": priorities}
            )
        self.forget()

    def forget(self) -> None:
        """Drop what is kept of requests no longer in flight."""
        pending = {r.request_id for r in self.extension.in_flight()}
        if len(self.stage_seconds) > 2 * len(pending) + 100:
            self.stage_seconds = {
                k: v for k, v in self.stage_seconds.items() if k in pending
            }
        self.past_saving &= pending


def priority(rank: int, key: float, ts: TaskState) -> tuple[float, ...]:
    """A stage task's Dask priority: requests that can still make their
    deadline first, by ``key`` (the deadline; or the arrival, in arrival
    order), then Dask's own order (its graph's generation and the task's place
    in it)."""
    assert ts.priority is not None
    return (rank, key, *ts.priority[-2:])


def ours_already(ts: TaskState) -> bool:
    """Whether ``ts`` has a deadline priority already (Dask's own has three
    parts: user priority, generation, order)."""
    return ts.priority is not None and len(ts.priority) == 4
