"""A cluster manager with one worker pool per stage.

:class:`StageCluster` is a :class:`distributed.SpecCluster` whose workers each
serve one stage of one model. ``scale(n, stage="dit")`` grows or shrinks that
pool alone, which is how a cloud deployment follows the load (add DiT workers)
rather than switching the roles of a fixed fleet. Locally it starts worker
processes on this machine: the embedded cluster of ``dflow demo`` and the tests.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from dask.utils import parse_timedelta
from distributed import Nanny, Scheduler, SpecCluster, Worker
from distributed.deploy.spec import NoOpAwaitable

from dflow.spec import canonical_name
from dflow.worker import WORKER_STAGES, StagePlugin, stage_slots

logger = logging.getLogger(__name__)


class StageCluster(SpecCluster):
    """Per-stage pools of worker processes, with dflow's scheduler preload.

    Parameters
    ----------
    model
        The model the pools serve (``scale`` can add pools of other models).
    layout
        Workers per stage, e.g. ``{"encoder": 1, "dit": 2, "vae": 1}``, or
        ``{"all": 2}`` for monolithic replicas.
    gpu_type
        GPU type the workers publish (``"auto"``: read from the device).
    fleet
        Workers as ``(stage, model, gpu_type)`` triples, instead of ``layout``:
        fleets of several models and GPU types (``gpu_type`` ``None``: the
        cluster's).
    processes
        One worker process per worker, each under a :class:`~distributed.Nanny`
        (the default); False runs the workers in this process, on the
        scheduler's event loop, as the emulated benchmarks do to fit dozens of
        emulated GPUs on a few cores.
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
        fleet: Sequence[tuple[str, str, str | None]] | None = None,
        processes: bool = True,
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
        self.processes = processes
        self.host = host
        self._worker_options = {"host": host, **(worker_options or {})}
        if protocol:
            self._worker_options["protocol"] = protocol
        self._names = itertools.count()
        if fleet is None:
            layout = layout or {"encoder": 1, "dit": 1, "vae": 1}
            fleet = [(s, self.model, None) for s, n in layout.items() for _ in range(n)]
        elif layout is not None:
            raise ValueError("pass layout or fleet, not both")
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

    def _stage_spec(
        self, stage: str, model: str, gpu_type: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        if stage not in WORKER_STAGES:
            raise ValueError(f"stage must be one of {', '.join(WORKER_STAGES)}")
        name = f"{stage}-{next(self._names)}"
        gpu_type = gpu_type or self.gpu_type
        plugin = StagePlugin(stage, model, gpu_type)
        options = {
            "nthreads": stage_slots(stage),
            "name": name,
            "plugins": {plugin},
            **self._worker_options,
        }
        return name, {
            "cls": Nanny if self.processes else Worker,
            "options": options,
            "stage": stage,
            "model": model,
            "gpu_type": gpu_type,
        }

    def stage_workers(self, stage: str, model: str | None = None) -> list[str]:
        """Names of the workers specified for ``stage`` (of ``model``)."""
        model = canonical_name(model) if model else self.model
        return [
            name
            for name, spec in self.worker_spec.items()
            if spec.get("stage") == stage and spec.get("model") == model
        ]

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
        minimum: int = 1,
        maximum: int | None = None,
        interval: str = "2s",
        wait: str = "60s",
        utilization: float | None = None,
    ) -> PoolAdaptive:
        """Grow and shrink each pool to follow its load (instead of switching
        workers' roles): see :class:`PoolAdaptive`."""
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
    """Sizes a :class:`StageCluster`'s pools to what the scheduler's elastic
    controller says each needs (``dflow_pool_targets``).

    A pool grows at once and shrinks only to the largest target seen over the
    last ``wait``, so a lull does not release workers a returning load needs
    (dask-gateway's adapt loop does the same).
    """

    def __init__(
        self,
        cluster: StageCluster,
        minimum: int = 1,
        maximum: int | None = None,
        interval: str = "2s",
        wait: str = "60s",
        utilization: float | None = None,
    ):
        from tornado.ioloop import PeriodicCallback

        self.cluster = cluster
        self.minimum = minimum
        self.maximum = maximum
        self.wait = parse_timedelta(wait)
        self.utilization = utilization
        self.history: dict[tuple[str, str], deque[tuple[float, int]]] = {}
        self._periodic = PeriodicCallback(self.step, parse_timedelta(interval) * 1000)
        assert cluster.loop is not None  # a started cluster has its loop
        cluster.loop.add_callback(self._periodic.start)

    def stop(self) -> None:
        self._periodic.stop()

    async def step(self) -> None:
        comm = self.cluster.scheduler_comm
        assert comm is not None  # a started cluster has its scheduler
        targets = await comm.dflow_pool_targets(utilization=self.utilization)
        now = time.monotonic()
        for name, needed in targets.items():
            stage, _, model = name.partition("/")
            if stage == "all":
                continue
            history = self.history.setdefault((stage, model), deque())
            history.append((now, needed))
            while history and history[0][0] < now - self.wait:
                history.popleft()
            size = max(self.minimum, max(n for _, n in history))
            if self.maximum is not None:
                size = min(size, self.maximum)
            if size != len(self.cluster.stage_workers(stage, model)):
                logger.info("Scaling %s of %s to %d workers", stage, model, size)
                self.cluster.scale(size, stage=stage, model=model)
