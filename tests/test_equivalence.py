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

import dask.config
from distributed.protocol import deserialize, serialize

import dflow
from dflow import protocol, runtime
from dflow.request import Request
from dflow.runtime import StageRuntime
from dflow.spec import STAGES
from dflow.testing import (
    EQUIVALENCE_CASES,
    equivalence_request,
    pixels,
    stock_pixels,
)

CASES = [pytest.param(case, id=name) for name, case in EQUIVALENCE_CASES.items()]


@dataclass
class Stages:
    encoder: StageRuntime
    dit: StageRuntime
    vae: StageRuntime


def through_dask(value):
    """``value`` after a trip through Dask's serialization, as between workers."""
    header, frames = serialize(value, serializers=("dask", "pickle"))
    return deserialize(header, frames)


def run_stages(stages: Stages, request: Request) -> np.ndarray:
    embeddings = through_dask(stages.encoder.encode(through_dask(request)))
    latents = through_dask(stages.dit.denoise(through_dask(request), embeddings))
    return pixels(through_dask(stages.vae.decode(through_dask(request), latents)))


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
    request = equivalence_request(model_folder, case)
    assert request.height != request.width

    ours = run_stages(stages, request)
    theirs = stock_pixels(stock, request)

    frames = request.num_frames if request.spec.video else 1
    assert ours.shape == theirs.shape == (frames, request.height, request.width, 3)
    assert ours.dtype == theirs.dtype == np.uint8
    diff = int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max())
    record_property("max_abs_diff", diff)
    assert diff <= 1


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_stages(model_folder, stages, case):
    request = equivalence_request(model_folder, case)
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
    request = equivalence_request(model_folder, case)
    first = run_stages(stages, request)
    np.testing.assert_array_equal(run_stages(stages, request), first)
    other = run_stages(stages, request.replace(seed=request.seed + 1))
    assert not np.array_equal(other, first)
