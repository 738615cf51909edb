"""The disaggregated path reproduces the stock diffusers pipeline.

For each diffusers folder (the tiny presets', plus any ``--model-path``), encode,
denoise and decode run on separate stage runtimes, as separate workers would, with
every intermediate passed through Dask's serialization; the pixels must match
what the family's stock pipeline makes from the same folder, prompt and seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import dask.config
from distributed.protocol import deserialize, serialize

import dflow
from dflow import families, protocol, runtime
from dflow.catalog import resolve
from dflow.request import Request
from dflow.runtime import StageRuntime
from dflow.spec import STAGES

# One landscape and one portrait request per folder: with the model's default
# guidance (classifier-free guidance for PixArt and Wan) and with guidance 1.0
# (no CFG); a seed above 2**63 checks that the full seed range reaches the noise.
CASES = [
    pytest.param({"guidance_scale": None, "seed": 1234, "aspect": (4, 6)}, id="cfg"),
    pytest.param(
        {"guidance_scale": 1.0, "seed": 2**63 + 7, "aspect": (6, 4)}, id="no-cfg"
    ),
]


@dataclass
class Stages:
    encoder: StageRuntime
    dit: StageRuntime
    vae: StageRuntime


def through_dask(value):
    """``value`` after a trip through Dask's serialization, as between workers."""
    header, frames = serialize(value, serializers=("dask", "pickle"))
    return deserialize(header, frames)


def make_request(folder: str, case: dict, **changes) -> Request:
    """A small, fast request that still exercises every stage of ``folder``'s model."""
    spec = resolve(folder)
    rows, columns = case["aspect"]
    if spec.video:
        # video models: fewer pixels, and two latent frames
        rows, columns = rows // 2, columns // 2
    fields = {
        "model": folder,
        "prompt": "a red bicycle leaning on a stone wall",
        "negative_prompt": "blurry, low quality" if spec.negative_prompts else "",
        "height": rows * spec.size_multiple,
        "width": columns * spec.size_multiple,
        "num_frames": spec.vae_scale_temporal + 1 if spec.video else None,
        "steps": 3,
        "guidance_scale": case["guidance_scale"],
        "seed": case["seed"],
    }
    fields.update(changes)
    return Request(**fields)


def pixels(output: dflow.Output) -> np.ndarray:
    """uint8 pixels of an output: (images, H, W, 3) or (frames, H, W, 3)."""
    if output.request.spec.video:
        return output.frames
    return np.stack([np.asarray(image.convert("RGB")) for image in output.images])


def run_stages(stages: Stages, request: Request) -> np.ndarray:
    embeddings = through_dask(stages.encoder.encode(through_dask(request)))
    latents = through_dask(stages.dit.denoise(through_dask(request), embeddings))
    return pixels(through_dask(stages.vae.decode(through_dask(request), latents)))


def run_stock(pipe, request: Request) -> np.ndarray:
    """The stock pipeline's pixels for ``request``, in the same uint8 layout."""
    spec = request.spec
    arguments = {
        "prompt": request.prompt,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
        "max_sequence_length": spec.max_sequence_length,
    }
    if spec.negative_prompts:
        arguments["negative_prompt"] = request.negative_prompt
    # what dflow's adapter passes too (PixArt: no resolution binning)
    arguments.update(families.of(spec).call_options)
    if spec.video:
        arguments.update(num_frames=request.num_frames, output_type="np")
        (video,) = pipe(**arguments).frames
        return (video * 255).round().astype(np.uint8)
    images = pipe(**arguments).images
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


@pytest.fixture(scope="module", autouse=True)
def on_cpu():
    """The comparison is defined on CPU, in float32 (the runtime's CPU dtype)."""
    protocol.register_serializers()
    with dask.config.set({"dflow.runtime.device": "cpu"}):
        yield


@pytest.fixture(scope="module")
def stages(model_folder: str) -> Stages:
    return Stages(
        *(StageRuntime(model_folder, stage, device="cpu") for stage in STAGES)
    )


@pytest.fixture(scope="module")
def stock(model_folder: str, stages: Stages):
    """The pipeline class model_index.json names, loaded as diffusers loads it."""
    index = json.loads(Path(model_folder, "model_index.json").read_text())
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        model_folder, dtype=stages.dit.dtype
    )
    assert type(pipe).__name__ == index["_class_name"]
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", CASES)
def test_stages_match_stock_pipeline(
    model_folder, stages, stock, case, record_property
):
    request = make_request(model_folder, case)
    assert request.height != request.width

    ours = run_stages(stages, request)
    theirs = run_stock(stock, request)

    frames = request.num_frames if request.spec.video else 1
    assert ours.shape == theirs.shape == (frames, request.height, request.width, 3)
    assert ours.dtype == theirs.dtype == np.uint8
    diff = int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max())
    record_property("max_abs_diff", diff)
    assert diff <= 1


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_stages(model_folder, stages, case):
    request = make_request(model_folder, case)
    resident = {(r.model, r.stage) for r in runtime.installed()}
    try:
        output = dflow.generate(request)
        assert output.timings["generate"] > 0
        np.testing.assert_array_equal(pixels(output), run_stages(stages, request))
    finally:
        # the monolithic copy of a real model must not outlive the test
        if (request.model, "all") not in resident:
            runtime.uninstall(request.model, "all")


def test_seed_decides_the_output(model_folder, stages):
    (case,) = CASES[0].values
    request = make_request(model_folder, case)
    first = run_stages(stages, request)
    np.testing.assert_array_equal(run_stages(stages, request), first)
    other = run_stages(stages, request.replace(seed=request.seed + 1))
    assert not np.array_equal(other, first)
