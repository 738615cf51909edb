"""Flux: CLIP + T5 text encoders, FluxTransformer2DModel on packed latents, AutoencoderKL."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dflow.adapters.base import Adapter, Embeddings, split_batch


class FluxAdapter(Adapter):
    """Runs ``FluxPipeline`` (:mod:`dflow.families.flux`)."""

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
