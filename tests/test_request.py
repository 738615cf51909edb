"""Request: every bad field is rejected by name; defaults, names and features."""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from dflow import prompts
from dflow.request import MAX_SEED, InvalidRequest, Request

LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 20
#: An input image for the image-to-video models
RGB = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def encoded(pixels: np.ndarray, format: str, **options) -> bytes:
    """``pixels`` as the bytes of an image file in ``format``."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=format, **options)
    return buffer.getvalue()


# (id, model, changes, the field that must be named). The tiny presets allow sizes
# that are multiples of 16 up to 512 (Wan: 256), 1 to 200 steps, guidance 0 to 30,
# and 4k + 1 frames up to 33 (Wan).
INVALID = [
    ("model-unknown", "no-such-model", {}, "model"),
    ("model-empty", "", {}, "model"),
    ("model-not-str", 3, {}, "model"),
    ("model-missing-folder", "/no/such/folder", {}, "model"),
    ("model-uncached-hub-id", "dflow-tests/no-such-model", {}, "model"),
    ("prompt-empty", "tiny-flux", {"prompt": ""}, "prompt"),
    ("prompt-whitespace", "tiny-flux", {"prompt": " \t\n"}, "prompt"),
    ("prompt-not-str", "tiny-flux", {"prompt": 42}, "prompt"),
    ("prompt-none", "tiny-pixart", {"prompt": None}, "prompt"),
    ("prompt-bytes", "tiny-wan", {"prompt": b"a cat"}, "prompt"),
    ("negative-not-str", "tiny-pixart", {"negative_prompt": 1}, "negative_prompt"),
    ("negative-none", "tiny-wan", {"negative_prompt": None}, "negative_prompt"),
    ("negative-on-flux", "tiny-flux", {"negative_prompt": "blur"}, "negative_prompt"),
    ("height-not-multiple", "tiny-flux", {"height": 72}, "height"),
    ("height-zero", "tiny-flux", {"height": 0}, "height"),
    ("height-negative", "tiny-pixart", {"height": -64}, "height"),
    ("height-too-small", "tiny-flux", {"height": 8}, "height"),
    ("height-too-large", "tiny-flux", {"height": 528}, "height"),
    ("height-too-large-wan", "tiny-wan", {"height": 272}, "height"),
    ("height-float", "tiny-flux", {"height": 64.0}, "height"),
    ("height-str", "tiny-flux", {"height": "64"}, "height"),
    ("height-bool", "tiny-flux", {"height": True}, "height"),
    ("width-not-multiple", "tiny-pixart", {"width": 100}, "width"),
    ("width-too-small", "tiny-wan", {"width": 8}, "width"),
    ("width-too-large", "tiny-pixart", {"width": 1024}, "width"),
    ("width-float", "tiny-wan", {"width": 32.5}, "width"),
    ("width-bool", "tiny-pixart", {"width": False}, "width"),
    ("frames-on-image-model", "tiny-flux", {"num_frames": 5}, "num_frames"),
    ("frames-bool-on-image-model", "tiny-pixart", {"num_frames": True}, "num_frames"),
    ("frames-not-4k+1", "tiny-wan", {"num_frames": 8}, "num_frames"),
    ("frames-zero", "tiny-wan", {"num_frames": 0}, "num_frames"),
    ("frames-too-many", "tiny-wan", {"num_frames": 37}, "num_frames"),
    ("frames-float", "tiny-wan", {"num_frames": 9.0}, "num_frames"),
    ("frames-bool", "tiny-wan", {"num_frames": True}, "num_frames"),
    ("steps-zero", "tiny-flux", {"steps": 0}, "steps"),
    ("steps-negative", "tiny-wan", {"steps": -1}, "steps"),
    ("steps-too-many", "tiny-pixart", {"steps": 201}, "steps"),
    ("steps-float", "tiny-flux", {"steps": 4.0}, "steps"),
    ("steps-bool", "tiny-flux", {"steps": True}, "steps"),
    ("guidance-nan", "tiny-flux", {"guidance_scale": math.nan}, "guidance_scale"),
    ("guidance-inf", "tiny-pixart", {"guidance_scale": math.inf}, "guidance_scale"),
    ("guidance-negative", "tiny-wan", {"guidance_scale": -0.5}, "guidance_scale"),
    ("guidance-too-large", "tiny-flux", {"guidance_scale": 30.5}, "guidance_scale"),
    ("guidance-str", "tiny-pixart", {"guidance_scale": "4.5"}, "guidance_scale"),
    ("guidance-bool", "tiny-wan", {"guidance_scale": True}, "guidance_scale"),
    ("seed-negative", "tiny-flux", {"seed": -1}, "seed"),
    ("seed-too-big", "tiny-flux", {"seed": MAX_SEED + 1}, "seed"),
    ("seed-float", "tiny-pixart", {"seed": 1.0}, "seed"),
    ("seed-bool", "tiny-wan", {"seed": False}, "seed"),
    ("seed-str", "tiny-flux", {"seed": "7"}, "seed"),
    ("format-unknown", "tiny-flux", {"output_format": "jpeg"}, "output_format"),
    ("format-video-on-image", "tiny-pixart", {"output_format": "gif"}, "output_format"),
    ("format-image-on-video", "tiny-wan", {"output_format": "png"}, "output_format"),
    ("format-not-str", "tiny-wan", {"output_format": 1}, "output_format"),
    # input images: image-to-video models need one, others take none
    ("image-missing", "tiny-wan22-i2v", {}, "image"),
    ("image-on-text-to-video", "tiny-wan22-t2v", {"image": RGB}, "image"),
    ("image-on-images", "tiny-flux", {"image": RGB}, "image"),
    ("image-float-array", "tiny-wan22-i2v", {"image": RGB / 255}, "image"),
    ("image-gray-array", "tiny-wan22-i2v", {"image": RGB[..., 0]}, "image"),
    (
        "image-rgba-array",
        "tiny-wan22-i2v",
        {"image": np.dstack([RGB, RGB[..., :1]])},
        "image",
    ),
    ("image-empty-array", "tiny-wan22-i2v", {"image": RGB[:0]}, "image"),
    (
        "image-too-tall",
        "tiny-wan22-i2v",
        {"image": np.zeros((4097, 2, 3), np.uint8)},
        "image",
    ),
    (
        "image-pil-rgba",
        "tiny-wan22-i2v",
        {"image": PIL.Image.new("RGBA", (8, 8))},
        "image",
    ),
    (
        "image-pil-gray",
        "tiny-wan22-i2v",
        {"image": PIL.Image.new("L", (8, 8))},
        "image",
    ),
    ("image-bytes-garbage", "tiny-wan22-i2v", {"image": b"not an image"}, "image"),
    ("image-bytes-empty", "tiny-wan22-i2v", {"image": b""}, "image"),
    ("image-bytes-gif", "tiny-wan22-i2v", {"image": encoded(RGB, "GIF")}, "image"),
    ("image-bytes-cut", "tiny-wan22-i2v", {"image": encoded(RGB, "PNG")[:60]}, "image"),
    ("image-path", "tiny-wan22-i2v", {"image": "cat.png"}, "image"),
    ("image-list", "tiny-wan22-i2v", {"image": [RGB]}, "image"),
]


@pytest.mark.parametrize(
    "model, changes, field",
    [pytest.param(*case[1:], id=case[0]) for case in INVALID],
)
def test_invalid_field_is_named(model, changes, field):
    fields = {"model": model, "prompt": "a cat on a mat", "seed": 0, **changes}
    with pytest.raises(ValueError) as excinfo:
        Request(**fields)
    assert isinstance(excinfo.value, InvalidRequest)
    assert excinfo.value.field == field
    assert str(excinfo.value).startswith(f"{field}: ")


# Prompts over the tiny presets' 32 tokens: what the tokenizer check refuses
TOO_LONG = [
    ("prompt-too-long-flux", "tiny-flux", {"prompt": LONG_PROMPT}, "prompt"),
    ("prompt-too-long-pixart", "tiny-pixart", {"prompt": LONG_PROMPT}, "prompt"),
    ("prompt-too-long-wan", "tiny-wan", {"prompt": LONG_PROMPT}, "prompt"),
    (
        "negative-too-long",
        "tiny-pixart",
        {"negative_prompt": LONG_PROMPT},
        "negative_prompt",
    ),
]


@pytest.mark.parametrize(
    "model, changes, field",
    [pytest.param(*case[1:], id=case[0]) for case in TOO_LONG],
)
def test_prompt_over_the_token_limit_is_named(model, changes, field):
    """A request cannot count tokens (it loads no tokenizer); the check that
    submit and the encoder worker run refuses the prompt, naming the limit."""
    request = Request(**{"model": model, "prompt": "a cat on a mat", **changes})
    with pytest.raises(InvalidRequest) as excinfo:
        prompts.check_length(request)
    assert excinfo.value.field == field
    assert str(excinfo.value).startswith(f"{field}: ")
    assert "over the limit of 32 tokens" in str(excinfo.value)
    prompts.check_length(request.replace(**dict.fromkeys(changes, "a short one")))


def test_model_only_a_cluster_serves_names_dflow_models():
    with pytest.raises(InvalidRequest, match=r"dflow\.models\(client\)") as excinfo:
        Request(model="/served/elsewhere/model", prompt="a cat")
    assert excinfo.value.field == "model"
    assert "unknown model" in str(excinfo.value)


def test_invalid_model_folder(tmp_path):
    """A folder whose pipeline dflow does not serve is a bad ``model`` too."""
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}'
    )
    with pytest.raises(InvalidRequest, match="StableDiffusionPipeline") as excinfo:
        Request(model=str(tmp_path), prompt="a cat")
    assert excinfo.value.field == "model"


@pytest.mark.parametrize(
    "model, expected",
    [
        pytest.param(
            "tiny-flux",
            {"height": 64, "width": 64, "num_frames": None, "steps": 4},
            id="tiny-flux",
        ),
        pytest.param(
            "tiny-pixart",
            {"height": 64, "width": 64, "num_frames": None, "steps": 4},
            id="tiny-pixart",
        ),
        pytest.param(
            "tiny-wan",
            {"height": 32, "width": 32, "num_frames": 9, "steps": 4},
            id="tiny-wan",
        ),
    ],
)
def test_defaults_come_from_the_model(model, expected):
    request = Request(model=model, prompt="a cat")
    spec = request.spec
    assert {name: getattr(request, name) for name in expected} == expected
    assert request.guidance_scale == spec.defaults["guidance_scale"]
    assert request.negative_prompt == ""
    assert request.output_format == ("np" if spec.video else "pil")
    assert isinstance(request.seed, int)
    assert 0 <= request.seed <= MAX_SEED
    assert request.model == model


def test_unset_seeds_differ():
    seeds = {Request(model="tiny-flux", prompt="a cat").seed for _ in range(8)}
    assert len(seeds) == 8


def test_values_are_normalized():
    """Integer and real types beyond Python's own are accepted and stored as such."""
    request = Request(
        model="tiny-wan",
        prompt="a cat",
        height=np.int64(48),
        width=np.int32(64),
        num_frames=np.int16(5),
        steps=np.uint8(2),
        guidance_scale=np.float32(2.5),
        seed=np.uint64(MAX_SEED),
    )
    assert (request.height, request.width, request.num_frames) == (48, 64, 5)
    assert request.steps == 2
    assert request.guidance_scale == 2.5
    assert request.seed == MAX_SEED
    for name in ("height", "width", "num_frames", "steps", "seed"):
        assert type(getattr(request, name)) is int
    assert type(request.guidance_scale) is float


def test_boundary_values_are_accepted():
    low = Request(
        model="tiny-wan",
        prompt="a",
        height=16,
        width=16,
        num_frames=1,
        steps=1,
        guidance_scale=0,
        seed=0,
    )
    assert (low.height, low.num_frames, low.guidance_scale) == (16, 1, 0.0)
    high = Request(
        model="tiny-wan",
        prompt="a",
        height=256,
        width=256,
        num_frames=33,
        steps=200,
        guidance_scale=30,
        seed=MAX_SEED,
    )
    assert (high.height, high.num_frames, high.steps) == (256, 33, 200)
    # num_frames=1 is the one frame count an image model takes
    assert Request(model="tiny-flux", prompt="a", num_frames=1).num_frames == 1


def test_folder_model_is_named_by_its_absolute_path(tiny_folders, monkeypatch):
    folder = Path(tiny_folders["tiny-pixart"])
    monkeypatch.chdir(folder.parent)
    for given in (folder.name, f"./{folder.name}/", str(folder)):
        request = Request(model=given, prompt="a cat")
        assert request.model == str(folder.resolve())
        assert os.path.isabs(request.model)
        assert request.spec.source == str(folder.resolve())
        assert request.spec.family == "pixart"


def test_features_of_flux_1024():
    request = Request(model="flux.1-dev", prompt="a cat", seed=0)
    assert request.features == {
        "family": "flux",
        "height": 1024,
        "width": 1024,
        "frames": 1,
        "steps": 28,
        "cfg": False,  # guidance is embedded
        "image": False,
        "latent_shape": [16, 128, 128],  # 1024 / 8
        "dit_tokens": 4096,  # (128 / 2) ** 2
        # bf16 T5 states (512 x 4096) plus the pooled CLIP vector (768)
        "embedding_bytes": (512 * 4096 + 768) * 2,
        "latent_bytes": 16 * 128 * 128 * 2,
        "output_bytes": 1024 * 1024 * 3,
    }


def test_features_of_wan_480p():
    request = Request(model="wan2.1-t2v-1.3b", prompt="a cat", seed=0)
    assert (request.height, request.width, request.num_frames) == (480, 832, 81)
    assert request.features == {
        "family": "wan",
        "height": 480,
        "width": 832,
        "frames": 81,
        "steps": 50,
        "cfg": True,
        "image": False,
        "latent_shape": [16, 21, 60, 104],  # (81 - 1) / 4 + 1, 480 / 8, 832 / 8
        "dit_tokens": 32760,  # 21 x 30 x 52
        # bf16 UMT5 states (512 x 4096), prompt and negative prompt
        "embedding_bytes": 512 * 4096 * 2 * 2,
        # Wan keeps its latents in float32
        "latent_bytes": 16 * 21 * 60 * 104 * 4,
        "output_bytes": 480 * 832 * 3 * 81,
    }


def test_features_of_the_seeds_wan22_i2v_request():
    """The seed's schedule: 4 distilled steps, two per expert, no CFG, 480x832x81."""
    image = np.zeros((480, 832, 3), dtype=np.uint8)
    request = Request(
        model="wan2.2-i2v-a14b",
        prompt="a cat",
        steps=4,
        guidance_scale=1.0,
        seed=0,
        image=image,
    )
    assert request.features == {
        "family": "wan-i2v",
        "height": 480,
        "width": 832,
        "frames": 81,
        "steps": 4,
        "cfg": False,
        "image": True,
        "latent_shape": [16, 21, 60, 104],
        "dit_tokens": 32760,
        # bf16 UMT5 states, and the image's condition: a 4-channel first-frame
        # mask and 16 latent channels per latent frame, float32
        "embedding_bytes": 512 * 4096 * 2 + 20 * 21 * 60 * 104 * 4,
        "latent_bytes": 16 * 21 * 60 * 104 * 4,
        "output_bytes": 480 * 832 * 3 * 81,
        "high_steps": 2,
        "low_steps": 2,
    }


@pytest.mark.parametrize(
    "guidance, cfg",
    [pytest.param(4.5, True, id="cfg"), pytest.param(1.0, False, id="no-cfg")],
)
def test_features_of_pixart(guidance, cfg):
    request = Request(
        model="pixart-sigma-1024",
        prompt="a cat",
        height=768,
        width=1280,
        guidance_scale=guidance,
    )
    features = request.features
    assert features["latent_shape"] == [4, 96, 160]
    assert features["dit_tokens"] == 48 * 80
    assert features["cfg"] is cfg
    assert features["embedding_bytes"] == 300 * 4096 * 2 * (2 if cfg else 1)
    assert features["latent_bytes"] == 4 * 96 * 160 * 2
    assert features["output_bytes"] == 768 * 1280 * 3


def test_replace_validates_again():
    request = Request(model="tiny-wan", prompt="a cat", seed=1, num_frames=5)
    changed = request.replace(seed=2, prompt="a dog")
    assert (changed.seed, changed.prompt) == (2, "a dog")
    assert (changed.num_frames, changed.height, changed.model) == (5, 32, "tiny-wan")
    assert (request.seed, request.prompt) == (1, "a cat")
    assert request.replace() == request
    with pytest.raises(InvalidRequest) as excinfo:
        request.replace(num_frames=6)
    assert excinfo.value.field == "num_frames"


def test_requests_are_frozen():
    request = Request(model="tiny-flux", prompt="a cat")
    with pytest.raises(AttributeError):
        request.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-wan", "wan2.1-t2v-14b"])
def test_pickle_roundtrip(model):
    request = Request(model=model, prompt="a cat", seed=5)
    features = request.features
    copy = pickle.loads(pickle.dumps(request))
    assert copy == request
    assert hash(copy) == hash(request)
    assert copy.features == features
    assert copy.spec == request.spec


# -- input images ----------------------------------------------------------------------


def test_an_image_is_the_same_whichever_way_it_comes():
    """A PIL image, its array and its PNG bytes make equal requests: the
    image's pixels (and a digest of them) are what the request holds."""
    requests = [
        Request(model="tiny-wan22-i2v", prompt="a cat", seed=0, image=image)
        for image in (RGB, PIL.Image.fromarray(RGB), encoded(RGB, "PNG"))
    ]
    assert requests[0] == requests[1] == requests[2]
    assert len({hash(r) for r in requests}) == 1
    image = requests[2].image
    assert (image.height, image.width) == (24, 40)
    np.testing.assert_array_equal(image.array(), RGB)
    np.testing.assert_array_equal(np.asarray(image.pil()), RGB)
    # another picture is another request
    other = Request(model="tiny-wan22-i2v", prompt="a cat", seed=0, image=RGB[::-1])
    assert other != requests[0]


def test_jpeg_bytes_are_decoded_upright():
    """JPEG bytes decode as diffusers' load_image decodes a file: turned by
    their EXIF orientation, in RGB."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to view
    data = encoded(RGB, "JPEG", quality=95, exif=exif)
    request = Request(model="tiny-wan22-i2v", prompt="a cat", seed=0, image=data)
    assert (request.image.height, request.image.width) == (40, 24)
    gray = encoded(RGB[..., 0], "JPEG")
    request = Request(model="tiny-wan22-i2v", prompt="a cat", seed=0, image=gray)
    assert request.image.array().shape == (24, 40, 3)


def test_stages_that_do_not_encode_the_image_get_no_pixels():
    request = Request(model="tiny-wan22-i2v", prompt="a cat", seed=0, image=RGB)
    light = request.without_pixels()
    assert light == request and hash(light) == hash(request)
    assert light.image.pixels is None and request.image.pixels is not None
    assert light.features == request.features
    # cheap to send: the pixels are what weighs
    assert len(pickle.dumps(request)) - len(pickle.dumps(light)) >= RGB.nbytes
    assert len(pickle.dumps(light)) < 2048
    # a request without pixels is still a valid request of its model
    assert light.replace(seed=1).image == request.image
    with pytest.raises(ValueError, match=r"^image: "):
        light.image.array()
    copy = pickle.loads(pickle.dumps(request))
    assert copy == request
    np.testing.assert_array_equal(copy.image.array(), RGB)
