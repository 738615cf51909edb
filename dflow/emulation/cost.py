"""The emulated backend's cost model: emulated seconds and device bytes of stage
calls on the catalog's GPU types, fitted on the shipped H200 profiles, with the
offload rates of monolithic workers calibrated on measured runs.

How the costs are derived is in docs/emulation.md.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import dask.config
from dask.utils import parse_bytes

import dflow.config  # noqa: F401
from dflow.catalog import resolve
from dflow.errors import StageOutOfMemory
from dflow.families import priced_as
from dflow.hardware import GIB, Catalog, read_catalog
from dflow.pools import base_stage
from dflow.predictor import (
    Prediction,
    Predictor,
    Row,
    anchor_rows,
    batch_rows,
    derived_rows,
    dit_work,
    load_profile,
    row_features,
)
from dflow.quantization import configured
from dflow.spec import STAGES, ModelSpec

logger = logging.getLogger(__name__)

#: Share of a component's weights that group offload keeps on the device at once
GROUP_WINDOW = 0.1
OFFLOAD_MODES = ("auto", "model", "group")
#: DiT weight bytes in 8 bits over bf16: torchao's weight-only int8 keeps a
#: byte per linear weight, the norms, biases and per-channel scales in bf16 (a
#: Wan 2.2 expert: 13.42 of 26.67 GiB, counted on the meta device by
#: ``benchmarks/gpu_costs.py --weights``); fp8 taken as the same
QUANTIZED_SHARE = 13.42 / 26.67


def time_scale() -> float:
    """Wall seconds slept per emulated second (``dflow.emulation.time-scale``)."""
    scale = float(dask.config.get("dflow.emulation.time-scale", 1.0))
    if not scale > 0:
        raise ValueError(f"dflow.emulation.time-scale must be positive, got {scale}")
    return scale


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
        """Emulated compute seconds of a resident ``stage`` call on ``gpu``.

        A DiT batch gains what the reference GPU gains at the work that fills
        it as much as ``features`` fill ``gpu``: a GPU ``n`` times slower runs
        out of spare capacity at ``1/n`` of the reference's work.
        """
        reference = self.catalog.reference
        slowdown = self.catalog.slowdown(gpu, spec.family, base_stage(stage))
        seconds = self.predictor.predict(
            spec.name, stage, reference, features, batch, corrected=False
        ).seconds
        if stage == "dit" and batch != 1 and gpu != reference:
            there = self.predictor.batch_speedup(
                spec.name, reference, _scaled_work(features, slowdown), batch
            )
            here = self.predictor.batch_speedup(spec.name, reference, features, batch)
            if there and here:
                seconds *= here / there
        return seconds * slowdown

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
        quantize: str | None = None,
    ) -> Placement:
        """How a worker serving ``stages`` runs a request with ``features``.

        A stage worker holds its stage resident; a monolithic worker (all three
        stages), or a DiT worker of both experts of a two-expert model, too when
        they fit, else it offloads (``mode``: ``"auto"`` picks the cheaper of
        model and group offload, ``"model"`` or ``"group"`` force one; default
        ``dflow.emulation.offload``). ``batch`` prices each stage's call on that
        many requests (a DiT batch shares its steps); ``quantize`` (int8, fp8)
        takes the DiT's weights in 8 bits, at the bf16 compute time. Raises
        :class:`~dflow.errors.StageOutOfMemory`, naming the stages, model, GPU
        type and sizes, when no way fits.
        """
        usable = self.usable_bytes(gpu)
        weights = {s: self.weight_bytes(spec, s, quantize) for s in stages}
        # what one denoising step uses: one expert of a two-expert DiT
        active = {
            s: weights[s] // 2 if spec.experts and s == "dit" else weights[s]
            for s in stages
        }
        activations = {
            s: self.activation_bytes(spec, s, features, batch) for s in stages
        }
        compute = {s: self.seconds(spec, s, gpu, features, batch) for s in stages}
        # an expert's pool runs its share of the steps
        steps = {
            s: priced_as(s, features)[1]["steps"] if base_stage(s) == "dit" else 1
            for s in stages
        }
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
        if len(stages) > 1 or (spec.experts and list(stages) == ["dit"]):
            model_rate, group_rate = self.offload_rates(gpu)
            model_peak = max(active[s] + activations[s] for s in stages)
            if mode in ("auto", "model") and model_peak <= usable:
                costs = {
                    s: StageCost(weights[s] / model_rate, compute[s], steps[s])
                    for s in stages
                }
                options.append(Placement("model-offload", costs, model_peak))
            group_peak = max(
                activations[s] + round(GROUP_WINDOW * active[s]) for s in stages
            )
            if mode in ("auto", "group") and group_peak <= usable:
                # each step streams the blocks it runs while computing the last
                costs = {
                    s: StageCost(
                        0.0,
                        steps[s] * max(compute[s] / steps[s], active[s] / group_rate),
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
                f"activations at {shape_name(features)}, batch {batch}) and the {gpu} "
                f"has {usable / GIB:.2f} GiB for it "
                f"({self.catalog.gpu(gpu).memory_bytes / GIB:.2f} GiB less the "
                "CUDA context, dflow.emulation.context-memory)"
                + ("" if len(stages) == 1 else ", offloading included")
            )
        return min(options, key=lambda p: p.seconds)

    def dit_batch_price(
        self, spec: ModelSpec, stages: Sequence[str], gpu: str
    ) -> Callable[[Mapping[str, Any], int], Prediction]:
        """The price of a DiT batch on a worker serving ``stages`` on ``gpu``:
        the DiT call's emulated seconds and the placement's peak bytes;
        infinite seconds for a batch that does not fit."""

        def price(features: Mapping[str, Any], batch: int) -> Prediction:
            try:
                placement = self.placement(spec, stages, gpu, features, batch)
            except StageOutOfMemory:
                return Prediction(math.inf, None)
            return Prediction(placement.stages["dit"].seconds, placement.peak_bytes)

        return price

    @staticmethod
    def weight_bytes(spec: ModelSpec, stage: str, quantize: str | None = None) -> int:
        """Device bytes of ``stage``'s weights, its DiT's in 8 bits if quantized."""
        weights = spec.weight_bytes[stage]
        if quantize is not None and base_stage(stage) == "dit":
            return round(weights * QUANTIZED_SHARE)
        return weights

    def resume_seconds(
        self, spec: ModelSpec, stages: Iterable[str], gpu: str, quantize: str | None
    ) -> float:
        """Emulated seconds to copy ``stages``' weights between pinned host
        memory and ``gpu`` (a parked stage resuming, or parking)."""
        weights = sum(self.weight_bytes(spec, s, quantize) for s in stages)
        return weights / (self.pinned_gibs(gpu) * GIB)

    def pinned_gibs(self, gpu: str) -> float:
        """GiB per second pinned host memory reaches ``gpu`` at: its link's
        payload rate at the efficiency measured on the reference."""
        pinned = self.anchors["ceilings"]["h2d_pinned_gibs"]
        efficiency = pinned / self.catalog.gpu(self.catalog.reference).link_gibs
        return self.catalog.gpu(gpu).link_gibs * efficiency

    def offload_rates(self, gpu: str) -> tuple[float, float]:
        """Bytes per second that model offload and group offload move weights at
        on ``gpu``, solved from the measured Flux runs (docs/emulation.md)."""
        if self._offload is None:
            self._offload = self._calibrate_offload()
        model_rate, group_rate = self._offload
        ceilings = self.anchors["ceilings"]
        link = self.pinned_gibs(gpu)
        # model offload copies through pageable memory: host-bound unless the link is slower
        model = model_rate * min(1.0, link / ceilings["h2d_pageable_gibs"])
        return model, group_rate * link / ceilings["h2d_pinned_gibs"]

    def _calibrate_offload(self) -> tuple[float, float]:
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

    def rows_for(self, gpu: str, scale: float = 1.0) -> list[Row]:
        """The calibration rows rescaled to ``gpu``: a predictor fitted on them
        prices ``gpu`` as this emulation charges it (for planners of emulated
        fleets, which then know each type's speed per stage as a profiled
        deployment would), its seconds times ``scale`` (a run's time scale).
        DiT batch speedups move to the work that fills ``gpu`` as much. A DiT
        stage quantized (``dflow.runtime.quantize``) or offloading on ``gpu``
        is priced as its placement there: its time and peak memory as a
        deployment would profile them."""
        rows = []
        for row in self.rows:
            spec = resolve(row["model"])
            stage = row["stage"]
            factor = self.catalog.slowdown(gpu, spec.family, base_stage(stage))
            if "speedup" in row:
                work = row.get("work") or dit_work(row_features(row))
                rows.append({**row, "gpu_type": gpu, "work": work / factor})
                continue
            scaled = {
                **row,
                "gpu_type": gpu,
                "seconds": row["seconds"] * factor * scale,
            }
            quantize = configured(stage) if base_stage(stage) == "dit" else None
            fits = (row.get("peak_bytes") or 0) <= self.usable_bytes(gpu)
            if base_stage(stage) == "dit" and (quantize or not fits):
                features = row_features(row)
                try:
                    placement = self.placement(
                        spec, [stage], gpu, features, quantize=quantize
                    )
                except StageOutOfMemory:
                    pass
                else:
                    scaled["seconds"] = placement.seconds * scale
                    scaled["peak_bytes"] = placement.peak_bytes
                    scaled["weight_bytes"] = self.weight_bytes(spec, stage, quantize)
            rows.append(scaled)
        return rows


def _scaled_work(features: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """``features`` whose DiT work (:func:`~dflow.predictor.dit_work`) is
    ``factor`` times as much."""
    return {**features, "dit_tokens": features["dit_tokens"] * factor}


def shape_name(features: Mapping[str, Any]) -> str:
    """A request's size as messages and cache keys name it: ``1024x1024``,
    ``480x832x81f``."""
    frames = f"x{features['frames']}f" if features.get("frames", 1) > 1 else ""
    return f"{features['height']}x{features['width']}{frames}"


@cache
def _cost_model(profiles: tuple[str, ...] | None, gpus: str | None) -> CostModel:
    if profiles is None:
        paths: list[Any] = [files("dflow.configs").joinpath("profiles/h200-dflow.json")]
    else:
        paths = [Path(p) for p in profiles]
    rows = anchor_rows() + derived_rows()
    for path in paths:
        if isinstance(path, Path):
            rows += load_profile(path)
        else:  # a resource of the installed package
            profile = json.loads(path.read_text())
            rows += [{"gpu_type": profile["gpu_type"], **r} for r in profile["rows"]]
    rows += batch_rows()
    anchors = json.loads(
        files("dflow.configs").joinpath("profiles/h200-stages.json").read_text()
    )
    cat = read_catalog(gpus)
    reference_rows = [r for r in rows if r["gpu_type"] == cat.reference]
    return CostModel(Predictor(reference_rows), cat, anchors, reference_rows)


def cost_model() -> CostModel:
    """This process's :class:`CostModel` for the current configuration."""
    return CostModel.from_config()
