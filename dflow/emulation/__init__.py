"""The emulated stage backend: GPU fleets larger than the machine, priced by profiles.

:mod:`dflow.emulation.cost` prices stage calls on the GPU types of
:mod:`dflow.hardware`; :mod:`dflow.emulation.adapter` (torch) is the stage
backend that sleeps for those costs; :mod:`dflow.emulation.network` delays
worker-to-worker transfers (network jitter). Figures from it are emulated and
must be labelled so. The design and its measurements: docs/emulation.md.
"""

from __future__ import annotations

from dflow.emulation.cost import (
    CostModel,
    Placement,
    StageCost,
    cost_model,
    time_scale,
)

__all__ = ["CostModel", "Placement", "StageCost", "cost_model", "time_scale"]
