"""Telemetry: every finished stage task, and the pools' load over time.

A :class:`Telemetry` scheduler plugin records each stage task that finishes:
stage, model, worker, GPU type, request features (from the task's ``dflow``
annotation), compute and transfer time (from ``startstops``) and bytes. Memory is
bounded (``dflow.telemetry.max-records``). From the records it derives, per
pool (a stage of a model): the arrival rate, the queue depth and the observed
service time; and once a second it samples the fleet (workers per stage and GPU
type, queues, throughput, latency percentiles) for the dashboard and metrics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tornado.ioloop import PeriodicCallback

import dask.config
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

from dflow.plugins.extension import DflowExtension
from dflow.plugins.predictions import Predictions
from dflow.pools import Pool, task_pool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRecord:
    """One finished stage task."""

    finished: float
    key: str
    request: str
    stage: str
    model: str
    worker: str
    gpu_type: str
    compute_s: float
    transfer_s: float
    nbytes: int
    features: dict[str, Any]
    #: device seconds of the stage call, and how many requests shared it (the
    #: task's compute time also counts its wait for the batch)
    call_s: float = 0.0
    batch: float = 1.0

    @property
    def service_s(self) -> float:
        """This request's share of its stage call."""
        return self.call_s / self.batch


@dataclass(frozen=True)
class Sample:
    """The fleet at one moment (one per ``dflow.telemetry.sample-interval``)."""

    time: float
    #: ready workers per stage and GPU type: {stage: {gpu_type: n}}
    workers: dict[str, dict[str, int]]
    #: queued or running stage tasks per stage
    queue: dict[str, int]
    #: requests completed per second since the previous sample
    throughput: float
    #: end-to-end latency percentiles over the latency window, seconds
    p50: float | None
    p95: float | None
    p99: float | None


class Telemetry(SchedulerPlugin):
    """Stage-task records and fleet samples, read from dflow's extension."""

    name = "dflow-telemetry"

    def __init__(self, extension: DflowExtension, predictions: Predictions):
        self.extension = extension
        self.predictions = predictions
        self.scheduler: Scheduler | None = None
        self.records: deque[StageRecord] = deque(
            maxlen=dask.config.get("dflow.telemetry.max-records")
        )
        self.samples: deque[Sample] = deque(
            maxlen=dask.config.get("dflow.telemetry.max-samples")
        )
        self.window = parse_timedelta(dask.config.get("dflow.telemetry.window"))
        #: stage-task submission times per pool, for arrival rates
        self.arrivals: defaultdict[Pool, deque[float]] = defaultdict(
            lambda: deque(maxlen=10_000)
        )
        #: EWMA of each pool's observed seconds per request (a batch's call
        #: shared among its requests)
        self.service: dict[Pool, float] = {}
        #: features of each pool's latest finished tasks, newest last
        self.recent: defaultdict[Pool, deque[dict[str, Any]]] = defaultdict(
            lambda: deque(maxlen=50)
        )
        self.alpha = float(dask.config.get("dflow.telemetry.ewma-alpha"))
        #: called with each new record (the health collaborator's worker speeds)
        self.listeners: list[Callable[[StageRecord], None]] = []
        #: encode tasks per model whose encoding the encoder had cached ("hit")
        #: or computed ("miss")
        self.encoding_cache: Counter[tuple[str, str]] = Counter()
        self._last_sample_completed = 0

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        interval = parse_timedelta(dask.config.get("dflow.telemetry.sample-interval"))
        scheduler.periodic_callbacks["dflow-telemetry"] = pc = PeriodicCallback(
            self.sample, interval * 1000
        )
        pc.start()

    # -- plugin hooks ----------------------------------------------------------------

    def update_graph(
        self, scheduler: Scheduler, *, annotations: dict | None = None, **kwargs: Any
    ) -> None:
        now = time.time()
        for info in ((annotations or {}).get("dflow") or {}).values():
            self.arrivals[Pool(info["stage"], info["model"])].append(now)

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        if start != "processing" or finish != "memory":
            return
        assert self.scheduler is not None
        ts = self.scheduler.tasks.get(key)
        if ts is None or (pool := task_pool(ts.annotations)) is None:
            return
        info = (ts.annotations or {})["dflow"]
        compute = transfer = 0.0
        finished = time.time()
        for startstop in kwargs.get("startstops", ()):
            duration = startstop["stop"] - startstop["start"]
            if startstop["action"] == "compute":
                compute += duration
                finished = startstop["stop"]
            elif startstop["action"] == "transfer":
                transfer += duration
        worker = kwargs.get("worker", "")
        record = self.extension.workers.get(worker)
        call = (kwargs.get("metadata") or {}).get("dflow") or {}
        cached = bool(call.get("cached"))
        if pool.stage == "encoder":
            self.encoding_cache[pool.model, "hit" if cached else "miss"] += 1
        entry = StageRecord(
            finished=finished,
            key=str(key),
            request=info["request"],
            stage=pool.stage,
            model=pool.model,
            worker=worker,
            gpu_type=record.gpu_type if record else "unknown",
            compute_s=compute,
            transfer_s=transfer,
            nbytes=int(kwargs.get("nbytes") or 0),
            features=info.get("features", {}),
            call_s=float(call.get("seconds", compute)),
            batch=float(call.get("batch", 1)),
        )
        self.records.append(entry)
        if cached:
            return  # no stage call ran: nothing to time or predict from
        self.recent[pool].append(entry.features)
        service = entry.service_s
        previous = self.service.get(pool)
        self.service[pool] = (
            service
            if previous is None
            else previous + self.alpha * (service - previous)
        )
        self.predictions.observe(
            pool, entry.gpu_type, entry.features, entry.call_s, entry.batch
        )
        for listener in self.listeners:
            listener(entry)

    # -- derived views ---------------------------------------------------------------

    def arrival_rate(self, pool: Pool, window: float | None = None) -> float:
        """Stage tasks of ``pool`` submitted per second over the last ``window``."""
        window = window or self.window
        now = time.time()
        times = self.arrivals.get(pool, ())
        return sum(1 for t in times if t >= now - window) / window

    def arrival_ages(self, pool: Pool, window: float) -> tuple[float, ...]:
        """Seconds since each stage task of ``pool`` was submitted over the last
        ``window``, youngest first."""
        now = time.time()
        ages = []
        for t in reversed(self.arrivals.get(pool, ())):
            if now - t > window:
                break
            ages.append(now - t)
        return tuple(ages)

    def queue(self, pool: Pool) -> int:
        """Tasks of ``pool`` waiting for a worker or placed on one (queued or running)."""
        return self.queues([pool])[pool]

    def queues(self, pools: Iterable[Pool]) -> dict[Pool, int]:
        """:meth:`queue` of each of ``pools``, in one pass over the workers."""
        assert self.scheduler is not None
        by_resource = {pool.resource: pool for pool in pools}
        counts = dict.fromkeys(by_resource.values(), 0)
        for ts in self.scheduler.unrunnable:
            for resource in ts.resource_restrictions or ():
                if resource in by_resource:
                    counts[by_resource[resource]] += 1
        for ws in self.scheduler.workers.values():
            if not ws.processing:
                continue
            # the pools whose resource the worker advertises
            advertised = [r for r, n in ws.resources.items() if n and r in by_resource]
            for ts in ws.processing:
                restrictions = ts.resource_restrictions
                if not restrictions:
                    continue
                for resource in advertised:
                    if resource in restrictions:
                        counts[by_resource[resource]] += 1
        return counts

    def pools(self) -> set[Pool]:
        """Pools that have workers or saw requests within the window; pools
        retired longer ago are forgotten."""
        # pairs first: a thousand workers serve a handful of pools
        pairs = {(r.stage, r.model) for r in self.extension.workers.values()}
        known = {Pool(s, m) for s, m in pairs if s is not None and m is not None}
        horizon = time.time() - 10 * self.window
        for pool in [p for p, times in self.arrivals.items() if p not in known]:
            if not self.arrivals[pool] or self.arrivals[pool][-1] < horizon:
                del self.arrivals[pool]
        return known | set(self.arrivals)

    def predicted(self, pool: Pool) -> float | None:
        """The predictor's mean service time over the pool's recent requests."""
        gpu_types = self.gpu_types(pool)
        recent = self.recent.get(pool)
        if not recent or not gpu_types:
            return None
        values = [
            self.predictions.seconds(pool, gpu_type, features)
            for features in recent
            for gpu_type in gpu_types
        ]
        if any(v is None for v in values):
            return None
        return float(np.mean([v for v in values if v is not None]))

    def gpu_types(self, pool: Pool) -> list[str]:
        """GPU types of the workers serving ``pool`` now."""
        return sorted(
            {r.gpu_type for r in self.extension.workers.values() if r.pool == pool}
        )

    # -- sampling --------------------------------------------------------------------

    def sample(self) -> None:
        """Record the fleet's state now (workers, queues, throughput, latency)."""
        now = time.time()
        workers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for record in self.extension.workers.values():
            if record.state == "ready" and record.stage:
                workers[record.stage][record.gpu_type] += 1
        queue: dict[str, int] = defaultdict(int)
        for pool, count in self.queues(self.pools()).items():
            queue[pool.stage] += count
        completed = sum(
            n
            for (_, status), n in self.extension.counts.items()
            if status == "completed"
        )
        previous = self.samples[-1] if self.samples else None
        elapsed = now - previous.time if previous else 0.0
        throughput = (
            (completed - self._last_sample_completed) / elapsed if elapsed > 0 else 0.0
        )
        self._last_sample_completed = completed
        latencies = [
            latency
            for finished, _, latency in self.extension.latencies
            if finished >= now - self.window
        ]
        p50 = p95 = p99 = None
        if latencies:
            p50, p95, p99 = (float(x) for x in np.percentile(latencies, [50, 95, 99]))
        self.samples.append(
            Sample(
                time=now,
                workers={k: dict(v) for k, v in workers.items()},
                queue=dict(queue),
                throughput=throughput,
                p50=p50,
                p95=p95,
                p99=p99,
            )
        )
