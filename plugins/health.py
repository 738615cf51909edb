"""Health: hung and slow stage workers, found in seconds and worked around.

Dask gives up on a worker that stops answering only after
``distributed.scheduler.worker-ttl`` (minutes), and never on one that answers
heartbeats but makes no progress (a deadlocked kernel). Until then its running
and queued requests wait. dflow knows more: how long each stage call should
take (the predictor, corrected by telemetry), and how each worker is doing (a
denoising loop reports each step as a ``dflow-progress`` event). Every
``dflow.health.interval`` :class:`Health` checks each stage worker. It is hung
when it is

- *silent*: no heartbeat for ``heartbeat-timeout`` (at least ten of Dask's
  heartbeat intervals): a stopped process, a frozen event loop;
- *stalled*: busy, yet no progress (a denoising step or a finished call) for
  ``stall-multiple`` times the time expected between two (and at least
  ``stall-floor``). The expectation is the predictor's, per step for a DiT and
  per call (at the batch it runs) otherwise, over the worker's measured speed;
  for a denoising loop, also the longest interval its own steps have shown.
  A prediction for a shape the pool has not run yet (over twice the predicted
  work, per step for the DiT, of the largest call it finished) is not
  trusted: such a loop is judged by its own steps, and a call nothing can
  price by heartbeats alone, so a long request of a shape no profile covers
  is not taken for a hang.

A hung worker is *fenced*, without asking it (it may not answer): its pool
resources drop to zero on the scheduler (as a role switch's drain drops them),
the tasks placed on it go back to the scheduler at once, queued ones and the
one it is stuck in alike, and data only it holds that a task or client still
needs is recomputed elsewhere, as if it had left (other workers stop fetching
from it). A result it sends late carries a stale run id and the scheduler drops
it: every request completes once. A task that hangs every worker it runs on
fails with :class:`~dflow.errors.StageHung` once it has been taken from
``distributed.scheduler.allowed-failures`` + 1 fenced workers.

A fenced worker that answers again within ``grace`` (a heartbeat, and a probe
finds it running nothing) is *unfenced*: its resources come back and it serves
with its model still loaded, so a stall that passes (a driver hiccup, a paused
process) costs its stuck task, not a reload; its data was already replaced, so
nothing it sends is used twice. A worker fenced ``max-fences`` times is retired
when it recovers instead. One that does not recover within ``grace`` is
*retired*: its nanny kills it (SIGKILL reaches a stopped process; the nanny
answers when the worker cannot) and starts it again, which reloads its stage;
without a nanny that answers, the scheduler removes it and its supervisor
restarts it.

Slow workers: each worker's speed against its GPU type
(:class:`~dflow.plugins.speeds.WorkerSpeeds`) goes on its record, where the
elastic controller's planner and :class:`~dflow.plugins.placement.SpeedPlacement`
read it. One below ``slow-speed`` for ``slow-after`` is reported slow, and
retired from the cluster with ``retire-slow``.

Every fence, unfence, retirement and slow report is a decision (kind
``fence``, ``unfence``, ``retire``, ``slow``) with its reason, an event on the
``"dflow"`` topic, a log line and a count (:attr:`Health.counts`, served as
Prometheus counters); fenced workers show in the state ``fenced``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tornado.ioloop import PeriodicCallback

import dask.config
from dask.typing import Key
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol import pickle
from distributed.scheduler import (
    Scheduler,
    TaskState,
    TaskStateState,
    WorkerState,
    heartbeat_interval,
)

import dflow.config  # noqa: F401
from dflow import events
from dflow.errors import StageHung
from dflow.plugins.extension import Decision, DflowExtension, WorkerRecord
from dflow.plugins.predictions import Predictions
from dflow.plugins.speeds import WorkerSpeeds
from dflow.plugins.telemetry import StageRecord
from dflow.pools import Pool, stage_resources, task_features, task_pool

logger = logging.getLogger(__name__)

#: Worker states in which a worker is watched for hangs: those that take or
#: hold stage tasks. A loading worker has none (building a model can hold the
#: GIL for seconds, and its heartbeats with it); Dask's TTL covers it.
WATCHED = ("ready", "draining")
#: Seconds a check may run late before the scheduler counts as stalled
STALL = 1.0
#: Seconds a retiring worker's nanny waits for it to exit before it kills it:
#: a worker retired for hanging will not exit by itself
RETIRE_TIMEOUT = 1.0


@dataclass(frozen=True)
class Settings:
    """``dflow.health``, in seconds."""

    interval: float
    heartbeat_timeout: float
    stall_multiple: float
    stall_floor: float
    grace: float
    max_fences: int
    slow_speed: float
    slow_after: float
    retire_slow: bool

    @classmethod
    def from_config(cls) -> Settings:
        def seconds(key: str) -> float:
            return float(parse_timedelta(dask.config.get(f"dflow.health.{key}")))

        return cls(
            interval=seconds("interval"),
            heartbeat_timeout=seconds("heartbeat-timeout"),
            stall_multiple=float(dask.config.get("dflow.health.stall-multiple")),
            stall_floor=seconds("stall-floor"),
            grace=seconds("grace"),
            max_fences=int(dask.config.get("dflow.health.max-fences")),
            slow_speed=float(dask.config.get("dflow.health.slow-speed")),
            slow_after=seconds("slow-after"),
            retire_slow=bool(dask.config.get("dflow.health.retire-slow")),
        )


@dataclass
class Steps:
    """The denoising steps one running task has reported."""

    done: int
    at: float
    #: the longest time between two of its steps so far
    longest: float = 0.0


@dataclass
class Watch:
    """What the health check follows of one worker."""

    #: its last progress: a finished stage call or a denoising step
    progress_at: float
    #: when its current spell of running stage calls began (None: idle)
    busy_since: float | None = None
    #: steps of the tasks it runs, by key
    steps: dict[str, Steps] = field(default_factory=dict)
    fenced_at: float | None = None
    reason: str = ""
    fences: int = 0
    #: the pool resources it advertised when it was fenced
    resources: dict[str, float] = field(default_factory=dict)
    probing: bool = False
    retiring: bool = False
    slow_since: float | None = None
    slow: bool = False


class Health(SchedulerPlugin):
    """Finds hung and slow stage workers; fences, unfences and retires them."""

    name = "dflow-health"

    def __init__(
        self,
        extension: DflowExtension,
        predictions: Predictions,
        speeds: WorkerSpeeds,
    ):
        self.extension = extension
        self.predictions = predictions
        self.speeds = speeds
        self.settings = Settings.from_config()
        self.scheduler: Scheduler | None = None
        self.watches: dict[str, Watch] = {}
        #: (event, stage, cause) -> times: fenced (cause heartbeat or stalled),
        #: unfenced, retired (unrecovered, flapping or slow), slow
        self.counts: Counter[tuple[str, str, str]] = Counter()
        #: the largest predicted work (seconds, per step for the DiT) of the
        #: calls each pool finished on each GPU type
        self.largest: dict[tuple[Pool, str], float] = {}
        #: the last check, and the end of the scheduler's last stall: silence
        #: counts from there, so a stalled scheduler does not blame its workers
        self._checked_at = self._awake_since = time.time()
        self._tasks: set[asyncio.Task] = set()

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers["dflow_health"] = self.summary
        scheduler.periodic_callbacks["dflow-health"] = pc = PeriodicCallback(
            self.check, self.settings.interval * 1000
        )
        pc.start()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    # -- what the scheduler sees: progress -------------------------------------------

    def transition(
        self, key: Key, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        if start != "processing":
            return
        watch = self.watches.get(kwargs.get("worker") or "")
        if watch is not None and finish in ("memory", "erred"):
            watch.progress_at = time.time()
            watch.steps.pop(str(key), None)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != events.TOPIC or not isinstance(msg, dict):
            return
        watch = self.watches.get(msg.get("worker", ""))
        if watch is None:
            return
        now = time.time()
        watch.progress_at = now
        key = str(msg.get("key"))
        steps = watch.steps.get(key)
        if steps is None:
            watch.steps[key] = Steps(int(msg.get("step", 1)), now)
        else:
            steps.longest = max(steps.longest, now - steps.at)
            steps.done, steps.at = int(msg.get("step", steps.done + 1)), now

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.watches[worker] = Watch(progress_at=time.time())

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.watches.pop(worker, None)
        self.speeds.forget(worker)

    # -- the check -------------------------------------------------------------------

    def check(self) -> None:
        """Periodic: find hung workers and fence them, follow the fenced ones,
        measure speeds and report slow workers."""
        assert self.scheduler is not None
        now = time.time()
        if now - self._checked_at > self.settings.interval + STALL:
            # this check ran late: the scheduler's event loop was stalled, and
            # heartbeats waited with it
            self._awake_since = now
        self._checked_at = now
        speeds = self.speeds.refresh()
        timeout = self.heartbeat_timeout()
        for address, record in list(self.extension.workers.items()):
            ws = self.scheduler.workers.get(address)
            watch = self.watches.get(address)
            if ws is None or watch is None or watch.retiring:
                continue
            if ws.status not in (Status.running, Status.paused):
                continue  # being retired or closing: leaving anyway
            if record.state == "fenced":
                self.follow(record, ws, watch, now)
                continue
            if watch.fenced_at is not None:
                # it reported a state of its own (a switch went on): it serves
                watch.fenced_at = None
                record.health = ""
            if record.state not in WATCHED:
                continue
            hung = self.hung(record, ws, watch, now, timeout)
            if hung is not None:
                self.fence(address, *hung)
                continue
            record.speed = speeds.get(address)
            self.follow_speed(record, watch, now)

    def heartbeat_timeout(self) -> float:
        """Seconds of silence that make a worker hung: the setting, and at
        least ten of Dask's heartbeat intervals (they grow with the cluster)."""
        assert self.scheduler is not None
        interval = heartbeat_interval(len(self.scheduler.workers))
        return max(self.settings.heartbeat_timeout, 10 * interval)

    def hung(
        self,
        record: WorkerRecord,
        ws: WorkerState,
        watch: Watch,
        now: float,
        timeout: float | None = None,
    ) -> tuple[str, str] | None:
        """Why the worker is hung, and the kind of cause (``heartbeat`` or
        ``stalled``); ``None`` while it is not. ``timeout``: the
        :meth:`heartbeat_timeout`, if the caller has it."""
        silence = now - max(ws.last_seen, self._awake_since)
        if silence > (self.heartbeat_timeout() if timeout is None else timeout):
            return f"no heartbeat for {silence:.1f}s", "heartbeat"
        if not ws.executing:
            # idle (most workers of a large fleet): nothing runs, nothing stalls
            if watch.steps:
                watch.steps = {}
            watch.busy_since = None
            return None
        # the stage calls it runs (as its last heartbeat said) that the
        # scheduler waits for
        running = {
            ts: seconds
            for ts, seconds in ws.executing.items()
            if ts.processing_on is ws and task_pool(ts.annotations)
        }
        keys = {str(ts.key) for ts in running}
        watch.steps = {k: v for k, v in watch.steps.items() if k in keys}
        if not running:
            watch.busy_since = None
            return None
        if watch.busy_since is None:
            watch.busy_since = ws.last_seen - max(running.values())
        expected = self.expected_gap(record, list(running), watch)
        if expected is None:
            return None
        allowed = max(
            self.settings.stall_floor, self.settings.stall_multiple * expected
        )
        stalled = now - max(watch.progress_at, watch.busy_since, self._awake_since)
        if stalled <= allowed:
            return None
        return (
            f"no progress for {stalled:.1f}s (a step or a call within "
            f"{allowed:.1f}s expected)",
            "stalled",
        )

    def expected_gap(
        self, record: WorkerRecord, running: list[TaskState], watch: Watch
    ) -> float | None:
        """Seconds expected between two progress events of a worker running
        ``running``: the longest of its tasks' (``None`` if one of them has no
        expectation)."""
        speed = min(1.0, record.speed or 1.0)
        gaps = []
        for ts in running:
            pool = task_pool(ts.annotations)
            assert pool is not None
            batch = sum(1 for t in running if task_pool(t.annotations) == pool)
            features = task_features(ts.annotations)
            call = self.trusted_prediction(pool, record.gpu_type, features, batch)
            steps = watch.steps.get(str(ts.key))
            total = int(features.get("steps") or 1)
            candidates = []
            if pool.stage == "dit":
                if call is not None:
                    candidates.append(call / total / speed)
                if steps is not None and steps.longest > 0:
                    candidates.append(steps.longest)
            elif call is not None:
                candidates.append(call / speed)
            elif pool.stage == "all" and steps is not None and steps.done < total:
                # a monolithic call between steps (not decoding yet)
                candidates.append(steps.longest or 0.0)
            if not candidates or not max(candidates):
                return None
            gaps.append(max(candidates))
        return max(gaps)

    def trusted_prediction(
        self, pool: Pool, gpu_type: str, features: dict[str, Any], batch: float
    ) -> float | None:
        """The predicted seconds of a call, where the prediction is backed by
        data: ``None`` without one, or for a shape the pool has not run on
        the GPU type yet (its predicted work, per denoising step for the DiT,
        over twice the largest of the calls it finished), which the fit
        extrapolates to."""
        seconds = self._predict(pool, gpu_type, features, batch)
        if seconds is None:
            return None
        seen = self.largest.get((pool, gpu_type), 0.0)
        if _per_step(pool, features, seconds) > 2 * seen:
            return None
        return seconds

    def _predict(
        self, pool: Pool, gpu_type: str, features: dict[str, Any], batch: float
    ) -> float | None:
        predictor = self.predictions.predictor
        if predictor is None or not features:
            return None
        try:
            return predictor.predict(
                pool.model, pool.stage, gpu_type, features, batch
            ).seconds
        except LookupError:
            return None

    def observe(self, record: StageRecord) -> None:
        """A stage call finished (telemetry calls this): the largest predicted
        work of the calls each pool finished on each GPU type bounds the
        shapes whose predictions are trusted. Predicted, not measured: a
        loaded host's late calls do not widen it."""
        pool = Pool(record.stage, record.model)
        seconds = self._predict(pool, record.gpu_type, record.features, record.batch)
        if seconds is None:
            return
        key = (pool, record.gpu_type)
        work = _per_step(pool, record.features, seconds)
        self.largest[key] = max(self.largest.get(key, 0.0), work)

    # -- fencing ---------------------------------------------------------------------

    def fence(self, address: str, reason: str, cause: str) -> None:
        """Stop placing tasks on a hung worker and move its work and data."""
        assert self.scheduler is not None
        scheduler = self.scheduler
        record, ws, watch = (
            self.extension.workers[address],
            scheduler.workers[address],
            self.watches[address],
        )
        now = time.time()
        stimulus = f"dflow-fence-{now}"
        pool = record.pool
        # no new tasks: its pool resources at zero before anything is re-placed
        watch.resources = (
            {r: q for r in stage_resources(pool, 0) if (q := ws.resources.get(r))}
            if pool is not None
            else {}
        )
        if watch.resources:
            scheduler.add_resources(
                worker=address, resources=dict.fromkeys(watch.resources, 0)
            )
        # its tasks back to the scheduler; the one it is stuck in runs elsewhere
        recommendations: dict[Key, TaskStateState] = {}
        for ts in list(ws.processing):
            if ts in ws.executing:
                ts.suspicious += 1
                if ts.suspicious > scheduler.allowed_failures:
                    recommendations.update(self._fail(ts, address, stimulus))
                    continue
            recommendations[ts.key] = "released"
        # its data: others' copies serve from now on, and what only it holds
        # that a task or client still needs is recomputed elsewhere
        dropped = []
        for ts in list(ws.has_what):
            if len(ts.who_has or ()) > 1:
                scheduler.remove_replica(ts, ws)
                dropped.append(ts.key)
            elif ts.waiters or ts.who_wants:
                recommendations[ts.key] = "released"
        scheduler.transitions(recommendations, stimulus_id=stimulus)
        if dropped:
            # after the tasks that used them were freed on it (same stream)
            scheduler.worker_send(
                address, {"op": "free-keys", "keys": dropped, "stimulus_id": stimulus}
            )
        for other in scheduler.workers:
            if other != address:
                scheduler.worker_send(
                    other,
                    {"op": "remove-worker", "worker": address, "stimulus_id": stimulus},
                )
        watch.fenced_at, watch.reason = now, reason
        watch.fences += 1
        watch.busy_since, watch.steps = None, {}
        record.health = f"fenced: {reason}"
        self.extension.mark(address, "fenced", reason=reason)
        self._decide(record, pool, None, f"fenced: {reason}", "fence")
        self.counts["fenced", _stage(pool), cause] += 1
        logger.warning(
            "Fenced %s (%s): %s; %d task(s) back to the scheduler",
            record.name,
            pool,
            reason,
            len(recommendations),
        )

    def _fail(self, ts: TaskState, address: str, stimulus: str) -> dict:
        """Fail a task that hung every worker it ran on."""
        assert self.scheduler is not None
        error = StageHung(
            f"{ts.key} hung on {ts.suspicious} workers in turn (each was fenced); "
            f"the last was {address}"
        )
        return self.scheduler.transition(
            ts.key,
            "erred",
            exception=pickle.dumps(error),
            cause=ts.key,
            worker=address,
            stimulus_id=stimulus,
        )

    def follow(
        self, record: WorkerRecord, ws: WorkerState, watch: Watch, now: float
    ) -> None:
        """A fenced worker: retire it after the grace period, unfence it once
        it answers and runs nothing."""
        if watch.fenced_at is None:
            return
        fenced_for = now - watch.fenced_at
        if fenced_for > self.settings.grace:
            self.retire(
                record.address,
                f"not recovered {fenced_for:.0f}s after it was fenced ({watch.reason})",
                "unrecovered",
            )
            return
        answering = (
            ws.last_seen > watch.fenced_at
            and now - ws.last_seen < self.heartbeat_timeout()
        )
        if answering and not watch.probing:
            watch.probing = True
            self._spawn(self.probe(record.address, watch))

    async def probe(self, address: str, watch: Watch) -> None:
        """Ask a fenced worker what it runs; unfence it (or retire it, if it
        keeps hanging) when it runs nothing."""
        assert self.scheduler is not None
        try:
            running = await asyncio.wait_for(
                self.scheduler.rpc(address).dflow_running(), self.heartbeat_timeout()
            )
        except Exception:
            return  # not answering yet: asked again at the next check
        finally:
            watch.probing = False
        record = self.extension.workers.get(address)
        if running or record is None or record.state != "fenced":
            return
        if watch.fenced_at is None or watch.retiring:
            return
        recovered = time.time() - watch.fenced_at
        if watch.fences >= self.settings.max_fences:
            self.retire(
                address,
                f"recovered after {recovered:.1f}s, but was fenced "
                f"{watch.fences} times",
                "flapping",
            )
            return
        self.unfence(address, f"answered again {recovered:.1f}s after it was fenced")

    def unfence(self, address: str, reason: str) -> None:
        """Let a fenced worker that recovered serve again."""
        assert self.scheduler is not None
        record, watch = self.extension.workers[address], self.watches[address]
        if watch.resources:
            self.scheduler.add_resources(worker=address, resources=watch.resources)
        watch.fenced_at, watch.progress_at = None, time.time()
        record.health = ""
        # "worker-ready": tasks that waited for its pool are placed on it
        self.extension.mark(address, "ready", reason=reason)
        self._decide(record, None, record.pool, f"unfenced: {reason}", "unfence")
        self.counts["unfenced", _stage(record.pool), ""] += 1
        logger.warning("Unfenced %s (%s): %s", record.name, record.pool, reason)

    # -- retiring --------------------------------------------------------------------

    def retire(self, address: str, reason: str, cause: str) -> None:
        """Take a worker out of the cluster: its nanny restarts a hung one; a
        slow one leaves (its supervisor may start it again)."""
        record, watch = self.extension.workers[address], self.watches[address]
        watch.retiring = True
        record.health = f"retired: {reason}"
        self._decide(record, record.pool, None, f"retired: {reason}", "retire")
        self.counts["retired", _stage(record.pool), cause] += 1
        logger.warning("Retiring %s (%s): %s", record.name, record.pool, reason)
        if cause == "slow":
            self._spawn(self._retire_gracefully(address))
        else:
            self._spawn(self._restart(address))

    async def _restart(self, address: str) -> None:
        assert self.scheduler is not None
        scheduler = self.scheduler
        ws = scheduler.workers.get(address)
        if ws is None:
            return
        if ws.nanny:
            try:
                await asyncio.wait_for(
                    scheduler.rpc(ws.nanny).kill(
                        timeout=RETIRE_TIMEOUT, reason="dflow-health-retire"
                    ),
                    RETIRE_TIMEOUT + self.heartbeat_timeout(),
                )
                return
            except Exception as error:
                logger.warning(
                    "The nanny of %s did not restart it (%r): removing it",
                    address,
                    error,
                )
        await scheduler.remove_worker(
            address, stimulus_id=f"dflow-retire-{time.time()}", expected=True
        )

    async def _retire_gracefully(self, address: str) -> None:
        assert self.scheduler is not None
        await self.scheduler.retire_workers(
            workers=[address],
            close_workers=True,
            stimulus_id=f"dflow-retire-slow-{time.time()}",
        )

    # -- slow workers ----------------------------------------------------------------

    def follow_speed(self, record: WorkerRecord, watch: Watch, now: float) -> None:
        """Report a worker that stays below ``slow-speed`` for ``slow-after``,
        and clear the report once it is back above."""
        speed = record.speed
        if speed is None or speed >= self.settings.slow_speed:
            if watch.slow:
                logger.info("%s runs at %.2fx its GPU type again", record.name, speed)
                record.health = ""
            watch.slow_since, watch.slow = None, False
            return
        if watch.slow_since is None:
            watch.slow_since = now
        if watch.slow or now - watch.slow_since < self.settings.slow_after:
            if watch.slow:
                record.health = f"slow: {speed:.2f}x its GPU type"
            return
        watch.slow = True
        reason = (
            f"runs at {speed:.2f}x its GPU type ({record.gpu_type}) for "
            f"{now - watch.slow_since:.0f}s"
        )
        record.health = f"slow: {speed:.2f}x its GPU type"
        self._decide(record, record.pool, record.pool, f"slow: {reason}", "slow")
        self.counts["slow", _stage(record.pool), ""] += 1
        logger.warning("%s (%s) is slow: %s", record.name, record.pool, reason)
        if self.settings.retire_slow:
            self.retire(record.address, f"slow: {reason}", "slow")

    # -- views -----------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Per worker (by name): state, speed, what is wrong; and the counts
        of fences, unfences, retirements and slow reports per stage."""
        now = time.time()
        workers = {}
        for address, record in self.extension.workers.items():
            watch = self.watches.get(address)
            workers[record.name] = {
                "address": address,
                "stage": record.stage,
                "state": record.state,
                "speed": record.speed,
                "slow": bool(watch and watch.slow),
                "health": record.health,
                "fenced_s": (
                    now - watch.fenced_at
                    if watch is not None and watch.fenced_at is not None
                    else None
                ),
                "fences": watch.fences if watch is not None else 0,
            }
        counts: dict[str, dict[str, int]] = {}
        for (event, stage, _), n in self.counts.items():
            per_stage = counts.setdefault(event, {})
            per_stage[stage] = per_stage.get(stage, 0) + n
        return {"workers": workers, "counts": counts}

    # -- helpers ---------------------------------------------------------------------

    def _decide(
        self,
        record: WorkerRecord,
        source: Pool | None,
        target: Pool | None,
        reason: str,
        kind: str,
    ) -> None:
        self.extension.record_decision(
            Decision(time.time(), record.name, source, target, reason, kind)
        )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _stage(pool: Pool | None) -> str:
    return "none" if pool is None else pool.stage


def _per_step(pool: Pool, features: dict[str, Any], seconds: float) -> float:
    """A call's seconds, per denoising step for the DiT (the shape, not the
    number of steps, is what a prediction extrapolates in)."""
    if pool.stage != "dit":
        return seconds
    return seconds / max(1, int(features.get("steps") or 1))
