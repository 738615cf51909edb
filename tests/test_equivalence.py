"""The disaggregated path reproduces the stock diffusers pipeline.

For each diffusers folder (the tiny presets', plus any ``--model-path``), encode,
denoise and decode run on separate stage runtimes, as separate workers would, with
every intermediate passed through Dask's serialization; the pixels must match
what the family's stock pipeline makes from the same folder, prompt and seed.
A VAE call that batches several requests' latents gives each within 1 level (of
255) of its single call, and exactly its single call with
``dflow.runtime.exact-decode``.
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


# -- step-level denoising (dflow.adapters.denoising) ------------------------------------


def dit_inputs(stages: Stages, request: Request) -> dict[str, torch.Tensor]:
    embeddings = stages.encoder.encode(request)
    return {k: v for k, v in embeddings.items() if isinstance(v, torch.Tensor)}


def step_alone(adapter, request: Request, embeddings) -> torch.Tensor:
    state = adapter.start(request, embeddings)
    while not state.done:
        adapter.step([state])
    return adapter.finish(state)


@pytest.mark.parametrize("case", CASES)
def test_steps_match_stock_pipeline(model_folder, stages, case):
    """A request stepped alone gets the latents of the pipeline's own call."""
    request = equivalence_request(model_folder, case)
    adapter = stages.dit.adapter
    embeddings = dit_inputs(stages, request)
    stock_latents = adapter.denoise(request, embeddings)
    assert torch.equal(step_alone(adapter, request, embeddings), stock_latents)


def test_batched_and_joined_steps_match_alone(model_folder, stages):
    """Requests stepping together, each with its own seed, guidance scale and
    step count, one joining after the others' first step, each get their
    latents alone, bit for bit (exact batches, the default)."""
    (case,) = CASES[0].values
    base = equivalence_request(model_folder, case)
    scale = base.guidance_scale
    requests = [
        base,
        base.replace(seed=base.seed + 1, guidance_scale=scale + 1.5, steps=4),
        base.replace(seed=base.seed + 2, prompt="a green door", steps=2),
    ]
    adapter = stages.dit.adapter
    assert adapter.exact_batches
    embeddings = [dit_inputs(stages, r) for r in requests]
    alone = [step_alone(adapter, r, e) for r, e in zip(requests, embeddings)]

    states = [adapter.start(r, e) for r, e in zip(requests[:2], embeddings[:2])]
    assert states[0].key == states[1].key
    adapter.step(states)
    states.append(adapter.start(requests[2], embeddings[2]))
    sizes = []
    while running := [s for s in states if not s.done]:
        sizes.append(len(running))
        adapter.step(running)
    # after the first step: 2 + 1 + 0 steps done of 3, 4 and 2
    assert sizes == [3, 3, 1]
    for state, expected in zip(states, alone):
        assert torch.equal(adapter.finish(state), expected)


def test_state_moves_between_workers(model_folder, stages):
    """A state sent through Dask's serialization between two steps (as Wan
    2.2's experts hand latents over) continues to the same latents."""
    (case,) = CASES[0].values
    request = equivalence_request(model_folder, case)
    adapter = stages.dit.adapter
    embeddings = dit_inputs(stages, request)
    state = adapter.start(request, embeddings)
    adapter.step([state])
    moved = through_dask(state).to("cpu")
    assert moved is not state and moved.index == 1
    while not moved.done:
        adapter.step([moved])
    assert torch.equal(adapter.finish(moved), step_alone(adapter, request, embeddings))


@pytest.mark.parametrize("case", CASES)
def test_batched_decodes_are_within_one_level_or_exact(
    model_folder, stages, case, record_property
):
    requests = [
        equivalence_request(model_folder, case).replace(seed=seed)
        for seed in (11, 12, 13)
    ]
    latents = [
        stages.dit.denoise(r, stages.encoder.encode(r))["latents"] for r in requests
    ]
    singles = [
        stages.vae.decode_batch([r], [x])[0][0] for r, x in zip(requests, latents)
    ]
    batched, _ = stages.vae.decode_batch(requests, latents)
    assert [p.shape for p in batched] == [p.shape for p in singles]
    diff = max(
        int(np.abs(b.astype(np.int16) - p.astype(np.int16)).max())
        for b, p in zip(batched, singles)
    )
    record_property("batched_max_abs_diff", diff)
    assert diff <= 1

    assert not stages.vae.exact_decode  # the default
    stages.vae.exact_decode = True
    try:
        exact, _ = stages.vae.decode_batch(requests, latents)
    finally:
        stages.vae.exact_decode = False
    for one, single in zip(exact, singles, strict=True):
        np.testing.assert_array_equal(one, single)
