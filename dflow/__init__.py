"""dflow: disaggregated serving of diffusion models on Dask.

Public names are imported lazily: Dask imports ``dflow.protocol`` through its
``dask.sizeof`` entry point while Dask itself is still importing.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Request": "dflow.request",
    "InvalidRequest": "dflow.errors",
    "ModelNotServed": "dflow.errors",
    "Overloaded": "dflow.errors",
    "StageOutOfMemory": "dflow.errors",
    "StageLoadError": "dflow.errors",
    "Cancelled": "dflow.errors",
    "StageHung": "dflow.errors",
    "ModelSpec": "dflow.spec",
    "Output": "dflow.output",
    "generate": "dflow.runtime",
    "submit": "dflow.client",
    "map": "dflow.client",
    "status": "dflow.client",
    "models": "dflow.client",
    "progress": "dflow.events",
    "StageRuntime": "dflow.runtime",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    try:
        module = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'dflow' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), name)
