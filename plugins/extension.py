"""dflow's scheduler extension: the one owner of dflow's state on the scheduler.

It keeps

- the workers' records: which pool (a stage of a model) each worker serves,
  whether it is loading, ready or draining, its GPU type and memory. This is the
  one answer to "which workers serve pool P": a worker sets its Dask resources
  before it reports ready and drops them before it reports draining, so the
  records are in step with where the scheduler can place stage tasks;
- each request from submission to completion, failure or cancellation;
- cumulative counters at the source (requests per model and outcome, a latency
  histogram, controller decisions per source and target stage), which the
  Prometheus collector and the dashboards read as they are.

Pool changes, repinned tasks and controller decisions are published as events
on the scheduler's ``"dflow"`` topic (``Scheduler.log_event``); the other
plugins react to them through ``SchedulerPlugin.log_event`` and clients read
them with ``Client.get_events("dflow")``. Admission, task policing, telemetry and
the elastic controller are separate plugins that receive this extension
(:func:`~dflow.plugins.install.install` wires them).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import dask.config
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

import dflow.config  # noqa: F401
from dflow.pools import ADMISSION_TOPIC, FINAL_PREFIXES, Pool

logger = logging.getLogger(__name__)

#: The scheduler's event topic of dflow's events
TOPIC = "dflow"
#: Worker states in which a worker counts as serving its pool
SERVING = ("loading", "ready")
#: Upper bounds (seconds) of the latency histogram's buckets: from tiny models
#: on CPU (tens of milliseconds) to long videos (minutes)
LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
)


@dataclass
class WorkerRecord:
    """What a worker serves, as it reported it."""

    address: str
    name: str
    state: str = "starting"  # starting | loading | ready | draining | fenced | failed
    stage: str | None = None
    model: str | None = None
    gpu_type: str = "unknown"
    device: str = ""
    memory: int = 0
    host: str = ""
    load_seconds: float | None = None
    since: float = field(default_factory=time.time)
    error: str | None = None
    #: speed relative to its GPU type (1.0: as fast; ``None``: not measured yet)
    speed: float | None = None
    #: why the worker is fenced, or that it is slow ("" while healthy)
    health: str = ""
    #: the 8-bit format of its DiT weights (``None``: the model's dtype)
    quantize: str | None = None
    #: pools whose weights it keeps in host memory, to switch back to fast
    parked: tuple[str, ...] = ()
    #: its last load resumed parked weights (``load_seconds`` is that resume)
    resumed: bool = False

    @property
    def pool(self) -> Pool | None:
        if self.stage is None or self.model is None:
            return None
        return Pool(self.stage, self.model)


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
    #: absolute time it should be done by, its arrival plus its SLO
    #: (:mod:`dflow.plugins.deadlines`; None: not known yet, inf: no SLO)
    due: float | None = None
    finished: float | None = None
    status: str = "pending"  # pending | completed | failed | cancelled


#: Kinds of decisions: the elastic controller's moves, and the health
#: collaborator's fencing, unfencing, retirements and slow-worker reports
DECISION_KINDS = ("move", "fence", "unfence", "retire", "slow")


@dataclass(frozen=True)
class Decision:
    """One move of a worker from a pool to another (``None``: no pool), and why;
    ``kind`` says who decided it (:data:`DECISION_KINDS`)."""

    time: float
    worker: str
    source: Pool | None
    target: Pool | None
    reason: str
    kind: str = "move"

    def to_dict(self) -> dict[str, Any]:
        """As ``dflow.status`` reports it: pools as ``[stage, model]`` lists."""
        return {
            "time": self.time,
            "worker": self.worker,
            "source": list(self.source) if self.source else None,
            "target": list(self.target) if self.target else None,
            "reason": self.reason,
            "kind": self.kind,
        }


class LatencyHistogram:
    """Cumulative bucket counts and sums of request latencies, per model."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts: defaultdict[str, list[int]] = defaultdict(
            lambda: [0] * (len(self.bounds) + 1)
        )
        self.sums: defaultdict[str, float] = defaultdict(float)

    def observe(self, model: str, seconds: float) -> None:
        counts = self.counts[model]
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.sums[model] += seconds


class DflowExtension(SchedulerPlugin):
    """Workers, pools, requests and counters of dflow, on the scheduler."""

    name = "dflow"
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.workers: dict[str, WorkerRecord] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.requests: dict[str, RequestRecord] = {}
        self.final_keys: dict[str, str] = {}
        #: requests per (model, outcome): submitted, completed, failed, cancelled
        self.counts: Counter[tuple[str, str]] = Counter()
        self.latency_histogram = LatencyHistogram()
        #: the controller's moves per (source stage, target stage), "none" for
        #: no pool
        self.decision_counts: Counter[tuple[str, str]] = Counter()
        history = dask.config.get("dflow.scheduler.history")
        #: (finish time, model, latency seconds) of recent completed requests
        self.latencies: deque[tuple[float, str, float]] = deque(maxlen=history)
        self.decisions: deque[Decision] = deque(maxlen=history)
        #: admission slots granted to clients whose graphs have not arrived yet
        self.reserved: Counter[str] = Counter()
        #: workers that could not load a pool, newest last: kept after they
        #: leave (a worker that fails its first load exits), for status and
        #: for ModelNotServed to say why a pool has no workers
        self.failures: deque[WorkerRecord] = deque(maxlen=history)
        #: counts the changes of the pools: admission answers from an older
        #: epoch may no longer hold (:meth:`new_epoch`)
        self.epoch = 0

    # -- plugin hooks ----------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.extensions["dflow"] = self
        scheduler.handlers.update(
            {
                "dflow_worker_state": self.worker_state,
                "dflow_pools": self.pools,
                "dflow_pool_members": self.pool_members,
                "dflow_models": self.models,
                "dflow_workers": self.worker_records,
                "dflow_decisions": self.recent_decisions,
            }
        )

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        ws = scheduler.workers[worker]
        self.workers[worker] = WorkerRecord(address=worker, name=str(ws.name))

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        record = self.workers.pop(worker, None)
        if record is not None and record.pool is not None:
            self.new_epoch()
            self.event(
                "worker-removed",
                worker=record.name,
                address=worker,
                pool=_text(record.pool),
            )

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
            # a standing admission reserved no slot
            if not info.get("standing") and self.reserved[record.model] > 0:
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
            self.latency_histogram.observe(record.model, latency)

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
        for name in (
            "gpu_type",
            "device",
            "memory",
            "host",
            "load_seconds",
            "error",
            "quantize",
            "resumed",
        ):
            if name in info:
                setattr(record, name, info[name])
        if "parked" in info:
            record.parked = tuple(info["parked"])
        if spec is not None and model is not None:
            self.specs[model] = spec
        if state == "failed":
            self.failures.append(replace(record))
        self.new_epoch()
        self.event(
            f"worker-{state}",
            worker=record.name,
            address=worker,
            pool=_text(record.pool),
            previous=_text(previous),
            gpu_type=record.gpu_type,
            load_seconds=record.load_seconds,
            resumed=record.resumed,
        )

    def pools(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{model: {stage: {"ready": n, "loading": n, "slots": n}}}``: workers
        ready or loading per pool, and the ready ones' task slots (their Dask
        resource for the pool)."""
        assert self.scheduler is not None
        pools: dict[str, dict[str, dict[str, int]]] = {}
        for record in self.workers.values():
            pool = record.pool
            if pool is None or record.state not in SERVING:
                continue
            entry = pools.setdefault(pool.model, {}).setdefault(
                pool.stage, {"ready": 0, "loading": 0, "slots": 0}
            )
            entry[record.state] += 1
            ws = self.scheduler.workers.get(record.address)
            if record.state == "ready" and ws is not None:
                entry["slots"] += int(ws.resources.get(pool.resource, 0))
        return pools

    def pool_members(self) -> dict[str, list[str]]:
        """Names of the workers of each pool (``"stage:model"``), ready, loading
        or draining out of it."""
        members: dict[str, list[str]] = {}
        # a copy: a cluster manager in this process may ask from its own thread
        for record in list(self.workers.values()):
            if record.pool is not None and record.state in (*SERVING, "draining"):
                members.setdefault(str(record.pool), []).append(record.name)
        return {pool: sorted(names) for pool, names in members.items()}

    def models(self) -> dict[str, dict[str, Any]]:
        """Specs of the models workers serve, for clients that lack them."""
        return dict(self.specs)

    def worker_records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.workers.values()]

    # -- views and changes -----------------------------------------------------------

    def members(
        self, pool: Pool, states: Collection[str] = SERVING
    ) -> list[WorkerRecord]:
        """The records of the workers of ``pool`` in one of ``states``."""
        # (stage, model) against the pool: no Pool made per worker
        return [
            r
            for r in self.workers.values()
            if r.state in states and (r.stage, r.model) == pool
        ]

    def served(self) -> set[Pool]:
        """Pools that have a worker ready or loading."""
        pairs = {
            (r.stage, r.model)
            for r in self.workers.values()
            if r.state in SERVING and r.stage is not None and r.model is not None
        }
        return {Pool(*pair) for pair in pairs}

    def in_flight(self) -> list[RequestRecord]:
        return [r for r in self.requests.values() if r.status == "pending"]

    def new_epoch(self) -> None:
        """The pools changed: start a new admission epoch and publish it on
        ``dflow-admission``, so clients stop reusing older answers."""
        assert self.scheduler is not None
        self.epoch += 1
        self.scheduler.log_event(
            ADMISSION_TOPIC, {"scheduler": self.scheduler.id, "epoch": self.epoch}
        )

    def reserve(self, counts: Counter[str]) -> None:
        """Hold admission slots for requests whose graph is on its way."""
        self.reserved.update(counts)

    def record_decision(self, decision: Decision) -> None:
        """Keep a decision, count it if it is a move and publish it as an event."""
        self.decisions.append(decision)
        if decision.kind == "move":
            source, target = _stage(decision.source), _stage(decision.target)
            self.decision_counts[source, target] += 1
        self.event("decision", **decision.to_dict())

    def mark(self, worker: str, state: str, **detail: Any) -> None:
        """Set a worker's state from the scheduler's side (the health
        collaborator fences and unfences workers) and publish it as the
        ``worker-<state>`` event a worker's own report would make."""
        record = self.workers.get(worker)
        if record is None:
            return
        record.state, record.since = state, time.time()
        self.event(
            f"worker-{state}",
            worker=record.name,
            address=worker,
            pool=_text(record.pool),
            previous=_text(record.pool),
            gpu_type=record.gpu_type,
            load_seconds=None,
            **detail,
        )

    def recent_decisions(self, last: int | None = None) -> list[dict[str, Any]]:
        """Decisions, oldest first (the ``last`` ones if given), as dicts."""
        decisions = list(self.decisions)[-last:] if last else list(self.decisions)
        return [d.to_dict() for d in decisions]

    def event(self, action: str, **detail: Any) -> None:
        """Publish ``{"action": action, **detail}`` on the ``"dflow"`` topic."""
        assert self.scheduler is not None
        self.scheduler.log_event(TOPIC, {"action": action, **detail})


def _text(pool: Pool | None) -> str | None:
    return None if pool is None else str(pool)


def _stage(pool: Pool | None) -> str:
    return "none" if pool is None else pool.stage
