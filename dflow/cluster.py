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
from typing import Any

from dask.utils import parse_timedelta
from distributed import Nanny, Scheduler, SpecCluster
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
        host: str = "127.0.0.1",
        dashboard_address: str = ":0",
        protocol: str | None = None,
        security: Any = None,
        worker_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        asynchronous: bool = False,
        **kwargs: Any,
    ):
        self.model = canonical_name(model)
        self.gpu_type = gpu_type
        self.host = host
        self._worker_options = {"host": host, **(worker_options or {})}
        if protocol:
            self._worker_options["protocol"] = protocol
        self._names = itertools.count()
        layout = layout or {"encoder": 1, "dit": 1, "vae": 1}
        workers = {}
        for stage, count in layout.items():
            for _ in range(count):
                name, spec = self._stage_spec(stage, self.model)
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

    def _stage_spec(self, stage: str, model: str) -> tuple[str, dict[str, Any]]:
        if stage not in WORKER_STAGES:
            raise ValueError(f"stage must be one of {', '.join(WORKER_STAGES)}")
        name = f"{stage}-{next(self._names)}"
        options = {
            "nthreads": stage_slots(stage),
            "name": name,
            "plugins": {StagePlugin(stage, model, self.gpu_type)},
            **self._worker_options,
        }
        return name, {"cls": Nanny, "options": options, "stage": stage, "model": model}

    def stage_workers(self, stage: str, model: str | None = None) -> list[str]:
        """Names of the workers specified for ``stage`` (of ``model``)."""
        model = canonical_name(model) if model else self.model
        return [
            name
            for name, spec in self.worker_spec.items()
            if spec.get("stage") == stage and spec.get("model") == model
        ]

    def scale(self, n: int = 0, memory=None, cores=None, *, stage=None, model=None):
        """Set the number of workers of one stage pool to ``n``.

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
            name, spec = self._stage_spec(stage, model)
            self.worker_spec[name] = spec
        self.loop.add_callback(self._correct_state)
        if self.asynchronous:
            return NoOpAwaitable()
        return None

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
        self.cluster.loop.add_callback(self._periodic.start)

    def stop(self) -> None:
        self._periodic.stop()

    async def step(self) -> None:
        targets = await self.cluster.scheduler_comm.dflow_pool_targets(
            utilization=self.utilization
        )
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
