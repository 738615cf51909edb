"""Admission: which requests enter, through which chain of stages, and on which
workers their stages may run.

``dflow.submit`` asks the scheduler's ``dflow_admit`` handler before it sends a
graph. A request runs through one of its family's chains of stages that the
cluster serves: a two-expert model's DiT is one pool of both-expert workers or
one pool per expert (:func:`_chain` picks). :class:`Admission` waits for workers of every model (else
:class:`~dflow.errors.ModelNotServed`), routes each stage to the workers with
the memory for the request's predicted peak (:class:`MemoryRouting`; else
:class:`~dflow.errors.InvalidRequest` naming the field to shrink), and holds
each model under ``dflow.admission.max-outstanding`` requests in flight (else
:class:`~dflow.errors.Overloaded`).

An answer that only the pools could change (no limit applies to the model, no
stage is restricted to some workers, the predictor is in place) is *standing*:
the client reuses it for requests of the same model and features without asking
again, until the pools change (:meth:`DflowExtension.new_epoch
<dflow.plugins.extension.DflowExtension.new_epoch>` publishes the new epoch to
the clients that asked). The scheduler polices what arrives from an older epoch:
its stages are routed again when the graph arrives, and a request no worker can
hold any more fails with the reason (:mod:`dflow.plugins.policing`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from typing import Any

import dask.config
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

import dflow.config  # noqa: F401
from dflow import families
from dflow.errors import InvalidRequest, ModelNotServed, Overloaded
from dflow.plugins.extension import DflowExtension
from dflow.plugins.predictions import Predictions
from dflow.pools import (
    ADMISSION_TOPIC,
    MONOLITHIC,
    STAGES,
    Pool,
    base_stage,
    expert_of,
)
from dflow.spec import ModelSpec

GIB = 2**30
#: The worker restriction of a task no worker can hold: no worker has this
#: address, so the task waits for a worker and task policing fails it with the
#: reason (:meth:`~dflow.plugins.policing.TaskPolicing.repin`)
NO_WORKER = "dflow-no-worker-can-hold"


class MemoryRouting:
    """The workers of a pool with the memory a request needs."""

    def __init__(self, extension: DflowExtension, predictions: Predictions):
        self.extension = extension
        self.predictions = predictions
        #: answers of :meth:`capable` in the epoch and with the predictor they
        #: were computed in: requests of one shape ask the same question
        self._answers: dict[tuple, list[str] | None] = {}
        self._answered_in: tuple[int, Any] = (-1, None)

    @property
    def exact(self) -> bool:
        """Whether routing has predictions to go by (the predictor is in place)."""
        return self.predictions.predictor is not None

    def capable(self, pool: Pool, features: dict[str, Any]) -> list[str] | None:
        """Addresses of the workers of ``pool`` with memory for a request of
        ``features`` at its predicted peak (``None``: all of them, or no
        prediction to go by). Raises :class:`~dflow.errors.InvalidRequest` when
        no worker of the pool has enough."""
        now = (self.extension.epoch, self.predictions.predictor)
        if self._answered_in[0] != now[0] or self._answered_in[1] is not now[1]:
            self._answers.clear()
            self._answered_in = now
        question = (pool, tuple(sorted(features.items())))
        if question not in self._answers:
            self._answers[question] = self._capable(pool, features)
        return self._answers[question]

    def _capable(self, pool: Pool, features: dict[str, Any]) -> list[str] | None:
        members = self.extension.members(pool)
        # one prediction per GPU type: a fleet has a few types and many workers
        try:
            peaks = {
                gpu_type: self.predictions.peak_bytes(pool, gpu_type, features)
                for gpu_type in {r.gpu_type for r in members}
            }
        except LookupError:
            return None
        capable, needs = [], []
        for record in members:
            peak = peaks[record.gpu_type]
            if peak is None or peak <= record.memory:
                capable.append(record.address)
            else:
                needs.append((peak, record.memory))
        if not needs:
            return None
        if not capable:
            peak, largest = max(needs)
            size = f"{features.get('height')}x{features.get('width')}"
            # a video's frames weigh as much as its pixels: name what can shrink
            field, advice = "height", "use a smaller size"
            if features.get("frames", 1) > 1:
                size += f"x{features['frames']} frames"
                field, advice = "num_frames", "use fewer frames or a smaller size"
            raise InvalidRequest(
                field,
                f"the {pool.stage} stage of {pool.model} needs {peak / GIB:.1f} GiB "
                f"at {size}; its largest worker has {largest / GIB:.1f} GiB: {advice}",
            )
        return capable


class Admission(SchedulerPlugin):
    """The ``dflow_admit`` handler: requests in, or a refusal with its reason."""

    name = "dflow-admission"

    def __init__(self, extension: DflowExtension, routing: MemoryRouting):
        self.extension = extension
        self.routing = routing
        self.scheduler: Scheduler | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers["dflow_admit"] = self.admit

    async def admit(
        self, client_id: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Handler of :meth:`admit_requests`: refusals come back as data, so the
        client raises them and the scheduler's log stays quiet. The client
        (``client_id``) is subscribed to the admission epochs, so that it hears when its
        standing answers lapse; the answer names the epoch it holds in."""
        assert self.scheduler is not None
        if client_id is not None:
            self.scheduler.subscribe_topic(ADMISSION_TOPIC, client_id)
        try:
            admitted = await self.admit_requests(**kwargs)
        except (InvalidRequest, ModelNotServed, Overloaded) as error:
            return {
                "error": type(error).__name__,
                "field": getattr(error, "field", None),
                "message": str(error),
            }
        # standing answers were routed after the last await (they reserve
        # nothing): the epoch is still theirs
        return {
            "admitted": admitted,
            "epoch": self.extension.epoch,
            "scheduler": self.scheduler.id,
        }

    def update_graph(
        self, scheduler: Scheduler, *, annotations: dict | None = None, **kwargs: Any
    ) -> None:
        """Police the stage tasks of requests admitted in an older epoch (a
        standing answer the pools changed under): route them again, as admission
        would now. A request that reused a standing answer for a model that has
        since been given a limit starts a new epoch, so clients ask again."""
        epoch = self.extension.epoch
        limit = dask.config.get("dflow.admission.max-outstanding")
        lapsed = False
        for key, info in ((annotations or {}).get("dflow") or {}).items():
            if info.get("epoch", epoch) == epoch:
                continue
            ts = scheduler.tasks.get(key)
            if ts is None or ts.state != "released":
                continue  # placed already (a shared encoding)
            pool = Pool(info["stage"], info["model"])
            try:
                capable = self.routing.capable(pool, info.get("features", {}))
            except InvalidRequest:
                capable = [NO_WORKER]
            ts.worker_restrictions = set(capable) if capable else None
            standing = info.get("standing", False)
            lapsed |= standing and not _unlimited(limit, pool.model)
        if lapsed:
            self.extension.new_epoch()

    async def admit_requests(
        self,
        requests: list[dict[str, Any]],
        mode: str | None = None,
        model_timeout: float = 0.0,
        admission_timeout: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Admit requests before their graph is sent.

        Waits up to ``model_timeout`` for workers of every model, restricts
        stages to the workers that can hold them and waits up to
        ``admission_timeout`` for room under ``dflow.admission.max-outstanding``.

        Returns, per request: its mode, per stage of its chain in order the
        workers it must run on (``None``: any worker of the pool), and whether
        the answer is standing (only the pools can change it: the client may
        reuse it).
        """
        deadline = time.monotonic() + model_timeout
        models = {r["model"] for r in requests}
        while True:
            pools = self.extension.pools()
            chains = {m: self.chains(m) for m in models}
            missing = sorted(
                m for m in models if not _serves(pools.get(m, {}), chains[m], mode)
            )
            if not missing:
                break
            if time.monotonic() >= deadline:
                raise ModelNotServed(self.not_served(missing[0], pools, mode))
            await asyncio.sleep(0.1)
        limit = dask.config.get("dflow.admission.max-outstanding")
        admitted = []
        for request in requests:
            model = request["model"]
            served = pools[model]
            request_mode = mode or _mode(served, chains[model])
            if request_mode == "disaggregated":
                stages = _chain(served, chains[model], request["features"])
            else:
                stages = (MONOLITHIC,)
            workers = {
                stage: self.routing.capable(Pool(stage, model), request["features"])
                for stage in stages
            }
            standing = (
                _unlimited(limit, model)
                and self.routing.exact
                and all(w is None for w in workers.values())
            )
            admitted.append(
                {"mode": request_mode, "workers": workers, "standing": standing}
            )
        await self._reserve(Counter(r["model"] for r in requests), admission_timeout)
        return admitted

    def not_served(
        self, model: str, pools: dict[str, dict[str, Any]], mode: str | None
    ) -> str:
        """Why ``model`` is not served: the stages with workers and those
        without (and why their last worker failed, if one did), and the
        ``dflow-worker`` commands that would serve it."""
        scheduler = self.extension.scheduler
        address = getattr(scheduler, "address", None) or "SCHEDULER"
        stages = pools.get(model, {})
        if mode == "monolithic":
            needed: tuple[str, ...] = (MONOLITHIC,)
        else:
            needed = STAGES
        have = [s for s in (*STAGES, MONOLITHIC) if s in stages]
        lacking = [s for s in needed if s not in stages]
        if have:
            text = (
                f"model {model!r} has workers for stage {', '.join(have)} but none "
                f"for {', '.join(lacking)}"
            )
        else:
            others = ", ".join(sorted(pools)) or "none"
            text = f"no worker serves model {model!r} (the cluster serves: {others})"
        if mode:
            text += f" ({mode} mode was asked for)"
        failed = {r.stage: r.error for r in self.extension.failures if r.model == model}
        reasons = [failed[s] for s in lacking if failed.get(s)]
        if reasons:
            text += "; the last worker that tried " + "; ".join(reasons)
        commands = " and ".join(
            f"`dflow-worker {address} --stage {s} --model {model}`" for s in lacking
        )
        text += f". Start {commands}"
        if mode is None:
            text += (
                f", or serve it whole with `dflow-worker {address} --stage all "
                f"--model {model}`"
            )
        return text

    def chains(self, model: str) -> tuple[tuple[str, ...], ...]:
        """The chains of stages a request of ``model`` may run through (its
        family's, from the spec its workers published; else the three stages)."""
        data = self.extension.specs.get(model)
        if data is None:
            return (STAGES,)
        spec = ModelSpec.from_dict(data)
        return families.of(spec).chains(spec)

    async def _reserve(self, counts: Counter[str], timeout: float) -> None:
        limit = dask.config.get("dflow.admission.max-outstanding")
        # slots of limited models only: a standing answer's graph frees none
        counts = Counter({m: n for m, n in counts.items() if not _unlimited(limit, m)})
        if not counts:
            return
        reserved = self.extension.reserved
        deadline = time.monotonic() + timeout
        while True:
            pending = Counter(r.model for r in self.extension.in_flight())
            over = [
                m
                for m, n in counts.items()
                if pending[m] + reserved[m] + n > _limit(limit, m)
            ]
            if not over:
                break
            if time.monotonic() >= deadline:
                model = over[0]
                raise Overloaded(
                    f"model {model!r} has {pending[model] + reserved[model]} "
                    f"requests in flight and {counts[model]} more were submitted; the "
                    f"limit is {_limit(limit, model)} (dflow.admission.max-outstanding): "
                    "retry later"
                )
            await asyncio.sleep(0.05)
        self.extension.reserve(counts)


def _served_chains(
    stages: dict[str, Any], chains: tuple[tuple[str, ...], ...]
) -> list[tuple[str, ...]]:
    return [chain for chain in chains if all(stage in stages for stage in chain)]


def _mode(stages: dict[str, Any], chains: tuple[tuple[str, ...], ...]) -> str:
    return "disaggregated" if _served_chains(stages, chains) else "monolithic"


def _serves(
    stages: dict[str, Any], chains: tuple[tuple[str, ...], ...], mode: str | None
) -> bool:
    if mode in (None, "disaggregated") and _served_chains(stages, chains):
        return True
    return mode in (None, "monolithic") and MONOLITHIC in stages


def _chain(
    stages: dict[str, dict[str, int]],
    chains: tuple[tuple[str, ...], ...],
    features: dict[str, Any],
) -> tuple[str, ...]:
    """The served chain whose DiT workers denoise the most requests at once:
    a DiT pool's workers over the share of the request's steps it runs (an
    expert's pool runs its expert's steps); the first chain on a tie."""

    def capacity(chain: tuple[str, ...]) -> float:
        shares = []
        for stage in chain:
            if base_stage(stage) != "dit":
                continue
            expert = expert_of(stage)
            steps = features.get(f"{expert}_steps") if expert else None
            share = steps / features["steps"] if steps is not None else 1.0
            workers = stages[stage]["ready"] + stages[stage]["loading"]
            shares.append(workers / share if share else math.inf)
        return min(shares, default=math.inf)

    return max(_served_chains(stages, chains), key=capacity)


def _unlimited(limit: int | dict[str, int] | None, model: str) -> bool:
    """Whether no ``dflow.admission.max-outstanding`` applies to ``model``."""
    if isinstance(limit, dict):
        return model not in limit and "default" not in limit
    return limit is None


def _limit(limit: int | dict[str, int], model: str) -> int:
    if isinstance(limit, dict):
        return limit.get(model, limit.get("default", 2**62))
    return int(limit)
