"""A cluster manager with one worker pool per stage.

:class:`StageCluster` is a :class:`distributed.SpecCluster` whose workers each
serve one stage of one model. ``scale(n, stage="dit")`` grows or shrinks that
pool alone, which is how a cloud deployment follows the load (add DiT workers)
rather than switching the roles of a fixed fleet: ``adapt()`` (or
``dflow.elastic.actuator: scale-pools``) lets the scheduler's elastic controller
size the pools. Locally it starts worker processes on this machine: the embedded
cluster of ``dflow demo`` and the tests.

Which pool a worker serves is what dflow's scheduler extension says (a role
switch moves a worker between pools); the worker specs only say what a worker
that has not reported yet was started for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tornado.ioloop import PeriodicCallback

import dask.config
from dask.utils import parse_timedelta
from distributed import Scheduler, SpecCluster, Worker
from distributed.deploy.spec import NoOpAwaitable

import dflow.config  # noqa: F401
from dflow.diagnosis import model_problem
from dflow.errors import StageLoadError
from dflow.pools import WORKER_STAGES, Pool
from dflow.protocol import configure_ucx_progress
from dflow.quantization import holds_dit
from dflow.spec import canonical_name
from dflow.worker import StageNanny
from dflow.worker_options import stage_worker_options, visible_gpus, worker_name

logger = logging.getLogger(__name__)


class StageCluster(SpecCluster):
    """Per-stage pools of worker processes, with dflow's scheduler preload.

    Parameters
    ----------
    model
        The model the pools serve (``scale`` can add pools of other models).
    layout
        Workers per stage, e.g. ``{"encoder": 1, "dit": 2, "vae": 1}``, or
        ``{"all": 2}`` for monolithic replicas. A model of two experts (Wan 2.2
        A14B) may give each expert its own workers: ``{"encoder": 1,
        "dit-high": 1, "dit-low": 1, "vae": 1}``.
    gpu_type
        GPU type the workers publish (``"auto"``: read from the device).
    quantize
        The workers' DiT weights in 8 bits (``"int8"`` or ``"fp8"``,
        :mod:`dflow.quantization`): for every stage holding them, or per stage
        (``{"dit-high": "int8"}``); default ``dflow.runtime.quantize``.
    fleet
        Workers as ``(stage, model, gpu_type)`` triples, instead of ``layout``:
        fleets of several models and GPU types (``gpu_type`` ``None``: the
        cluster's).
    processes
        One worker process per worker, each under a :class:`~distributed.Nanny`
        (the default); False runs the workers in this process, on the
        scheduler's event loop, as the emulated benchmarks do to fit dozens of
        emulated GPUs on a few cores.
    gpus
        GPU ids the worker processes are pinned to, one GPU each in turn (its
        id first in ``CUDA_VISIBLE_DEVICES``); default: every visible GPU.
    worker_options
        Extra keyword arguments of each worker's :class:`~distributed.Nanny`
        (e.g. ``{"config": {...}}`` for per-worker dask config).
    scheduler_options
        Extra keyword arguments of the :class:`~distributed.Scheduler`.

    Examples
    --------
    >>> cluster = StageCluster("tiny-flux", {"encoder": 1, "dit": 2, "vae": 1})  # doctest: +SKIP
    >>> cluster.scale(3, stage="dit")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str,
        layout: dict[str, int] | None = None,
        *,
        gpu_type: str = "auto",
        quantize: str | Mapping[str, str] | None = None,
        fleet: Sequence[tuple[str, str, str | None]] | None = None,
        processes: bool = True,
        gpus: Sequence[str] | None = None,
        host: str | None = "127.0.0.1",
        dashboard_address: str | None = ":0",
        protocol: str | None = None,
        security: Any = None,
        worker_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        asynchronous: bool = False,
        **kwargs: Any,
    ):
        self.model = canonical_name(model)
        self.gpu_type = gpu_type
        self.quantize = quantize
        self.processes = processes
        if gpus is None:
            gpus = visible_gpus() if processes else []
        self.gpus = list(gpus)
        self.host = host
        self._worker_options = {"host": host, **(worker_options or {})}
        if protocol:
            self._worker_options["protocol"] = protocol
        if protocol and protocol.startswith("ucx"):
            configure_ucx_progress()
        self._names = itertools.count()
        if fleet is None:
            layout = layout or {"encoder": 1, "dit": 1, "vae": 1}
            fleet = [(s, self.model, None) for s, n in layout.items() for _ in range(n)]
        elif layout is not None:
            raise ValueError("pass layout or fleet, not both")
        for worker_model in sorted({m for _, m, _ in fleet}):
            problem = model_problem(worker_model)
            if problem is not None:
                raise ValueError(problem)
        workers = {}
        for stage, worker_model, worker_gpu in fleet:
            name, spec = self._stage_spec(
                stage, canonical_name(worker_model), worker_gpu
            )
            workers[name] = spec
        scheduler = {
            "cls": Scheduler,
            "options": {
                "host": host,
                "dashboard_address": dashboard_address,
                "preload": ["dflow.preload"],
                **({"protocol": protocol} if protocol else {}),
                **(scheduler_options or {}),
            },
        }
        super().__init__(
            workers=workers,
            scheduler=scheduler,
            security=security,
            asynchronous=asynchronous,
            name="dflow",
            **kwargs,
        )

    async def _start(self) -> None:
        await super()._start()
        if dask.config.get("dflow.elastic.enabled") and (
            dask.config.get("dflow.elastic.actuator") == "scale-pools"
        ):
            # the pools follow the load by growing: scale them to the sizes
            # the controller gives (its config's bounds)
            self.adapt(minimum=None, wait=None)

    def _stage_spec(
        self, stage: str, model: str, gpu_type: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        if stage not in WORKER_STAGES:
            raise ValueError(f"stage must be one of {', '.join(WORKER_STAGES)}")
        number = next(self._names)
        index = number % len(self.gpus) if self.gpus else None
        name = worker_name(None if index is None else self.gpus[index], number)
        gpu_type = gpu_type or self.gpu_type
        if isinstance(self.quantize, Mapping):
            quantize = self.quantize.get(stage)
        else:
            quantize = self.quantize if holds_dit(stage) else None
        options = stage_worker_options(
            stage,
            model,
            name=name,
            gpu_type=gpu_type,
            gpus=self.gpus,
            index=index,
            quantize=quantize,
        )
        if not self.processes:
            del options["env"]  # workers in this process share its environment
        options.update(self._worker_options)
        return name, {
            "cls": StageNanny if self.processes else Worker,
            "options": options,
            "stage": stage,
            "model": model,
            "gpu_type": gpu_type,
        }

    def stage_workers(self, stage: str, model: str | None = None) -> list[str]:
        """Names of this cluster's workers in the pool of ``stage`` of ``model``:
        serving it as the scheduler's dflow extension records (a role switch
        moves a worker), or started for it and not reporting yet."""
        pool = Pool(stage, canonical_name(model) if model else self.model)
        joined = self._pools_of_workers()
        return [
            name
            for name, spec in self.worker_spec.items()
            if joined.get(name, Pool(spec["stage"], spec["model"])) == pool
        ]

    def wait_until_ready(self, timeout: float | None = None) -> Any:
        """Wait until every worker of the cluster serves its pool.

        Raises :class:`~dflow.errors.StageLoadError` as soon as a worker could
        not load or warm up its stage (it exits), with its reason, and
        ``TimeoutError`` after ``timeout`` seconds.
        """
        return self.sync(self._wait_until_ready, timeout)

    async def _wait_until_ready(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            extension = getattr(self.scheduler, "extensions", {}).get("dflow")
            records = list(extension.workers.values()) if extension else []
            ours = set(self.worker_spec)
            failures = [
                f"worker {r.name} {r.error}"
                for r in (extension.failures if extension else [])
                if r.name in ours
            ]
            if failures:
                raise StageLoadError("; ".join(failures))
            ready = {r.name for r in records if r.state == "ready"}
            if ours <= ready:
                return
            if deadline is not None and time.monotonic() > deadline:
                waiting = ", ".join(sorted(ours - ready))
                raise TimeoutError(f"workers not ready within {timeout:g}s: {waiting}")
            await asyncio.sleep(0.1)

    def _pools_of_workers(self) -> dict[str, Pool]:
        """Pool of each worker per the dflow extension of this cluster's
        scheduler (which runs in this process)."""
        extension = getattr(self.scheduler, "extensions", {}).get("dflow")
        if extension is None:
            return {}
        return {
            name: Pool.parse(pool)
            for pool, names in extension.pool_members().items()
            for name in names
        }

    def scale(
        self,
        n: int = 0,
        memory=None,
        cores=None,
        *,
        stage=None,
        model=None,
        gpu_type=None,
    ):
        """Set the number of workers of one stage pool to ``n`` (new ones of
        ``gpu_type``, default the cluster's).

        Workers leave through ``retire_workers``, so the intermediates they hold
        move to other workers first. Without ``stage`` the call is ambiguous for a
        per-stage cluster and raises, except ``scale(0)`` which removes every pool.
        """
        if stage is None:
            if n == 0:  # closing: every pool goes
                return super().scale(0)
            raise ValueError("StageCluster.scale needs stage=: each pool scales alone")
        model = canonical_name(model) if model else self.model
        current = self.stage_workers(stage, model)
        for name in current[n:]:
            del self.worker_spec[name]
        for _ in range(n - len(current)):
            name, spec = self._stage_spec(stage, model, gpu_type)
            self.worker_spec[name] = spec
        assert self.loop is not None  # a started cluster has its loop
        self.loop.add_callback(self._retire_then_correct, current[n:])
        if self.asynchronous:
            return NoOpAwaitable()
        return None

    async def _retire_then_correct(self, names: list[str]) -> None:
        # SpecCluster retires leaving workers by passing their names where the
        # scheduler expects addresses, so it would close them with their data:
        # retire them by name first.
        if names and self.scheduler_comm is not None:
            await self.scheduler_comm.retire_workers(names=names)
        await self._correct_state()

    def adapt(  # type: ignore[override]
        self,
        minimum: int | None = 1,
        maximum: int | None = None,
        interval: str = "2s",
        wait: str | None = "60s",
        utilization: float | None = None,
    ) -> PoolAdaptive:
        """Grow and shrink each pool to follow its load, instead of switching
        workers' roles: the scheduler's elastic controller sizes the pools
        (actuator ``scale-pools``; ``None``: its config) and :class:`PoolAdaptive`
        scales them."""
        if self._adaptive is not None:
            self._adaptive.stop()
        self._adaptive = PoolAdaptive(
            self,
            minimum=minimum,
            maximum=maximum,
            interval=interval,
            wait=wait,
            utilization=utilization,
        )
        return self._adaptive


class PoolAdaptive:
    """Scales a :class:`StageCluster`'s pools to the sizes the scheduler's
    elastic controller gives them.

    It turns the controller on with the ``scale-pools`` actuator (each pool sized
    to its load at ``utilization``, at least ``minimum`` and at most ``maximum``
    workers, growing at once and shrinking only to the largest size of the last
    ``wait``), reads the sizes every ``interval`` (``dflow_pool_sizes``) and
    scales the pools that differ. :meth:`stop` puts the controller's settings
    back as they were.
    """

    def __init__(
        self,
        cluster: StageCluster,
        minimum: int | None = 1,
        maximum: int | None = None,
        interval: str = "2s",
        wait: str | None = "60s",
        utilization: float | None = None,
    ):
        self.cluster = cluster
        self.scale = {
            k: v
            for k, v in {
                "minimum": minimum,
                "maximum": maximum,
                "wait": wait,
                "utilization": utilization,
            }.items()
            if v is not None
        }
        self.previous: dict[str, Any] | None = None
        self._periodic = PeriodicCallback(self.step, parse_timedelta(interval) * 1000)
        assert cluster.loop is not None  # a started cluster has its loop
        cluster.loop.add_callback(self._begin)

    async def _begin(self) -> None:
        comm = self.cluster.scheduler_comm
        assert comm is not None  # a started cluster has its scheduler
        settings = await comm.dflow_elastic()
        self.previous = {k: settings[k] for k in ("enabled", "actuator")}
        await comm.dflow_elastic(enabled=True, actuator="scale-pools", **self.scale)
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
        if self.previous is not None and self.cluster.loop is not None:
            self.cluster.loop.add_callback(self._restore, self.previous)

    async def _restore(self, previous: dict[str, Any]) -> None:
        comm = self.cluster.scheduler_comm
        if comm is not None:
            await comm.dflow_elastic(**previous)

    async def step(self) -> None:
        comm = self.cluster.scheduler_comm
        assert comm is not None  # a started cluster has its scheduler
        sizes = await comm.dflow_pool_sizes()
        for text, size in sizes.items():
            pool = Pool.parse(text)
            if size != len(self.cluster.stage_workers(pool.stage, pool.model)):
                logger.info("Scaling %s to %d workers", pool, size)
                self.cluster.scale(size, stage=pool.stage, model=pool.model)
