"""Model presets: tiny random-weight models for tests, real architectures for benchmarks.

A preset is a YAML file in ``dflow/configs/models``: the pipeline class, each
component's class and config, the pipeline's own settings (``pipeline_config``:
Wan 2.2's ``boundary_ratio``), defaults and limits. Presets with ``build: folder``
(the tiny ones) are built once with random weights and offline tokenizers, saved
as an ordinary diffusers folder in ``dflow.cache-dir`` and then loaded like any
other folder. Presets with ``build: memory`` (real sizes) are built directly on
the device that runs them, a stage at a time, since their random weights are
tens of GB. Each YAML also records its stages' ``weight_bytes`` (counted on the
meta device by :func:`count_weight_bytes`), so describing a preset needs no
torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

import dask.config

import dflow.config  # noqa: F401
from dflow import families
from dflow.logs import quiet_progress_bars
from dflow.spec import STAGES, ModelSpec

logger = logging.getLogger(__name__)


@cache
def _presets() -> dict[str, dict[str, Any]]:
    folder = files("dflow.configs").joinpath("models")
    return {
        entry.name.removesuffix(".yaml"): yaml.safe_load(entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    }


def names() -> list[str]:
    return sorted(_presets())


def get(name: str) -> dict[str, Any]:
    try:
        return _presets()[name]
    except KeyError:
        raise ValueError(
            f"model: unknown preset {name!r}; presets are {', '.join(names())}"
        ) from None


def cache_dir() -> Path:
    path = dask.config.get("dflow.cache-dir", None) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dflow"
    )
    return Path(path)


def folder_path(name: str) -> Path:
    """Where the diffusers folder of a ``build: folder`` preset is (or will be)
    built. The folder name carries a hash of the preset, so editing a preset
    rebuilds it."""
    preset = get(name)
    digest = hashlib.sha256(json.dumps(preset, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "models" / f"{name}-{digest[:12]}"


def folder(name: str) -> str:
    """The diffusers folder of a ``build: folder`` preset, built on first use.

    Concurrent builders (several workers starting at once) each write a temporary
    folder and the first rename wins.
    """
    target = folder_path(name)
    if (target / "model_index.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building preset %s in %s", name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        pipeline = build(name, stages=STAGES, device="cpu", dtype="float32")
        with quiet_progress_bars():
            pipeline.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def folder_of(spec: ModelSpec) -> str | None:
    """The diffusers folder ``spec``'s weights load from, a tiny preset's built
    here on first use; ``None`` for presets built in memory (:func:`build`)."""
    if spec.preset is not None and spec.preset in names():
        if get(spec.preset)["build"] == "memory":
            return None
        return folder(spec.preset)
    return spec.source


def _component_class(class_name: str) -> Any:
    import diffusers
    import transformers

    for module in (diffusers, transformers):
        if hasattr(module, class_name):
            return getattr(module, class_name)
    raise ValueError(f"unknown component class {class_name!r}")


def build_component(entry: dict[str, Any], device: str = "cpu", dtype: Any = None):
    """Instantiate one component of a preset with random weights, seeded by the
    entry's ``seed`` (default 0)."""
    import torch

    if "kind" in entry:
        from dflow import tokenizers

        options = {k: v for k, v in entry.items() if k != "kind"}
        return tokenizers.build(entry["kind"], **options)
    cls = _component_class(entry["class"])
    config = dict(entry.get("config", {}))
    if hasattr(cls, "set_timesteps"):
        return cls.from_config(config)  # a scheduler
    torch.manual_seed(entry.get("seed", 0))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            if hasattr(cls, "config_class") and hasattr(cls.config_class, "model_type"):
                model = cls(cls.config_class(**config))  # transformers
            else:
                model = cls.from_config(config)  # diffusers
    finally:
        torch.set_default_dtype(previous)
    # as from_pretrained(torch_dtype=...) does: some modules stay in float32
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, parameter in model.named_parameters():
        if any(module in name for module in keep):
            parameter.data = parameter.data.float()
    return model.eval()


def build(name: str, stages: tuple[str, ...], device: str = "cpu", dtype: Any = None):
    """A pipeline of preset ``name`` holding only the components of ``stages``."""
    import diffusers
    import torch

    preset = get(name)
    family = families.for_pipeline(preset["pipeline"])
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    components = {}
    for component, entry in preset["components"].items():
        if set(family.stages_of(component)) & set(stages):
            components[component] = build_component(entry, device, dtype)
        else:
            components[component] = None
    pipeline = getattr(diffusers, preset["pipeline"])
    return pipeline(**components, **preset.get("pipeline_config", {}))


def count_weight_bytes(name: str) -> dict[str, int]:
    """Bytes of each stage's weights at the preset's dtype, counted on the meta
    device: what the preset's ``weight_bytes`` records."""
    import torch

    preset = get(name)
    family = families.for_pipeline(preset["pipeline"])
    element = torch.empty(0, dtype=getattr(torch, preset.get("dtype", "float32")))
    components = {}
    for component, entry in preset["components"].items():
        if not family.stages_of(component) or "kind" in entry:
            continue
        model = build_component(entry, device="meta")
        if isinstance(model, torch.nn.Module):
            count = sum(p.numel() for p in model.parameters())
            components[component] = count * element.element_size()
    experts = preset.get("pipeline_config", {}).get("boundary_ratio") is not None
    return family.stage_weights(components, experts)
