"""Model families: each splits its diffusers pipeline into encode, denoise and decode."""

from __future__ import annotations

from dflow.adapters.base import Adapter
from dflow.adapters.flux import FluxAdapter
from dflow.adapters.pixart import PixArtAdapter
from dflow.adapters.wan import WanAdapter

ADAPTERS: tuple[type[Adapter], ...] = (FluxAdapter, PixArtAdapter, WanAdapter)


def adapter_for(pipeline: str) -> type[Adapter]:
    """The adapter of a diffusers pipeline class name (``model_index.json``'s ``_class_name``)."""
    for adapter in ADAPTERS:
        if pipeline in adapter.pipelines:
            return adapter
    supported = sorted(p for a in ADAPTERS for p in a.pipelines)
    raise ValueError(
        f"model: pipeline {pipeline!r} is not supported; dflow serves {', '.join(supported)}"
    )


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
