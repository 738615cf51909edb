"""Model families: what dflow knows about each without its weights.

One module per family (like diffusers' ``pipeline_flux.py`` owns Flux's shape
rules): its pipeline classes, which component each stage holds, how its configs
become a :class:`~dflow.spec.ModelSpec`, defaults and limits, the shape rules a
request must follow, and the shapes, dtypes and bytes of its embeddings and
latents. Torch-free, so clients and the scheduler read them cheaply. Adding a
family is a module here plus its adapter in :mod:`dflow.adapters`.
"""

from __future__ import annotations

from dflow.families import flux, pixart, wan
from dflow.families.base import Family, TensorSpec, priced_as
from dflow.spec import ModelSpec

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (flux.FAMILY, pixart.FAMILY, wan.FAMILY, wan.IMAGE_TO_VIDEO)
}


def family(name: str) -> Family:
    """The family named ``name`` (``ModelSpec.family``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r}; dflow knows {', '.join(FAMILIES)}"
        ) from None


def of(spec: ModelSpec) -> Family:
    """The family of a model."""
    return family(spec.family)


def for_pipeline(pipeline: str) -> Family:
    """The family of a diffusers pipeline class name (``model_index.json``'s
    ``_class_name``); a ``ValueError`` naming ``model`` for one dflow does not serve."""
    for candidate in FAMILIES.values():
        if pipeline in candidate.pipelines:
            return candidate
    supported = sorted(p for f in FAMILIES.values() for p in f.pipelines)
    raise ValueError(
        f"model: pipeline {pipeline!r} is not supported; dflow serves "
        f"{', '.join(supported)}"
    )


__all__ = [
    "FAMILIES",
    "Family",
    "TensorSpec",
    "family",
    "for_pipeline",
    "of",
    "priced_as",
]
