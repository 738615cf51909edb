"""Model families: the registry, shape rules and allowed values, and tensor
shapes that must equal what the real diffusers pipelines and encoders return."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from dflow import families
from dflow.catalog import resolve
from dflow.errors import InvalidRequest
from dflow.images import InputImage
from dflow.pools import EXPERT_STAGES
from dflow.request import Request
from dflow.runtime import StageRuntime

TINY = ["tiny-flux", "tiny-pixart", "tiny-wan", "tiny-wan22-t2v", "tiny-wan22-i2v"]


# -- registry ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline, family",
    [
        ("FluxPipeline", "flux"),
        ("PixArtSigmaPipeline", "pixart"),
        ("PixArtAlphaPipeline", "pixart"),
        ("WanPipeline", "wan"),
    ],
)
def test_family_of_a_pipeline(pipeline, family):
    assert families.for_pipeline(pipeline).name == family
    assert families.family(family) is families.for_pipeline(pipeline)


@pytest.mark.parametrize(
    "pipeline", ["StableDiffusion3Pipeline", "FluxKontextPipeline"]
)
def test_unsupported_pipeline_names_model(pipeline, tmp_path):
    with pytest.raises(ValueError, match=f"^model: pipeline '{pipeline}'") as error:
        families.for_pipeline(pipeline)
    for served in ("FluxPipeline", "PixArtSigmaPipeline", "WanPipeline"):
        assert served in str(error.value)
    # a folder of that pipeline is a bad model for a request
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(InvalidRequest, match=pipeline) as refused:
        Request(model=str(tmp_path), prompt="a cat")
    assert refused.value.field == "model"


@pytest.mark.parametrize("name", TINY)
def test_every_component_of_a_folder_has_its_stage(tiny_folders, name):
    """The stages of a family are data, and each pipeline component of a folder
    belongs to one of them."""
    spec = resolve(name)
    family = families.of(spec)
    assert family.stages == ("encoder", "dit", "vae")
    index = json.loads(Path(tiny_folders[name], "model_index.json").read_text())
    components = [c for c, v in index.items() if isinstance(v, list) and v[0]]
    stages = {c: family.stages_of(c) for c in components}
    assert all(stages.values()), stages
    held = {stage for held in stages.values() for stage in held}
    assert set(family.stages) <= held <= {*family.stages, *EXPERT_STAGES.values()}
    assert family.stages_of(family.prompt_tokenizer) == ("encoder",)
    assert family.stages_of("feature_extractor") == ()


# -- rules ---------------------------------------------------------------------------


def check(name: str, **inputs) -> None:
    spec = resolve(name)
    inputs = {
        "height": 64,
        "width": 64,
        "num_frames": 9 if spec.video else None,
        **inputs,
    }
    families.of(spec).check_inputs(spec, **inputs)


def refused(name: str, **inputs) -> str:
    with pytest.raises(InvalidRequest) as error:
        check(name, **inputs)
    return error.value.field


def test_sizes_are_multiples_of_vae_scale_times_patch():
    for name in ("flux.1-dev", "pixart-sigma-1024", "wan2.1-t2v-1.3b"):
        spec = resolve(name)
        assert spec.size_multiple == 16
        frames = 81 if spec.video else None
        check(name, height=16, width=1024, num_frames=frames)
        assert refused(name, height=1000, width=1024, num_frames=frames) == "height"
        assert refused(name, height=1024, width=8, num_frames=frames) == "width"
        largest = spec.limit("max_size")
        check(name, height=largest, width=16, num_frames=frames)
        assert refused(name, height=largest + 16, num_frames=frames) == "height"


def test_wan_takes_4k_plus_1_frames():
    for frames in (1, 5, 81, 129):
        check("wan2.1-t2v-1.3b", height=480, width=832, num_frames=frames)
    for frames in (0, 2, 80, 133, None):
        assert refused("wan2.1-t2v-1.3b", num_frames=frames) == "num_frames"


def test_image_families_make_one_frame():
    for name in ("flux.1-dev", "pixart-sigma-1024"):
        check(name, num_frames=None)
        check(name, num_frames=1)
        assert refused(name, num_frames=5) == "num_frames"


def test_negative_prompts_and_cfg_rule():
    flux, pixart, wan = (resolve(n) for n in TINY[:3])
    assert refused("tiny-flux", negative_prompt="blurry") == "negative_prompt"
    check("tiny-pixart", negative_prompt="blurry")
    check("tiny-wan", negative_prompt="blurry", height=32, width=32)
    # guidance above 1 runs classifier-free guidance, where a family takes it
    assert not families.of(flux).uses_cfg(flux, 3.5)
    for spec in (pixart, wan):
        family = families.of(spec)
        assert family.uses_cfg(spec, 4.5)
        assert not family.uses_cfg(spec, 1.0)


def test_defaults_and_limits_are_the_familys_unless_a_preset_says():
    flux = families.family("flux")
    spec = resolve("flux.1-dev")
    assert spec.defaults == {**flux.defaults}
    assert spec.max_sequence_length == flux.max_sequence_length == 512
    assert spec.limit("max_steps") == flux.limits["max_steps"]
    tiny = resolve("tiny-flux")
    assert tiny.limit("max_size") == 512
    assert tiny.max_sequence_length == 32


# -- tensors against the real pipelines ------------------------------------------------

#: (height, width, frames) per preset: not the default, not square
SHAPES = {
    "tiny-flux": (48, 80, 1),
    "tiny-pixart": (80, 48, 1),
    "tiny-wan": (32, 48, 9),
    "tiny-wan22-t2v": (32, 48, 9),
    "tiny-wan22-i2v": (48, 32, 5),
}
#: The input image of image-to-video requests: another size than the request's
IMAGE = np.arange(24 * 40 * 3, dtype=np.uint8).reshape(24, 40, 3)


@pytest.fixture(scope="module")
def stock(tiny_folders):
    """Each tiny preset's folder loaded by stock diffusers, on CPU in float32."""
    loaded = {}
    for name in TINY:
        pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_folders[name])
        pipe.set_progress_bar_config(disable=True)
        loaded[name] = pipe
    return loaded


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_latents_are_what_the_pipeline_returns(stock, name, guidance):
    spec = resolve(name)
    family = families.of(spec)
    height, width, frames = SHAPES[name]
    arguments = {
        "prompt": "a cat",
        "height": height,
        "width": width,
        "num_inference_steps": 1,
        "guidance_scale": guidance,
        "output_type": "latent",
        "max_sequence_length": spec.max_sequence_length,
        **family.call_options,
    }
    if spec.video:
        arguments["num_frames"] = frames
    if family.image_input:
        arguments["image"] = PIL.Image.fromarray(IMAGE)
    with torch.inference_mode():
        output = stock[name](**arguments)
    latents = output.frames if spec.video else output.images
    expected = family.latents(spec, height, width, frames, dtype="float32")
    assert tuple(latents.shape) == expected.shape
    assert latents.dtype == getattr(torch, expected.dtype)
    features = family.features(
        spec,
        height=height,
        width=width,
        frames=frames,
        steps=1,
        cfg=family.uses_cfg(spec, guidance),
    )
    assert features["latent_bytes"] == latents.nbytes
    # a DiT token is a patch x patch square of latent pixels (Flux: packed ones)
    patches = latents.numel() // spec.latent_channels // spec.patch**2
    assert features["dit_tokens"] == patches


@pytest.mark.parametrize("name", TINY)
def test_embeddings_are_what_the_encoder_returns(tiny_folders, name):
    spec = resolve(name)
    family = families.of(spec)
    encoder = StageRuntime(name, "encoder", device="cpu")
    height, width, frames = SHAPES[name]
    try:
        for guidance in (1.0, 4.0):
            request = Request(
                model=name,
                prompt="a cat",
                negative_prompt="blurry" if spec.negative_prompts else "",
                height=height,
                width=width,
                num_frames=frames if spec.video else None,
                guidance_scale=guidance,
                seed=0,
                image=IMAGE if family.image_input else None,
            )
            real = {k: v for k, v in encoder.encode(request).items() if k != "timings"}
            cfg = family.uses_cfg(spec, guidance)
            described = family.embeddings(
                spec, cfg, dtype="float32", height=height, width=width, frames=frames
            )
            assert described.keys() == real.keys()
            for key, tensor in real.items():
                assert tuple(tensor.shape) == described[key].shape, key
                assert tensor.dtype == getattr(torch, described[key].dtype), key
            floating = sum(t.nbytes for t in real.values() if t.is_floating_point())
            # at the model's dtype, which the tiny presets' float32 is
            assert request.features["embedding_bytes"] == floating
    finally:
        encoder.close()


# -- Wan 2.2's experts -----------------------------------------------------------------

SCHEDULERS = [
    pytest.param(
        diffusers.UniPCMultistepScheduler,
        {
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "flow_shift": shift,
        },
        id=f"unipc-shift{shift}",
    )
    for shift in (1.0, 3.0, 5.0, 12.0)
] + [
    pytest.param(
        diffusers.FlowMatchEulerDiscreteScheduler,
        {"shift": shift},
        id=f"euler-shift{shift}",
    )
    for shift in (1.0, 5.0)
]


@pytest.mark.parametrize("scheduler_class, config", SCHEDULERS)
@pytest.mark.parametrize("ratio", [0.875, 0.9, 0.5])
def test_expert_steps_are_the_pipelines(scheduler_class, config, ratio):
    """Which steps each expert runs, known without torch, is what the pipeline
    does: the high-noise expert while the scheduler's timestep is at least the
    boundary."""
    scheduler = scheduler_class(**config)
    spec = dataclasses.replace(
        resolve("tiny-wan22-t2v"),
        boundary_ratio=ratio,
        scheduler=dict(scheduler.config) | {"_class_name": scheduler_class.__name__},
    )
    family = families.of(spec)
    boundary = ratio * scheduler.config.num_train_timesteps
    for steps in range(1, 61):
        scheduler.set_timesteps(steps)
        high = sum(1 for t in scheduler.timesteps if t >= boundary)
        assert family.expert_steps(spec, steps) == {"high": high, "low": steps - high}


def test_the_seeds_schedule_runs_two_steps_per_expert():
    """4 distilled steps (timesteps 1000/750/500/250 before the shift), two per
    expert, no CFG: the seed's schedule is a plain request of the A14B models."""
    for name in ("wan2.2-i2v-a14b", "wan2.2-t2v-a14b"):
        spec = resolve(name)
        family = families.of(spec)
        assert family.expert_steps(spec, 4) == {"high": 2, "low": 2}
        assert not family.uses_cfg(spec, 1.0)
        assert family.chains(spec) == (
            ("encoder", "dit", "vae"),
            ("encoder", "dit-high", "dit-low", "vae"),
        )
    one = resolve("wan2.1-t2v-14b")
    assert families.of(one).expert_steps(one, 4) is None
    assert families.of(one).chains(one) == (("encoder", "dit", "vae"),)


def test_image_to_video_takes_an_image_and_others_none():
    image = InputImage.of(np.zeros((8, 8, 3), dtype=np.uint8))
    i2v = resolve("tiny-wan22-i2v")
    families.of(i2v).check_image(i2v, image)
    with pytest.raises(InvalidRequest) as missing:
        families.of(i2v).check_image(i2v, None)
    assert missing.value.field == "image"
    for name in ("tiny-wan22-t2v", "tiny-wan", "tiny-flux"):
        spec = resolve(name)
        families.of(spec).check_image(spec, None)
        with pytest.raises(InvalidRequest) as unused:
            families.of(spec).check_image(spec, image)
        assert unused.value.field == "image"
