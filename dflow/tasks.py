"""The functions stage tasks run on workers.

Each finds the resident runtime of its worker (its stage plugin's; else the
process's, by model and stage). A task that lands on a worker which no longer
serves its stage (it was switched to another stage after the task was placed)
raises :class:`distributed.Reschedule`, so the scheduler places it again instead
of failing the request.

The client imports this module to name the task functions, so the runtime (and
torch) is imported only where a task runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distributed import Reschedule, get_worker
from distributed.worker import thread_state

from dflow import events, prompts
from dflow.images import InputImage
from dflow.output import Output
from dflow.pools import EXPERT_STAGES, TASK_PREFIXES
from dflow.request import Request

if TYPE_CHECKING:
    from dflow.runtime import StageRuntime


def _runtime(request: Request, stage: str) -> StageRuntime:
    """The runtime of the worker running this task: its stage plugin's, so that
    several workers in one process (in-process emulated fleets) each run their
    own; the process's registry for workers without one."""
    from dflow import runtime as runtimes

    plugin = get_worker().plugins.get("dflow-stage")
    if plugin is not None:
        runtime: StageRuntime | None = getattr(plugin, "runtime", None)
        if (
            runtime is None
            or runtime.model != request.model
            or not runtime.serves(stage)
        ):
            raise Reschedule()
        return runtime
    try:
        return runtimes.lookup(request.model, stage)
    except LookupError:
        raise Reschedule() from None


def _unwanted() -> Callable[[], bool]:
    """A check whether the scheduler no longer wants the task running in this
    thread, which any thread may call (a batched denoising step polls every
    request of the batch from one task's thread)."""
    key = getattr(thread_state, "key", None)
    if key is None:
        return lambda: False
    worker = get_worker()

    def unwanted() -> bool:
        task = worker.state.tasks.get(key)
        return task is None or task.state != "executing"

    return unwanted


def _progress(request: Request, stage: str = "dit") -> Callable[[int], None]:
    """The ``on_step`` of a denoising loop: reports each step as a progress
    event (:mod:`dflow.events`). The low-noise expert's steps follow the
    high-noise expert's in the request's count."""
    done = request.features["high_steps"] if stage == EXPERT_STAGES["low"] else 0
    report = events.step_reporter(request.steps or 0, done=done)
    return lambda step: report()


def _validated(request: Request) -> Request:
    """``request``, validated again where the model is: a client with stale
    specs checks against old limits. Raises
    :class:`~dflow.errors.InvalidRequest`.

    The encoder checks only the prompts' token counts (a client without the
    model's tokenizer cannot): requests with equal prompts share one encode task
    (:func:`dflow.client.encoding_key`), which the other fields of one of them
    must not fail. The DiT and the monolithic stage check every field."""
    return request.replace()


def _report(timings: dict[str, float], call: str) -> None:
    """Note on this task what its stage call cost, for the scheduler's
    telemetry: the seconds of the call and how many requests shared it. The
    task's own duration also counts the wait for a batch to run."""
    key = getattr(thread_state, "key", None)
    task = get_worker().state.tasks.get(key) if key is not None else None
    if task is not None:
        task.metadata["dflow"] = {
            "seconds": timings[call],
            # a denoising call's batch changes as requests join and leave: its
            # mean, weighted so that seconds / batch is this request's share
            "batch": float(timings.get(f"{call}_batch", 1)),
            # reused from the encoder's cache: no call ran
            "cached": bool(timings.get(f"{call}_cached")),
        }


def encode(request: Request, image: InputImage | None = None) -> dict[str, Any]:
    """The encoder stage; ``image``: the pixels of the request's input image,
    which only this task receives (the request carries a reference)."""
    if image is not None:
        request = request.with_pixels(image)
    prompts.check_length(request)
    embeddings = _runtime(request, "encoder").encode(request)
    _report(embeddings["timings"], "encode")
    return embeddings


def _denoise(stage: str, request: Request, inputs: dict[str, Any]) -> dict[str, Any]:
    from dflow.runtime import Drained

    try:
        output = _runtime(request, stage).denoise(
            _validated(request),
            inputs,
            should_stop=_unwanted(),
            on_step=_progress(request, stage),
        )
    except Drained:
        raise Reschedule() from None
    _report(output["timings"], TASK_PREFIXES[stage])
    return output


def denoise(request: Request, embeddings: dict[str, Any]) -> dict[str, Any]:
    return _denoise("dit", request, embeddings)


def denoise_high(request: Request, embeddings: dict[str, Any]) -> dict[str, Any]:
    """The high-noise expert's steps; passes the embeddings on with them."""
    return _denoise(EXPERT_STAGES["high"], request, embeddings)


def denoise_low(request: Request, denoising: dict[str, Any]) -> dict[str, Any]:
    """The low-noise expert's steps, from where the high-noise expert stopped."""
    return _denoise(EXPERT_STAGES["low"], request, denoising)


def decode(request: Request, latents: dict[str, Any]) -> Output:
    output = _runtime(request, "vae").decode(request, latents)
    _report(output.timings, "decode")
    return output


def generate(request: Request) -> Output:
    from dflow.runtime import Drained

    prompts.check_length(request)
    try:
        output = _runtime(request, "all").generate(
            _validated(request), should_stop=_unwanted(), on_step=_progress(request)
        )
    except Drained:
        raise Reschedule() from None
    _report(output.timings, "generate")
    return output
