"""Flux: CLIP + T5 text encoders, FluxTransformer2DModel on packed latents, AutoencoderKL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dflow.adapters.base import Adapter, Embeddings, split_batch
from dflow.adapters.denoising import DenoisingState, advance


class FluxAdapter(Adapter):
    """Runs ``FluxPipeline`` (:mod:`dflow.families.flux`)."""

    conditioning_modules = (
        "CombinedTimestepGuidanceTextProjEmbeddings",
        "CombinedTimestepTextProjEmbeddings",
        "AdaLayerNormZero",
        "AdaLayerNormZeroSingle",
        "AdaLayerNormContinuous",
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

    # -- step-level denoising: FluxPipeline.__call__ a step at a time -------------------

    def start(self, request, embeddings: Embeddings) -> DenoisingState:
        from diffusers.pipelines.flux.pipeline_flux import (
            calculate_shift,
            retrieve_timesteps,
        )

        pipe, steps = self.pipe, request.steps
        device = pipe._execution_device
        embeddings = self.on_device(embeddings)
        with torch.inference_mode():
            # with embeddings given, encode_prompt casts them and makes the text ids
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(
                prompt=None,
                prompt_embeds=embeddings["prompt_embeds"],
                pooled_prompt_embeds=embeddings["pooled_prompt_embeds"],
                device=device,
                max_sequence_length=self.spec.max_sequence_length,
            )
            generator = torch.Generator("cpu").manual_seed(request.seed)
            latents, image_ids = pipe.prepare_latents(
                1,
                pipe.transformer.config.in_channels // 4,
                request.height,
                width=request.width,
                dtype=prompt_embeds.dtype,
                device=device,
                generator=generator,
            )
            scheduler = self.new_scheduler()
            config = scheduler.config
            sigmas: Any = np.linspace(1.0, 1 / steps, steps)
            if getattr(config, "use_flow_sigmas", False):
                sigmas = None
            mu = calculate_shift(
                latents.shape[1],
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
            timesteps, _ = retrieve_timesteps(
                scheduler, steps, device, sigmas=sigmas, mu=mu
            )
            scheduler.set_begin_index(0)
            inputs = {"text_ids": text_ids, "image_ids": image_ids}
            if pipe.transformer.config.guidance_embeds:
                inputs["guidance"] = torch.full(
                    [1], request.guidance_scale, device=device, dtype=torch.float32
                )
        tensors = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        return DenoisingState(
            key=self.state_key(request, latents, tensors),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            embeddings=tensors,
            guidance_scale=request.guidance_scale,
            generator=generator,
            inputs=inputs,
        )

    def step(self, states: Sequence[DenoisingState]) -> None:
        transformer = self.pipe.transformer
        first = states[0]
        latents = torch.cat([s.latents for s in states])
        # the pipeline's t.expand(batch).to(latents.dtype), one t per request
        timestep = torch.stack([s.timestep for s in states]).to(latents.dtype)
        guidance = None
        if "guidance" in first.inputs:
            guidance = torch.cat([s.inputs["guidance"] for s in states])
        with (
            torch.inference_mode(),
            self.batched(transformer, len(states), len(states)),
        ):
            noise = transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=torch.cat(
                    [s.embeddings["pooled_prompt_embeds"] for s in states]
                ),
                encoder_hidden_states=torch.cat(
                    [s.embeddings["prompt_embeds"] for s in states]
                ),
                txt_ids=first.inputs["text_ids"],
                img_ids=first.inputs["image_ids"],
                joint_attention_kwargs={},
                return_dict=False,
            )[0]
            advance(states, noise.split(1))

    def decode_latents(self, requests: Sequence, latents: torch.Tensor) -> torch.Tensor:
        request = requests[0]
        vae = self.pipe.vae
        latents = self.pipe._unpack_latents(
            latents, request.height, request.width, self.spec.vae_scale
        )
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
