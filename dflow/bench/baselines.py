"""Baseline (b): monolithic replicas autoscaled per model, as Ray Serve would.

Each model is a deployment of monolithic replicas (``--stage all`` workers) on
a fixed fleet. :class:`ReplicaAutoscaler` follows Ray Serve's request-based
policy: every ``interval`` it samples each model's *ongoing requests* (queued or
running: Ray's ``target_ongoing_requests`` metric), averages them over the
``look_back`` window, and wants ``ceil(average / target_ongoing)`` replicas
(at least ``min_replicas``). A model gets a replica only after wanting more for
``upscale_delay``; it gives one up only after wanting fewer for
``downscale_delay``.

On a fixed fleet Ray itself would leave an upscaled replica pending until some
other deployment scaled down; when every model wants more than the fleet has,
nothing would move. So that the baseline is the best such a deployment could
do, the wanted counts are apportioned to the fleet (largest remainders, every
model its minimum) when they add up to more than it, and a replica a model
gives up goes straight to the model short of replicas, keeping its old model
loaded until then. A move pays what a replica restart pays: the replica drains
(its queued requests go back to the other replicas, the running one finishes),
unloads, and loads the new model's whole pipeline. The actuator is the elastic
controller's :class:`~dflow.plugins.actuators.RoleSwitcher`, so baseline and
dflow pay the very same switch.

It runs on the scheduler, as a :class:`~distributed.diagnostics.plugin.SchedulerPlugin`,
because its signal (tasks per model queued or running) and its actuator are
there; Ray Serve's autoscaler likewise runs centrally, in the Serve controller.
Delays and periods are in emulated seconds, times ``scale``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from dflow.pools import Pool, task_pool

logger = logging.getLogger(__name__)

#: task states that are ongoing requests (queued somewhere or running)
ONGOING = ("waiting", "no-worker", "queued", "processing")


@dataclass(frozen=True)
class ReplicaMove:
    time: float
    worker: str
    source: str | None
    target: str
    reason: str


def apportion(wanted: dict[str, int], total: int, minimum: int) -> dict[str, int]:
    """Scale ``wanted`` replicas per model down to ``total`` (largest remainders),
    each model keeping ``minimum``; unchanged when it fits."""
    if sum(wanted.values()) <= total or not wanted:
        return dict(wanted)
    floor = {m: min(minimum, wanted[m]) for m in wanted}
    spare = total - sum(floor.values())
    extra = {m: wanted[m] - floor[m] for m in wanted}
    weight = sum(extra.values())
    if spare <= 0 or weight == 0:
        return floor
    shares = {m: spare * extra[m] / weight for m in wanted}
    result = {m: floor[m] + int(shares[m]) for m in wanted}
    left = total - sum(result.values())
    for m in sorted(wanted, key=lambda m: (-(shares[m] - int(shares[m])), m))[:left]:
        result[m] += 1
    return result


class ReplicaAutoscaler(SchedulerPlugin):
    """Ray-Serve-style per-model autoscaling of monolithic replicas on a fixed fleet.

    Parameters
    ----------
    scale
        The emulation's time scale: delays and periods below are emulated
        seconds, multiplied by it.
    target_ongoing
        Ongoing requests per replica the policy aims at (Ray's
        ``target_ongoing_requests``, default 2).
    upscale_delay, downscale_delay
        How long a model must want more (fewer) replicas before it gets (gives
        up) one. Ray's defaults are 30 s and 600 s; the benchmark's scenarios
        pass 30 s and 60 s, which favours the baseline on a shifting mix.
    interval, look_back
        How often the policy samples and decides, and the window its average
        covers (Ray: metrics every 10 s, averaged over 30 s).
    min_replicas
        Replicas every model keeps.
    """

    name = "dflow-bench-autoscaler"

    def __init__(
        self,
        *,
        scale: float = 1.0,
        target_ongoing: float = 2.0,
        upscale_delay: float = 30.0,
        downscale_delay: float = 60.0,
        interval: float = 10.0,
        look_back: float = 30.0,
        min_replicas: int = 1,
    ):
        self.scale = scale
        self.target_ongoing = target_ongoing
        self.upscale_delay = upscale_delay * scale
        self.downscale_delay = downscale_delay * scale
        self.interval = interval * scale
        self.look_back = look_back * scale
        self.min_replicas = min_replicas
        self.scheduler: Any = None
        self.samples: deque[tuple[float, Counter[str]]] = deque()
        self.up_since: dict[str, float] = {}
        self.down_since: dict[str, float] = {}
        self.decisions: list[ReplicaMove] = []
        self._pc: Any = None

    async def start(self, scheduler: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self._pc = PeriodicCallback(self.step, self.interval * 1000)
        self._pc.start()

    async def close(self) -> None:
        if self._pc is not None:
            self._pc.stop()

    @property
    def switcher(self) -> Any:
        return self.scheduler.plugins["dflow-elastic"].actuator

    def replicas(self) -> dict[str, list[str]]:
        """Workers per model: serving it, loading it, or switching to it."""
        extension = self.scheduler.extensions["dflow"]
        switching = self.switcher.switching
        models: dict[str, list[str]] = defaultdict(list)
        for address, record in extension.workers.items():
            pool = switching.get(address, record.pool)
            if pool is not None and pool[0] == "all" and record.state != "failed":
                models[pool[1]].append(address)
        return models

    def ongoing(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for ts in self.scheduler.tasks.values():
            pool = task_pool(ts.annotations)
            if pool is not None and pool[0] == "all" and ts.state in ONGOING:
                counts[pool[1]] += 1
        return counts

    def wanted(self, now: float) -> dict[str, int]:
        """Replicas each model wants, apportioned to the fleet."""
        replicas = self.replicas()
        models = set(replicas) | {m for _, c in self.samples for m in c}
        average = {
            m: sum(c[m] for _, c in self.samples) / max(1, len(self.samples))
            for m in models
        }
        wanted = {
            m: max(self.min_replicas, math.ceil(average[m] / self.target_ongoing))
            for m in models
        }
        total = sum(len(v) for v in replicas.values())
        return apportion(wanted, total, self.min_replicas)

    def step(self) -> None:
        now = time.time()
        self.samples.append((now, self.ongoing()))
        while self.samples and self.samples[0][0] < now - self.look_back:
            self.samples.popleft()
        wanted = self.wanted(now)
        replicas = self.replicas()
        short, spare = {}, {}
        for model, want in wanted.items():
            have = len(replicas.get(model, []))
            if want > have:
                self.up_since.setdefault(model, now)
                self.down_since.pop(model, None)
                if now - self.up_since[model] >= self.upscale_delay:
                    short[model] = want - have
            elif want < have:
                self.down_since.setdefault(model, now)
                self.up_since.pop(model, None)
                if now - self.down_since[model] >= self.downscale_delay:
                    spare[model] = have - want
            else:
                self.up_since.pop(model, None)
                self.down_since.pop(model, None)
        if not short or not spare:
            return
        extension = self.scheduler.extensions["dflow"]
        for target in sorted(short, key=lambda m: -short[m]):
            while short[target] and spare:
                source = max(spare, key=lambda m: spare[m])
                worker = self.pick(replicas[source])
                if worker is None:
                    spare.pop(source)
                    continue
                replicas[source].remove(worker)
                spare[source] -= 1
                if not spare[source]:
                    spare.pop(source)
                short[target] -= 1
                reason = f"{target} wants {wanted[target]}, {source} {wanted[source]}"
                record = extension.workers.get(worker)
                self.decisions.append(
                    ReplicaMove(
                        now, record.name if record else worker, source, target, reason
                    )
                )
                logger.info(
                    "Moving replica %s from %s to %s: %s",
                    worker,
                    source,
                    target,
                    reason,
                )
                self.switcher.start(worker, Pool("all", target))
            self.up_since.pop(target, None)
        for model in list(self.down_since):
            if model not in spare:
                self.down_since.pop(model, None)

    def pick(self, workers: list[str]) -> str | None:
        """The replica to give up: not already switching, the least busy first."""
        switching = self.switcher.switching
        ready = [
            w for w in workers if w not in switching and w in self.scheduler.workers
        ]
        if not ready:
            return None
        return min(ready, key=lambda w: (len(self.scheduler.workers[w].processing), w))
