"""DisagFusion's threshold policy on dflow's stage pools, a ``dflow bench`` mode.

The DisagFusion prototype (``zhtshr/LightX2V``, its disaggregation controller;
``../shared/notes/peer-apis.md``) scales each stage service on two signals: it
adds an instance when the service's average GPU utilization is above 80% or
its longest instance queue holds more than 2 requests, and removes one when
utilization is below 20%; a service waits 30 s after each scaling, and nothing
scales during warm-up.

On a fixed fleet an instance is added by taking one from another pool.
:class:`ThresholdScaler` takes it from a pool that the same policy would scale
in (utilization below 20%, out of its cooldown, more than one worker): a pool
it scales in keeps its worker loaded until another pool needs it, so the
policy never pays a load the prototype would not. Utilization is the busy
fraction of a pool's workers, sampled five times per ``interval`` and
averaged over ``window``. Moves go through the elastic controller's
:class:`~dflow.plugins.actuators.RoleSwitcher`, so every mode pays the same
switch. Periods are in emulated seconds, times ``scale``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from typing import Any

from tornado.ioloop import PeriodicCallback

from distributed.diagnostics.plugin import SchedulerPlugin

from dflow.bench.baselines import ReplicaMove
from dflow.pools import MONOLITHIC, Pool, task_pool

logger = logging.getLogger(__name__)


class ThresholdScaler(SchedulerPlugin):
    """DisagFusion's per-stage threshold autoscaling on a fixed fleet.

    Parameters
    ----------
    scale
        The emulation's time scale.
    scale_out_utilization, scale_out_queue, scale_in_utilization
        A pool gets a worker above the utilization or with an instance queue
        deeper than the queue threshold; it may give one up below the
        scale-in utilization.
    cooldown, warmup, interval, window
        Emulated seconds: a pool's wait after each scaling, the start with no
        scaling, how often the policy decides, and the span of its
        utilization average.
    """

    name = "dflow-bench-disagfusion"

    def __init__(
        self,
        *,
        scale: float = 1.0,
        scale_out_utilization: float = 0.8,
        scale_out_queue: float = 2.0,
        scale_in_utilization: float = 0.2,
        cooldown: float = 30.0,
        warmup: float = 60.0,
        interval: float = 5.0,
        window: float = 30.0,
    ):
        self.scale_out_utilization = scale_out_utilization
        self.scale_out_queue = scale_out_queue
        self.scale_in_utilization = scale_in_utilization
        self.cooldown = cooldown * scale
        self.warmup = warmup * scale
        self.interval = interval * scale
        self.window = window * scale
        self.scheduler: Any = None
        self.started = 0.0
        self.samples: deque[tuple[float, dict[Pool, float]]] = deque()
        #: when each pool last scaled
        self.scaled: dict[Pool, float] = {}
        self.decisions: list[ReplicaMove] = []
        self._callbacks: list[PeriodicCallback] = []

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.started = time.time()
        self._callbacks = [
            PeriodicCallback(self.sample, self.interval / 5 * 1000),
            PeriodicCallback(self.step, self.interval * 1000),
        ]
        for callback in self._callbacks:
            callback.start()

    async def close(self) -> None:
        for callback in self._callbacks:
            callback.stop()

    @property
    def switcher(self) -> Any:
        return self.scheduler.plugins["dflow-elastic"].actuator

    def pools(self) -> dict[Pool, list[str]]:
        """Workers per stage pool: serving it, loading it, or switching to it."""
        extension = self.scheduler.extensions["dflow"]
        switching = self.switcher.switching
        pools: dict[Pool, list[str]] = defaultdict(list)
        for address, record in extension.workers.items():
            pool = switching.get(address, record.pool)
            served = pool is not None and pool.stage != MONOLITHIC
            if served and record.state != "failed":
                pools[pool].append(address)
        return pools

    def sample(self) -> None:
        """Record each pool's busy fraction now."""
        now = time.time()
        busy = {}
        for pool, workers in self.pools().items():
            states = [self.scheduler.workers.get(w) for w in workers]
            busy[pool] = sum(bool(ws and ws.executing) for ws in states) / len(workers)
        self.samples.append((now, busy))
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()

    def queues(self, pools: dict[Pool, list[str]]) -> dict[Pool, int]:
        """Each pool's longest instance queue (tasks placed on a worker and not
        running; tasks no worker can take count toward every instance)."""
        unplaced: dict[Pool, int] = defaultdict(int)
        for ts in self.scheduler.unrunnable:
            pool = task_pool(ts.annotations)
            if pool is not None:
                unplaced[pool] += 1
        result = {}
        for pool, workers in pools.items():
            states = [self.scheduler.workers.get(w) for w in workers]
            longest = max(
                (len(ws.processing) - len(ws.executing) for ws in states if ws),
                default=0,
            )
            result[pool] = longest + unplaced[pool]
        return result

    def step(self) -> None:
        """Scale each pool that crosses a threshold, one worker at a time."""
        now = time.time()
        if now - self.started < self.warmup or not self.samples:
            return
        pools = self.pools()
        utilization = {
            pool: sum(busy.get(pool, 0.0) for _, busy in self.samples)
            / len(self.samples)
            for pool in pools
        }
        queues = self.queues(pools)

        def cooling(pool: Pool) -> bool:
            return now - self.scaled.get(pool, -float("inf")) < self.cooldown

        out = [
            p
            for p in pools
            if not cooling(p)
            and (
                utilization[p] > self.scale_out_utilization
                or queues[p] > self.scale_out_queue
            )
        ]
        spare = [
            p
            for p in pools
            if not cooling(p)
            and len(pools[p]) > 1
            and utilization[p] < self.scale_in_utilization
        ]
        extension = self.scheduler.extensions["dflow"]
        for target in sorted(out, key=lambda p: (-utilization[p], -queues[p], p)):
            source = min(spare, key=lambda p: (utilization[p], p), default=None)
            if source is None:
                return
            worker = self.pick(pools[source])
            if worker is None:
                spare.remove(source)
                continue
            spare.remove(source)
            self.scaled[source] = self.scaled[target] = now
            reason = (
                f"{target} utilization {utilization[target]:.2f}, queue "
                f"{queues[target]}; {source} utilization {utilization[source]:.2f}"
            )
            record = extension.workers.get(worker)
            name = record.name if record else worker
            self.decisions.append(
                ReplicaMove(now, name, str(source), str(target), reason)
            )
            logger.info("Moving %s from %s to %s: %s", name, source, target, reason)
            self.switcher.start(worker, target)

    def pick(self, workers: list[str]) -> str | None:
        """The worker to give up: not already switching, the least busy first."""
        switching = self.switcher.switching
        ready = [
            w for w in workers if w not in switching and w in self.scheduler.workers
        ]
        if not ready:
            return None
        return min(ready, key=lambda w: (len(self.scheduler.workers[w].processing), w))
