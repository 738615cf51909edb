"""Pools: a pool is a stage of a model, the unit dflow places, prices and sizes.

A :class:`Pool` has one string form, ``"stage:model"``, which is also the Dask
resource a stage task of the model requires and a worker serving the pool
advertises. The chain of a disaggregated request runs :data:`STAGES` in order;
a monolithic request runs the whole pipeline as one task of stage
:data:`MONOLITHIC`. A model whose denoising two experts share (Wan 2.2) may
also split its DiT into one pool per expert (:data:`EXPERT_STAGES`): its chain
is then :data:`EXPERT_CHAIN`. Pure: no torch, no distributed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

#: Stages of a disaggregated request, in order
STAGES = ("encoder", "dit", "vae")
#: The stage of a worker that runs the whole pipeline (monolithic)
MONOLITHIC = "all"
#: The DiT stage of each expert of a two-expert model: the high-noise expert
#: runs the steps before the boundary, the low-noise expert the rest
EXPERT_STAGES = {"high": "dit-high", "low": "dit-low"}
#: The chain of a request whose experts run in their own pools
EXPERT_CHAIN = ("encoder", EXPERT_STAGES["high"], EXPERT_STAGES["low"], "vae")
#: Every stage a worker can serve
WORKER_STAGES = (*STAGES, *EXPERT_STAGES.values(), MONOLITHIC)
#: Task key prefix of each stage's task (``"denoise-<request id>"``)
TASK_PREFIXES = {
    "encoder": "encode",
    "dit": "denoise",
    "dit-high": "denoise_high",
    "dit-low": "denoise_low",
    "vae": "decode",
    "all": "generate",
}
#: The scheduler's event topic of admission epochs: ``{"scheduler": id, "epoch": n}``
#: whenever the pools change, so what admission answered before may no longer hold
ADMISSION_TOPIC = "dflow-admission"
#: Key prefixes of a request's final task: the end of the chain, or the one
#: monolithic task
FINAL_PREFIXES = (f"{TASK_PREFIXES['vae']}-", f"{TASK_PREFIXES['all']}-")


class Pool(NamedTuple):
    """A stage of a model: ``Pool("dit", "tiny-flux")``, written ``"dit:tiny-flux"``.

    A named tuple, so it unpacks as ``stage, model``, orders by stage then model
    and travels in scheduler messages as a two-item list.
    """

    stage: str
    model: str

    def __str__(self) -> str:
        return self.resource

    @property
    def resource(self) -> str:
        """The Dask resource a stage task of the pool requires: ``"stage:model"``."""
        return f"{self.stage}:{self.model}"

    @classmethod
    def parse(cls, text: str) -> Pool:
        """The pool written ``"stage:model"``; ``ValueError`` for anything else."""
        stage, sep, model = text.partition(":")
        if not sep or stage not in WORKER_STAGES or not model:
            raise ValueError(
                f"a pool is written 'stage:model' with stage one of "
                f"{', '.join(WORKER_STAGES)}, got {text!r}"
            )
        return cls(stage, model)


def base_stage(stage: str) -> str:
    """The stage a pool's workers run: ``"dit"`` for an expert's pool, else
    ``stage`` itself."""
    return "dit" if stage in EXPERT_STAGES.values() else stage


def expert_of(stage: str) -> str | None:
    """The expert (``"high"`` or ``"low"``) an expert's stage runs; ``None``
    for every other stage."""
    for expert, name in EXPERT_STAGES.items():
        if name == stage:
            return expert
    return None


def stage_resources(pool: Pool, slots: int) -> dict[str, float]:
    """The Dask resources a worker serving ``pool`` with ``slots`` concurrent
    tasks advertises: the stage's and the pool's."""
    return {pool.stage: slots, pool.resource: slots}


def task_resources(pool: Pool) -> dict[str, float]:
    """The Dask resources one stage task of ``pool`` requires."""
    return stage_resources(pool, 1)


def task_pool(annotations: Mapping[str, Any] | None) -> Pool | None:
    """The pool of a stage task, from its annotations (``None``: not dflow's)."""
    info = (annotations or {}).get("dflow")
    if not info:
        return None
    return Pool(info["stage"], info["model"])


def task_features(annotations: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request features a stage task was annotated with."""
    return dict(((annotations or {}).get("dflow") or {}).get("features", {}))


#: The features requests of one model must share to take denoising steps
#: together (their latent and embedding shapes and guidance mode follow from
#: them); each keeps its own step count, seed and guidance scale
BATCH_FEATURES = ("height", "width", "frames", "cfg", "image")


def batch_key(features: Mapping[str, Any]) -> tuple:
    """What requests of one pool must share to be batched in one denoising
    step, from their features (as annotated on their tasks)."""
    return tuple(features.get(name) for name in BATCH_FEATURES)
