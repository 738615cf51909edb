"""Wan 2.1/2.2 text-to-video: UMT5 encoder, WanTransformer3DModel, AutoencoderKLWan."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dflow.adapters.base import Adapter, Embeddings, split_batch
from dflow.adapters.denoising import DenoisingState, advance


class WanAdapter(Adapter):
    """Runs ``WanPipeline`` (:mod:`dflow.families.wan`)."""

    conditioning_modules = ("WanTimeTextImageEmbedding",)

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

    # -- step-level denoising: WanPipeline.__call__ a step at a time --------------------

    @property
    def transformers(self) -> list[torch.nn.Module]:
        """The experts this worker holds: ``transformer`` (Wan 2.2's high-noise
        expert) and ``transformer_2`` (its low-noise expert), where loaded."""
        pipe = self.pipe
        candidates = (pipe.transformer, getattr(pipe, "transformer_2", None))
        return [t for t in candidates if t is not None]

    def start(self, request, embeddings: Embeddings) -> DenoisingState:
        pipe = self.pipe
        device = pipe._execution_device
        cfg = self.uses_negative(request)
        embeddings = self.on_device(embeddings)
        transformer: Any = self.transformers[0]
        with torch.inference_mode():
            embeds, negative = pipe.encode_prompt(
                prompt=None,
                do_classifier_free_guidance=cfg,
                prompt_embeds=embeddings["prompt_embeds"],
                negative_prompt_embeds=embeddings.get("negative_prompt_embeds"),
                max_sequence_length=self.spec.max_sequence_length,
                device=device,
            )
            tensors = {"prompt_embeds": embeds.to(transformer.dtype)}
            if cfg:
                tensors["negative_prompt_embeds"] = negative.to(transformer.dtype)
            scheduler = self.new_scheduler()
            scheduler.set_timesteps(request.steps, device=device)
            generator = torch.Generator("cpu").manual_seed(request.seed)
            latents = pipe.prepare_latents(
                1,
                transformer.config.in_channels,
                request.height,
                request.width,
                request.num_frames,
                torch.float32,
                device,
                generator,
            )
            scheduler.set_begin_index(0)
        boundary = None
        if pipe.config.boundary_ratio is not None:
            boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
        return DenoisingState(
            key=self.state_key(request, latents, tensors),
            latents=latents,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            embeddings=tensors,
            guidance_scale=request.guidance_scale,
            generator=generator,
            inputs={"cfg": cfg, "boundary": boundary},
        )

    def expert(self, state: DenoisingState) -> tuple[torch.nn.Module, float]:
        """The transformer and guidance scale of the state's next step: Wan 2.2's
        high-noise expert down to the boundary timestep, then its low-noise one."""
        pipe, boundary = self.pipe, state.inputs["boundary"]
        if boundary is None or state.timestep >= boundary:
            return pipe.transformer, state.guidance_scale
        return pipe.transformer_2, state.guidance_scale

    def step(self, states: Sequence[DenoisingState]) -> None:
        groups: dict[int, list[DenoisingState]] = {}
        for state in states:
            groups.setdefault(id(self.expert(state)[0]), []).append(state)
        for group in groups.values():
            self._step_with(self.expert(group[0])[0], group)

    def _step_with(self, transformer: Any, states: Sequence[DenoisingState]) -> None:
        """One step of ``states`` on one expert: the pipeline's conditional and
        unconditional calls, as rows of one call."""
        cfg = states[0].inputs["cfg"]
        prompts = (
            ("prompt_embeds", "negative_prompt_embeds") if cfg else ("prompt_embeds",)
        )
        latents, timesteps, texts = [], [], []
        for state in states:
            latent_input = state.latents.to(transformer.dtype)
            if self.pipe.config.expand_timesteps:
                mask = torch.ones(state.latents.shape, dtype=torch.float32)
                mask = mask.to(state.latents.device)
                timestep = (mask[0][0][:, ::2, ::2] * state.timestep).flatten()[None]
            else:
                timestep = state.timestep.expand(1)
            for name in prompts:
                latents.append(latent_input)
                timesteps.append(timestep)
                texts.append(state.embeddings[name])
        rows = len(latents)
        with torch.inference_mode(), self.batched(transformer, rows, rows):
            output = transformer(
                hidden_states=torch.cat(latents),
                timestep=torch.cat(timesteps),
                encoder_hidden_states=torch.cat(texts),
                attention_kwargs=None,
                return_dict=False,
            )[0]
            noise = []
            for state, prediction in zip(
                states, output.split(len(prompts)), strict=True
            ):
                if cfg:
                    cond, uncond = prediction[:1], prediction[1:]
                    prediction = uncond + self.expert(state)[1] * (cond - uncond)
                noise.append(prediction)
            advance(states, noise)

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
