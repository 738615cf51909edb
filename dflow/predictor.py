"""Stage cost on request features: fitted from profiles, corrected online.

A profile row is one timed stage call::

    {"model": "flux.1-dev", "stage": "dit", "gpu_type": "h200", "batch": 1,
     "height": 1024, "width": 1024, "frames": 1, "steps": 28, "cfg": false,
     "seconds": 4.82, "peak_bytes": 24330000000, "weight_bytes": 23802816640}

``dflow profile`` writes them (:mod:`dflow.profile`); :func:`anchor_rows` turns the
shipped H200 measurements into the same form. A :class:`Predictor` fits, per
model, stage and GPU type, seconds and peak bytes as a non-negative combination
of a few cost terms of the request's features (see :func:`time_terms`), then
tracks how live stage times drift from the fit.

DiT calls of several requests (a batch sharing denoising steps) cost what the
linear terms charge for the requests one after another, divided by the batch's
measured speedup (:meth:`Predictor.batch_speedup`): the per-request speed at
that batch against batch 1, from rows with a ``speedup`` (the shipped
``profiles/h200-dit-batch.json``) or from pairs of timed rows of one shape at
batch 1 and at a larger batch. How much a batch gains is the GPU's physics (a
fast GPU is full at batch 1 except for small models at low resolution), which
no combination of per-request terms can express.

The pool of one expert of a two-expert model (Wan 2.2) is priced by its
model's DiT stage: the same per-step cost for the expert's share of the steps
(:func:`dflow.families.priced_as`), and the DiT stage's peak less the other
expert's weights; its observations correct the DiT stage's fit.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

import dask.config

import dflow.config  # noqa: F401
from dflow import families
from dflow.catalog import resolve
from dflow.pools import expert_of
from dflow.request import Request

logger = logging.getLogger(__name__)

Row = dict[str, Any]
#: (model, stage, gpu_type)
Key = tuple[str, str, str]
Terms = tuple[float, ...]

GIB = 2**30


def _passes(features: Mapping[str, Any], batch: float) -> float:
    """DiT forward passes of one call: CFG runs the model on the prompt and the
    negative prompt at each step."""
    return features["steps"] * batch * (2 if features["cfg"] else 1)


def _prompts(features: Mapping[str, Any], batch: float) -> float:
    return batch * (2 if features["cfg"] else 1)


def _pixels(features: Mapping[str, Any], batch: float) -> float:
    return batch * features["height"] * features["width"] * features["frames"]


def _images(features: Mapping[str, Any], batch: float) -> float:
    """Pixels of the input images an image-to-video encoder encodes: the image
    and the zero frames after it, at the request's size."""
    return _pixels(features, batch) if features.get("image") else 0.0


def _encoder_time(features: Mapping[str, Any], batch: float) -> Terms:
    return (_prompts(features, batch), _images(features, batch), 1.0)


def _dit_time(features: Mapping[str, Any], batch: float) -> Terms:
    passes = _passes(features, batch)
    tokens = features["dit_tokens"]
    return (passes * tokens, passes * tokens * tokens, passes, 1.0)


def _vae_time(features: Mapping[str, Any], batch: float) -> Terms:
    return (_pixels(features, batch), 1.0)


def _encoder_memory(features: Mapping[str, Any], batch: float) -> Terms:
    # an image is encoded a frame chunk at a time, one request after another
    frame = features["height"] * features["width"] if features.get("image") else 0
    return (1.0, _prompts(features, batch), float(frame))


def _dit_memory(features: Mapping[str, Any], batch: float) -> Terms:
    tokens = batch * (2 if features["cfg"] else 1) * features["dit_tokens"]
    return (1.0, tokens, tokens * features["dit_tokens"])


def _vae_memory(features: Mapping[str, Any], batch: float) -> Terms:
    frame = batch * features["height"] * features["width"]
    return (1.0, _pixels(features, batch), frame)


_TIME: dict[str, Callable[[Mapping[str, Any], float], Terms]] = {
    "encoder": _encoder_time,
    "dit": _dit_time,
    "vae": _vae_time,
}
_MEMORY: dict[str, Callable[[Mapping[str, Any], float], Terms]] = {
    "encoder": _encoder_memory,
    "dit": _dit_memory,
    "vae": _vae_memory,
}


def time_terms(stage: str, features: Mapping[str, Any], batch: float = 1) -> Terms:
    """The cost terms whose non-negative combination prices a stage call.

    - encoder: prompts encoded (the batch, doubled by CFG's negative prompt),
      the pixels of the input images an image-to-video encoder encodes with
      the VAE (0 for others) and a per-call constant. Prompts are padded to the
      encoder's fixed sequence length, so tokens are prompts times a per-model
      constant; as fits are per model, a separate token term could not be told
      apart from the prompt term.
    - dit: with passes = steps x batch (x 2 under CFG) and tokens the DiT's
      sequence length: passes x tokens (linear layers), passes x tokens^2
      (attention), passes (fixed cost of a step: scheduler, launches) and a
      per-call constant (latent set-up). Cost per step and pass, so other step
      counts and CFG follow from the same coefficients.
    - vae: pixels decoded (batch x height x width x frames) and a per-call
      constant.

    Terms come in order of preference: when a profile cannot tell two terms
    apart, the earlier one is kept. One size pins a line in tokens (linear
    extrapolation); two sizes pin a curve, which the attention term bends the
    way H200 profiles do (Wan at 81 frames: 4% off from 17 and 33 frames,
    where a fixed per-step cost instead is 34% off).
    """
    return _TIME[stage](features, batch)


def memory_terms(stage: str, features: Mapping[str, Any], batch: float = 1) -> Terms:
    """The terms of a stage call's peak device bytes: a constant (weights,
    workspace) plus the activations: prompts (and an input image's frame) for
    the encoder, tokens and
    tokens^2 (attention scores where not fused) for the DiT, pixels and pixels
    of one frame (video VAEs decode a frame chunk at a time) for the VAE."""
    return _MEMORY[stage](features, batch)


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one stage call: seconds, and peak device bytes (``None``
    when the profile recorded none, as on CPU)."""

    seconds: float
    peak_bytes: int | None


@dataclass(frozen=True)
class StageFit:
    """Coefficients over :func:`time_terms` and :func:`memory_terms` of one
    model, stage and GPU type; zero for terms the data could not tell apart."""

    seconds: Terms
    peak_bytes: Terms | None
    samples: int


@dataclass(frozen=True)
class _Sample:
    time: Terms
    memory: Terms
    #: ``None``: a batched DiT row, which informs the batch speedup, not the fit
    seconds: float | None
    peak_bytes: float | None


@dataclass(frozen=True)
class _Speedup:
    """One measured point of a DiT batch curve: per-request speed at ``batch``
    against batch 1, for requests of ``work`` (tokens times passes per step)."""

    work: float
    batch: float
    speedup: float


def dit_work(features: Mapping[str, Any]) -> float:
    """A DiT request's work per step, the axis batch speedups are measured on:
    its tokens times its passes (2 under classifier-free guidance)."""
    return features["dit_tokens"] * (2 if features["cfg"] else 1)


class Predictor:
    """Seconds and peak memory of a stage call, per model, stage and GPU type.

    Parameters
    ----------
    rows
        Profile rows (:func:`load_profile`, :func:`anchor_rows`); fitted at once.
    speeds
        Speed of GPU types relative to a reference, to price a type that has no
        profile from the profiled type of closest speed. A profiled type missing
        from the mapping counts as the reference (1.0), so ``{"l4": 0.2}`` reads
        "an L4 runs at a fifth of the profiled type's speed".
    ewma_alpha
        Weight of each observation in the online correction (config
        ``dflow.predictor.ewma-alpha``).
    max_samples
        Observations kept per model, stage and GPU type for :meth:`refit`
        (config ``dflow.predictor.max-samples``).

    Notes
    -----
    :meth:`predict` returns the fit times a correction factor, an exponentially
    weighted moving average of observed/fitted seconds that :meth:`observe`
    updates: live stage times (other clocks, contention, real prompts) steer
    predictions at once, while :meth:`refit` folds the observations into the
    fit itself. Coefficients are plain tuples, so a prediction costs a few
    microseconds.

    Examples
    --------
    >>> predictor = Predictor(anchor_rows())  # doctest: +SKIP
    >>> request = Request(model="flux.1-dev", prompt="a fox")  # doctest: +SKIP
    >>> predictor.predict("flux.1-dev", "dit", "h200", request).seconds  # doctest: +SKIP
    4.82
    """

    def __init__(
        self,
        rows: Iterable[Row] = (),
        *,
        speeds: Mapping[str, float] | None = None,
        ewma_alpha: float | None = None,
        max_samples: int | None = None,
    ):
        if ewma_alpha is None:
            ewma_alpha = dask.config.get("dflow.predictor.ewma-alpha")
        if max_samples is None:
            max_samples = dask.config.get("dflow.predictor.max-samples")
        self.speeds = dict(speeds or {})
        self.ewma_alpha = float(ewma_alpha)
        self.max_samples = int(max_samples)
        self.fits: dict[Key, StageFit] = {}
        self._rows: dict[Key, list[_Sample]] = {}
        self._observed: dict[Key, deque[_Sample]] = {}
        self._corrections: dict[Key, float] = {}
        self._scaled: dict[Key, tuple[StageFit, float]] = {}
        #: measured DiT batch speedups per model, stage and GPU type
        self.speedups: dict[Key, list[_Speedup]] = {}
        timed: dict[tuple, dict[int, float]] = {}
        for row in rows:
            key = (row["model"], row["stage"], row["gpu_type"])
            features = row_features(row)
            if "speedup" in row:
                work = row.get("work") or dit_work(features)
                point = _Speedup(work, row["batch"], row["speedup"])
                self.speedups.setdefault(key, []).append(point)
                continue
            batched = row["stage"] == "dit" and row["batch"] > 1
            if row["stage"] == "dit":
                shape = (*key, dit_work(features), features["steps"])
                timed.setdefault(shape, {})[row["batch"]] = float(row["seconds"])
            self._rows.setdefault(key, []).append(
                _Sample(
                    time_terms(row["stage"], features, row["batch"]),
                    memory_terms(row["stage"], features, row["batch"]),
                    None if batched else float(row["seconds"]),
                    row.get("peak_bytes"),
                )
            )
        # timed batches of a shape also timed alone are speedups too
        for (model, stage, gpu_type, work, _), seconds in timed.items():
            curve = self.speedups.setdefault((model, stage, gpu_type), [])
            measured = {(p.work, p.batch) for p in curve}
            for batch, batch_seconds in seconds.items():
                if batch > 1 and 1 in seconds and (work, batch) not in measured:
                    curve.append(
                        _Speedup(work, batch, batch * seconds[1] / batch_seconds)
                    )
            if not curve:
                del self.speedups[model, stage, gpu_type]
        self.refit()

    def predict(
        self,
        model: str,
        stage: str,
        gpu_type: str,
        features: Mapping[str, Any] | Request,
        batch: float = 1,
        *,
        corrected: bool = True,
    ) -> Prediction:
        """Cost of one call of ``stage`` on ``batch`` requests shaped like ``features``.

        Parameters
        ----------
        model
            The model's canonical name (``Request.model``).
        features
            A request or its :attr:`~dflow.request.Request.features`.
        corrected
            Apply the online correction from :meth:`observe` (the default); False
            gives the fit alone.

        Raises
        ------
        LookupError
            No profile covers the model and stage, on this GPU type or on a type
            it can be scaled from.
        """
        if isinstance(features, Request):
            features = features.features
        pool_stage = stage
        stage, features = families.priced_as(stage, features)
        key = (model, stage, gpu_type)
        fit, scale = self._fit(key)
        x = _TIME[stage](features, batch)
        seconds = scale * sum(c * v for c, v in zip(fit.seconds, x))
        if stage == "dit" and batch != 1:
            seconds /= self.batch_speedup(model, gpu_type, features, batch) or 1.0
        if corrected:
            seconds *= self._corrections.get(key, 1.0)
        if fit.peak_bytes is None:
            return Prediction(seconds, None)
        m = _MEMORY[stage](features, batch)
        peak = sum(c * v for c, v in zip(fit.peak_bytes, m))
        return Prediction(seconds, round(peak - _unheld_bytes(model, pool_stage)))

    def batch_speedup(
        self,
        model: str,
        gpu_type: str,
        features: Mapping[str, Any],
        batch: float,
    ) -> float | None:
        """Per-request speed of a DiT batch of ``batch`` requests like
        ``features`` against batch 1 (``None``: no batch was measured for the
        model).

        Interpolated linearly in the batch between measured batches (flat past
        the largest: the GPU is full) and in log work between measured works
        (clamped outside them). A GPU type without its own points takes those
        of the measured type of closest speed, at the work that fills that GPU
        as much: a slower GPU fills with less work.
        """
        points = self.speedups.get((model, "dit", gpu_type))
        work = dit_work(features)
        if points is None:
            measured = sorted(
                g for m, s, g in self.speedups if (m, s) == (model, "dit")
            )
            if not measured:
                return None
            speed = self.speeds.get(gpu_type)
            if speed:
                source = min(
                    measured,
                    key=lambda g: (abs(math.log(self.speeds.get(g, 1.0) / speed)), g),
                )
                work *= self.speeds.get(source, 1.0) / speed
            else:
                source = measured[0]
            points = self.speedups[(model, "dit", source)]
        return _interpolate(points, work, batch)

    def peak_bytes(
        self,
        model: str,
        stage: str,
        gpu_type: str,
        features: Mapping[str, Any],
        batch: int = 1,
    ) -> int | None:
        """Predicted peak device bytes of a stage call. A GPU type without a
        profile of its own (nor a speed to scale one from) takes the largest
        peak of the profiled types: peak memory follows the model and the
        request's shape, not the GPU's speed. Raises ``LookupError`` when no
        type has a profile of the model's stage."""
        try:
            return self.predict(model, stage, gpu_type, features, batch).peak_bytes
        except LookupError:
            # an expert's pool is priced by its model's DiT stage
            fitted = families.priced_as(stage, features)[0]
            profiled = sorted({g for m, s, g in self.fits if (m, s) == (model, fitted)})
            if not profiled:
                raise
        peaks = [
            self.predict(model, stage, g, features, batch).peak_bytes for g in profiled
        ]
        known = [peak for peak in peaks if peak is not None]
        return max(known) if known else None

    def observe(
        self,
        model: str,
        stage: str,
        gpu_type: str,
        features: Mapping[str, Any] | Request,
        seconds: float,
        batch: float = 1,
        *,
        peak_bytes: int | None = None,
    ) -> None:
        """Record a measured stage call: update the correction and keep the
        sample for :meth:`refit`. Raises ``LookupError`` as :meth:`predict` does."""
        if isinstance(features, Request):
            features = features.features
        fitted = self.predict(model, stage, gpu_type, features, batch, corrected=False)
        stage, features = families.priced_as(stage, features)
        key = (model, stage, gpu_type)
        if fitted.seconds > 0:
            self._correct(key, seconds / fitted.seconds)
        sequential = float(seconds)
        if stage == "dit" and batch != 1:
            # what the batch's requests would cost one after another: the fit's unit
            sequential *= self.batch_speedup(model, gpu_type, features, batch) or 1.0
        samples = self._observed.setdefault(key, deque(maxlen=self.max_samples))
        samples.append(
            _Sample(
                _TIME[stage](features, batch),
                _MEMORY[stage](features, batch),
                sequential,
                peak_bytes,
            )
        )

    def correction(self, model: str, stage: str, gpu_type: str) -> float:
        """The factor :meth:`predict` applies to the fit: observed over fitted
        seconds, averaged over recent observations (1.0 before any)."""
        return self._corrections.get((model, stage, gpu_type), 1.0)

    def refit(self) -> None:
        """Fit every profiled model, stage and GPU type on its profile rows plus
        the observations kept since, then restart the corrections from those
        observations against the new fits.

        Observations of a GPU type without profile rows correct its scaled
        prediction but are not fitted on their own: a profile covers shapes
        that live traffic may not.
        """
        fits = {}
        for key, rows in self._rows.items():
            fit = _fit([*rows, *self._observed.get(key, ())])
            if fit is not None:
                fits[key] = fit
        self.fits = fits
        self._scaled = {}
        self._corrections = {}
        for key, samples in self._observed.items():
            fit, scale = self._fit(key)
            for sample in samples:
                fitted = scale * sum(c * v for c, v in zip(fit.seconds, sample.time))
                if fitted > 0 and sample.seconds is not None:
                    self._correct(key, sample.seconds / fitted)

    def mape(self, rows: Iterable[Row], *, corrected: bool = False) -> float:
        """Mean absolute percentage error of the predictions of ``rows``' seconds,
        as a fraction (0.05 is 5%)."""
        errors = []
        for row in rows:
            if "speedup" in row:
                continue
            predicted = self.predict(
                row["model"],
                row["stage"],
                row["gpu_type"],
                row_features(row),
                row["batch"],
                corrected=corrected,
            ).seconds
            errors.append(abs(predicted - row["seconds"]) / row["seconds"])
        if not errors:
            raise ValueError("mape needs at least one row")
        return float(np.mean(errors))

    def _correct(self, key: Key, ratio: float) -> None:
        previous = self._corrections.get(key, 1.0)
        self._corrections[key] = previous + self.ewma_alpha * (ratio - previous)

    def _fit(self, key: Key) -> tuple[StageFit, float]:
        """The fit that prices ``key`` and the factor its seconds scale by."""
        fit = self.fits.get(key)
        if fit is not None:
            return fit, 1.0
        scaled = self._scaled.get(key)
        if scaled is None:
            scaled = self._scaled[key] = self._scale(key)
        return scaled

    def _scale(self, key: Key) -> tuple[StageFit, float]:
        model, stage, gpu_type = key
        profiled = sorted(g for m, s, g in self.fits if (m, s) == (model, stage))
        if not profiled:
            known = ", ".join(sorted({f"{m} {s}" for m, s, _ in self.fits})) or "none"
            raise LookupError(
                f"no profile for stage {stage!r} of model {model!r}; profiled: {known}"
            )
        if gpu_type not in self.speeds:
            raise LookupError(
                f"no profile for {model} {stage} on GPU type {gpu_type!r} and no "
                f"speed to scale one from: profiled on {', '.join(profiled)}, "
                f"speeds known for {', '.join(sorted(self.speeds)) or 'none'}"
            )
        speed = self.speeds[gpu_type]
        if speed <= 0:
            raise LookupError(f"GPU type {gpu_type!r} has speed {speed}: it cannot run")

        def distance(g: str) -> float:
            return abs(math.log(self.speeds.get(g, 1.0) / speed))

        source = min(profiled, key=lambda g: (distance(g), g))
        return self.fits[(model, stage, source)], self.speeds.get(source, 1.0) / speed


def _unheld_bytes(model: str, stage: str) -> int:
    """Weights a pool's workers do not hold of those its stage's fit counts:
    an expert's pool is priced by the DiT stage of both experts, less the other
    expert's weights (0 where the model's spec is unknown here: the larger peak)."""
    if expert_of(stage) is None:
        return 0
    try:
        weights = resolve(model).weight_bytes
    except ValueError:
        return 0
    return weights.get("dit", 0) - weights.get(stage, weights.get("dit", 0))


def _fit(samples: list[_Sample]) -> StageFit | None:
    timed = [s for s in samples if s.seconds is not None]
    if not timed:
        return None
    seconds = _nnls(
        np.array([s.time for s in timed]), np.array([s.seconds for s in timed])
    )
    if seconds is None:
        return None
    measured = [s for s in samples if s.peak_bytes is not None]
    peak = None
    if measured:
        peak = _nnls(
            np.array([s.memory for s in measured]),
            np.array([s.peak_bytes for s in measured], dtype=float),
        )
    return StageFit(seconds, peak, len(samples))


def _nnls(terms: np.ndarray, target: np.ndarray) -> Terms | None:
    """Non-negative coefficients minimizing the squared *relative* error (the
    error that matters when shapes span orders of magnitude), over the terms the
    data can tell apart from earlier ones."""
    valid = target > 0
    if not valid.any():
        return None
    weighted = terms[valid] / target[valid, None]
    scale = np.abs(weighted).max(axis=0)
    scale[scale == 0] = 1.0
    weighted = weighted / scale
    kept: list[int] = []
    for column in range(weighted.shape[1]):
        trial = [*kept, column]
        if np.linalg.matrix_rank(weighted[:, trial], rtol=1e-9) == len(trial):
            kept = trial
    solution, _ = nnls(weighted[:, kept], np.ones(len(weighted)))
    coefficients = np.zeros(weighted.shape[1])
    coefficients[kept] = solution / scale[kept]
    return tuple(float(c) for c in coefficients)


def _interpolate(points: Iterable[_Speedup], work: float, batch: float) -> float:
    """A batch curve's speedup at ``work`` and ``batch`` (see
    :meth:`Predictor.batch_speedup`)."""
    curves: dict[float, list[tuple[float, float]]] = {}
    for point in points:
        curves.setdefault(point.work, [(1.0, 1.0)]).append((point.batch, point.speedup))

    def along_batch(curve: list[tuple[float, float]]) -> float:
        batches, speedups = zip(*sorted(curve))
        return float(np.interp(batch, batches, speedups))

    works = sorted(curves)
    at = [along_batch(curves[w]) for w in works]
    return float(np.interp(math.log(work), [math.log(w) for w in works], at))


def batch_limit(
    predict: Callable[[int], Prediction],
    most: int,
    memory: int | None = None,
    min_gain: float = 0.0,
) -> int:
    """The largest DiT batch, up to ``most``, worth forming: each request it
    takes must keep the predicted peak within ``memory`` bytes (``None``: no
    limit) and raise the predicted throughput (requests per second of the
    batch) by at least ``min_gain`` (0.05: 5%) over one request fewer; a
    profiled model whose batches were never measured is priced as if its
    requests ran one after another, so it does not batch. ``predict(batch)``
    prices a batch; where nothing prices it (``LookupError``: a model without a
    profile) only ``most`` limits."""
    limit = 1
    try:
        previous = predict(1)
        for batch in range(2, most + 1):
            prediction = predict(batch)
            peak = prediction.peak_bytes
            if memory is not None and peak is not None and peak > memory:
                break
            gain = batch * previous.seconds / ((batch - 1) * prediction.seconds)
            if gain < 1 + min_gain:
                break
            limit, previous = batch, prediction
    except LookupError:
        return most
    return limit


def row_features(row: Row) -> dict[str, Any]:
    """The :attr:`Request.features <dflow.request.Request.features>` of a
    profile row's shape. Raises ``ValueError`` for shapes the model rejects."""
    return _features(
        row["model"],
        row["height"],
        row["width"],
        row.get("frames", 1),
        row["steps"],
        bool(row.get("cfg", False)),
    )


@cache
def _features(
    model: str, height: int, width: int, frames: int, steps: int, cfg: bool
) -> dict[str, Any]:
    spec = resolve(model)
    family = families.of(spec)
    frames = frames if spec.video else 1
    family.check_inputs(
        spec, height=height, width=width, num_frames=frames if spec.video else None
    )
    if cfg and not spec.negative_prompts:
        raise ValueError(f"cfg: {model} does not run classifier-free guidance")
    return family.features(
        spec, height=height, width=width, frames=frames, steps=steps, cfg=cfg
    )


def load_profile(path: str | Path) -> list[Row]:
    """The rows of a profile file written by ``dflow profile``; each row carries
    the file's ``gpu_type`` unless it names its own."""
    profile = json.loads(Path(path).read_text())
    if "rows" not in profile:
        raise ValueError(f"{path} is not a dflow profile: it has no 'rows'")
    return [{"gpu_type": profile.get("gpu_type"), **row} for row in profile["rows"]]


#: Models of the shipped anchors by the preset names dflow knows them by
_ANCHOR_MODELS = {"pixart-sigma": "pixart-sigma-1024"}
#: Anchor stages: (dflow stage, CFG)
_ANCHOR_STAGES = {
    "encoder": ("encoder", False),
    "dit_step": ("dit", False),
    "dit_step_cfg": ("dit", True),
    "vae_decode": ("vae", False),
}


def anchor_rows(steps: int | None = None) -> list[Row]:
    """The shipped H200 measurements (``profiles/h200-stages.json``) as profile rows.

    The anchors time one DiT *step* at each batch; a row here prices the whole
    denoising call of ``steps`` steps (default: each model's own default). Each
    anchor was measured at its preset's default shape (1024px images; 81 frames
    of 480x832 for Wan), which the rows record. Flux's encoder was timed as T5
    and CLIP apart (``flux.1-dev:t5``, ``flux.1-dev:clip``); its stage runs
    both, so they add up. Encoder anchors time one text-encoder pass per prompt,
    hence ``cfg`` False there.
    """
    text = files("dflow.configs").joinpath("profiles/h200-stages.json").read_text()
    merged: dict[tuple[str, str, bool, int], Row] = {}
    for anchor in json.loads(text)["rows"]:
        name = anchor["model"].split(":")[0]
        model = _ANCHOR_MODELS.get(name, name)
        stage, cfg = _ANCHOR_STAGES[anchor["stage"]]
        spec = resolve(model)
        count = steps or spec.defaults["steps"]
        seconds = anchor["ms"] / 1000 * (count if stage == "dit" else 1)
        key = (model, stage, cfg, anchor["batch"])
        row = merged.setdefault(
            key,
            {
                "model": model,
                "stage": stage,
                "gpu_type": "h200",
                "batch": anchor["batch"],
                "height": spec.defaults["height"],
                "width": spec.defaults["width"],
                "frames": spec.defaults.get("num_frames", 1),
                "steps": count,
                "cfg": cfg,
                "seconds": 0.0,
                "peak_bytes": 0,
                "weight_bytes": 0,
            },
        )
        row["seconds"] += seconds
        # both of Flux's encoders stay resident on its encoder worker
        row["peak_bytes"] += round(anchor["peak_gib"] * GIB)
        row["weight_bytes"] += round(anchor["weights_gib"] * GIB)
    return list(merged.values())


#: Models priced from a measured model of the same blocks, not measured:
#: {model: (measured model, whether its encoder also encodes an input image)}
DERIVED_MODELS = {
    "wan2.2-t2v-a14b": ("wan2.1-t2v-14b", False),
    "wan2.2-i2v-a14b": ("wan2.1-t2v-14b", True),
}
#: The Wan VAE's encode of an image-to-video condition (the image and 80 zero
#: frames) over its decode of the 81 frames at 480x832, measured on a GPU
#: (``benchmarks/gpu_costs.py --sections small``; BENCHMARKS.md)
WAN_ENCODE_OVER_DECODE = 0.62


def derived_rows() -> list[Row]:
    """H200 rows of :data:`DERIVED_MODELS`, derived from their measured model's
    anchors (:func:`anchor_rows`); label what they price *derived*.

    Each Wan 2.2 A14B expert is a Wan 2.1 14B DiT (same blocks and width): a
    step of one expert without guidance is half the anchor's guided step (two
    forward passes), at the anchor's activations; the DiT stage holds both
    experts. The encoder is the same UMT5, plus, for image-to-video, the VAE
    encoding the condition (:data:`WAN_ENCODE_OVER_DECODE` of the anchor's
    decode) with the VAE's weights and activations; the VAE is the same.
    """
    anchors = anchor_rows()
    rows: list[Row] = []
    for model, (measured, image) in DERIVED_MODELS.items():
        spec = resolve(model)
        base = {
            (r["stage"], r["cfg"], r["batch"]): r
            for r in anchors
            if r["model"] == measured
        }
        shape = {
            "model": model,
            "height": spec.defaults["height"],
            "width": spec.defaults["width"],
            "frames": spec.defaults["num_frames"],
        }
        dit = base["dit", True, 1]
        step = dit["seconds"] / dit["steps"] / 2
        activations = dit["peak_bytes"] - dit["weight_bytes"]
        weights = spec.weight_bytes
        for steps in (4, spec.defaults["steps"]):
            rows.append(
                {
                    **dit,
                    **shape,
                    "stage": "dit",
                    "steps": steps,
                    "cfg": False,
                    "seconds": step * steps,
                    "peak_bytes": weights["dit"] + activations,
                    "weight_bytes": weights["dit"],
                }
            )
        vae = base["vae", False, 1]
        decode_activations = vae["peak_bytes"] - vae["weight_bytes"]
        rows.append({**vae, **shape, "weight_bytes": weights["vae"]})
        for (stage, _, batch), row in base.items():
            if stage != "encoder":
                continue
            seconds, peak = row["seconds"], row["peak_bytes"]
            if image:
                seconds += batch * WAN_ENCODE_OVER_DECODE * vae["seconds"]
                peak += vae["weight_bytes"] + decode_activations
            rows.append(
                {
                    **row,
                    **shape,
                    "seconds": seconds,
                    "peak_bytes": peak,
                    "weight_bytes": weights["encoder"],
                }
            )
    return rows


#: dflow's own stage profiles shipped with the package (``dflow profile`` runs)
SHIPPED_PROFILES = ("profiles/h200-dflow.json",)
#: DiT batch speedups shipped with the package, in the form of the batch profile
#: ``benchmarks/gpu_costs.py`` writes
SHIPPED_BATCH_PROFILES = ("profiles/h200-dit-batch.json",)


@cache
def shipped_predictor() -> Predictor:
    """A predictor of the shipped measurements (:func:`shipped_rows`), built
    once per process: what a stage worker prices its own batches with."""
    return Predictor(shipped_rows())


def batch_rows(profile: Mapping[str, Any] | None = None) -> list[Row]:
    """DiT batch speedups as predictor rows (``speedup``: per-request speed at
    ``batch`` against batch 1), from a batch profile (default: the shipped
    ones): rows named like the anchors with a ``per_request_speedup``."""
    if profile is None:
        return [
            row
            for name in SHIPPED_BATCH_PROFILES
            for row in batch_rows(
                json.loads(files("dflow.configs").joinpath(name).read_text())
            )
        ]
    rows = []
    for entry in profile["rows"]:
        if "per_request_speedup" not in entry:
            continue
        name = entry["model"].split(":")[0]
        model = _ANCHOR_MODELS.get(name, name)
        stage, cfg = _ANCHOR_STAGES[entry["stage"]]
        rows.append(
            {
                "model": model,
                "stage": stage,
                "gpu_type": entry.get("gpu_type", profile["gpu_type"]),
                "batch": entry["batch"],
                "height": entry["height"],
                "width": entry["width"],
                "frames": entry.get("frames", 1),
                "steps": resolve(model).defaults["steps"],
                "cfg": cfg,
                "speedup": entry["per_request_speedup"],
            }
        )
    return rows


def shipped_rows() -> list[Row]:
    """Every shipped measurement: dflow's own profiles, the anchors (and rows
    derived from them, :func:`derived_rows`) for each model, stage and GPU type
    those do not cover, and the DiT batch speedups.

    The profiles time dflow's stage calls as they run (tokenization, host copies
    and all), the anchors the bare model passes; where both exist the profiles
    are what a stage costs, so they replace the anchors rather than blend in.
    """
    rows: list[Row] = []
    for name in SHIPPED_PROFILES:
        profile = json.loads(files("dflow.configs").joinpath(name).read_text())
        rows += [{"gpu_type": profile["gpu_type"], **row} for row in profile["rows"]]
    measured = {(r["model"], r["stage"], r["gpu_type"]) for r in rows}
    rows += [
        r
        for r in anchor_rows() + derived_rows()
        if (r["model"], r["stage"], r["gpu_type"]) not in measured
    ]
    return rows + batch_rows()
