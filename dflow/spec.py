"""What dflow knows about a model without loading its weights.

A :class:`ModelSpec` is read from the JSON configs of a diffusers folder (or a
preset's YAML) by the model's family (:mod:`dflow.families`): latent geometry,
text-encoder widths, defaults and limits, and the bytes of weights each stage
holds. It is small and picklable, so the scheduler can hand it to clients that
do not have the model locally. Which name means which model is
:mod:`dflow.catalog`'s business.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dflow.pools import STAGES as STAGES  # a request's chain: one home, dflow.pools


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
        The diffusers folder the weights load from (a tiny preset's is built
        there when a stage first loads it); ``None`` for presets built in memory
        with random weights.
    preset
        The preset's name, for models that are dflow presets.
    boundary_ratio
        Models whose denoising two experts share (Wan 2.2 A14B): the high-noise
        expert runs the steps whose timestep is at least this fraction of the
        scheduler's training timesteps, the low-noise expert the rest. ``None``
        for one DiT.
    scheduler
        The scheduler's config (``_class_name`` and its keys): which steps
        each expert runs follows from it.
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
    boundary_ratio: float | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)

    @property
    def experts(self) -> bool:
        """Whether two experts share the denoising (see ``boundary_ratio``)."""
        return self.boundary_ratio is not None

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE downsampling x patch)."""
        return self.vae_scale * self.patch

    def limit(self, key: str) -> Any:
        """A limit of requests (``max_size``, ``max_frames``, ``max_steps``,
        ``max_guidance_scale``)."""
        return self.limits[key]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)


def canonical_name(model: str) -> str:
    """The name a model is known by everywhere: folders become absolute paths."""
    if os.path.isdir(model):
        return str(Path(model).resolve())
    return model
