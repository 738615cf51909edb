"""Pools: a pool is a stage of a model, served by workers that advertise it as
a Dask resource."""

from __future__ import annotations


def pool_resource(stage: str, model: str) -> str:
    """The resource a stage task of ``model`` requires (a pool is a stage of a model)."""
    return f"{stage}:{model}"
