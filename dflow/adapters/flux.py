"""Flux: CLIP + T5 text encoders, FluxTransformer2DModel on packed latents, AutoencoderKL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dflow.adapters.base import Adapter, Embeddings, split_batch
from dflow.spec import ModelSpec


class FluxAdapter(Adapter):
    family = "flux"
    pipelines = ("FluxPipeline",)
    prompt_tokenizer = "tokenizer_2"

    @classmethod
    def describe(
        cls, *, configs: dict[str, dict], defaults: dict, **kwargs: Any
    ) -> ModelSpec:
        transformer, vae = configs["transformer"], configs["vae"]
        return ModelSpec(
            family=cls.family,
            video=False,
            vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
            vae_scale_temporal=1,
            # latents are packed in 2x2 patches
            patch=2,
            latent_channels=transformer["in_channels"] // 4,
            text_dim=configs["text_encoder_2"]["d_model"],
            pooled_dim=configs["text_encoder"]["hidden_size"],
            max_sequence_length=defaults.pop("max_sequence_length", 512),
            negative_prompts=False,
            defaults=defaults,
            **kwargs,
        )

    def encode(self, requests: Sequence) -> list[Embeddings]:
        with torch.inference_mode():
            prompt_embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=[r.prompt for r in requests],
                prompt_2=None,
                device=self.device,
                max_sequence_length=self.spec.max_sequence_length,
            )
        batch = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        return split_batch(batch, len(requests))

    def denoise_inputs(self, request, embeddings: Embeddings) -> dict:
        return {
            "prompt_embeds": embeddings["prompt_embeds"],
            "pooled_prompt_embeds": embeddings["pooled_prompt_embeds"],
            "max_sequence_length": self.spec.max_sequence_length,
        }

    def decode_latents(self, requests: Sequence, latents: torch.Tensor) -> torch.Tensor:
        request = requests[0]
        vae = self.pipe.vae
        latents = self.pipe._unpack_latents(
            latents, request.height, request.width, self.spec.vae_scale
        )
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
