"""``dflow profile``: time a model's stages over a grid of request shapes.

Each stage is loaded alone (as a stage worker holds it), warmed up, then timed at
every grid point; the median of the repeats is kept. The result is a profile file
that :func:`dflow.predictor.load_profile` reads::

    {"gpu_type": "h200", "device": "NVIDIA H200", "dtype": "bfloat16",
     "torch": "2.11.0", "rows": [...], "load_seconds": {"flux.1-dev/dit": 41.2},
     "warmup_seconds": {"flux.1-dev/dit": 1.3}, "skipped": [...]}

What varies per stage: the encoder's cost depends on the batch alone (prompts are
padded to a fixed length), the DiT runs one request per call over sizes, frames
and steps, and the VAE decodes batches over sizes and frames.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import torch

from dflow.catalog import resolve
from dflow.hardware import gpu_type_of
from dflow.request import Request
from dflow.runtime import StageRuntime
from dflow.spec import STAGES, ModelSpec

logger = logging.getLogger(__name__)

Size = tuple[int, int]


def run_profile(
    model: str,
    stages: Sequence[str],
    sizes: Sequence[int | Size] | None = None,
    steps: Sequence[int] | None = None,
    batches: Sequence[int] | None = None,
    frames: Sequence[int] | None = None,
    repeats: int = 3,
    gpu_type: str | None = None,
    device: str | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Profile ``stages`` of ``model``; return the profile and write it to ``out``.

    Parameters
    ----------
    model
        A preset, diffusers folder or Hugging Face id in the local cache.
    stages
        Any of ``"encoder"``, ``"dit"``, ``"vae"``.
    sizes
        Square sizes (``512``) or ``(height, width)`` pairs; default the model's
        default size.
    steps, frames
        Denoising steps and video frames; default the model's defaults.
    batches
        Requests per encoder or VAE call (default ``[1]``); the DiT runs one
        request per call, so it is timed at batch 1 only.
    repeats
        Timed calls per grid point; the median is kept.
    gpu_type
        The GPU type the rows are recorded for; default read from the device
        (``"cpu"`` without one), as stage workers publish it.
    device
        Torch device (default as :class:`~dflow.runtime.StageRuntime` picks).
    out
        JSON file to write.

    Grid points the model rejects (a size that is not a multiple of its patch,
    frames of an image model) are skipped, logged and listed under ``skipped``.
    """
    spec = resolve(model)
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    grid = {
        "sizes": [
            (s, s) if isinstance(s, int) else tuple(s)
            for s in sizes or [(spec.defaults["height"], spec.defaults["width"])]
        ],
        "steps": list(steps or [spec.defaults["steps"]]),
        "batches": list(batches or [1]),
        "frames": list(frames or [spec.defaults.get("num_frames", 1)]),
    }
    profile: dict[str, Any] = {
        "model": spec.name,
        "gpu_type": gpu_type,
        "device": None,
        "dtype": None,
        "torch": torch.__version__,
        "rows": [],
        "load_seconds": {},
        "warmup_seconds": {},
        "skipped": [],
    }
    for stage in stages:
        runtime = StageRuntime(spec.name, stage, device=device)
        try:
            profile["gpu_type"] = profile["gpu_type"] or gpu_type_of(runtime.device)
            profile["device"] = _device_name(runtime.device)
            profile["dtype"] = str(runtime.dtype).removeprefix("torch.")
            key = f"{spec.name}/{stage}"
            profile["load_seconds"][key] = runtime.load_seconds
            profile["warmup_seconds"][key] = runtime.warmup()
            for point in _points(spec, stage, grid):
                try:
                    requests = _requests(spec, point)
                except ValueError as error:
                    logger.warning("Skipping %s %s: %s", stage, point, error)
                    profile["skipped"].append(
                        {"stage": stage, **point, "reason": str(error)}
                    )
                    continue
                seconds, peak = _time(runtime, stage, requests, repeats)
                features = requests[0].features
                profile["rows"].append(
                    {
                        "model": spec.name,
                        "stage": stage,
                        "gpu_type": profile["gpu_type"],
                        "batch": len(requests),
                        "height": features["height"],
                        "width": features["width"],
                        "frames": features["frames"],
                        "steps": features["steps"],
                        "cfg": features["cfg"],
                        "seconds": seconds,
                        "peak_bytes": peak,
                        "weight_bytes": spec.weight_bytes.get(stage),
                    }
                )
                logger.info("%s %s: %.4fs", stage, point, seconds)
        finally:
            runtime.close()
    if out is not None:
        Path(out).write_text(json.dumps(profile, indent=1) + "\n")
    return profile


def _points(spec: ModelSpec, stage: str, grid: dict[str, list]) -> list[dict]:
    """Grid points of a stage: only the dimensions its cost depends on vary."""
    height, width = spec.defaults["height"], spec.defaults["width"]
    base = {
        "height": height,
        "width": width,
        "frames": spec.defaults.get("num_frames", 1),
        "steps": spec.defaults["steps"],
        "batch": 1,
    }
    if stage == "encoder":
        return [{**base, "batch": b} for b in grid["batches"]]
    if stage == "dit":
        product = itertools.product(grid["sizes"], grid["frames"], grid["steps"])
        return [
            {**base, "height": h, "width": w, "frames": f, "steps": s}
            for (h, w), f, s in product
        ]
    product = itertools.product(grid["sizes"], grid["frames"], grid["batches"])
    return [
        {**base, "height": h, "width": w, "frames": f, "batch": b}
        for (h, w), f, b in product
    ]


def _requests(spec: ModelSpec, point: dict) -> list[Request]:
    # prompts are padded to a fixed length: their text does not change the cost
    request = Request(
        model=spec.name,
        prompt="a red bicycle",
        height=point["height"],
        width=point["width"],
        num_frames=point["frames"] if spec.video or point["frames"] != 1 else None,
        steps=point["steps"],
        seed=0,
    )
    return [request] * point["batch"]


def _time(
    runtime: StageRuntime, stage: str, requests: list[Request], repeats: int
) -> tuple[float, int | None]:
    """Median seconds of ``repeats`` calls and the largest peak device memory.

    Batches go straight to the runtime's batch calls: its batcher only forms
    batches from calls that happen to overlap, which a profile cannot rely on.
    Every path times the device call as serving does (synchronized).
    """
    request = requests[0]
    call: Callable[[], float]
    if stage == "encoder":

        def call() -> float:
            return runtime.encode_batch(requests)[1]

    elif stage == "dit":
        embeddings = runtime.zero_embeddings(request)

        def call() -> float:
            return runtime.denoise(request, embeddings)["timings"]["denoise"]

    else:
        latents = [runtime.zero_latents(r) for r in requests]

        def call() -> float:
            return runtime.decode_batch(requests, latents)[1]

    times, peaks = [], []
    for _ in range(repeats):
        times.append(call())
        peaks.append(runtime.peak_memory)
    peak = max((p for p in peaks if p is not None), default=None)
    return statistics.median(times), peak


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _size(text: str) -> int | Size:
    if "x" in text:
        height, width = text.split("x")
        return int(height), int(width)
    return int(text)


def _list(parse: Callable[[str], Any]) -> Callable[..., list | None]:
    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            return [parse(item) for item in value.split(",") if item.strip()]
        except ValueError:
            raise click.BadParameter(
                f"expected comma-separated values, got {value!r}"
            ) from None

    return callback


@click.command(
    name="profile", short_help="Time a model's stages on this device for the planner."
)
@click.option("--model", required=True, help="Preset, diffusers folder or HF id.")
@click.option(
    "--stage",
    "stages",
    type=click.Choice(STAGES),
    multiple=True,
    required=True,
    help="Stage to profile (repeatable).",
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="JSON file to write."
)
@click.option(
    "--sizes",
    callback=_list(_size),
    help="Comma-separated sizes: 512 (square) or 480x832 (default: the model's).",
)
@click.option("--steps", callback=_list(int), help="Comma-separated denoising steps.")
@click.option(
    "--batches", callback=_list(int), help="Comma-separated encoder/VAE batch sizes."
)
@click.option("--frames", callback=_list(int), help="Comma-separated video frames.")
@click.option("--repeats", default=3, show_default=True, help="Timed calls per point.")
@click.option(
    "--gpu-type",
    default="auto",
    show_default=True,
    help="GPU type to record; 'auto' reads it from the device.",
)
@click.option("--device", default=None, help="Torch device (default: cuda if present).")
def profile(
    model, stages, out, sizes, steps, batches, frames, repeats, gpu_type, device
):
    """Time stages of a model over a grid of shapes and write a profile file."""
    result = run_profile(
        model,
        stages,
        sizes=sizes,
        steps=steps,
        batches=batches,
        frames=frames,
        repeats=repeats,
        gpu_type=None if gpu_type == "auto" else gpu_type,
        device=device,
        out=out,
    )
    for point in result["skipped"]:
        click.echo(f"Skipped {point}", err=True)
    click.echo(f"Wrote {len(result['rows'])} rows for {result['gpu_type']} to {out}")
