"""Stage workers: Dask workers that hold one stage of one model.

``dflow-worker SCHEDULER --stage dit --model NAME`` starts one Nanny per GPU (each
with its own ``CUDA_VISIBLE_DEVICES``, as ``dask cuda worker`` does), or one CPU
worker on a machine without GPUs; their options come from
:mod:`dflow.worker_options`. Each worker process runs a :class:`StagePlugin`: it loads and warms up the stage model, then advertises the
stage as Dask resources (``{"dit": 1, "dit:<model>": 1}``) and publishes its GPU
type, memory and model to dflow's scheduler extension. Until then the worker has
no stage resource, so no request waits on a cold load.

A worker that cannot load or warm up its stage logs why in one line
(:func:`dflow.diagnosis.load_failure`) and stops: its :class:`StageNanny` does not
restart it, so ``dflow-worker`` exits non-zero and a supervisor (systemd,
Kubernetes, dask-jobqueue) sees the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dask.config
from dask.utils import parse_bytes
from distributed import Nanny, Worker
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.worker_state_machine import TaskState, WorkerState

import dflow.config  # noqa: F401
from dflow import backend, diagnosis, logs
from dflow import runtime as runtimes
from dflow.catalog import resolve
from dflow.pools import (
    MONOLITHIC,
    WORKER_STAGES,
    Pool,
    base_stage,
    batch_key,
    stage_resources,
    task_features,
)
from dflow.quantization import holds_dit

logger = logging.getLogger(__name__)

#: Worker states in which it is closing: its process exits next
CLOSING = (Status.closing, Status.closing_gracefully, Status.closed)


def stage_slots(stage: str) -> int:
    """Concurrent tasks of a stage per worker, so the runtime can batch them:
    ``dflow.runtime.max-dit-batch`` for the DiT (and monolithic) stage, whose
    requests share denoising steps, ``dflow.runtime.max-batch`` for the encoder
    and VAE; an expert's stage runs one request at a time."""
    if stage in ("dit", MONOLITHIC):
        return int(dask.config.get("dflow.runtime.max-dit-batch"))
    if base_stage(stage) == "dit":
        return 1
    return int(dask.config.get("dflow.runtime.max-batch"))


class StagePlugin(WorkerPlugin):
    """Loads a stage model into its worker and advertises it once warm.

    Parameters
    ----------
    stage
        ``"encoder"``, ``"dit"``, ``"vae"`` or ``"all"``.
    model
        Model name or path, as :class:`~dflow.request.Request` takes it.
    gpu_type
        ``"auto"`` reads it from the device; any other value is published as given
        (heterogeneous fleets name their GPU types). Emulated workers
        (``dflow.runtime.backend: emulated``) emulate this type of
        ``configs/gpus.yaml`` (``"auto"``: ``dflow.runtime.gpu-type``) and publish
        its memory.
    quantize
        ``"int8"`` or ``"fp8"``: the DiT weights of the stages this worker
        serves that hold them, in 8 bits (:mod:`dflow.quantization`); ``None``:
        ``dflow.runtime.quantize``.
    """

    name = "dflow-stage"

    def __init__(
        self,
        stage: str,
        model: str,
        gpu_type: str = "auto",
        *,
        quantize: str | None = None,
    ):
        if stage not in WORKER_STAGES:
            raise ValueError(f"stage must be one of {', '.join(WORKER_STAGES)}")
        self.stage = stage
        self.model = model
        self.gpu_type = gpu_type
        self.quantize = quantize
        self.worker: Worker | None = None
        self.runtime: runtimes.StageRuntime | None = None
        #: stages it served before, their weights kept in host memory (most
        #: recently parked last; ``dflow.runtime.park-memory`` bytes at most)
        self.parked: dict[tuple[str, str], runtimes.StageRuntime] = {}
        self._reserving: asyncio.Task | None = None
        self.ready: asyncio.Event | None = None

    async def setup(self, worker: Worker) -> None:
        from dflow.protocol import register_serializers

        register_serializers()
        logs.configure()
        self.worker = worker
        self.ready = asyncio.Event()
        worker.handlers["dflow_drain"] = self.drain
        worker.handlers["dflow_assign"] = self.reassign
        worker.handlers["dflow_running"] = self.running_keys
        worker.handlers["dflow_give_back"] = self.give_back
        worker.stream_handlers["dflow-priorities"] = self.reprioritize
        # Dask's pick of the next task to start, narrowed by next_ready_task
        worker.state.__class__ = BatchingWorkerState
        backend.current().setup_worker(worker)
        # Load in the background: the worker joins the scheduler (and shows as
        # loading) at once, and takes stage tasks once the model is warm.
        self._loading = asyncio.create_task(
            self.assign(self.stage, self.model, stop_on_failure=True)
        )

    def _running(self, resource: str, *, finished: bool = False) -> list[str]:
        """Keys of the tasks needing ``resource`` that run here (with
        ``finished``, also those that ran and hold their result here)."""
        assert self.worker is not None
        states = {"executing", "long-running"} | ({"memory"} if finished else set())
        return [
            str(ts.key)
            for ts in self.worker.state.tasks.values()
            if ts.state in states and resource in (ts.resource_restrictions or {})
        ]

    def next_ready_task(
        self, dask_pick: Callable[[], TaskState | None]
    ) -> TaskState | None:
        """The task this worker starts next: Dask's pick (``dask_pick``), except
        while this worker denoises a batch (``dflow.runtime.max-dit-batch``
        above 1).

        A worker of several task slots starts, besides the batch it runs, only
        denoising tasks that can join it: same :func:`~dflow.pools.batch_key`,
        of a shape that batches (its limit above 1; past the limit they join
        as members leave, and a monolithic worker's concurrent requests batch
        their encodes and decodes). The others stay queued, where the
        scheduler's rebalance can move them and their priorities hold, as with
        one slot. A task may join ahead of a queued task of another shape only
        while the batch holds a request ahead of that one (the oldest shape
        goes next, as in :class:`~dflow.runtime.StepBatcher`), so no shape
        starves.
        """
        assert self.worker is not None
        state = self.worker.state
        runtime = self.runtime
        if (
            runtime is None
            or runtime.dit_stage is None
            or not runtime.steps_batch(runtime.dit_stage)
            or not state.constrained
        ):
            return dask_pick()
        resource = Pool(runtime.stage, runtime.model).resource
        batch = [
            ts
            for ts in (*state.executing, *state.long_running)
            if resource in (ts.resource_restrictions or {})
        ]
        if not batch or resource not in (
            state.constrained.peek().resource_restrictions or {}
        ):
            return dask_pick()
        try:
            joining = self._joining(batch, state.constrained.sorted(), resource)
        except Exception:
            # never break the worker's state machine over a batch
            logger.exception("Could not tell which task may join the batch")
            return dask_pick()
        if joining is not None and state._resource_restrictions_satisfied(joining):
            state.constrained.discard(joining)
            return joining
        # nothing may join: the batch's extra slots stay free
        return state.ready.pop() if state.ready else None

    def _joining(
        self, batch: list[TaskState], queued: Iterator[TaskState], resource: str
    ) -> TaskState | None:
        """The first of ``queued`` (in priority order) that may join ``batch``."""
        assert self.runtime is not None
        keys = {batch_key(task_features(ts.annotations)) for ts in batch}
        if len(keys) > 1:
            return None
        key = keys.pop()
        if self.runtime.dit_batch_limit(task_features(batch[0].annotations)) <= 1:
            return None
        foremost = min(ts.priority or () for ts in batch)
        for ts in queued:
            if resource not in (ts.resource_restrictions or {}):
                continue
            if batch_key(task_features(ts.annotations)) == key:
                return ts
            if (ts.priority or ()) < foremost:
                # a request of another shape waits longer than the whole batch
                return None
        return None

    def running_keys(self) -> list[str]:
        """Keys of the tasks running in this worker's threads: the scheduler's
        health check unfences a fenced worker only once none is left."""
        assert self.worker is not None
        return [str(key) for key in self.worker.active_keys]

    def reprioritize(self, priorities: dict[str, Any]) -> None:
        """New priorities of tasks queued here (requests past saving go behind
        the others: :mod:`dflow.plugins.deadlines`). A queue's heap keeps the
        place a task had when it joined, so the queues are rebuilt."""
        assert self.worker is not None
        state = self.worker.state
        tasks = [state.tasks.get(key) for key in priorities]
        changed = [ts for ts in tasks if ts is not None]
        if not changed:
            return
        for ts in changed:
            ts.priority = tuple(priorities[str(ts.key)])
        for queue in (state.constrained, state.ready):
            if any(ts in queue for ts in changed):
                queued = list(queue)
                queue.clear()
                for ts in queued:
                    queue.add(ts)

    async def drain(self) -> list[str]:
        """Stop taking tasks of the current pool; returns the keys of its tasks
        that run here or ran here.

        The pool's resources drop to zero here and on the scheduler, so no queued
        task of the pool starts on this worker any more; the scheduler moves the
        others elsewhere. A task that ran is among the keys even where the
        scheduler has not heard it finish yet (that message may come after this
        reply): moved, it would run twice.
        """
        assert self.worker is not None
        if self.runtime is None:
            return []
        pool = Pool(self.runtime.stage, self.runtime.model)
        await self.worker.set_resources(**stage_resources(pool, 0))
        # denoising calls waiting for a batch go back to the scheduler
        self.runtime.drain()
        await self._report(
            "draining", stage=self.runtime.stage, model=self.runtime.model
        )
        return self._running(pool.resource, finished=True)

    def give_back(self, batches: int = 1) -> list[str]:
        """Send back to the scheduler up to ``batches`` batches of the denoising
        tasks waiting here for a step they cannot join (another worker of the
        pool is idle: :mod:`dflow.plugins.placement`). Returns their keys."""
        assert self.worker is not None
        if self.runtime is None or self.runtime.dit_stage is None:
            return []
        threads = self.runtime.give_back(batches)
        with self.worker.active_threads_lock:
            running = dict(self.worker.active_threads)
        return [str(running[t]) for t in threads if t in running]

    async def reassign(self, stage: str, model: str) -> str:
        """Switch to ``stage`` of ``model`` once running tasks finish (in the
        background: the scheduler hears "loading", then "ready")."""
        self._loading = asyncio.create_task(self._switch(stage, model))
        return "OK"

    async def _switch(self, stage: str, model: str) -> None:
        if self.runtime is not None:
            old = self.runtime
            resource = Pool(old.stage, old.model).resource
            start = time.monotonic()
            while self._running(resource):
                await asyncio.sleep(0.05)
            runtimes.uninstall(old.model, old.stage)
            self.runtime = None
            logger.info(
                "Drained stage %s of %s in %.1fs; unloading it for stage %s of %s",
                old.stage,
                old.model,
                time.monotonic() - start,
                stage,
                model,
            )
            await asyncio.to_thread(self._park, old)
        await self.assign(stage, model)

    def _park(self, runtime: runtimes.StageRuntime) -> None:
        """Keep ``runtime``'s weights in host memory if they fit
        ``dflow.runtime.park-memory`` (the least recently parked go first),
        else close it."""
        budget = self._park_memory()
        closing = [runtime]
        if runtime.weight_bytes <= budget:
            try:
                runtime.park()
            except Exception:
                logger.warning(
                    "Could not keep stage %s of %s in host memory; unloading it",
                    runtime.stage,
                    runtime.model,
                    exc_info=True,
                )
            else:
                closing = []
                self.parked[runtime.model, runtime.stage] = runtime
                while sum(r.weight_bytes for r in self.parked.values()) > budget:
                    closing.append(self.parked.pop(next(iter(self.parked))))
        for leaving in closing:
            leaving.close()

    @staticmethod
    def _park_memory() -> int:
        return parse_bytes(dask.config.get("dflow.runtime.park-memory") or 0)

    def _unpark(self, model: str, stage: str) -> runtimes.StageRuntime | None:
        """The parked runtime of ``stage`` of ``model`` (a name or path), taken
        out of :attr:`parked`."""
        try:
            name = resolve(model).name
        except Exception:  # the load that follows says what is wrong with it
            name = model
        return self.parked.pop((name, stage), None)

    def _parked_pools(self) -> list[str]:
        return [str(Pool(stage, model)) for model, stage in self.parked]

    async def assign(
        self, stage: str, model: str, *, stop_on_failure: bool = False
    ) -> None:
        """Load ``stage`` of ``model``, warm it up, then advertise it.

        If that fails the worker reports ``failed`` with the reason, and with
        ``stop_on_failure`` (its first stage) it closes, with its nanny.
        """
        assert self.worker is not None and self.ready is not None
        worker = self.worker
        # setup() runs before the worker registers; the scheduler ignores reports
        # of workers it does not know yet
        while worker.status in (Status.init, Status.starting, Status.undefined):
            await asyncio.sleep(0.05)
        await self._report(
            "loading", stage=stage, model=model, parked=self._parked_pools()
        )
        parked = self._unpark(model, stage)
        if parked is not None:
            try:
                resumed = await asyncio.to_thread(parked.resume)
            except Exception:
                logger.warning(
                    "Could not resume stage %s of %s from host memory; loading it",
                    stage,
                    parked.model,
                    exc_info=True,
                )
                await asyncio.to_thread(parked.close)
                parked = None
        warming = False
        try:
            if parked is not None:
                runtime, load, warmup = parked, resumed, 0.0
            else:
                runtime = await asyncio.to_thread(
                    runtimes.StageRuntime,
                    model,
                    stage,
                    gpu_type=None if self.gpu_type == "auto" else self.gpu_type,
                    quantize=self.quantize if holds_dit(stage) else None,
                )
                warming = True
                load, warmup = (
                    runtime.load_seconds,
                    await asyncio.to_thread(runtime.warmup),
                )
        except Exception as error:
            message = diagnosis.load_failure(model, stage, error, warming)
            logger.error("Worker %s %s", worker.name, message)
            logger.debug("The failure's traceback", exc_info=True)
            await self._report("failed", stage=stage, model=model, error=message)
            if stop_on_failure:
                await self._stop(message)
            return
        runtimes.install(runtime)
        self.runtime = runtime
        resources = stage_resources(Pool(stage, runtime.model), stage_slots(stage))
        await worker.set_resources(**resources)
        await self._report(
            "ready",
            stage=stage,
            model=runtime.model,
            quantize=runtime.quantize,
            resources=resources,
            # what a switch to this pool costs: load plus warm-up, or a resume
            load_seconds=load + warmup,
            resumed=parked is not None,
            parked=self._parked_pools(),
            spec=runtime.spec.to_dict(),
        )
        self.ready.set()
        if runtime.weight_bytes <= self._park_memory():
            # page-locking is slow: done while serving, a later park only copies
            self._reserving = asyncio.create_task(
                asyncio.to_thread(runtime.reserve_host)
            )
        logger.info(
            "Stage %s of %s ready (%s %.1fs, warm-up %.1fs)",
            stage,
            runtime.model,
            "resumed from host memory in" if parked is not None else "load",
            load,
            warmup,
        )

    async def _stop(self, message: str) -> None:
        """Have this worker's :class:`StageNanny` close it and keep ``message``
        as the reason; without one, close the worker (and a plain Nanny)."""
        assert self.worker is not None
        worker = self.worker
        if worker.nanny is not None:
            try:
                # the nanny's address (typed as the Nanny in distributed)
                nanny = str(worker.nanny)
                await worker.rpc(nanny).dflow_load_failed(message=message)
                return
            except Exception:
                logger.debug("The nanny is not a StageNanny", exc_info=True)
        await worker.close(nanny=True, reason="dflow-load-failed")

    async def _report(self, state: str, **info: Any) -> None:
        """Tell dflow's scheduler extension what this worker is doing."""
        assert self.worker is not None
        device = (
            self.runtime.device
            if self.runtime is not None
            else runtimes.default_device()
        )
        gpu_type, memory = backend.current().gpu(
            None if self.gpu_type == "auto" else self.gpu_type, device
        )
        try:
            await self.worker.scheduler.dflow_worker_state(
                worker=self.worker.address,
                state=state,
                gpu_type=gpu_type,
                device=device,
                memory=memory,
                host=socket.gethostname(),
                **info,
            )
        except (KeyError, ValueError) as error:
            # a scheduler without dflow's preload still serves requests
            logger.warning("Scheduler has no dflow extension (%s)", error)

    async def teardown(self, worker: Worker) -> None:
        runtime, self.runtime = self.runtime, None
        parked, self.parked = list(self.parked.values()), {}
        if runtime is not None:
            runtimes.uninstall(runtime.model, runtime.stage)
            # a reservation under way would hold the process's exit
            runtime.adapter.unreserve()
        if worker.nanny is not None and worker.status in CLOSING:
            # The worker process exits next and the OS takes its memory back.
            # Collecting torch's heap object by object at interpreter exit
            # takes seconds: past the Nanny's patience, which then kills the
            # process with a warning. Leave the heap out of collections.
            gc.freeze()
        else:
            for leaving in [runtime, *parked] if runtime is not None else parked:
                await asyncio.to_thread(leaving.close)


class BatchingWorkerState(WorkerState):
    """Dask's worker state machine, whose pick of the next task to start the
    worker's :class:`StagePlugin` narrows while it denoises a batch
    (:meth:`StagePlugin.next_ready_task`). The plugin sets it as the class of
    its worker's state (the same slots: Dask builds the state itself); without
    the plugin it picks as Dask does."""

    __slots__ = ()

    def _next_ready_task(self) -> TaskState | None:
        plugin = self.plugins.get(StagePlugin.name)
        if isinstance(plugin, StagePlugin):
            return plugin.next_ready_task(super()._next_ready_task)
        return super()._next_ready_task()


def spawn_environment() -> dict[str, str | None]:
    """Variables a stage worker process starts with (``None``: without it), from
    ``dflow.worker.pre-spawn-environ``. glibc reads its allocator's settings
    when the process starts, so they cannot be set once it runs."""
    changes = dask.config.get("dflow.worker.pre-spawn-environ") or {}
    return {k: None if v is None else str(v) for k, v in changes.items()}


#: Stage worker processes being spawned in this process, and the variables of
#: :func:`spawn_environment` as they were before the first of them
_spawning = 0
_saved: dict[str, str | None] = {}
_spawning_lock = threading.Lock()


@contextlib.contextmanager
def _spawning_with(changes: Mapping[str, str | None]) -> Iterator[None]:
    """This process's environment with ``changes`` while worker processes are
    spawned (a child inherits it), as it was once the last of them has started:
    the Nanny copies its spawn environment into its own process, which would
    reach every later child (and override the config of later Nannies)."""
    global _spawning
    with _spawning_lock:
        if _spawning == 0:
            _saved.clear()
        for key in changes:
            _saved.setdefault(key, os.environ.get(key))
        _spawning += 1
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield
    finally:
        with _spawning_lock:
            _spawning -= 1
            if _spawning == 0:
                for key, value in _saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


class StageNanny(Nanny):
    """A Nanny that stops, rather than restarts, a worker whose stage could not
    load (its :class:`StagePlugin` says so through ``dflow_load_failed``).

    Its worker process starts with :func:`spawn_environment` over
    ``distributed.nanny.pre-spawn-environ``: dflow's config decides the
    variables it names (a value this process inherited or was left by another
    Nanny does not override it), and the Nanny leaves this process's
    environment as it found it.

    Attributes
    ----------
    load_error
        The worker's reason, once it could not load its stage.
    failed
        Set with ``load_error``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.load_error: str | None = None
        self.failed = asyncio.Event()
        self.handlers["dflow_load_failed"] = self.load_failed
        changes = spawn_environment()
        for key, value in changes.items():
            for environment in (self.pre_spawn_env, self.env):
                if value is None:
                    environment.pop(key, None)
                else:
                    environment[key] = value
        removed = {k: None for k, v in changes.items() if v is None}
        #: this process's environment while the worker process is spawned
        self.spawn_changes: dict[str, str | None] = {**self.pre_spawn_env, **removed}

    async def instantiate(self) -> Any:
        with _spawning_with(self.spawn_changes):
            return await super().instantiate()

    async def close(
        self, timeout: float | None = 30, reason: str = "nanny-close"
    ) -> Any:
        # a worker process with torch loaded can take more than distributed's
        # default 4 s to exit on a busy host: wait, rather than kill it and warn
        return await super().close(
            timeout=30 if timeout is None else timeout, reason=reason
        )

    def load_failed(self, message: str) -> None:
        """Handler: the worker could not load its stage; close it for good."""
        self.load_error = message
        self.failed.set()
        self._ongoing_background_tasks.call_soon(self._close_for_good)

    async def _close_for_good(self) -> None:
        await self.close(reason="dflow-load-failed")


async def run_nannies(
    scheduler: str | None, specs: list[dict[str, Any]], **kwargs: Any
) -> list[str]:
    """Start one :class:`StageNanny` per spec and run until they finish, a signal
    arrives or a worker cannot load its stage (then every worker closes).

    Returns the reasons of the workers that could not load their stage.
    """
    from distributed._signals import wait_for_signals

    nannies = [StageNanny(scheduler, **spec, **kwargs) for spec in specs]

    async def finish() -> None:
        await asyncio.gather(*nannies)
        await asyncio.gather(*(n.finished() for n in nannies))

    async def close_on_signal() -> None:
        signum = await wait_for_signals()
        await asyncio.gather(
            *(n.close(timeout=10, reason=f"signal-{signum}") for n in nannies)
        )

    async def close_on_failure() -> None:
        await asyncio.wait(
            [asyncio.create_task(n.failed.wait()) for n in nannies],
            return_when=asyncio.FIRST_COMPLETED,
        )
        await asyncio.gather(
            *(n.close(timeout=10, reason="dflow-load-failed") for n in nannies)
        )

    tasks = [asyncio.create_task(f()) for f in (finish, close_on_signal)]
    failure = asyncio.create_task(close_on_failure())
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    if failure.done() or any(n.failed.is_set() for n in nannies):
        await failure
    for task in (*pending, failure):
        task.cancel()
    for task in done:
        task.result()
    return [n.load_error for n in nannies if n.load_error is not None]
