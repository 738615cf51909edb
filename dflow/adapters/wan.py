"""Wan 2.1/2.2 text-to-video: UMT5 encoder, WanTransformer3DModel, AutoencoderKLWan."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dflow.adapters.base import Adapter, Embeddings, split_batch


class WanAdapter(Adapter):
    """Runs ``WanPipeline`` (:mod:`dflow.families.wan`)."""

    def encode(self, requests: Sequence) -> list[Embeddings]:
        cfg = self.uses_negative(requests[0])
        with torch.inference_mode():
            embeds, negative = self.pipe.encode_prompt(
                prompt=[r.prompt for r in requests],
                negative_prompt=[r.negative_prompt for r in requests],
                do_classifier_free_guidance=cfg,
                max_sequence_length=self.spec.max_sequence_length,
                device=self.device,
            )
        batch = {"prompt_embeds": embeds}
        if cfg:
            batch["negative_prompt_embeds"] = negative
        return split_batch(batch, len(requests))

    def denoise_inputs(self, request, embeddings: Embeddings) -> dict:
        return {
            **embeddings,
            "num_frames": request.num_frames,
            "max_sequence_length": self.spec.max_sequence_length,
        }

    def _configure(self, pipe: Any) -> None:
        pipe.vae_scale_factor_spatial = self.spec.vae_scale
        pipe.vae_scale_factor_temporal = self.spec.vae_scale_temporal

    def decode_latents(self, requests: Sequence, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = (
            torch.tensor(vae.config.latents_mean)
            .view(shape)
            .to(latents.device, latents.dtype)
        )
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(
            latents.device, latents.dtype
        )
        return vae.decode(latents / inverse_std + mean, return_dict=False)[0]
