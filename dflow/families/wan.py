"""Wan 2.1 and 2.2: UMT5 encoder, a 3D DiT (Wan 2.2 A14B: two experts), AutoencoderKLWan.

Text-to-video runs ``WanPipeline``; image-to-video ``WanImageToVideoPipeline``,
whose encoder stage also encodes the input image with the Wan VAE into the
latent condition the DiT reads (docs/wan22.md says why there). Wan 2.2 A14B
splits denoising between a high-noise expert (``transformer``: the steps whose
timestep is at least ``boundary_ratio`` of the training timesteps) and a
low-noise expert (``transformer_2``: the rest).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dflow.errors import InvalidRequest
from dflow.families.base import Family, TensorSpec
from dflow.pools import EXPERT_STAGES
from dflow.spec import ModelSpec


class Wan(Family):
    name = "wan"
    pipelines = ("WanPipeline",)
    video = True
    components = {
        "text_encoder": "encoder",
        "tokenizer": "encoder",
        # a DiT worker holds both experts (Wan 2.2), an expert's worker one
        "transformer": ("dit", EXPERT_STAGES["high"]),
        "transformer_2": ("dit", EXPERT_STAGES["low"]),
        "scheduler": ("dit", *EXPERT_STAGES.values()),
        "vae": "vae",
    }
    transformers = ("transformer", "transformer_2")
    max_sequence_length = 512
    defaults = {
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "steps": 50,
        "guidance_scale": 5.0,
    }

    def geometry(self, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        transformer = _present(configs, "transformer") or configs["transformer_2"]
        vae = configs["vae"]
        return {
            "vae_scale": vae.get("scale_factor_spatial", 8),
            "vae_scale_temporal": vae.get("scale_factor_temporal", 4),
            "patch": transformer["patch_size"][1],
            # the VAE's latents; an image-to-video DiT reads the condition too
            "latent_channels": vae.get("z_dim", 16),
            "text_dim": configs["text_encoder"]["d_model"],
            "pooled_dim": 0,
        }

    def config_limits(self, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """The DiT's rotary embedding covers ``rope_max_seq_len`` patches along
        each axis: sizes and frames beyond them fail in the transformer."""
        transformer = _present(configs, "transformer") or configs["transformer_2"]
        rope = transformer.get("rope_max_seq_len", 1024)
        geometry = self.geometry(configs)
        largest = rope * geometry["patch"] * geometry["vae_scale"]
        frames = (rope - 1) * geometry["vae_scale_temporal"] + 1
        return {
            "max_size": min(self.limits["max_size"], largest),
            "max_frames": min(self.limits["max_frames"], frames),
        }

    def boundary_ratio(self, configs: Mapping[str, Mapping[str, Any]]) -> float | None:
        ratio = configs.get("_pipeline", {}).get("boundary_ratio")
        if ratio is None:
            return None
        if not (
            _present(configs, "transformer") and _present(configs, "transformer_2")
        ):
            # one expert only: the pipeline runs it for every step it can
            return None
        return float(ratio)

    def check_frames(self, spec: ModelSpec, num_frames: int | None) -> None:
        """``4k + 1`` frames: the VAE compresses 4 frames into one after the first."""
        step, largest = spec.vae_scale_temporal, spec.limit("max_frames")
        if num_frames is None or not (
            1 <= num_frames <= largest and (num_frames - 1) % step == 0
        ):
            raise InvalidRequest(
                "num_frames",
                f"{num_frames} is not allowed for {spec.name}: use {step}k + 1 frames "
                f"from 1 to {largest}",
            )

    def latent_dtype(self, dtype: str) -> str:
        # the Wan pipelines keep their latents in float32 whatever the embeddings' dtype
        return "float32"

    def expert_steps(self, spec: ModelSpec, steps: int) -> dict[str, int] | None:
        """Steps of each expert: the high-noise expert runs the steps whose
        timestep is at least ``boundary_ratio`` x the training timesteps, as the
        pipeline chooses, with the timesteps the scheduler sets (UniPC or
        flow-match Euler with flow sigmas and a static shift, Wan's schedulers)."""
        if spec.boundary_ratio is None:
            return None
        timesteps = flow_timesteps(spec.scheduler, steps)
        if timesteps is None:
            return None
        # compared in float32, as torch compares a timestep tensor with a float
        train = spec.scheduler.get("num_train_timesteps", 1000)
        boundary = np.float32(spec.boundary_ratio * train)
        high = int(np.count_nonzero(timesteps.astype(np.float32) >= boundary))
        return {"high": high, "low": steps - high}


class WanImageToVideo(Wan):
    """Wan image-to-video (2.2 A14B): the encoder stage holds the VAE too, to
    encode the input image into the condition (mask and image latents) the
    DiT reads beside its latents."""

    name = "wan-i2v"
    pipelines = ("WanImageToVideoPipeline",)
    image_input = True
    components = {
        **Wan.components,
        "vae": ("encoder", "vae"),
    }
    defaults = {**Wan.defaults, "guidance_scale": 3.5}

    def geometry(self, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        for component in ("transformer", "transformer_2"):
            config = _present(configs, component)
            if config and config.get("image_dim") is not None:
                raise ValueError(
                    "model: Wan 2.1 image-to-video (a CLIP image encoder feeding the "
                    "DiT) is not supported; dflow serves Wan 2.2 image-to-video"
                )
        if configs.get("_pipeline", {}).get("expand_timesteps"):
            raise ValueError(
                "model: Wan 2.2 TI2V image-to-video (expand_timesteps) is not "
                "supported; serve it as text-to-video with WanPipeline"
            )
        return super().geometry(configs)

    def condition(
        self, spec: ModelSpec, height: int, width: int, frames: int
    ) -> TensorSpec:
        """What the encoder makes of the image, as ``prepare_latents`` returns it:
        a first-frame mask of ``vae_scale_temporal`` channels and the image's
        latents, per latent frame, in float32."""
        latent_frames, latent_h, latent_w = self.latent_grid(
            spec, height, width, frames
        )
        channels = spec.vae_scale_temporal + spec.latent_channels
        return TensorSpec((1, channels, latent_frames, latent_h, latent_w), "float32")

    def embeddings(
        self,
        spec: ModelSpec,
        cfg: bool,
        dtype: str | None = None,
        *,
        height: int = 0,
        width: int = 0,
        frames: int = 1,
    ) -> dict[str, TensorSpec]:
        tensors = super().embeddings(spec, cfg, dtype)
        tensors["condition"] = self.condition(
            spec, height or spec.size_multiple, width or spec.size_multiple, frames
        )
        return tensors


def _present(configs: Mapping[str, Mapping[str, Any]], component: str) -> Any:
    """A component's config, or ``None`` where the folder leaves it out."""
    config = configs.get(component)
    if not config or config.get("_class_name") is None:
        return None
    return config


def flow_timesteps(scheduler: Mapping[str, Any], steps: int) -> np.ndarray | None:
    """The timesteps ``scheduler`` (a config) sets for ``steps`` steps, computed
    as the scheduler computes them, for the flow-sigma schedules Wan ships;
    ``None`` for others (dynamic shifting, Karras sigmas, a terminal shift...)."""
    name = scheduler.get("_class_name")
    train = scheduler.get("num_train_timesteps", 1000)
    plain = not any(
        scheduler.get(key)
        for key in (
            "use_dynamic_shifting",
            "shift_terminal",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
        )
    )
    if not plain:
        return None
    if name == "UniPCMultistepScheduler" and scheduler.get("use_flow_sigmas"):
        # float64 sigmas, shifted, to integer timesteps (the scheduler's int64 cast)
        shift = scheduler.get("flow_shift", 1.0)
        sigmas = np.linspace(1, 1 / train, steps + 1)[:-1]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        return (sigmas * train).astype(np.int64)
    if name == "FlowMatchEulerDiscreteScheduler":
        # the range comes from the float32 schedule built at construction,
        # shifted there and shifted again here
        shift = scheduler.get("shift", 1.0)
        ends = np.array([train, 1], dtype=np.float32) / np.float32(train)
        ends = shift * ends / (1 + (shift - 1) * ends)
        timesteps = np.linspace(float(ends[0]) * train, float(ends[1]) * train, steps)
        sigmas = timesteps / train
        sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
        return sigmas * np.float32(train)
    return None


FAMILY = Wan()
IMAGE_TO_VIDEO = WanImageToVideo()
