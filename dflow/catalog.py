"""Which model a name means: specs registered in this process, dflow presets,
local diffusers folders and Hugging Face ids in the local cache.

Resolving reads configs only (a preset's YAML, a folder's JSON files): it loads
no weights, builds no folder and asks no scheduler. Models that only a cluster
serves become resolvable through :func:`dflow.models`, which registers them.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from dflow import families, presets
from dflow.spec import ModelSpec, canonical_name

_registry: dict[str, ModelSpec] = {}
_lock = threading.Lock()


def register(spec: ModelSpec) -> None:
    """Make ``spec`` resolvable by name in this process."""
    with _lock:
        _registry[spec.name] = spec


def resolve(model: str) -> ModelSpec:
    """The spec of ``model``.

    Looked up in order: specs registered in this process, dflow presets, a local
    diffusers folder, a Hugging Face id in the local cache (offline). Raises
    ``ValueError`` naming the field ``model`` when none matches.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: expected a model name or path, got {model!r}")
    name = canonical_name(model)
    with _lock:
        spec = _registry.get(name)
    if spec is not None:
        return spec
    if name in presets.names():
        spec = from_preset(name)
    elif os.path.isfile(os.path.join(name, "model_index.json")):
        spec = from_folder(name)
    else:
        folder = _hf_cache_folder(name)
        if folder is None:
            raise ValueError(
                f"model: unknown model {model!r}; expected a preset "
                f"({', '.join(presets.names())}), a diffusers folder with a "
                "model_index.json or a Hugging Face id in the local cache. For a "
                "model only a dflow cluster serves, call dflow.models(client) "
                "first: it makes the cluster's models known here"
            )
        spec = from_folder(folder, name=name)
    register(spec)
    return spec


def from_preset(name: str) -> ModelSpec:
    """The spec of a preset, from its YAML alone (a tiny preset's folder is
    named, not built)."""
    preset = presets.get(name)
    configs = {
        component: {"_class_name": entry.get("class", ""), **entry.get("config", {})}
        for component, entry in preset["components"].items()
    }
    configs["_pipeline"] = dict(preset.get("pipeline_config", {}))
    source = str(presets.folder_path(name)) if preset["build"] == "folder" else None
    return families.for_pipeline(preset["pipeline"]).describe(
        name=name,
        pipeline=preset["pipeline"],
        configs=configs,
        source=source,
        preset=name,
        dtype=preset.get("dtype", "float32"),
        defaults=preset.get("defaults", {}),
        limits=preset.get("limits", {}),
        weight_bytes=preset["weight_bytes"],
    )


def from_folder(folder: str, name: str | None = None) -> ModelSpec:
    """Describe a diffusers folder of a supported family from its JSON configs."""
    pipeline, configs = read_configs(folder)
    family = families.for_pipeline(pipeline)
    source = str(Path(folder).resolve())
    experts = family.boundary_ratio(configs) is not None
    return family.describe(
        name=name or source,
        pipeline=pipeline,
        configs=configs,
        source=source,
        preset=None,
        dtype="bfloat16",
        weight_bytes=folder_weight_bytes(folder, family, experts),
    )


def read_configs(folder: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The pipeline class and each component's config from a diffusers folder;
    the pipeline's own settings (``boundary_ratio``, ...) under ``"_pipeline"``."""
    index = json.loads(Path(folder, "model_index.json").read_text())
    configs: dict[str, dict[str, Any]] = {"_pipeline": {}}
    for component, value in index.items():
        if component.startswith("_"):
            continue
        if not isinstance(value, list):
            configs["_pipeline"][component] = value
            continue
        sub = Path(folder, component)
        for filename in (
            "config.json",
            "scheduler_config.json",
            "tokenizer_config.json",
        ):
            if (sub / filename).is_file():
                configs[component] = json.loads((sub / filename).read_text())
                break
        else:
            configs[component] = {}
        configs[component]["_class_name"] = value[1]
    return index["_class_name"], configs


def folder_weight_bytes(
    folder: str, family: families.Family, experts: bool
) -> dict[str, int]:
    """Bytes of weights per stage (and per expert's stage, for a model of two
    experts), from the safetensors/bin files' sizes on disk."""
    components = {}
    for sub in Path(folder).iterdir():
        if sub.is_dir() and family.stages_of(sub.name):
            components[sub.name] = sum(
                f.stat().st_size
                for f in sub.iterdir()
                if f.suffix in (".safetensors", ".bin")
            )
    return family.stage_weights(components, experts)


def _hf_cache_folder(repo_id: str) -> str | None:
    if repo_id.count("/") != 1:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
