"""Actuators: how the elastic controller's decisions change the fleet.

Each control step gives the actuator the planner's plan (which worker moves to
which pool) and each pool's target size (workers needed at the target
utilization), both priced alike. ``dflow.elastic.actuator`` chooses one:

``switch-roles`` (:class:`RoleSwitcher`)
    A fixed fleet: idle workers switch pools as the plan says. A switch drains
    the worker (its pool resources drop to zero, on the worker and the
    scheduler, so none of its queued tasks starts there), sends the pool's
    tasks queued on it back to the scheduler, lets the running task finish,
    then the worker unloads the old model, loads and warms up the new one and
    advertises it. The worker process lives throughout, so the intermediates
    it holds stay where they are.
``scale-pools`` (:class:`ClusterScaler`)
    A fleet that grows: each pool is sized to its target, growing at once and
    shrinking only to the largest target of the last ``wait``, so a lull does
    not release workers a returning load needs (dask-gateway's adapt loop
    does the same); the cluster manager starts and retires the workers
    (``StageCluster.adapt``, which reads the sizes through ``dflow_pool_sizes``).

Both read pool membership from dflow's extension, the one place that says
which workers serve a pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Protocol

from dask.typing import Key
from distributed.scheduler import Scheduler, TaskStateState

from dflow.planner import Move, Plan
from dflow.plugins.extension import DflowExtension
from dflow.pools import Pool, task_pool

logger = logging.getLogger(__name__)

ACTUATORS = ("switch-roles", "scale-pools")
#: Seconds a switch waits for tasks being stolen to the worker to land
STEAL_WAIT = 30


class Actuator(Protocol):
    """What the elastic controller acts through."""

    #: its ``dflow.elastic.actuator`` name
    kind: str
    #: workers on their way to a pool (address -> the pool)
    switching: Mapping[str, Pool]

    def act(self, plan: Plan | None, targets: Mapping[Pool, int]) -> list[Move]:
        """Apply a control step (``plan``: ``None`` when there is none); returns
        the moves it started."""
        ...

    def finished(self, address: str) -> None:
        """The worker reported ready (or failed, or left): a move of it is over."""
        ...


class RoleSwitcher:
    """Switches workers between pools of a fixed fleet: drain, requeue, reload."""

    kind = "switch-roles"

    def __init__(self, scheduler: Scheduler, extension: DflowExtension):
        self.scheduler = scheduler
        self.extension = extension
        self.switching: dict[str, Pool] = {}
        self._tasks: set[asyncio.Task] = set()

    def act(self, plan: Plan | None, targets: Mapping[Pool, int]) -> list[Move]:
        if plan is None:
            return []
        return [
            m
            for m in plan.moves
            if m.target is not None and self.start(m.worker, m.target)
        ]

    def start(self, address: str, target: Pool) -> bool:
        """Switch ``address`` to ``target`` in the background; False if it is
        not a dflow worker or is being switched already."""
        record = self.extension.workers.get(address)
        if record is None or address in self.switching:
            return False
        self.switching[address] = target
        task = asyncio.ensure_future(self.switch(address, record.pool, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def switch(self, address: str, source: Pool | None, target: Pool) -> None:
        """Drain ``address``, requeue its queued tasks of ``source`` and have it
        load ``target``; it reports ready (:meth:`finished`) when it serves."""
        try:
            started = set(await self.scheduler.rpc(address).dflow_drain())
            # a steal to it that began before the drain lands after it
            await self._steals_landed(address)
            self.requeue(address, source, started)
            await self.scheduler.rpc(address).dflow_assign(
                stage=target.stage, model=target.model
            )
        except Exception:
            logger.exception("Switching %s to %s failed", address, target)
            self.switching.pop(address, None)

    async def _steals_landed(self, address: str) -> None:
        """Wait until no task is being stolen to ``address`` (Dask's stealing
        confirms a move without asking whether the thief still takes the task's
        pool)."""
        stealing = self.scheduler.extensions.get("stealing")
        ws = self.scheduler.workers.get(address)
        deadline = time.monotonic() + STEAL_WAIT
        while any(
            info["thief"] is ws for info in getattr(stealing, "in_flight", {}).values()
        ):
            if time.monotonic() > deadline:
                logger.warning(
                    "Tasks still being stolen to %s after %ss", address, STEAL_WAIT
                )
                return
            await asyncio.sleep(0.01)

    def requeue(self, address: str, pool: Pool | None, started: set[str]) -> None:
        """Send the pool's tasks placed on ``address`` that have not started there
        (``started``: the keys running or run there) back to the scheduler,
        which places them on the pool's other workers."""
        ws = self.scheduler.workers.get(address)
        if ws is None or pool is None:
            return
        queued: dict[Key, TaskStateState] = {
            ts.key: "released"
            for ts in ws.processing
            if task_pool(ts.annotations) == pool and ts.key not in started
        }
        if queued:
            self.scheduler.transitions(
                queued, stimulus_id=f"dflow-requeue-{time.time()}"
            )

    def finished(self, address: str) -> None:
        self.switching.pop(address, None)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


class ClusterScaler:
    """Sizes each pool to its target for the cluster manager to scale it.

    Parameters
    ----------
    minimum, maximum
        Workers per pool at least and at most (``None``: no limit).
    wait
        Seconds a pool keeps the largest target it saw before it shrinks.
    utilization
        The utilization targets aim for (``None``:
        ``dflow.elastic.target-utilization``).
    """

    kind = "scale-pools"

    def __init__(
        self,
        minimum: int = 1,
        maximum: int | None = None,
        wait: float = 60.0,
        utilization: float | None = None,
    ):
        self.minimum = minimum
        self.maximum = maximum
        self.wait = wait
        self.utilization = utilization
        self.switching: dict[str, Pool] = {}
        #: the size of each pool the cluster manager should scale to
        self.sizes: dict[Pool, int] = {}
        self._history: dict[Pool, deque[tuple[float, int]]] = {}

    def act(self, plan: Plan | None, targets: Mapping[Pool, int]) -> list[Move]:
        now = time.monotonic()
        for pool, needed in targets.items():
            if pool.stage == "all":
                continue  # monolithic replicas are not scaled per stage
            history = self._history.setdefault(pool, deque())
            history.append((now, needed))
            while history and history[0][0] < now - self.wait:
                history.popleft()
            size = max(self.minimum, max(n for _, n in history))
            if self.maximum is not None:
                size = min(size, self.maximum)
            if self.sizes.get(pool) != size:
                logger.info("Sizing %s to %d workers", pool, size)
            self.sizes[pool] = size
        return []

    def finished(self, address: str) -> None:
        pass
