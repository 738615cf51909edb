"""The benchmark's scheduler plugin: records what the metrics need during a run."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin


class Recorder(SchedulerPlugin):
    """Records what the metrics need, cheaply: each stage task's compute span
    and worker, each request's completion, and pool sizes every ``interval``."""

    name = "dflow-bench-recorder"

    def __init__(self, interval: float):
        self.interval = interval
        self.scheduler: Any = None
        #: (stage, model, worker, start, stop) of finished stage tasks
        self.tasks: list[tuple[str, str, str, float, float]] = []
        #: final key -> (time, "memory" | "erred")
        self.finals: dict[str, tuple[float, str]] = {}
        #: (time, {pool label: workers ready or loading}, {stage: queued tasks})
        self.samples: list[tuple[float, dict[str, int], dict[str, int]]] = []
        #: pools that have finished a task
        self.served: set[tuple[str, str]] = set()
        #: (time, utilization per pool, reason) of the elastic controller's
        #: plans, one per plan (sampled: a plan made between samples is kept)
        self.plans: list[tuple[float, dict[str, float], str]] = []
        #: (time, action, worker name, pool) of workers' pool changes
        self.events: list[tuple[float, str, str, str | None]] = []
        self._pc: Any = None

    async def start(self, scheduler: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self._pc = PeriodicCallback(self.sample, self.interval * 1000)
        self._pc.start()

    async def close(self) -> None:
        if self._pc is not None:
            self._pc.stop()

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == "dflow" and str(msg.get("action", "")).startswith("worker-"):
            self.events.append(
                (time.time(), msg["action"], msg.get("worker", ""), msg.get("pool"))
            )

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        if start != "processing" or finish not in ("memory", "erred"):
            return
        ts = self.scheduler.tasks.get(key)
        info = (ts.annotations or {}).get("dflow") if ts is not None else None
        if not info:
            return
        now = time.time()
        if finish == "memory":
            self.served.add((info["stage"], info["model"]))
            for startstop in kwargs.get("startstops", ()):
                if startstop["action"] == "compute":
                    self.tasks.append(
                        (
                            info["stage"],
                            info["model"],
                            kwargs.get("worker", ""),
                            startstop["start"],
                            startstop["stop"],
                        )
                    )
        if str(key).startswith(("decode-", "generate-")):
            self.finals[str(key)] = (now, finish)

    def sample(self) -> None:
        extension = self.scheduler.extensions.get("dflow")
        if extension is None:
            return
        pools: dict[str, int] = defaultdict(int)
        for record in extension.workers.values():
            if record.state in ("ready", "loading", "draining") and record.pool:
                pools["/".join(record.pool)] += 1
        queue: dict[str, int] = defaultdict(int)
        for ts in self.scheduler.unrunnable:
            info = (ts.annotations or {}).get("dflow")
            if info:
                queue[info["stage"]] += 1
        for ws in self.scheduler.workers.values():
            for ts in ws.processing:
                info = (ts.annotations or {}).get("dflow")
                if info:
                    queue[info["stage"]] += 1
        self.samples.append((time.time(), dict(pools), dict(queue)))
        controller = self.scheduler.plugins.get("dflow-elastic")
        last = getattr(controller, "last_plan", None) or {}
        if last.get("time") and (not self.plans or self.plans[-1][0] != last["time"]):
            self.plans.append(
                (last["time"], dict(last.get("utilization", {})), last["reason"])
            )
