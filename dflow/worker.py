"""Stage workers: Dask workers that hold one stage of one model.

``dflow-worker SCHEDULER --stage dit --model NAME`` starts one Nanny per GPU (each
with its own ``CUDA_VISIBLE_DEVICES``, as ``dask cuda worker`` does), or one CPU
worker on a machine without GPUs; their options come from
:mod:`dflow.worker_options`. Each worker process runs a :class:`StagePlugin`: it loads and warms up the stage model, then advertises the
stage as Dask resources (``{"dit": 1, "dit:<model>": 1}``) and publishes its GPU
type, memory and model to dflow's scheduler extension. Until then the worker has
no stage resource, so no request waits on a cold load.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import dask.config
from distributed import Nanny, Worker
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

import dflow.config  # noqa: F401
from dflow import backend
from dflow import runtime as runtimes
from dflow.pools import WORKER_STAGES, Pool, stage_resources

logger = logging.getLogger(__name__)


def stage_slots(stage: str) -> int:
    """Concurrent tasks of a stage per worker: the DiT runs one request at a time,
    the encoder and VAE take several so the runtime can batch them."""
    if stage in ("dit", "all"):
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
    """

    name = "dflow-stage"

    def __init__(self, stage: str, model: str, gpu_type: str = "auto"):
        if stage not in WORKER_STAGES:
            raise ValueError(f"stage must be one of {', '.join(WORKER_STAGES)}")
        self.stage = stage
        self.model = model
        self.gpu_type = gpu_type
        self.worker: Worker | None = None
        self.runtime: runtimes.StageRuntime | None = None
        self.ready: asyncio.Event | None = None

    async def setup(self, worker: Worker) -> None:
        from dflow.protocol import register_serializers

        register_serializers()
        self.worker = worker
        self.ready = asyncio.Event()
        worker.handlers["dflow_drain"] = self.drain
        worker.handlers["dflow_assign"] = self.reassign
        # Load in the background: the worker joins the scheduler (and shows as
        # loading) at once, and takes stage tasks once the model is warm.
        self._loading = asyncio.create_task(self.assign(self.stage, self.model))

    def _running(self, resource: str) -> list[str]:
        assert self.worker is not None
        return [
            str(ts.key)
            for ts in self.worker.state.tasks.values()
            if ts.state in ("executing", "long-running")
            and resource in (ts.resource_restrictions or {})
        ]

    async def drain(self) -> list[str]:
        """Stop taking tasks of the current pool; returns the keys still running.

        The pool's resources drop to zero here and on the scheduler, so no queued
        task of the pool starts on this worker any more; the scheduler moves the
        queued ones elsewhere.
        """
        assert self.worker is not None
        if self.runtime is None:
            return []
        pool = Pool(self.runtime.stage, self.runtime.model)
        await self.worker.set_resources(**stage_resources(pool, 0))
        await self._report(
            "draining", stage=self.runtime.stage, model=self.runtime.model
        )
        return self._running(pool.resource)

    async def reassign(self, stage: str, model: str) -> str:
        """Switch to ``stage`` of ``model`` once running tasks finish (in the
        background: the scheduler hears "loading", then "ready")."""
        self._loading = asyncio.create_task(self._switch(stage, model))
        return "OK"

    async def _switch(self, stage: str, model: str) -> None:
        if self.runtime is not None:
            old = self.runtime
            resource = Pool(old.stage, old.model).resource
            while self._running(resource):
                await asyncio.sleep(0.05)
            runtimes.uninstall(old.model, old.stage)
            self.runtime = None
            await asyncio.to_thread(old.close)
        await self.assign(stage, model)

    async def assign(self, stage: str, model: str) -> None:
        """Load ``stage`` of ``model``, warm it up, then advertise it."""
        assert self.worker is not None and self.ready is not None
        worker = self.worker
        # setup() runs before the worker registers; the scheduler ignores reports
        # of workers it does not know yet
        while worker.status in (Status.init, Status.starting, Status.undefined):
            await asyncio.sleep(0.05)
        await self._report("loading", stage=stage, model=model)
        try:
            runtime = await asyncio.to_thread(
                runtimes.StageRuntime,
                model,
                stage,
                gpu_type=None if self.gpu_type == "auto" else self.gpu_type,
            )
            warmup = await asyncio.to_thread(runtime.warmup)
        except Exception as error:
            logger.exception("Could not load %s stage %s", model, stage)
            await self._report("failed", stage=stage, model=model, error=repr(error))
            return
        runtimes.install(runtime)
        self.runtime = runtime
        resources = stage_resources(Pool(stage, runtime.model), stage_slots(stage))
        await worker.set_resources(**resources)
        await self._report(
            "ready",
            stage=stage,
            model=runtime.model,
            resources=resources,
            # what a switch to this pool costs: load plus warm-up
            load_seconds=runtime.load_seconds + warmup,
            spec=runtime.spec.to_dict(),
        )
        self.ready.set()
        logger.info(
            "Serving %s stage %s (load %.1fs, warm-up %.1fs)",
            runtime.model,
            stage,
            runtime.load_seconds,
            warmup,
        )

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
        if self.runtime is not None:
            runtimes.uninstall(self.runtime.model, self.runtime.stage)
            self.runtime.close()


async def run_nannies(
    scheduler: str | None, specs: list[dict[str, Any]], **kwargs: Any
) -> None:
    """Start one Nanny per spec and run until they finish or a signal arrives."""
    from distributed._signals import wait_for_signals

    nannies = [Nanny(scheduler, **spec, **kwargs) for spec in specs]

    async def finish() -> None:
        await asyncio.gather(*nannies)
        await asyncio.gather(*(n.finished() for n in nannies))

    async def close_on_signal() -> None:
        signum = await wait_for_signals()
        await asyncio.gather(
            *(n.close(timeout=10, reason=f"signal-{signum}") for n in nannies)
        )

    done, pending = await asyncio.wait(
        [asyncio.create_task(finish()), asyncio.create_task(close_on_signal())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    for task in pending:
        task.cancel()
    for task in done:
        task.result()
