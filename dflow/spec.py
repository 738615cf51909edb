"""What dflow knows about a model without loading its weights.

A :class:`ModelSpec` is read from the JSON configs of a diffusers folder (or a
preset's YAML): family, latent geometry, text-encoder widths, defaults and
limits, and the bytes of weights each stage holds. It is small and picklable,
so the scheduler can hand it to clients that do not have the model locally.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAGES = ("encoder", "dit", "vae")

#: Defaults of a family's diffusers pipeline, used for folders that dflow did not
#: build (presets carry their own).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "flux": {"height": 1024, "width": 1024, "steps": 28, "guidance_scale": 3.5},
    "pixart": {"height": 1024, "width": 1024, "steps": 20, "guidance_scale": 4.5},
    "wan": {
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "steps": 50,
        "guidance_scale": 5.0,
    },
}

DEFAULT_LIMITS: dict[str, Any] = {
    "max_size": 2048,
    "max_frames": 129,
    "max_steps": 200,
    "max_guidance_scale": 30.0,
}


def stage_of_component(component: str) -> str | None:
    """Which stage holds a pipeline component (``None``: no stage needs it)."""
    if component.startswith(("text_encoder", "tokenizer")):
        return "encoder"
    if component.startswith("transformer") or component == "scheduler":
        return "dit"
    if component == "vae":
        return "vae"
    return None


@dataclass(frozen=True)
class ModelSpec:
    """Facts about one model, enough to validate and price a request.

    Parameters
    ----------
    name
        Canonical model name: a preset name, a Hugging Face id or an absolute path.
    family
        ``"flux"``, ``"pixart"`` or ``"wan"``.
    pipeline
        The diffusers pipeline class (``model_index.json``'s ``_class_name``).
    source
        The diffusers folder the weights load from; ``None`` for presets built in
        memory with random weights.
    """

    name: str
    family: str
    pipeline: str
    source: str | None
    preset: str | None
    video: bool
    dtype: str
    vae_scale: int
    vae_scale_temporal: int
    patch: int
    latent_channels: int
    text_dim: int
    pooled_dim: int
    max_sequence_length: int
    negative_prompts: bool
    defaults: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    weight_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE downsampling x patch)."""
        return self.vae_scale * self.patch

    def limit(self, key: str) -> Any:
        return self.limits.get(key, DEFAULT_LIMITS[key])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)


_registry: dict[str, ModelSpec] = {}
_lock = threading.Lock()


def register(spec: ModelSpec) -> None:
    """Make ``spec`` resolvable by name in this process."""
    with _lock:
        _registry[spec.name] = spec


def canonical_name(model: str) -> str:
    """The name a model is known by everywhere: folders become absolute paths."""
    if os.path.isdir(model):
        return str(Path(model).resolve())
    return model


def resolve(model: str) -> ModelSpec:
    """Find the spec of ``model``.

    Looked up in order: specs registered in this process, dflow presets, a local
    diffusers folder, a Hugging Face id in the local cache (offline), and last the
    models the default Dask client's cluster serves (``dflow.models``). Raises
    ``ValueError`` naming the field ``model`` when none matches.
    """
    from dflow import presets

    if not isinstance(model, str) or not model:
        raise ValueError(f"model: expected a model name or path, got {model!r}")
    name = canonical_name(model)
    with _lock:
        spec = _registry.get(name)
    if spec is not None:
        return spec
    if name in presets.names():
        spec = presets.spec(name)
    elif os.path.isfile(os.path.join(name, "model_index.json")):
        spec = from_folder(name)
    else:
        folder = _hf_cache_folder(name)
        if folder is None and _fetch_cluster_specs():
            return resolve(model)
        if folder is None:
            raise ValueError(
                f"model: unknown model {model!r}; expected a preset "
                f"({', '.join(sorted(presets.names()))}), a diffusers folder with a "
                "model_index.json, a Hugging Face id in the local cache, or a model "
                "a connected dflow cluster serves"
            )
        spec = from_folder(folder, name=name)
    register(spec)
    return spec


def _fetch_cluster_specs() -> bool:
    """Register the specs of the models the default client's cluster serves, so
    a notebook can name a model whose folder only the workers have. Returns
    whether it learned any model it did not know."""
    try:
        from distributed import default_client

        from dflow.client import models

        client = default_client()
    except (ImportError, ValueError):
        return False
    if client.asynchronous:
        # in the client's own event loop: a blocking call would never return
        return False
    with _lock:
        before = set(_registry)
    models(client)
    with _lock:
        return bool(set(_registry) - before)


def _hf_cache_folder(repo_id: str) -> str | None:
    if repo_id.count("/") != 1:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def read_configs(folder: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The pipeline class and each component's config from a diffusers folder."""
    index = json.loads(Path(folder, "model_index.json").read_text())
    configs: dict[str, dict[str, Any]] = {}
    for component, value in index.items():
        if component.startswith("_") or not isinstance(value, list):
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


def from_folder(folder: str, name: str | None = None) -> ModelSpec:
    """Describe a diffusers folder of a supported family."""
    from dflow.adapters import adapter_for

    pipeline, configs = read_configs(folder)
    adapter = adapter_for(pipeline)
    return adapter.describe(
        name=name or str(Path(folder).resolve()),
        pipeline=pipeline,
        configs=configs,
        source=str(Path(folder).resolve()),
        preset=None,
        dtype="bfloat16",
        defaults=dict(FAMILY_DEFAULTS[adapter.family]),
        limits={},
        weight_bytes=folder_weight_bytes(folder),
    )


def folder_weight_bytes(folder: str) -> dict[str, int]:
    """Bytes of weights per stage, from the safetensors/bin files' sizes on disk."""
    total = dict.fromkeys(STAGES, 0)
    for sub in Path(folder).iterdir():
        stage = stage_of_component(sub.name)
        if stage is None or not sub.is_dir():
            continue
        for weights in sub.iterdir():
            if weights.suffix in (".safetensors", ".bin"):
                total[stage] += weights.stat().st_size
    return total
