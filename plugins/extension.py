"""dflow's scheduler extension: stage pools and request bookkeeping.

Installed by ``dask scheduler --preload dflow.preload`` (or registered by the
first ``dflow.submit`` when the scheduler lacks it). It keeps

- the workers' stage records: which stage of which model each worker serves,
  whether it is loading, ready or draining, its GPU type and memory;
- the pools (a pool is a stage of a model) derived from them;
- each request from submission to completion, failure or cancellation.

Workers report through the ``dflow_worker_state`` handler; clients and
dashboards read through ``dflow_pools``, ``dflow_models``, ``dflow_workers`` and
``dflow_status``. Telemetry, the elastic controller and the dashboard attach to
this extension (``extension.telemetry``, ``extension.elastic``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import dask.config
from dask.typing import Key
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol import pickle
from distributed.scheduler import Scheduler, TaskState

import dflow.config  # noqa: F401
from dflow.errors import InvalidRequest, ModelNotServed, Overloaded
from dflow.spec import STAGES

logger = logging.getLogger(__name__)

#: Final keys of a request: the output of the chain, or of a monolithic task
FINAL_PREFIXES = ("decode-", "generate-")


@dataclass
class WorkerRecord:
    """What a worker serves, as it reported it."""

    address: str
    name: str
    state: str = "starting"  # starting | loading | ready | draining | failed
    stage: str | None = None
    model: str | None = None
    gpu_type: str = "unknown"
    device: str = ""
    memory: int = 0
    host: str = ""
    load_seconds: float | None = None
    since: float = field(default_factory=time.time)
    error: str | None = None

    @property
    def pool(self) -> tuple[str, str] | None:
        if self.stage is None or self.model is None:
            return None
        return self.stage, self.model


@dataclass
class RequestRecord:
    """One request from submission to its end."""

    request_id: str
    model: str
    mode: str  # disaggregated | monolithic
    final_key: str
    submitted: float
    features: dict[str, Any]
    #: absolute time past which the request is cancelled (None: no deadline)
    deadline: float | None = None
    finished: float | None = None
    status: str = "pending"  # pending | completed | failed | cancelled


class DflowExtension(SchedulerPlugin):
    """Pools per stage and model, and request bookkeeping, on the scheduler."""

    name = "dflow"
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.workers: dict[str, WorkerRecord] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.requests: dict[str, RequestRecord] = {}
        self.final_keys: dict[str, str] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        history = dask.config.get("dflow.scheduler.history")
        #: (finish time, model, latency seconds) of recent completed requests
        self.latencies: deque[tuple[float, str, float]] = deque(maxlen=history)
        #: (time, kind, detail) of pool changes, for dashboards
        self.events: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=history)
        self.telemetry: Any = None
        self.elastic: Any = None
        self._unserved_since: dict[Key, float] = {}
        #: admission slots granted to clients whose graphs have not arrived yet
        self.reserved: Counter[str] = Counter()

    # -- plugin hooks ----------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.extensions["dflow"] = self
        scheduler.handlers.update(
            {
                "dflow_worker_state": self.worker_state,
                "dflow_pools": self.pools,
                "dflow_models": self.models,
                "dflow_workers": self.worker_records,
                "dflow_status": self.status,
                "dflow_admit": self.admit,
            }
        )
        interval = parse_timedelta(dask.config.get("dflow.scheduler.check-interval"))
        scheduler.periodic_callbacks["dflow-requests"] = pc = _periodic(
            self.check_requests, interval
        )
        pc.start()

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        ws = scheduler.workers[worker]
        self.workers[worker] = WorkerRecord(address=worker, name=str(ws.name))

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        record = self.workers.pop(worker, None)
        if record is not None and record.pool is not None:
            self.event("worker-removed", worker=record.name, pool=list(record.pool))

    def update_graph(
        self, scheduler: Scheduler, *, annotations: dict | None = None, **kwargs: Any
    ) -> None:
        now = time.time()
        for key, info in ((annotations or {}).get("dflow") or {}).items():
            if not isinstance(key, str) or not key.startswith(FINAL_PREFIXES):
                continue
            deadline = info.get("deadline")
            record = RequestRecord(
                request_id=info["request"],
                model=info["model"],
                mode=info["mode"],
                final_key=key,
                submitted=now,
                features=info.get("features", {}),
                deadline=None if deadline is None else now + deadline,
            )
            self.requests[record.request_id] = record
            self.final_keys[key] = record.request_id
            self.counts[record.model, "submitted"] += 1
            if self.reserved[record.model] > 0:
                self.reserved[record.model] -= 1

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        request_id = self.final_keys.get(key)
        if request_id is None:
            return
        record = self.requests[request_id]
        if finish == "memory":
            self._finish(record, "completed")
        elif finish == "erred":
            self._finish(record, "failed")
        elif finish == "forgotten":
            if record.status == "pending":
                self._finish(record, "cancelled")
            del self.requests[request_id]
            del self.final_keys[key]

    def _finish(self, record: RequestRecord, status: str) -> None:
        if record.status != "pending":
            return
        record.status = status
        record.finished = time.time()
        self.counts[record.model, status] += 1
        if status == "completed":
            latency = record.finished - record.submitted
            self.latencies.append((record.finished, record.model, latency))

    # -- handlers --------------------------------------------------------------------

    def worker_state(
        self,
        worker: str,
        state: str,
        stage: str | None = None,
        model: str | None = None,
        spec: dict[str, Any] | None = None,
        **info: Any,
    ) -> None:
        """A worker reports a stage change (``loading``, ``ready``, ...)."""
        assert self.scheduler is not None
        if worker not in self.scheduler.workers:
            return
        record = self.workers.setdefault(
            worker, WorkerRecord(worker, str(self.scheduler.workers[worker].name))
        )
        previous = record.pool
        record.state, record.stage, record.model = state, stage, model
        record.since = time.time()
        for name in ("gpu_type", "device", "memory", "host", "load_seconds", "error"):
            if name in info:
                setattr(record, name, info[name])
        if spec is not None and model is not None:
            self.specs[model] = spec
        self.event(
            f"worker-{state}",
            worker=record.name,
            pool=[stage, model],
            previous=list(previous) if previous else None,
        )
        if state == "ready":
            self._schedule_unrunnable(worker)
        if self.elastic is not None and state in ("ready", "failed"):
            self.elastic.worker_ready(
                worker, record.pool, record.gpu_type, record.load_seconds
            )

    def pools(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{model: {stage: {"ready": n, "loading": n, "slots": n}}}``.

        Ready pools come from the workers' resources (``"dit:<model>"``), the
        ground truth of where the scheduler can place tasks; loading ones from the
        workers' reports.
        """
        assert self.scheduler is not None
        pools: dict[str, dict[str, dict[str, int]]] = {}

        def entry(stage: str, model: str) -> dict[str, int]:
            return pools.setdefault(model, {}).setdefault(
                stage, {"ready": 0, "loading": 0, "slots": 0}
            )

        for ws in self.scheduler.workers.values():
            for resource, quantity in ws.resources.items():
                stage, _, model = resource.partition(":")
                if model and quantity > 0:
                    e = entry(stage, model)
                    e["ready"] += 1
                    e["slots"] += int(quantity)
        for record in self.workers.values():
            if record.state == "loading" and record.pool is not None:
                entry(*record.pool)["loading"] += 1
        return pools

    async def admit(self, **kwargs: Any) -> dict[str, Any]:
        """Handler of :meth:`admit_requests`: refusals come back as data, so the
        client raises them and the scheduler's log stays quiet."""
        try:
            return {"admitted": await self.admit_requests(**kwargs)}
        except (InvalidRequest, ModelNotServed, Overloaded) as error:
            return {
                "error": type(error).__name__,
                "field": getattr(error, "field", None),
                "message": str(error),
            }

    async def admit_requests(
        self,
        requests: list[dict[str, Any]],
        mode: str | None = None,
        model_timeout: float = 0.0,
        admission_timeout: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Admit requests before their graph is sent.

        Waits up to ``model_timeout`` for workers of every model (raising
        :class:`ModelNotServed`), rejects what no worker of a pool has the memory
        for (``InvalidRequest`` naming the size), restricts stages to the workers
        that can hold them, and holds each model under
        ``dflow.admission.max-outstanding`` requests in flight, waiting up to
        ``admission_timeout`` for room (:class:`Overloaded`).

        Returns, per request: its mode and, per stage, the workers it must run
        on (``None``: any worker of the pool).
        """
        deadline = time.monotonic() + model_timeout
        models = {r["model"] for r in requests}
        while True:
            pools = self.pools()
            missing = sorted(m for m in models if not _serves(pools.get(m, {}), mode))
            if not missing:
                break
            if time.monotonic() >= deadline:
                served = ", ".join(sorted(pools)) or "none"
                wanted = f" in {mode} mode" if mode else ""
                raise ModelNotServed(
                    f"no workers serve model {missing[0]!r}{wanted} (served: {served}); "
                    f"start them with `dflow-worker SCHEDULER --stage dit --model "
                    f"{missing[0]}` (and encoder, vae), or `--stage all`"
                )
            await asyncio.sleep(0.1)
        admitted = []
        for request in requests:
            request_mode = mode or _mode(pools[request["model"]])
            stages = STAGES if request_mode == "disaggregated" else ("all",)
            admitted.append(
                {
                    "mode": request_mode,
                    "workers": {s: self._capable(s, request) for s in stages},
                }
            )
        await self._reserve(Counter(r["model"] for r in requests), admission_timeout)
        return admitted

    def _capable(self, stage: str, request: dict[str, Any]) -> list[str] | None:
        """Workers of the pool with memory for the request's predicted peak
        (``None``: all of them, or no prediction to go by)."""
        predictor = getattr(self.elastic, "predictor", None)
        if predictor is None:
            return None
        model, features = request["model"], request["features"]
        members = [
            r
            for r in self.workers.values()
            if r.pool == (stage, model) and r.state in ("ready", "loading")
        ]
        # one prediction per GPU type: a fleet has a few types and many workers
        try:
            peaks = {
                gpu_type: _peak_bytes(predictor, model, stage, gpu_type, features)
                for gpu_type in {r.gpu_type for r in members}
            }
        except LookupError:
            return None
        capable, needs = [], []
        for record in members:
            peak = peaks[record.gpu_type]
            if peak is None or peak <= record.memory:
                capable.append(record.address)
            else:
                needs.append((peak, record.memory))
        if not needs:
            return None
        if not capable:
            peak, largest = max(needs)
            size = f"{features.get('height')}x{features.get('width')}"
            # a video's frames weigh as much as its pixels: name what can shrink
            field, advice = "height", "use a smaller size"
            if features.get("frames", 1) > 1:
                size += f"x{features['frames']} frames"
                field, advice = "num_frames", "use fewer frames or a smaller size"
            raise InvalidRequest(
                field,
                f"the {stage} stage of {model} needs {peak / 2**30:.1f} GiB at {size}; "
                f"its largest worker has {largest / 2**30:.1f} GiB: {advice}",
            )
        return capable

    async def _reserve(self, counts: Counter[str], timeout: float) -> None:
        limit = dask.config.get("dflow.admission.max-outstanding")
        if limit is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            pending = Counter(r.model for r in self.in_flight())
            over = [
                m
                for m, n in counts.items()
                if pending[m] + self.reserved[m] + n > _limit(limit, m)
            ]
            if not over:
                break
            if time.monotonic() >= deadline:
                model = over[0]
                raise Overloaded(
                    f"model {model!r} has {pending[model] + self.reserved[model]} "
                    f"requests in flight and {counts[model]} more were submitted; the "
                    f"limit is {_limit(limit, model)} (dflow.admission.max-outstanding): "
                    "retry later"
                )
            await asyncio.sleep(0.05)
        self.reserved.update(counts)

    def models(self) -> dict[str, dict[str, Any]]:
        """Specs of the models workers serve, for clients that lack them."""
        return dict(self.specs)

    def worker_records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.workers.values()]

    def status(self) -> dict[str, Any]:
        """Per stage: workers, queue, arrival rate, predicted and observed service
        time; the elastic controller's recent decisions."""
        stages = {stage: self.stage_summary(stage) for stage in (*STAGES, "all")}
        if self.telemetry is not None:
            self.telemetry.annotate_status(stages)
        decisions = self.elastic.decisions(last=20) if self.elastic is not None else []
        return {"stages": stages, "decisions": decisions}

    # -- views -----------------------------------------------------------------------

    def stage_summary(self, stage: str) -> dict[str, Any]:
        """Workers and queued tasks of one stage, over all models."""
        assert self.scheduler is not None
        workers = [
            r for r in self.workers.values() if r.stage == stage and r.state == "ready"
        ]
        queue = sum(
            1
            for ts in self.scheduler.unrunnable
            if ts.resource_restrictions and stage in ts.resource_restrictions
        )
        for record in workers:
            ws = self.scheduler.workers.get(record.address)
            if ws is not None:
                queue += len(ws.processing)
        return {
            "workers": len(workers),
            "loading": sum(
                1
                for r in self.workers.values()
                if r.stage == stage and r.state == "loading"
            ),
            "queue": queue,
            "arrival_rate": None,
            "predicted_s": None,
            "observed_s": None,
        }

    def in_flight(self) -> list[RequestRecord]:
        return [r for r in self.requests.values() if r.status == "pending"]

    def event(self, kind: str, **detail: Any) -> None:
        self.events.append((time.time(), kind, detail))

    # -- scheduling ------------------------------------------------------------------

    def _schedule_unrunnable(self, worker: str) -> None:
        """Place tasks that waited for a resource this worker now has.

        The scheduler re-examines unrunnable tasks when a worker joins, not when a
        worker's resources change, so a worker that became ready after joining
        must ask for it.
        """
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
        for record in self.in_flight():
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
        are pinned again (:meth:`_repin`)."""
        assert self.scheduler is not None
        timeout = parse_timedelta(dask.config.get("dflow.scheduler.unserved-timeout"))
        now = time.time()
        served = {
            r.pool for r in self.workers.values() if r.state in ("loading", "ready")
        }
        recommendations: dict = {}
        waiting: set[Key] = set()
        for ts in list(self.scheduler.unrunnable):
            pool = _pool_of(ts)
            if pool is None:
                continue
            if pool in served:
                recommendations.update(self._repin(ts, pool, now))
                continue
            waiting.add(ts.key)
            since = self._unserved_since.setdefault(ts.key, now)
            if now - since < timeout:
                continue
            stage, model = pool
            error = ModelNotServed(
                f"no worker serves the {stage} stage of model {model!r} "
                f"(waited {timeout:g}s); start one with "
                f"`dflow-worker SCHEDULER --stage {stage} --model {model}`"
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
        self._unserved_since = {
            k: v for k, v in self._unserved_since.items() if k in waiting
        }
        if recommendations:
            self.scheduler.transitions(
                recommendations, stimulus_id=f"dflow-unserved-{now}"
            )

    def _repin(self, ts: TaskState, pool: tuple[str, str], now: float) -> dict:
        """Recommendations for an unrunnable task of a served pool that admission
        pinned to workers with the memory for it, when none of those serves the
        pool any more (they switched roles): pin it to the pool's workers that
        have the memory now, or fail it with the reason when none has."""
        assert self.scheduler is not None
        members = {
            r.address
            for r in self.workers.values()
            if r.pool == pool and r.state in ("loading", "ready")
        }
        if not ts.worker_restrictions or ts.worker_restrictions & members:
            return {}
        stage, model = pool
        features = (ts.annotations or {})["dflow"].get("features", {})
        try:
            capable = self._capable(stage, {"model": model, "features": features})
        except InvalidRequest as error:
            return self.scheduler.transition(
                ts.key,
                "erred",
                exception=pickle.dumps(error),
                cause=ts.key,
                stimulus_id=f"dflow-repin-{now}",
            )
        ts.worker_restrictions = set(capable) if capable else None
        self.event("repinned", key=str(ts.key), workers=sorted(capable or members))
        for address in capable or members:
            self._schedule_unrunnable(address)
        return {}


def _mode(stages: dict[str, Any]) -> str:
    if all(stage in stages for stage in STAGES):
        return "disaggregated"
    return "monolithic"


def _serves(stages: dict[str, Any], mode: str | None) -> bool:
    if mode in (None, "disaggregated") and all(s in stages for s in STAGES):
        return True
    return mode in (None, "monolithic") and "all" in stages


def _peak_bytes(
    predictor: Any, model: str, stage: str, gpu_type: str, features: dict[str, Any]
) -> int | None:
    """Predicted peak bytes of a stage call on ``gpu_type``. A type without a
    profile of its own (nor a speed to scale one from) takes the largest peak of
    the profiled types: peak memory follows the model and the request's shape,
    not the GPU's speed. Raises ``LookupError`` when no type has a profile."""
    try:
        return predictor.predict(model, stage, gpu_type, features).peak_bytes
    except LookupError:
        profiled = sorted({g for m, s, g in predictor.fits if (m, s) == (model, stage)})
        if not profiled:
            raise
    peaks = [predictor.predict(model, stage, g, features).peak_bytes for g in profiled]
    known = [peak for peak in peaks if peak is not None]
    return max(known) if known else None


def _limit(limit: int | dict[str, int], model: str) -> int:
    if isinstance(limit, dict):
        return limit.get(model, limit.get("default", 2**62))
    return int(limit)


def _pool_of(ts: TaskState) -> tuple[str, str] | None:
    info = (ts.annotations or {}).get("dflow")
    if not info:
        return None
    return info["stage"], info["model"]


def _periodic(callback: Any, interval: float) -> Any:
    from tornado.ioloop import PeriodicCallback

    return PeriodicCallback(callback, interval * 1000)


def extension(scheduler: Scheduler) -> DflowExtension:
    """The scheduler's dflow extension, installed on first use."""
    ext = scheduler.extensions.get("dflow")
    if ext is None:
        raise RuntimeError("the scheduler has no dflow extension")
    return ext
