"""Presets: tiny folders that stock diffusers loads, real-size weight bytes, and
the tokenizers they are built with offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
from transformers import AutoTokenizer

import dask.config

from dflow import catalog, families, presets, tokenizers
from dflow.catalog import resolve

GIB = 2**30

# (preset, pipeline, family, video, size_multiple, latent channels, text width,
# pooled width, negative prompts)
TINY_SPECS = [
    pytest.param(
        "tiny-flux",
        "FluxPipeline",
        "flux",
        False,
        16,
        16,
        32,
        32,
        False,
        id="tiny-flux",
    ),
    pytest.param(
        "tiny-pixart",
        "PixArtSigmaPipeline",
        "pixart",
        False,
        16,
        4,
        32,
        0,
        True,
        id="tiny-pixart",
    ),
    pytest.param(
        "tiny-wan", "WanPipeline", "wan", True, 16, 16, 32, 0, True, id="tiny-wan"
    ),
    pytest.param(
        "tiny-wan22-t2v",
        "WanPipeline",
        "wan",
        True,
        16,
        16,
        32,
        0,
        True,
        id="tiny-wan22-t2v",
    ),
    # 36 DiT input channels: 16 of latents and 20 of the image's condition
    pytest.param(
        "tiny-wan22-i2v",
        "WanImageToVideoPipeline",
        "wan-i2v",
        True,
        16,
        16,
        32,
        0,
        True,
        id="tiny-wan22-i2v",
    ),
]


@pytest.mark.parametrize(
    "name, pipeline, family, video, multiple, channels, text_dim, pooled_dim, negative",
    TINY_SPECS,
)
def test_tiny_preset_spec(
    tiny_folders,
    name,
    pipeline,
    family,
    video,
    multiple,
    channels,
    text_dim,
    pooled_dim,
    negative,
):
    spec = resolve(name)
    assert (spec.name, spec.preset, spec.pipeline) == (name, name, pipeline)
    assert (spec.family, spec.video, spec.size_multiple) == (family, video, multiple)
    assert spec.latent_channels == channels
    assert (spec.text_dim, spec.pooled_dim) == (text_dim, pooled_dim)
    assert spec.negative_prompts is negative
    assert spec.vae_scale_temporal == (4 if video else 1)
    assert spec.max_sequence_length == 32
    assert spec.source == tiny_folders[name]
    assert spec.dtype == "float32"
    # the same facts, read back from the folder's own configs
    described = resolve(tiny_folders[name])
    for field in (
        "family",
        "pipeline",
        "video",
        "vae_scale",
        "vae_scale_temporal",
        "patch",
        "latent_channels",
        "text_dim",
        "pooled_dim",
        "negative_prompts",
        "boundary_ratio",
    ):
        assert getattr(described, field) == getattr(spec, field), field
    # the folder's scheduler config lists every key, the preset what it sets
    family = families.of(spec)
    for steps in (1, 4, 40):
        split = family.expert_steps(spec, steps)
        assert family.expert_steps(described, steps) == split
    assert described.name == described.source == tiny_folders[name]


@pytest.mark.parametrize(
    "name", ["tiny-flux", "tiny-pixart", "tiny-wan", "tiny-wan22-t2v", "tiny-wan22-i2v"]
)
def test_tiny_folder_loads_with_stock_diffusers(tiny_folders, name):
    folder = Path(tiny_folders[name])
    assert folder.parent == Path(presets.cache_dir(), "models")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == presets.get(name)["pipeline"]

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)

    assert type(pipe) is getattr(diffusers, index["_class_name"])
    for component in presets.get(name)["components"]:
        assert getattr(pipe, component) is not None, component
    # built once: asking again finds the folder
    assert presets.folder(name) == str(folder)


def test_a_tiny_preset_is_built_where_its_weights_load(tmp_path):
    """Resolving names the folder; loading weights (``folder_of``, which a
    stage's adapter calls) builds it there."""
    with dask.config.set({"dflow.cache-dir": str(tmp_path)}):
        spec = catalog.from_preset("tiny-pixart")
        assert spec.source is not None and not os.path.exists(spec.source)
        assert presets.folder_of(spec) == spec.source
        assert Path(spec.source, "model_index.json").is_file()
    assert presets.folder_of(catalog.resolve("flux.1-dev")) is None  # built in memory


@pytest.mark.parametrize("name", presets.names())
def test_recorded_weight_bytes_are_the_counted_ones(name):
    """Each preset records its stages' weight bytes, so describing it needs no
    torch; counted again on the meta device, they must match."""
    counted = presets.count_weight_bytes(name)
    assert presets.get(name)["weight_bytes"] == counted, (
        f"configs/models/{name}.yaml: set weight_bytes to {counted}"
    )


def test_preset_cache_is_the_sessions(dflow_cache_dir):
    assert presets.cache_dir() == Path(dflow_cache_dir)
    assert os.environ["DASK_DFLOW__CACHE_DIR"] == dflow_cache_dir


def test_unknown_preset():
    with pytest.raises(ValueError, match="model: unknown preset 'tiny-sd'"):
        presets.get("tiny-sd")


# Weights of each stage on an H200 in bf16 (profiles/h200-stages.json, DESIGN.md):
# Flux's encoder stage holds T5-XXL (8.87 GiB) and CLIP-L (0.23 GiB).
WEIGHT_ANCHORS_GIB = {
    "flux.1-dev": {"encoder": 8.87 + 0.23, "dit": 22.17, "vae": 0.16},
    "pixart-sigma-1024": {"encoder": 8.87, "dit": 1.14, "vae": 0.16},
    "wan2.1-t2v-1.3b": {"encoder": 10.58, "dit": 2.64, "vae": 0.24},
    "wan2.1-t2v-14b": {"encoder": 10.58, "dit": 26.61, "vae": 0.24},
    # Wan 2.2 A14B: two experts of Wan 2.1 14B's size; image-to-video's encoder
    # stage holds the VAE too
    "wan2.2-t2v-a14b": {
        "encoder": 10.58,
        "dit": 2 * 26.61,
        "vae": 0.24,
        "dit-high": 26.61,
        "dit-low": 26.61,
    },
    "wan2.2-i2v-a14b": {
        "encoder": 10.58 + 0.24,
        "dit": 2 * 26.61,
        "vae": 0.24,
        "dit-high": 26.61,
        "dit-low": 26.61,
    },
}


@pytest.mark.parametrize("name", sorted(WEIGHT_ANCHORS_GIB))
def test_real_size_weight_bytes(name):
    spec = resolve(name)
    assert spec.source is None  # built in memory on the worker, never saved
    assert spec.dtype == "bfloat16"
    assert spec.weight_bytes.keys() == WEIGHT_ANCHORS_GIB[name].keys()
    for stage, gib in WEIGHT_ANCHORS_GIB[name].items():
        # the profile rounds to 0.01 GiB, which is more than 2% of a VAE
        expected = pytest.approx(gib, rel=0.02, abs=0.005)
        assert spec.weight_bytes[stage] / GIB == expected, stage
    # DESIGN.md: text encoders hold 8.9-10.6 GiB (plus a VAE for an image)
    assert 8.9 * 0.98 <= spec.weight_bytes["encoder"] / GIB <= 10.9 * 1.02


@pytest.mark.parametrize(
    "name, family, multiple, video",
    [
        ("flux.1-dev", "flux", 16, False),
        ("pixart-sigma-1024", "pixart", 16, False),
        ("wan2.1-t2v-1.3b", "wan", 16, True),
        ("wan2.1-t2v-14b", "wan", 16, True),
        ("wan2.2-t2v-a14b", "wan", 16, True),
        ("wan2.2-i2v-a14b", "wan-i2v", 16, True),
    ],
)
def test_real_size_spec(name, family, multiple, video):
    spec = resolve(name)
    assert (spec.family, spec.size_multiple, spec.video) == (family, multiple, video)
    assert spec.text_dim == 4096
    assert spec.preset == name


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("A Photo OF a CAT!", [49406, 320, 1125, 539, 320, 2368, 256, 49407]),
    ],
)
def test_clip_tokenizer_matches_clip(text, ids):
    tokenizer = tokenizers.clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer(text).input_ids == ids


def test_t5_tokenizer():
    tokenizer = tokenizers.t5_tokenizer()
    assert len(tokenizer) == 1000
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
    )
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert tokenizer.model_max_length == 512
    with pytest.raises(ValueError, match="'t5' or 'clip'"):
        tokenizers.build("bert")


def test_tiny_folder_tokenizers_are_the_built_ones(tiny_folders):
    """A preset's tokenizer built in this process matches the one saved in its
    folder, so a client validating against one agrees with the encoder's."""
    texts = ["a photo of a cat", "PixArt: repetitions & ParamSpec CERTIFICATE ─ €"]
    for name, component, built in [
        ("tiny-flux", "tokenizer", tokenizers.clip_tokenizer()),
        ("tiny-flux", "tokenizer_2", tokenizers.t5_tokenizer()),
        ("tiny-wan", "tokenizer", tokenizers.t5_tokenizer()),
    ]:
        saved = AutoTokenizer.from_pretrained(tiny_folders[name], subfolder=component)
        assert saved.get_vocab() == built.get_vocab(), (name, component)
        for text in texts:
            assert saved(text).input_ids == built(text).input_ids


BUILD_OFFLINE = """
import json, sys
from dflow import presets, tokenizers
t5 = tokenizers.t5_tokenizer()
json.dump(
    {"cache": str(presets.cache_dir()), "vocab": t5.get_vocab(),
     "scores": [score for _, score in tokenizers._unigram_vocab(1000)]},
    sys.stdout,
)
"""


def test_tokenizers_build_offline_and_alike_in_every_process(dflow_cache_dir):
    """Workers build their own tokenizers: with no hub, and all the same ids,
    whatever the process imported before (this one has torch, that one not)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", BUILD_OFFLINE],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    built = json.loads(result.stdout)
    assert built["cache"] == dflow_cache_dir
    assert built["vocab"] == tokenizers.t5_tokenizer().get_vocab()
    assert built["scores"] == [s for _, s in tokenizers._unigram_vocab(1000)]
