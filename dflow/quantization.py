"""8-bit DiT weights: torchao through diffusers' ``TorchAoConfig``.

A stage that holds DiT weights (``dit``, an expert's stage, or ``all``) may load
its transformers quantized (``dflow-worker --quantize``, ``StageCluster(...,
quantize=...)``, config ``dflow.runtime.quantize``):

- ``int8``: int8 weights, activations in the model's dtype
  (``Int8WeightOnlyConfig``); any device.
- ``fp8``: fp8 weights and dynamic fp8 activations with per-row scales
  (``Float8DynamicActivationFloat8WeightConfig``); GPUs of compute capability
  8.9 and later (Ada, Hopper), whose tensor cores multiply fp8.

Folders load through ``from_pretrained(quantization_config=...)``, exactly as
stock diffusers given the same :func:`pipeline_config`; models built in memory
(the real-size presets) are quantized with the same torchao config on the same
layers (every ``nn.Linear`` outside the model's ``_keep_in_fp32_modules``).
torchao is the optional extra ``dflow[quant]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import dask.config

import dflow.config  # noqa: F401
from dflow.pools import MONOLITHIC, base_stage

#: Quantizations of DiT weights
QUANTIZATIONS = ("int8", "fp8")
#: The compute capability fp8 matrix multiplies need
FP8_CAPABILITY = (8, 9)
INSTALL = "install torchao with `pip install 'dflow[quant]'`"


def holds_dit(stage: str) -> bool:
    """Whether a worker of ``stage`` holds DiT weights."""
    return stage == MONOLITHIC or base_stage(stage) == "dit"


def configured(stage: str, given: str | None = None) -> str | None:
    """The quantization of a worker of ``stage``: ``given`` (a worker's
    ``--quantize``), else config ``dflow.runtime.quantize`` for its stage.
    Raises ``ValueError`` for an unknown quantization or a stage without DiT
    weights."""
    if given is None:
        given = (dask.config.get("dflow.runtime.quantize", None) or {}).get(stage)
    if given is None:
        return None
    if given not in QUANTIZATIONS:
        raise ValueError(
            f"quantize: {given!r} is not one of {', '.join(QUANTIZATIONS)}"
        )
    if not holds_dit(stage):
        raise ValueError(
            f"quantize: stage {stage!r} holds no DiT weights; quantize the dit "
            "stage, an expert's stage or the monolithic one"
        )
    return given


def check_offload(kind: str | None, offload: str, device: Any) -> None:
    """Refuse 8-bit DiT weights under diffusers' group offload with CUDA
    streams (``dflow.runtime.offload: group`` on a GPU): torchao's 8-bit
    tensors cannot be pinned (no ``aten.is_pinned`` in torchao 0.17), so the
    first step would fail (docs/wan22.md). ``ValueError`` naming both settings
    and what to use instead."""
    import torch

    if kind is None or offload != "group" or torch.device(device).type != "cuda":
        return
    raise ValueError(
        f"quantize: {kind} DiT weights cannot be group-offloaded with CUDA "
        "streams (dflow.runtime.offload: group): torchao's 8-bit tensors cannot "
        "be pinned. Keep this worker's DiT in its own dtype (no --quantize, or "
        "dflow.runtime.quantize without its stage) to offload it by groups, or "
        "hold the 8-bit weights resident (dflow.runtime.offload: none) on a GPU "
        "with room for them"
    )


def torchao_config(kind: str, device: Any) -> Any:
    """The torchao config of ``kind`` for ``device``; ``ValueError`` where the
    device cannot run it, ``ImportError`` without torchao."""
    import torch

    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )
    except ImportError as error:
        raise ImportError(f"quantize: {kind} needs torchao: {INSTALL}") from error
    if kind == "int8":
        return Int8WeightOnlyConfig(version=2)
    device = torch.device(device)
    capability = (
        torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    )
    if capability is None or capability < FP8_CAPABILITY:
        where = f"compute capability {capability}" if capability else device.type
        raise ValueError(
            f"quantize: fp8 needs a GPU of compute capability "
            f"{'.'.join(map(str, FP8_CAPABILITY))} or later; this device is {where}: "
            "use int8"
        )
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def pipeline_config(kind: str, components: Iterable[str], device: Any) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` quantizing ``components`` (the
    DiT transformers a stage loads) with ``kind``."""
    from diffusers import PipelineQuantizationConfig, TorchAoConfig

    config = torchao_config(kind, device)
    mapping: dict[str, Any] = {name: TorchAoConfig(config) for name in components}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def quantize_built(models: Mapping[str, Any], kind: str, device: Any) -> None:
    """Quantize models built in memory in place, as loading them with
    :func:`pipeline_config` would: each ``nn.Linear`` weight outside the
    model's ``_keep_in_fp32_modules``."""
    import torch
    from torchao.quantization import quantize_

    config = torchao_config(kind, device)
    for model in models.values():
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or ())

        def quantized(module: Any, name: str, keep: list[str] = keep) -> bool:
            return isinstance(module, torch.nn.Linear) and not any(
                f"{k}." in f"{name}.weight" or k == f"{name}.weight" for k in keep
            )

        quantize_(model, config, filter_fn=quantized)
