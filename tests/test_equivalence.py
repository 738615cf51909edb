"""The disaggregated path reproduces the stock diffusers pipeline.

For each diffusers folder (the tiny presets', plus any ``--model-path``), encode,
denoise and decode run on separate stage runtimes, as separate workers would, with
every intermediate passed through Dask's serialization; the pixels must match
what the family's stock pipeline makes from the same folder, prompt and seed.

Models of two experts (Wan 2.2 A14B) also denoise on one runtime per expert, the
request's state handed from the high-noise expert to the low-noise one;
image-to-video models (``WanImageToVideoPipeline``) get an input image, which
the stock pipeline gets too, and refuse bad ones by name. Quantized DiT stages
match stock diffusers loaded with the same ``TorchAoConfig``. For two-expert and
image-to-video folders a real cluster (scheduler and ``dflow-worker``
processes) serves both layouts of the DiT: both experts on each worker, then
one expert per worker.

A VAE call that batches several requests' latents gives each within 1 level (of
255) of its single call, and exactly its single call with
``dflow.runtime.exact-decode``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import dask.config
from distributed import Client, get_task_stream
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol import deserialize, serialize

import dflow
from dflow import families, protocol, runtime
from dflow.catalog import resolve
from dflow.pools import EXPERT_STAGES, TASK_PREFIXES
from dflow.request import Request
from dflow.runtime import StageRuntime
from dflow.spec import STAGES
from dflow.testing import (
    EQUIVALENCE_CASES,
    equivalence_image,
    equivalence_request,
    fleet_layout,
    move,
    pixels,
    scheduler_process,
    stock_pixels,
    stop,
    wait_for_pools,
    worker_processes,
)

CASES = [pytest.param(case, id=name) for name, case in EQUIVALENCE_CASES.items()]
#: The input image of image-to-video requests (equivalence_request's)
IMAGE = equivalence_image()


@dataclass
class Stages:
    encoder: StageRuntime
    dit: StageRuntime
    vae: StageRuntime
    #: one runtime per expert, for models of two experts
    high: StageRuntime | None = None
    low: StageRuntime | None = None


def through_dask(value):
    """``value`` after a trip through Dask's serialization, as between workers."""
    header, frames = serialize(value, serializers=("dask", "pickle"))
    return deserialize(header, frames)


def run_stages(stages: Stages, request: Request, experts: bool = False) -> np.ndarray:
    """The request through the stage runtimes: only the encoder gets the input
    image's pixels; ``experts``: denoised by one runtime per expert."""
    embeddings = through_dask(stages.encoder.encode(through_dask(request)))
    light = request.without_pixels()
    if experts:
        assert stages.high is not None and stages.low is not None
        handed = through_dask(stages.high.denoise(through_dask(light), embeddings))
        assert "denoising" in handed and "latents" not in handed
        latents = through_dask(stages.low.denoise(through_dask(light), handed))
    else:
        latents = through_dask(stages.dit.denoise(through_dask(light), embeddings))
    return pixels(through_dask(stages.vae.decode(through_dask(light), latents)))


@pytest.fixture(scope="module", autouse=True)
def on_cpu():
    """The comparison is defined on CPU, in float32 (the runtime's CPU dtype)."""
    protocol.register_serializers()
    with dask.config.set({"dflow.runtime.device": "cpu"}):
        yield


@pytest.fixture(scope="module")
def stages(model_folder: str) -> Stages:
    runtimes = [StageRuntime(model_folder, stage, device="cpu") for stage in STAGES]
    if resolve(model_folder).experts:
        runtimes += [
            StageRuntime(model_folder, stage, device="cpu")
            for stage in EXPERT_STAGES.values()
        ]
    return Stages(*runtimes)


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


#: How the DiT runs: one worker holds the DiT (both experts of a two-expert
#: model), or one worker per expert
DIT_LAYOUTS = ["one-dit", "experts"]


def experts_or_skip(model_folder: str, layout: str) -> bool:
    if layout == "experts" and not resolve(model_folder).experts:
        pytest.skip("one DiT: the model has no experts to split")
    return layout == "experts"


@pytest.mark.parametrize("layout", DIT_LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_stages_match_stock_pipeline(
    model_folder, stages, stock, case, layout, record_property
):
    experts = experts_or_skip(model_folder, layout)
    request = equivalence_request(model_folder, case)
    assert request.height != request.width

    ours = run_stages(stages, request, experts)
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


def steps_or_skip(model_folder: str) -> None:
    if families.of(resolve(model_folder)).image_input:
        pytest.skip("image-to-video denoises a request at a time (no step seam)")


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
    steps_or_skip(model_folder)
    request = equivalence_request(model_folder, case)
    adapter = stages.dit.adapter
    embeddings = dit_inputs(stages, request)
    stock_latents = adapter.denoise(request, embeddings)
    assert torch.equal(step_alone(adapter, request, embeddings), stock_latents)


def test_batched_and_joined_steps_match_alone(model_folder, stages):
    """Requests stepping together, each with its own seed, guidance scale and
    step count, one joining after the others' first step, each get their
    latents alone, bit for bit (exact batches, the default)."""
    steps_or_skip(model_folder)
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
    steps_or_skip(model_folder)
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


# -- input images ----------------------------------------------------------------------


def _encoded(image: PIL.Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


#: Inputs no request takes as its image
BAD_IMAGES = {
    "missing": None,
    "rgba": IMAGE.convert("RGBA"),
    "gray": IMAGE.convert("L"),
    "float-array": np.asarray(IMAGE) / 255.0,
    "hwc4-array": np.zeros((16, 16, 4), dtype=np.uint8),
    "not-an-image": b"GIF89a, or not",
    "gif": _encoded(IMAGE, "GIF"),
    "path": "/images/cat.png",
    "too-large": np.zeros((4097, 4, 3), dtype=np.uint8),
}


def test_invalid_images_are_refused_by_name(model_folder):
    """An image-to-video model refuses a missing or unusable image, and every
    other model any image, with a ValueError naming ``image``."""
    (case,) = CASES[0].values
    if families.of(resolve(model_folder)).image_input:
        for name, image in BAD_IMAGES.items():
            with pytest.raises(ValueError, match=r"^image: ") as refused:
                equivalence_request(model_folder, case, image=image)
            assert refused.value.field == "image", name
        # the same pixels as bytes, an array or a PIL image are one request
        as_bytes = equivalence_request(model_folder, case, image=_encoded(IMAGE, "PNG"))
        assert as_bytes == equivalence_request(
            model_folder, case, image=np.asarray(IMAGE)
        )
        assert as_bytes == equivalence_request(model_folder, case)
    else:
        with pytest.raises(ValueError, match=r"^image: ") as refused:
            equivalence_request(model_folder, case, image=IMAGE)
        assert refused.value.field == "image"


# -- 8-bit DiT weights -----------------------------------------------------------------


@pytest.mark.parametrize("layout", DIT_LAYOUTS)
def test_quantized_dit_matches_stock_quantized(model_folder, stages, layout):
    """An int8 DiT stage (or one int8 runtime per expert) makes the pixels of
    stock diffusers loaded with the same TorchAoConfig on its transformers."""
    pytest.importorskip(
        "torchao", reason="int8 DiT weights need torchao (dflow[quant])"
    )
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    experts = experts_or_skip(model_folder, layout)
    dit_stages = list(EXPERT_STAGES.values()) if experts else ["dit"]
    quantized = {
        stage: StageRuntime(model_folder, stage, device="cpu", quantize="int8")
        for stage in dit_stages
    }
    index = json.loads(Path(model_folder, "model_index.json").read_text())
    transformers = [
        name
        for name in ("transformer", "transformer_2")
        if isinstance(index.get(name), list) and index[name][0]
    ]
    config = PipelineQuantizationConfig(
        quant_mapping={
            name: TorchAoConfig(Int8WeightOnlyConfig(version=2))
            for name in transformers
        }
    )
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        model_folder, dtype=stages.dit.dtype, quantization_config=config
    )
    pipe.set_progress_bar_config(disable=True)
    try:
        int8 = dataclasses.replace(
            stages,
            dit=quantized.get("dit", stages.dit),
            high=quantized.get("dit-high"),
            low=quantized.get("dit-low"),
        )
        for runtime in quantized.values():
            transformer = (
                runtime.adapter.pipe.transformer or runtime.adapter.pipe.transformer_2
            )
            weight = transformer.proj_out.weight
            assert type(weight).__name__ == "Int8Tensor"
        (case,) = CASES[1].values
        request = equivalence_request(model_folder, case)
        ours = run_stages(int8, request, experts)
        np.testing.assert_array_equal(ours, stock_pixels(pipe, request))
        # quantization changed the weights: not the float pixels
        assert not np.array_equal(ours, run_stages(stages, request, experts))
    finally:
        for runtime in quantized.values():
            runtime.close()


# -- a real cluster: both experts per worker, then one expert per worker -----------------

#: Scheduler settings: workers keep their stages unless moved here
CLUSTER_ENV = {"DASK_DFLOW__ELASTIC__ENABLED": "False"}


class PixelWitness(SchedulerPlugin):
    """Records, for each stage task submitted, the pickled size of its task
    spec and the pool it runs in: the input image's pixels travel only in the
    encode task's."""

    name = "pixel-witness"

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def update_graph(self, scheduler, *, keys=(), **kwargs) -> None:
        for key, ts in scheduler.tasks.items():
            if ts.run_spec is not None and str(key) not in self.sizes:
                self.sizes[str(key)] = len(pickle.dumps(ts.run_spec))


def witnessed(dask_scheduler) -> dict[str, int]:
    return dict(dask_scheduler.plugins[PixelWitness.name].sizes)


@pytest.mark.slow
def test_a_cluster_serves_both_dit_layouts(model_folder, stock, tmp_path):
    """Real scheduler and worker processes: a request on one worker per expert
    (``dflow-worker --stage dit --expert high|low``), then, after both moved
    to the DiT stage, on workers holding both experts (admission picks the
    chain the cluster serves); the pixels are the stock pipeline's, and an
    input image reaches the encode task alone."""
    spec = resolve(model_folder)
    image_input = families.of(spec).image_input
    if not (spec.experts or image_input):
        pytest.skip("one DiT and no image: tests/test_serving.py serves these")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    layouts = [("dit", "dit")]
    if spec.experts:
        layouts.insert(0, tuple(EXPERT_STAGES.values()))
    layout = ["encoder", *layouts[0], "vae"]
    with (
        scheduler_process(env=CLUSTER_ENV, log_dir=tmp_path) as address,
        worker_processes(
            address, [(stage, model_folder) for stage in layout], log_dir=tmp_path
        ) as workers,
        Client(address, set_as_default=False) as client,
    ):
        wait_for_pools(client, {model_folder: layout}, processes=workers)
        client.register_plugin(PixelWitness())
        for index, stages in enumerate(layouts):
            if index:
                dits = sorted(
                    name
                    for name, stage in fleet_layout(client).items()
                    if stage in layouts[index - 1]
                )
                for name, stage in zip(dits, stages):
                    move(client, name, stage, model_folder, "both experts per worker")
                wait_for_pools(
                    client,
                    {model_folder: ["encoder", *stages, "vae"]},
                    processes=workers,
                )
            (case,) = CASES[index % len(CASES)].values
            request = equivalence_request(model_folder, case)
            with get_task_stream(client) as stream:
                output = dflow.submit(client, request).result(timeout=300)
            np.testing.assert_array_equal(pixels(output), stock_pixels(stock, request))
            stages_run = {
                record["key"].rpartition("-")[0]: fleet_workers_by_address(client)[
                    record["worker"]
                ]
                for record in stream.data
            }
            prefixes = [
                TASK_PREFIXES[s] for s in ("encoder", *dict.fromkeys(stages), "vae")
            ]
            assert sorted(stages_run) == sorted(prefixes)
            for prefix, stage in stages_run.items():
                assert TASK_PREFIXES[stage] == prefix
            if image_input:
                sizes = client.run_on_scheduler(witnessed)
                image_bytes = request.image.height * request.image.width * 3
                for key, size in sizes.items():
                    carries = size > image_bytes
                    assert carries == key.startswith("encode-"), (key, size)
                client.run_on_scheduler(
                    lambda dask_scheduler: dask_scheduler.plugins[
                        PixelWitness.name
                    ].sizes.clear()
                )
        stop([address.process, *workers])


def fleet_workers_by_address(client: Client) -> dict[str, str]:
    """The stage each ready worker serves, by address."""
    records = client.sync(client.scheduler.dflow_workers)
    return {r["address"]: r["stage"] for r in records if r["state"] == "ready"}


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
