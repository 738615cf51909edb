"""Options of dflow's stage worker processes, in one place.

The ``dflow-worker`` command (:func:`nanny_specs`) and
:class:`~dflow.cluster.StageCluster` both build their workers with
:func:`stage_worker_options`: the stage plugin, the task slots, the process's
environment (:func:`worker_environment`: its GPU first in
``CUDA_VISIBLE_DEVICES``) and its name. Settings every dflow worker process
needs belong here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from dflow.worker import StagePlugin, stage_slots


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` or all devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def cuda_visible_devices(gpus: Sequence[str], index: int) -> str:
    """The GPU list rotated so that GPU ``index`` comes first (as dask-cuda does)."""
    return ",".join([*gpus[index:], *gpus[:index]])


def worker_environment(gpus: Sequence[str], index: int | None) -> dict[str, str]:
    """Environment variables of a stage worker process pinned to GPU ``index`` of
    ``gpus`` (``None``: a CPU worker). A variable every dflow worker needs (an
    allocator's settings, say) is set here, for the CLI and StageCluster alike."""
    if index is None:
        return {}
    return {"CUDA_VISIBLE_DEVICES": cuda_visible_devices(gpus, index)}


def worker_name(gpu: str | None, suffix: int | None = None) -> str:
    """A worker's name: its host and GPU (``cpu`` without one), then ``suffix``
    if given. Never its stage: a role switch changes that (the dashboard and
    ``dflow.status`` show it)."""
    name = f"{socket.gethostname()}-{'cpu' if gpu is None else f'gpu{gpu}'}"
    return name if suffix is None else f"{name}-{suffix}"


def stage_worker_options(
    stage: str,
    model: str,
    *,
    name: str,
    gpu_type: str = "auto",
    gpus: Sequence[str] = (),
    index: int | None = None,
    nthreads: int | None = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of the :class:`~distributed.Nanny` of one worker of
    ``stage`` of ``model``, pinned to GPU ``index`` of ``gpus`` (``None``: none),
    its DiT weights quantized as ``quantize`` says (:mod:`dflow.quantization`)."""
    return {
        "name": name,
        "nthreads": nthreads or stage_slots(stage),
        "env": worker_environment(gpus, index),
        "plugins": {StagePlugin(stage, model, gpu_type, quantize=quantize)},
    }


def nanny_specs(
    stage: str,
    model: str,
    gpus: list[str] | None,
    gpu_type: str = "auto",
    name: str | None = None,
    nthreads: int | None = None,
    resources: dict[str, float] | None = None,
    quantize: str | None = None,
) -> list[dict[str, Any]]:
    """Keyword arguments of the Nannies of one ``dflow-worker`` process: one per
    GPU in ``gpus`` (``None``: every visible GPU), or a single CPU worker."""
    if gpus is None:
        gpus = visible_gpus()
    placements: list[str | None] = list(gpus) or [None]
    specs = []
    for i, gpu in enumerate(placements):
        if name:
            label = name if len(placements) == 1 else f"{name}-{i}"
        else:
            # CPU workers of several dflow-worker processes share the host
            label = worker_name(gpu, os.getpid() if gpu is None else None)
        options = stage_worker_options(
            stage,
            model,
            name=label,
            gpu_type=gpu_type,
            gpus=gpus,
            index=None if gpu is None else i,
            nthreads=nthreads,
            quantize=quantize,
        )
        specs.append({**options, "resources": resources})
    return specs
