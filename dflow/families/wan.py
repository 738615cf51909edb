"""Wan 2.1/2.2 text-to-video: UMT5 encoder, a 3D DiT, AutoencoderKLWan."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dflow.errors import InvalidRequest
from dflow.families.base import Family
from dflow.spec import ModelSpec


class Wan(Family):
    name = "wan"
    pipelines = ("WanPipeline",)
    video = True
    components = {
        "text_encoder": "encoder",
        "tokenizer": "encoder",
        # Wan 2.2's two experts (high and low noise) are both DiT weights
        "transformer": "dit",
        "transformer_2": "dit",
        "scheduler": "dit",
        "vae": "vae",
    }
    max_sequence_length = 512
    defaults = {
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "steps": 50,
        "guidance_scale": 5.0,
    }

    def geometry(self, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        transformer = configs.get("transformer") or configs["transformer_2"]
        vae = configs["vae"]
        return {
            "vae_scale": vae.get("scale_factor_spatial", 8),
            "vae_scale_temporal": vae.get("scale_factor_temporal", 4),
            "patch": transformer["patch_size"][1],
            "latent_channels": transformer["in_channels"],
            "text_dim": configs["text_encoder"]["d_model"],
            "pooled_dim": 0,
        }

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
        # WanPipeline keeps its latents in float32 whatever the embeddings' dtype
        return "float32"


FAMILY = Wan()
