"""Emulated stage backend: GPU fleets larger than the machine, priced by profiles.

With dask config ``dflow.runtime.backend: emulated`` a :class:`~dflow.runtime.StageRuntime`
drives an :class:`EmulatedAdapter` instead of a model family's adapter. A stage call
then costs what the H200 profile predicts for its request and batch, scaled to the
worker's GPU type, and is paid by sleeping in the calling thread (a Dask task thread),
per denoising step, so cancellation between steps works as on a GPU. The call returns
tensors and pixels of the real shapes, dtypes and bytes (random bytes: transfers and
any ``distributed.comm.compression`` see incompressible data, as real latents are),
so the real scheduler, workers, transfers and elastic plugin run unchanged on top
and dozens of emulated GPUs share two cores. **Every figure from this backend is
emulated and must be labelled so**; real GPU figures come from the device machine.

Costs on the reference GPU (the H200)
    A :class:`~dflow.predictor.Predictor` fitted on the shipped H200 anchors
    (``profiles/h200-stages.json``) plus dflow's own H200 profile runs
    (``profiles/h200-dflow.json``: the DiT over sizes, frames and steps, the VAE and
    encoder over batches; config ``dflow.emulation.profiles``). The anchors pin each
    model's default shape; dflow's rows identify how cost grows with tokens (the
    attention term) and batch. Batches are priced as batches: an encoder call of 8
    prompts costs the fitted batch-8 time, far less than 8 calls of one.

Speed of a GPU type, per stage (``configs/gpus.yaml``)
    No single ratio holds for every stage, so the catalog splits each stage's H200
    wall time into the shares that scale with different hardware limits, measured
    with ``torch.profiler`` on the H200 (``h200-dflow.json``, ``kernel_time``):
    tensor-core kernels (GEMM, convolution, attention) scale with dense bf16 TFLOPS,
    fp32 CUDA-core GEMMs (T5 keeps its FFN output projection in fp32) with fp32
    TFLOPS, the remaining kernels (norms, elementwise, upsampling) with memory
    bandwidth, and host time (Python, tokenization, launches the GPU waits on,
    copies to host memory) not at all. A type's time is the H200 time times
    ``host + tensor * F_ref/F + fp32 * P_ref/P + memory * B_ref/B`` (datasheet
    peaks of both types, so the ratio is like for like). The measurement corrects
    the rule of thumb "DiT and encoders are compute-bound": the Flux DiT spends 57%
    of its time in tensor-core kernels and 36% in memory-bound ones, Wan's 73% and
    26%, T5 encoders about half in fp32 GEMMs. The VAE decode, convolutions over
    1024x1024x128 activations, spends only 18% (Flux) to 26% (Wan) in convolution
    kernels and most of the rest in GroupNorm and elementwise passes, so it scales
    mostly with memory bandwidth: a blend measured rather than assumed. The model
    is additive, an upper bound where a slower GPU would hide host time behind its
    longer kernels; that bound is at most the host share (1% of Wan's DiT time,
    7% of Flux's).

Memory
    No device memory is used: tensors live in host memory. A stage loads only if
    its weights (``ModelSpec.weight_bytes``) plus the predicted peak activations of
    the model's default request fit the type's memory less
    ``dflow.emulation.context-memory`` (CUDA context, allocator slack; the profiled
    peaks are allocated bytes). A call whose batch would not fit raises
    ``torch.OutOfMemoryError``, which the runtime turns into
    :class:`~dflow.errors.StageOutOfMemory` as for a real one.

Monolithic workers (stage ``"all"``)
    Resident when the whole pipeline fits: every weight plus the largest stage's
    activations (33.6 GiB for Flux; the H200 measured 33.87). When it does not,
    the worker offloads as a diffusers user would, and pays for it per request:

    - model offload (``enable_model_cpu_offload``): each component is moved to the
      GPU when it runs and back after, nothing stays resident; needs the largest
      component plus its activations. Measured on the H200 for Flux: 27.79 s
      against 5.04 s resident, i.e. 22.75 s for moving 31.4 GiB of weights:
      1.38 GiB/s, well below even pageable copies (5.9 GiB/s): the weights go to
      and fro through pageable host memory, parameter by parameter. The host
      bounds this rate, not the link, so it is the same on every type whose link
      beats pageable copies (all of the catalog).
    - group offload (``apply_group_offloading``, block level, CUDA streams, pinned
      memory): blocks stream in while the previous ones compute, every pass, so a
      DiT step costs ``max(compute, weights / rate)``; needs the activations plus
      a streaming window (10% of a component: two blocks of a few dozen). Solving
      the measured 24.58 s for the rate gives about half the pinned link rate
      (25.7 of 51.6 GiB/s); it scales with each type's link.

    Per request the cheaper of the two that fits is taken (``dflow.emulation.offload:
    auto``). A deployed replica fixes one mode, so this bounds the baseline's offload
    cost from below: the emulation never handicaps the monolithic baseline. On a
    24 GiB card of the H200's speed Flux picks group offload at 28 steps (24.6 s)
    and model offload at 50; on an RTX 4090, whose Gen4 link halves the streaming
    rate, model offload already at 28 (48.6 s, against 25.3 s for its DiT alone).

Loads
    A stage's construction sleeps ``weights / dflow.emulation.load-bandwidth`` (1.3
    GiB/s: a T5-XXL ``from_pretrained`` to the H200 with a cold page cache, 5.5 GiB/s
    warm), so ``StageRuntime.load_seconds`` and a worker that changes model pay it.
    Each stage's first call pays ``dflow.emulation.first-call`` more (0.5 s: the
    median of the profiled warm-ups), so the runtime's warm-up reports it.

Time scale
    ``dflow.emulation.time-scale`` multiplies every sleep: 0.01 runs a 5 s DiT call
    in 50 ms. Wall-clock figures of a scaled run are emulated seconds times the
    scale: divide by it, scale arrival rates, horizons and timeouts by it, and say
    so next to the figure. It is what lets CPU benchmarks emulate long video runs.
    What is not scaled is everything real: Dask's scheduling, serialization and
    transfers keep their wall time and so weigh 1/scale times more against the
    emulated GPU time than on real GPUs (a few ms per task hop is 0.1% of a 5 s
    DiT call, 10% of its 50 ms at 0.01). That penalizes the disaggregated path
    (three tasks a request) more than the monolithic one (one): pick the largest
    scale a run affords, and report the scale.

Process start
    The first :func:`cost_model` of a process fits the predictor, which resolves
    the profiled models' specs and builds their tokenizers: about 20 s of CPU,
    which :class:`~dflow.runtime.StageRuntime` spends before it starts timing the
    load. Workers whose outputs are large (a Wan VAE: 97 MB per 81-frame video)
    also draw their random bytes during the load, about 0.3 s per 100 MB.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import yaml

import dask.config
from dask.utils import parse_bytes, parse_timedelta

import dflow.config  # noqa: F401
from dflow.adapters.base import Adapter, Embeddings, StepCallback
from dflow.errors import StageOutOfMemory
from dflow.predictor import Predictor, Row, anchor_rows, load_profile
from dflow.spec import STAGES, ModelSpec, resolve

if TYPE_CHECKING:
    from dflow.request import Request

logger = logging.getLogger(__name__)

GIB = 2**30
#: Payload rate of one PCIe lane per generation, GB/s (after line encoding)
PCIE_LANE_GBS = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
#: Share of a component's weights that group offload keeps on the device at once
GROUP_WINDOW = 0.1
OFFLOAD_MODES = ("auto", "model", "group")


def enabled() -> bool:
    """Whether stage runtimes of this process are emulated (``dflow.runtime.backend``)."""
    backend = dask.config.get("dflow.runtime.backend", "real")
    if backend not in ("real", "emulated"):
        raise ValueError(
            f"dflow.runtime.backend must be 'real' or 'emulated', got {backend!r}"
        )
    return backend == "emulated"


def time_scale() -> float:
    """Wall seconds slept per emulated second (``dflow.emulation.time-scale``)."""
    scale = float(dask.config.get("dflow.emulation.time-scale", 1.0))
    if not scale > 0:
        raise ValueError(f"dflow.emulation.time-scale must be positive, got {scale}")
    return scale


# -- GPU catalog -------------------------------------------------------------------


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
        the reference (see the module docstring)."""
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
def _read_catalog(path: str | None) -> Catalog:
    if path is None:
        text = files("dflow.configs").joinpath("gpus.yaml").read_text()
    else:
        text = Path(path).read_text()
    return Catalog.from_dict(yaml.safe_load(text))


def catalog() -> Catalog:
    """The GPU catalog: ``dflow.emulation.gpus`` or the shipped ``configs/gpus.yaml``."""
    return _read_catalog(dask.config.get("dflow.emulation.gpus", None))


def resolve_gpu(name: str | None = None) -> GpuType:
    """The emulated GPU type: ``name``, else ``dflow.runtime.gpu-type``, else the
    catalog's reference."""
    cat = catalog()
    name = name or dask.config.get("dflow.runtime.gpu-type", None) or cat.reference
    return cat.gpu(name)


def worker_gpu(name: str | None = None) -> tuple[str, int] | None:
    """The GPU type and memory bytes a stage worker publishes when emulated
    (``name``: the worker's ``--gpu-type``, ``None`` or ``"auto"`` for config);
    ``None`` when the backend is real."""
    if not enabled():
        return None
    gpu = resolve_gpu(None if name in (None, "auto") else name)
    return gpu.name, gpu.memory_bytes


# -- costs -------------------------------------------------------------------------


@dataclass(frozen=True)
class StageCost:
    """Emulated seconds of one stage call: weights moved in before it runs (model
    offload), then compute spread over ``steps`` (denoising steps; 1 otherwise),
    which for group offload already includes the streamed weights."""

    transfer: float
    compute: float
    steps: int = 1

    @property
    def seconds(self) -> float:
        return self.transfer + self.compute


@dataclass(frozen=True)
class Placement:
    """How a worker holds its stages for one request: ``resident``,
    ``model-offload`` or ``group-offload``, the stage costs that follow and the
    device bytes the request peaks at."""

    mode: str
    stages: dict[str, StageCost]
    peak_bytes: int

    @property
    def seconds(self) -> float:
        return sum(cost.seconds for cost in self.stages.values())


@dataclass
class CostModel:
    """Emulated seconds and device bytes of stage calls on the catalog's GPU types.

    Parameters
    ----------
    predictor
        Fitted on reference-GPU rows; queried for ``catalog.reference``.
    catalog
        GPU types and stage mixes.
    anchors
        The shipped ``profiles/h200-stages.json``: host-link ceilings and the
        monolithic Flux offload measurements the offload rates are solved from.
    rows
        The rows ``predictor`` was fitted on (their weight bytes split peaks into
        weights and activations; :meth:`rows_for` rescales them).
    """

    predictor: Predictor
    catalog: Catalog
    anchors: dict[str, Any]
    rows: list[Row]
    _weights: dict[tuple[str, str], float] = field(init=False, repr=False)
    _offload: tuple[float, float] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        weights: dict[tuple[str, str], list[float]] = {}
        for row in self.rows:
            if row.get("weight_bytes"):
                key = (row["model"], row["stage"])
                weights.setdefault(key, []).append(row["weight_bytes"])
        self._weights = {k: statistics.median(v) for k, v in weights.items()}

    @classmethod
    def from_config(cls) -> CostModel:
        """The cost model of ``dflow.emulation.*`` (cached per configuration)."""
        profiles = dask.config.get("dflow.emulation.profiles", None)
        return _cost_model(
            None if profiles is None else tuple(str(p) for p in profiles),
            dask.config.get("dflow.emulation.gpus", None),
        )

    # -- single stages ---------------------------------------------------------

    def seconds(
        self,
        spec: ModelSpec,
        stage: str,
        gpu: str,
        features: Mapping[str, Any],
        batch: int = 1,
    ) -> float:
        """Emulated compute seconds of a resident ``stage`` call on ``gpu``."""
        reference = self.predictor.predict(
            spec.name, stage, self.catalog.reference, features, batch, corrected=False
        ).seconds
        return reference * self.catalog.slowdown(gpu, spec.family, stage)

    def activation_bytes(
        self, spec: ModelSpec, stage: str, features: Mapping[str, Any], batch: int = 1
    ) -> int:
        """Predicted peak device bytes of a call beyond its stage's weights."""
        peak = self.predictor.predict(
            spec.name, stage, self.catalog.reference, features, batch, corrected=False
        ).peak_bytes
        if peak is None:
            return 0
        profiled = self._weights.get((spec.name, stage), spec.weight_bytes[stage])
        return max(0, round(peak - profiled))

    def usable_bytes(self, gpu: str) -> int:
        """Device bytes stages may use on ``gpu``: its memory less the context."""
        reserve = parse_bytes(dask.config.get("dflow.emulation.context-memory"))
        return self.catalog.gpu(gpu).memory_bytes - reserve

    def load_seconds(self, spec: ModelSpec, stages: Iterable[str]) -> float:
        """Emulated seconds to load ``stages``' weights (disk to device)."""
        bandwidth = parse_bytes(dask.config.get("dflow.emulation.load-bandwidth"))
        return sum(spec.weight_bytes[s] for s in stages) / bandwidth

    # -- placements --------------------------------------------------------------

    def placement(
        self,
        spec: ModelSpec,
        stages: Sequence[str],
        gpu: str,
        features: Mapping[str, Any],
        batch: int = 1,
        mode: str | None = None,
    ) -> Placement:
        """How a worker serving ``stages`` runs a request with ``features``.

        A stage worker holds its stage resident; a monolithic worker (all three
        stages) too when the pipeline fits, else it offloads (``mode``: ``"auto"``
        picks the cheaper of model and group offload, ``"model"`` or ``"group"``
        force one; default ``dflow.emulation.offload``). ``batch`` prices encoder
        and VAE calls. Raises :class:`~dflow.errors.StageOutOfMemory`, naming the
        stages, model, GPU type and sizes, when no way fits.
        """
        usable = self.usable_bytes(gpu)
        weights = {s: spec.weight_bytes[s] for s in stages}
        activations = {
            s: self.activation_bytes(spec, s, features, self._batch(s, batch))
            for s in stages
        }
        compute = {
            s: self.seconds(spec, s, gpu, features, self._batch(s, batch))
            for s in stages
        }
        steps = {s: features["steps"] if s == "dit" else 1 for s in stages}
        resident_peak = sum(weights.values()) + max(activations.values())
        if resident_peak <= usable:
            costs = {s: StageCost(0.0, compute[s], steps[s]) for s in stages}
            return Placement("resident", costs, resident_peak)
        options = []
        mode = mode or dask.config.get("dflow.emulation.offload", "auto")
        if mode not in OFFLOAD_MODES:
            raise ValueError(
                f"dflow.emulation.offload must be one of {', '.join(OFFLOAD_MODES)}, "
                f"got {mode!r}"
            )
        if len(stages) > 1:
            model_rate, group_rate = self.offload_rates(gpu)
            model_peak = max(weights[s] + activations[s] for s in stages)
            if mode in ("auto", "model") and model_peak <= usable:
                costs = {
                    s: StageCost(weights[s] / model_rate, compute[s], steps[s])
                    for s in stages
                }
                options.append(Placement("model-offload", costs, model_peak))
            group_peak = max(
                activations[s] + round(GROUP_WINDOW * weights[s]) for s in stages
            )
            if mode in ("auto", "group") and group_peak <= usable:
                costs = {
                    s: StageCost(
                        0.0,
                        steps[s] * max(compute[s] / steps[s], weights[s] / group_rate),
                        steps[s],
                    )
                    for s in stages
                }
                options.append(Placement("group-offload", costs, group_peak))
        if not options:
            raise StageOutOfMemory(
                f"{spec.name} {'+'.join(stages)} does not fit GPU type {gpu}: it needs "
                f"{resident_peak / GIB:.2f} GiB ({sum(weights.values()) / GIB:.2f} GiB "
                f"of weights, {max(activations.values()) / GIB:.2f} GiB of "
                f"activations at {_shape(features)}, batch {batch}) and the {gpu} "
                f"has {usable / GIB:.2f} GiB for it "
                f"({self.catalog.gpu(gpu).memory_bytes / GIB:.2f} GiB less the "
                "CUDA context, dflow.emulation.context-memory)"
                + ("" if len(stages) == 1 else ", offloading included")
            )
        return min(options, key=lambda p: p.seconds)

    @staticmethod
    def _batch(stage: str, batch: int) -> int:
        # the DiT runs one request per call; only encoder and VAE calls batch
        return 1 if stage == "dit" else batch

    def offload_rates(self, gpu: str) -> tuple[float, float]:
        """Bytes per second that model offload and group offload move weights at
        on ``gpu`` (module docstring: solved from the measured Flux runs)."""
        if self._offload is None:
            self._offload = self._calibrate_offload()
        model_rate, group_rate = self._offload
        ceilings = self.anchors["ceilings"]
        pinned = ceilings["h2d_pinned_gibs"]
        # the link's measured efficiency on the reference carries over to other links
        efficiency = pinned / self.catalog.gpu(self.catalog.reference).link_gibs
        link = self.catalog.gpu(gpu).link_gibs * efficiency
        # model offload copies through pageable memory: host-bound unless the link is slower
        model = model_rate * min(1.0, link / ceilings["h2d_pageable_gibs"])
        return model, group_rate * link / pinned

    def _calibrate_offload(self) -> tuple[float, float]:
        from dflow.predictor import row_features

        measured = self.anchors["monolithic_flux_1024"]
        spec = resolve("flux.1-dev")
        features = row_features(
            {"model": spec.name, "height": 1024, "width": 1024, "steps": 28}
        )
        reference = self.catalog.reference
        compute = {s: self.seconds(spec, s, reference, features) for s in STAGES}
        weights = {s: float(spec.weight_bytes[s]) for s in STAGES}
        extra = measured["enable_model_cpu_offload_s_per_request"] - sum(
            compute.values()
        )
        model_rate = sum(weights.values()) / extra

        def group_seconds(rate: float) -> float:
            return sum(
                n * max(compute[s] / n, weights[s] / rate)
                for s, n in (("encoder", 1), ("dit", features["steps"]), ("vae", 1))
            )

        target = measured["group_offload_block_level_stream_s_per_request"]
        low, high = 1e6, 1e13
        for _ in range(100):
            middle = math.sqrt(low * high)
            low, high = (
                (middle, high) if group_seconds(middle) > target else (low, middle)
            )
        logger.debug(
            "Offload rates on %s: model %.2f GiB/s, group %.2f GiB/s",
            reference,
            model_rate / GIB,
            high / GIB,
        )
        return model_rate, high

    # -- rows for other predictors -------------------------------------------------

    def rows_for(self, gpu: str) -> list[Row]:
        """The calibration rows rescaled to ``gpu``: a predictor fitted on them
        prices ``gpu`` as this emulation charges it (for planners of emulated
        fleets, which then know each type's speed per stage as a profiled
        deployment would)."""
        rows = []
        for row in self.rows:
            family = resolve(row["model"]).family
            factor = self.catalog.slowdown(gpu, family, row["stage"])
            rows.append({**row, "gpu_type": gpu, "seconds": row["seconds"] * factor})
        return rows


def _shape(features: Mapping[str, Any]) -> str:
    frames = f"x{features['frames']}f" if features.get("frames", 1) > 1 else ""
    return f"{features['height']}x{features['width']}{frames}"


@cache
def _cost_model(profiles: tuple[str, ...] | None, gpus: str | None) -> CostModel:
    if profiles is None:
        paths: list[Any] = [files("dflow.configs").joinpath("profiles/h200-dflow.json")]
    else:
        paths = [Path(p) for p in profiles]
    rows = anchor_rows()
    for path in paths:
        if isinstance(path, Path):
            rows += load_profile(path)
        else:  # a resource of the installed package
            profile = json.loads(path.read_text())
            rows += [{"gpu_type": profile["gpu_type"], **r} for r in profile["rows"]]
    anchors = json.loads(
        files("dflow.configs").joinpath("profiles/h200-stages.json").read_text()
    )
    cat = _read_catalog(gpus)
    reference_rows = [r for r in rows if r["gpu_type"] == cat.reference]
    return CostModel(Predictor(reference_rows), cat, anchors, reference_rows)


def cost_model() -> CostModel:
    """This process's :class:`CostModel` for the current configuration."""
    return CostModel.from_config()


# -- the adapter ---------------------------------------------------------------------


class _Noise:
    """Random bytes that emulated outputs are views of, so a call allocates nothing.

    Each output is its own tensor or array over a slice at a random offset: its
    ``sizeof`` and serialized frames are its own bytes (dflow's serializer sends a
    view's bytes only), and the data is incompressible.
    """

    #: Extra bytes beyond the largest output, so offsets vary
    SLACK = 8 * 2**20

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> np.ndarray:
        """The buffer, grown to hold ``nbytes`` at varying offsets (random bytes
        take ~0.3 s per 100 MB to draw, once per process and size)."""
        with self._lock:
            if nbytes + self.SLACK > len(self._buffer):
                words = max(2 * len(self._buffer), nbytes + self.SLACK) // 8 + 1
                self._buffer = np.random.SFC64().random_raw(words).view(np.uint8)
            return self._buffer

    def take(self, nbytes: int) -> np.ndarray:
        buffer = self.reserve(nbytes)
        # 64-byte aligned, so any dtype can view it
        offset = random.randrange(0, (len(buffer) - nbytes) // 64 + 1) * 64
        return buffer[offset : offset + nbytes]

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        element = torch.empty(0, dtype=dtype).element_size()
        raw = torch.from_numpy(self.take(math.prod(shape) * element))
        return raw.view(dtype).view(*shape)

    def pixels(self, shape: Sequence[int]) -> np.ndarray:
        return self.take(math.prod(shape)).reshape(shape)


_noise = _Noise()


class EmulatedAdapter(Adapter):
    """A stage backend that costs what the profile says and computes nothing.

    The :class:`~dflow.adapters.base.Adapter` interface that
    :class:`~dflow.runtime.StageRuntime` drives, over a model's
    :class:`~dflow.spec.ModelSpec` alone: no weights, no device memory.

    Parameters
    ----------
    spec, stages
        The model and the stages served (all three for a monolithic worker).
    device, dtype
        Accepted for the interface; outputs take the model's own dtypes.
    gpu_type
        The emulated GPU type (default ``dflow.runtime.gpu-type``, else the
        catalog's reference).
    cost
        Default :func:`cost_model`.

    Raises
    ------
    StageOutOfMemory
        The stages do not fit the GPU type at the model's default request.
    """

    family: ClassVar[str] = "emulated"
    pipelines: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        spec: ModelSpec,
        stages: Sequence[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        gpu_type: str | None = None,
        cost: CostModel | None = None,
    ):
        start = time.perf_counter()
        self.spec = spec
        self.stages = tuple(stages)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cost = cost or cost_model()
        self.gpu = resolve_gpu(gpu_type)
        self._first_call = parse_timedelta(
            dask.config.get("dflow.emulation.first-call")
        )
        self._called: set[str] = set()
        self._placements: dict[tuple, Placement] = {}
        default = self._default_features()
        self.placement = self._placement(default)
        # draw the random bytes of the outputs now, as part of the load
        output_bytes = {"encoder": "embedding_bytes", "dit": "latent_bytes"}
        _noise.reserve(
            max(default[output_bytes.get(s, "output_bytes")] for s in self.stages)
        )
        self.load_seconds = self.cost.load_seconds(spec, self.stages)
        logger.info(
            "Emulating %s %s on a %s (%s): load %.1fs, default request %.2fs",
            spec.name,
            "+".join(self.stages),
            self.gpu.name,
            self.placement.mode,
            self.load_seconds,
            self.placement.seconds,
        )
        self._sleep_until(start, self.load_seconds)

    def _default_features(self) -> dict[str, Any]:
        from dflow.request import Request

        request = Request(model=self.spec.name, prompt="x", seed=0)
        return request.features

    def _placement(self, features: Mapping[str, Any], batch: int = 1) -> Placement:
        key = (_shape(features), features["steps"], features["cfg"], batch)
        placement = self._placements.get(key)
        if placement is None:
            placement = self.cost.placement(
                self.spec, self.stages, self.gpu.name, features, batch
            )
            if len(self._placements) < 1024:
                self._placements[key] = placement
        return placement

    # -- timing ------------------------------------------------------------------

    def _sleep_until(self, start: float, seconds: float) -> None:
        """Sleep until ``seconds`` emulated seconds (scaled) after ``start``: work
        done since (allocations) is part of the call, not added to it."""
        remaining = start + seconds * time_scale() - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def _run(
        self,
        stage: str,
        request: Request,
        batch: int,
        on_step: Callable[[int], None] | None = None,
    ) -> Callable[[], None]:
        """Check memory, then return a function that sleeps out the call's cost
        (per step, calling ``on_step`` after each)."""
        start = time.perf_counter()
        try:
            placement = self._placement(request.features, batch)
        except StageOutOfMemory as error:
            raise torch.OutOfMemoryError(str(error)) from None
        cost = placement.stages[stage]
        first = self._first_call if stage not in self._called else 0.0
        self._called.add(stage)

        def sleep() -> None:
            elapsed = first + cost.transfer
            self._sleep_until(start, elapsed)
            step = cost.compute / cost.steps
            for index in range(cost.steps):
                elapsed += step
                self._sleep_until(start, elapsed)
                if on_step is not None:
                    on_step(index)

        return sleep

    # -- stage calls ---------------------------------------------------------------

    def encode(self, requests: Sequence[Request]) -> list[Embeddings]:
        sleep = self._run("encoder", requests[0], len(requests))
        outputs = [self._embeddings(r) for r in requests]
        sleep()
        return outputs

    def denoise(
        self,
        request: Request,
        embeddings: Embeddings,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        sleep = self._run("dit", request, 1, on_step)
        latents = self._latents(request)
        sleep()
        return latents

    def decode(
        self, requests: Sequence[Request], latents: Sequence[torch.Tensor]
    ) -> list[np.ndarray]:
        sleep = self._run("vae", requests[0], len(requests))
        outputs = []
        for request in requests:
            features = request.features
            shape = (features["frames"], features["height"], features["width"], 3)
            outputs.append(_noise.pixels(shape))
        sleep()
        return outputs

    # -- outputs -------------------------------------------------------------------

    def _embeddings(self, request: Request) -> Embeddings:
        """What the family's encoder returns for one request: embeddings of the
        padded prompt (plus pooled for Flux, attention masks for PixArt, negatives
        under CFG)."""
        spec = self.spec
        dtype = getattr(torch, spec.dtype)
        shape = (1, spec.max_sequence_length, spec.text_dim)
        prefixes = ["", "negative_"] if self.uses_negative(request) else [""]
        embeddings = {}
        for prefix in prefixes:
            embeddings[f"{prefix}prompt_embeds"] = _noise.tensor(shape, dtype)
            if spec.family == "pixart":
                embeddings[f"{prefix}prompt_attention_mask"] = torch.ones(
                    shape[:2], dtype=torch.long
                )
        if spec.pooled_dim:
            embeddings["pooled_prompt_embeds"] = _noise.tensor(
                (1, spec.pooled_dim), dtype
            )
        return embeddings

    def _latents(self, request: Request) -> torch.Tensor:
        """Latents as the family's pipeline returns them for ``output_type="latent"``:
        Flux packs 2x2 patches into (1, tokens, channels x 4); video latents are
        float32, image latents in the model's dtype (``Request.features``)."""
        shape = request.features["latent_shape"]
        if self.spec.video:
            return _noise.tensor((1, *shape), torch.float32)
        dtype = getattr(torch, self.spec.dtype)
        if self.spec.family == "flux":
            channels, height, width = shape
            return _noise.tensor((1, height * width // 4, channels * 4), dtype)
        return _noise.tensor((1, *shape), dtype)
