"""PixArt-Sigma: T5 text encoder, PixArtTransformer2DModel, AutoencoderKL."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dflow.adapters.base import Adapter, Embeddings, StepCallback, split_batch


class PixArtAdapter(Adapter):
    """Runs PixArt pipelines (:mod:`dflow.families.pixart`)."""

    def encode(self, requests: Sequence) -> list[Embeddings]:
        cfg = self.uses_negative(requests[0])
        with torch.inference_mode():
            embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
                prompt=[r.prompt for r in requests],
                do_classifier_free_guidance=cfg,
                negative_prompt=[r.negative_prompt for r in requests],
                device=self.device,
                clean_caption=False,
                max_sequence_length=self.spec.max_sequence_length,
            )
        batch = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if cfg:
            batch["negative_prompt_embeds"] = negative
            batch["negative_prompt_attention_mask"] = negative_mask
        return split_batch(batch, len(requests))

    def denoise_inputs(self, request, embeddings: Embeddings) -> dict:
        return {
            "prompt": None,
            # the pipeline's default negative_prompt="" conflicts with precomputed embeddings
            "negative_prompt": None,
            **embeddings,
            **self.family.call_options,
            "max_sequence_length": self.spec.max_sequence_length,
        }

    def step_callback(self, on_step: StepCallback) -> dict:
        # PixArt still takes the legacy per-step callback
        return {"callback": lambda step, timestep, latents: on_step(step)}

    def decode_latents(self, requests: Sequence, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(
            latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False
        )[0]
