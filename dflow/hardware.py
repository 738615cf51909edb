"""GPU types: the catalog of types and their datasheet peaks (``configs/gpus.yaml``),
and what a real device says it is.

The emulated backend prices stage calls on catalog types (docs/emulation.md);
real workers name and size their own device here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

import dask.config

import dflow.config  # noqa: F401

GIB = 2**30
#: Payload rate of one PCIe lane per generation, GB/s (after line encoding)
PCIE_LANE_GBS = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


@dataclass(frozen=True)
class GpuType:
    """One GPU type of the catalog (``configs/gpus.yaml``); figures are datasheet
    peaks, see the catalog's comments for sources."""

    name: str
    label: str
    memory_mib: int
    bf16_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float
    pcie_gen: int
    pcie_lanes: int

    @property
    def memory_bytes(self) -> int:
        """Device memory as torch reports it, which an emulated worker publishes."""
        return self.memory_mib * 2**20

    @property
    def link_gibs(self) -> float:
        """Payload rate of the host link, GiB/s."""
        return PCIE_LANE_GBS[self.pcie_gen] * self.pcie_lanes * 1e9 / GIB


@dataclass(frozen=True)
class StageMix:
    """Shares of a stage call's reference wall time bound by tensor-core compute,
    fp32 compute, memory bandwidth and the host; they add up to 1."""

    tensor: float
    fp32: float
    memory: float
    host: float


@dataclass(frozen=True)
class Catalog:
    """GPU types and the per-stage mixes that scale the reference's costs to them."""

    reference: str
    gpus: dict[str, GpuType]
    mixes: dict[tuple[str, str], StageMix]

    def gpu(self, name: str) -> GpuType:
        try:
            return self.gpus[name]
        except KeyError:
            raise ValueError(
                f"unknown GPU type {name!r}; the catalog has {', '.join(self.gpus)}"
            ) from None

    def slowdown(self, gpu_type: str, family: str, stage: str) -> float:
        """Time of ``stage`` of a ``family`` model on ``gpu_type`` over its time on
        the reference: its stage-mix's shares, each scaled by the reference's
        peak over the type's (docs/emulation.md)."""
        ref, gpu = self.gpus[self.reference], self.gpu(gpu_type)
        try:
            mix = self.mixes[family, stage]
        except KeyError:
            raise ValueError(
                f"the GPU catalog has no stage-mix for {family} {stage}"
            ) from None
        return (
            mix.host
            + mix.tensor * ref.bf16_tflops / gpu.bf16_tflops
            + mix.fp32 * ref.fp32_tflops / gpu.fp32_tflops
            + mix.memory * ref.bandwidth_gbs / gpu.bandwidth_gbs
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalog:
        gpus = {}
        for name, entry in data["gpus"].items():
            gpus[name] = GpuType(
                name=name,
                label=entry.get("label", name),
                memory_mib=int(entry["memory-mib"]),
                bf16_tflops=float(entry["bf16-tflops"]),
                fp32_tflops=float(entry["fp32-tflops"]),
                bandwidth_gbs=float(entry["bandwidth-gbs"]),
                pcie_gen=int(entry["pcie"]["gen"]),
                pcie_lanes=int(entry["pcie"]["lanes"]),
            )
        mixes = {}
        for family, stages in data["stage-mix"].items():
            for stage, shares in stages.items():
                total = sum(float(v) for v in shares.values())
                if not math.isclose(total, 1.0, abs_tol=0.01):
                    raise ValueError(
                        f"stage-mix {family} {stage} adds up to {total}, not 1"
                    )
                # exactly 1, so the reference's own slowdown is exactly 1
                mixes[family, stage] = StageMix(
                    **{k: float(v) / total for k, v in shares.items()}
                )
        if data["reference"] not in gpus:
            raise ValueError(f"reference GPU type {data['reference']!r} is not listed")
        return cls(data["reference"], gpus, mixes)


@cache
def read_catalog(path: str | None) -> Catalog:
    """The catalog in the YAML file ``path`` (``None``: the shipped one), read once."""
    if path is None:
        text = files("dflow.configs").joinpath("gpus.yaml").read_text()
    else:
        text = Path(path).read_text()
    return Catalog.from_dict(yaml.safe_load(text))


def catalog() -> Catalog:
    """The GPU catalog: ``dflow.emulation.gpus`` or the shipped ``configs/gpus.yaml``."""
    return read_catalog(dask.config.get("dflow.emulation.gpus", None))


def resolve_gpu(name: str | None = None) -> GpuType:
    """A GPU type of the catalog: ``name``, else ``dflow.runtime.gpu-type``, else
    the catalog's reference."""
    cat = catalog()
    name = name or dask.config.get("dflow.runtime.gpu-type", None) or cat.reference
    return cat.gpu(name)


def gpu_type_of(device: str) -> str:
    """A short GPU type name of a real device (``"h200"``, ``"a100-80gb"``) or
    ``"cpu"``."""
    import torch

    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for prefix in ("nvidia ", "geforce ", "tesla "):
        name = name.replace(prefix, "")
    return "-".join(name.split())


def device_memory(device: str) -> int:
    """Bytes of memory a stage model can use on a real ``device``."""
    import psutil

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total
