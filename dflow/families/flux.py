"""Flux: CLIP + T5 text encoders, a DiT on latents packed in 2x2 patches, AutoencoderKL."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dflow.families.base import Family, TensorSpec
from dflow.spec import ModelSpec


class Flux(Family):
    name = "flux"
    pipelines = ("FluxPipeline",)
    components = {
        "text_encoder": "encoder",
        "tokenizer": "encoder",
        "text_encoder_2": "encoder",
        "tokenizer_2": "encoder",
        "transformer": "dit",
        "scheduler": "dit",
        "vae": "vae",
    }
    # T5's limit; CLIP sees the first 77 tokens, as in the stock pipeline
    prompt_tokenizer = "tokenizer_2"
    negative_prompts = False
    max_sequence_length = 512
    defaults = {"height": 1024, "width": 1024, "steps": 28, "guidance_scale": 3.5}

    def geometry(self, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        transformer, vae = configs["transformer"], configs["vae"]
        return {
            "vae_scale": 2 ** (len(vae["block_out_channels"]) - 1),
            "vae_scale_temporal": 1,
            # the DiT sees 2x2 patches of latents, packed by the pipeline
            "patch": 2,
            "latent_channels": transformer["in_channels"] // 4,
            "text_dim": configs["text_encoder_2"]["d_model"],
            "pooled_dim": configs["text_encoder"]["hidden_size"],
        }

    def latents(
        self,
        spec: ModelSpec,
        height: int,
        width: int,
        frames: int = 1,
        dtype: str | None = None,
    ) -> TensorSpec:
        """Packed as ``FluxPipeline._pack_latents`` does: (1, patches, channels x 4)."""
        channels, latent_h, latent_w = self.latent_shape(spec, height, width, frames)
        shape = (1, (latent_h // 2) * (latent_w // 2), channels * 4)
        return TensorSpec(shape, self.latent_dtype(dtype or spec.dtype))


FAMILY = Flux()
