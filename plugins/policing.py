"""Task policing: the stage tasks the scheduler alone would leave stuck.

:class:`TaskPolicing` places tasks that waited for a pool once a worker of it
is ready (the scheduler re-examines unrunnable tasks when a worker joins, not
when a worker's resources change), and, every ``dflow.scheduler.check-interval``,
cancels requests past their deadline, fails requests whose pool nobody has
served for ``dflow.scheduler.unserved-timeout``, and pins again the tasks that
admission pinned to workers that have since left their pool.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tornado.ioloop import PeriodicCallback

import dask.config
from dask.typing import Key
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol import pickle
from distributed.scheduler import Scheduler, TaskState

import dflow.config  # noqa: F401
from dflow.errors import InvalidRequest, ModelNotServed
from dflow.plugins.admission import MemoryRouting
from dflow.plugins.extension import TOPIC, DflowExtension
from dflow.pools import Pool, task_features, task_pool

logger = logging.getLogger(__name__)


class TaskPolicing(SchedulerPlugin):
    """Deadlines, unserved pools, repinning and placing unrunnable tasks."""

    name = "dflow-policing"

    def __init__(self, extension: DflowExtension, routing: MemoryRouting):
        self.extension = extension
        self.routing = routing
        self.scheduler: Scheduler | None = None
        #: when each unrunnable task of an unserved pool was first seen so
        self.unserved_since: dict[Key, float] = {}

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        interval = parse_timedelta(dask.config.get("dflow.scheduler.check-interval"))
        scheduler.periodic_callbacks["dflow-requests"] = pc = PeriodicCallback(
            self.check_requests, interval * 1000
        )
        pc.start()

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == TOPIC and msg.get("action") == "worker-ready":
            self.schedule_unrunnable(msg["address"])

    def schedule_unrunnable(self, worker: str) -> None:
        """Place tasks that waited for a resource this worker now has."""
        assert self.scheduler is not None
        ws = self.scheduler.workers.get(worker)
        if ws is None:
            return
        recommendations = self.scheduler.bulk_schedule_unrunnable_after_adding_worker(
            ws
        )
        if recommendations:
            self.scheduler.transitions(
                recommendations, stimulus_id=f"dflow-worker-ready-{time.time()}"
            )

    def check_requests(self) -> None:
        """Periodic: cancel requests past their deadline, fail unserved ones."""
        self.expire_deadlines()
        self.fail_unserved()

    def expire_deadlines(self) -> None:
        """Cancel the chain of every pending request past its deadline: its
        future raises ``FutureCancelledError`` (reason ``deadline-exceeded``), a
        running denoising loop stops at its next step and intermediates are freed."""
        assert self.scheduler is not None
        now = time.time()
        for record in self.extension.in_flight():
            if record.deadline is None or now < record.deadline:
                continue
            ts = self.scheduler.tasks.get(record.final_key)
            if ts is None or not ts.who_wants:
                continue
            client = next(iter(ts.who_wants)).client_key
            self.scheduler.stimulus_cancel(
                [record.final_key],
                client,
                force=True,
                reason="deadline-exceeded",
                msg=f"request {record.request_id} of {record.model} missed its "
                f"deadline of {record.deadline - record.submitted:g}s",
            )

    def fail_unserved(self) -> None:
        """Fail requests whose pool has had no worker, ready or loading, for longer
        than ``dflow.scheduler.unserved-timeout``: they get a clear error instead
        of waiting forever. Tasks of a served pool pinned to workers that left it
        are pinned again (:meth:`repin`)."""
        assert self.scheduler is not None
        timeout = parse_timedelta(dask.config.get("dflow.scheduler.unserved-timeout"))
        now = time.time()
        # only unrunnable tasks need it: most checks have none
        served = self.extension.served() if self.scheduler.unrunnable else set()
        recommendations: dict = {}
        waiting: set[Key] = set()
        for ts in list(self.scheduler.unrunnable):
            pool = task_pool(ts.annotations)
            if pool is None:
                continue
            if pool in served:
                recommendations.update(self.repin(ts, pool, now))
                continue
            waiting.add(ts.key)
            since = self.unserved_since.setdefault(ts.key, now)
            if now - since < timeout:
                continue
            error = ModelNotServed(
                f"no worker serves the {pool.stage} stage of model {pool.model!r} "
                f"(waited {timeout:g}s); start one with "
                f"`dflow-worker SCHEDULER --stage {pool.stage} --model {pool.model}`"
            )
            recommendations.update(
                self.scheduler.transition(
                    ts.key,
                    "erred",
                    exception=pickle.dumps(error),
                    cause=ts.key,
                    stimulus_id=f"dflow-unserved-{now}",
                )
            )
        self.unserved_since = {
            k: v for k, v in self.unserved_since.items() if k in waiting
        }
        if recommendations:
            self.scheduler.transitions(
                recommendations, stimulus_id=f"dflow-unserved-{now}"
            )

    def repin(self, ts: TaskState, pool: Pool, now: float) -> dict:
        """Recommendations for an unrunnable task of a served pool that admission
        pinned to workers with the memory for it, when none of those serves the
        pool any more (they switched roles): pin it to the pool's workers that
        have the memory now, or fail it with the reason when none has."""
        assert self.scheduler is not None
        members = {r.address for r in self.extension.members(pool)}
        if not ts.worker_restrictions or ts.worker_restrictions & members:
            return {}
        try:
            capable = self.routing.capable(pool, task_features(ts.annotations))
        except InvalidRequest as error:
            return self.scheduler.transition(
                ts.key,
                "erred",
                exception=pickle.dumps(error),
                cause=ts.key,
                stimulus_id=f"dflow-repin-{now}",
            )
        ts.worker_restrictions = set(capable) if capable else None
        self.extension.event(
            "repinned", key=str(ts.key), workers=sorted(capable or members)
        )
        for address in capable or members:
            self.schedule_unrunnable(address)
        return {}
