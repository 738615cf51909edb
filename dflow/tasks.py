"""The functions stage tasks run on workers.

Each finds the resident runtime of its worker (its stage plugin's; else the
process's, by model and stage). A task that lands on a worker which no longer
serves its stage (it was switched to another stage after the task was placed)
raises :class:`distributed.Reschedule`, so the scheduler places it again instead
of failing the request.
"""

from __future__ import annotations

from typing import Any

from distributed import Reschedule, get_worker
from distributed.worker import thread_state

from dflow import runtime as runtimes
from dflow.output import Output
from dflow.request import Request


def _runtime(request: Request, stage: str) -> runtimes.StageRuntime:
    """The runtime of the worker running this task: its stage plugin's, so that
    several workers in one process (in-process emulated fleets) each run their
    own; the process's registry for workers without one."""
    plugin = get_worker().plugins.get("dflow-stage")
    if plugin is not None:
        runtime: runtimes.StageRuntime | None = getattr(plugin, "runtime", None)
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


def _still_wanted() -> bool:
    """Whether the scheduler still wants the task running in this thread."""
    key = getattr(thread_state, "key", None)
    if key is None:
        return True
    task = get_worker().state.tasks.get(key)
    return task is not None and task.state == "executing"


def encode(request: Request) -> dict[str, Any]:
    return _runtime(request, "encoder").encode(request)


def denoise(request: Request, embeddings: dict[str, Any]) -> dict[str, Any]:
    return _runtime(request, "dit").denoise(
        request, embeddings, should_stop=lambda: not _still_wanted()
    )


def decode(request: Request, latents: dict[str, Any]) -> Output:
    return _runtime(request, "vae").decode(request, latents)


def generate(request: Request) -> Output:
    return _runtime(request, "all").generate(
        request, should_stop=lambda: not _still_wanted()
    )
