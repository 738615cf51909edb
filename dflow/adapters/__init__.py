"""Adapters: each runs its model family's diffusers pipeline as encode, denoise
and decode (what the family is lives in :mod:`dflow.families`)."""

from __future__ import annotations

from dflow.adapters.base import Adapter
from dflow.adapters.flux import FluxAdapter
from dflow.adapters.pixart import PixArtAdapter
from dflow.adapters.wan import WanAdapter
from dflow.families import flux, pixart, wan
from dflow.spec import ModelSpec

#: The adapter of each family, by family name
ADAPTERS: dict[str, type[Adapter]] = {
    flux.FAMILY.name: FluxAdapter,
    pixart.FAMILY.name: PixArtAdapter,
    wan.FAMILY.name: WanAdapter,
    wan.IMAGE_TO_VIDEO.name: WanAdapter,
}


def adapter_for(spec: ModelSpec) -> type[Adapter]:
    """The adapter that runs ``spec``'s family."""
    return ADAPTERS[spec.family]


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
