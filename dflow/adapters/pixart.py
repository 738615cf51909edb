"""PixArt-Sigma: T5 text encoder, PixArtTransformer2DModel, AutoencoderKL."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dflow.adapters.base import Adapter, Embeddings, StepCallback, split_batch
from dflow.adapters.denoising import DenoisingState, advance


class PixArtAdapter(Adapter):
    """Runs PixArt pipelines (:mod:`dflow.families.pixart`)."""

    conditioning_modules = ("AdaLayerNormSingle", "PixArtAlphaTextProjection")

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

    # -- step-level denoising: the PixArt pipelines' __call__ a step at a time ----------

    def start(self, request, embeddings: Embeddings) -> DenoisingState:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
            retrieve_timesteps,
        )

        pipe = self.pipe
        device = pipe._execution_device
        cfg = self.uses_negative(request)
        embeddings = self.on_device(embeddings)
        alpha = type(pipe).__name__ == "PixArtAlphaPipeline"
        with torch.inference_mode():
            embeds, mask, negative, negative_mask = pipe.encode_prompt(
                None,
                cfg,
                negative_prompt=None,
                device=device,
                prompt_embeds=embeddings["prompt_embeds"],
                negative_prompt_embeds=embeddings.get("negative_prompt_embeds"),
                prompt_attention_mask=embeddings["prompt_attention_mask"],
                negative_prompt_attention_mask=embeddings.get(
                    "negative_prompt_attention_mask"
                ),
                clean_caption=False,
                max_sequence_length=self.spec.max_sequence_length,
            )
            if cfg:
                embeds = torch.cat([negative, embeds])
                mask = torch.cat([negative_mask, mask])
            generator = torch.Generator("cpu").manual_seed(request.seed)
            scheduler = self.new_scheduler()
            with self.using(scheduler):
                timesteps, _ = retrieve_timesteps(scheduler, request.steps, device)
                latents = pipe.prepare_latents(
                    1,
                    pipe.transformer.config.in_channels,
                    request.height,
                    request.width,
                    embeds.dtype,
                    device,
                    generator,
                )
                step_options = pipe.prepare_extra_step_kwargs(generator, 0.0)
            conditions: dict[str, torch.Tensor | None] = {
                "resolution": None,
                "aspect_ratio": None,
            }
            if alpha and pipe.transformer.config.sample_size == 128:
                # PixArt-Alpha's micro-conditions, as its __call__ makes them
                rows = 2 if cfg else 1
                conditions = {
                    "resolution": torch.tensor([request.height, request.width])
                    .repeat(rows, 1)
                    .to(dtype=embeds.dtype, device=device),
                    "aspect_ratio": torch.tensor(
                        [float(request.height / request.width)]
                    )
                    .repeat(rows, 1)
                    .to(dtype=embeds.dtype, device=device),
                }
            if alpha and hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
        tensors = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        return DenoisingState(
            key=self.state_key(request, latents, tensors),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            embeddings=tensors,
            guidance_scale=request.guidance_scale,
            generator=generator,
            inputs={
                "cfg": cfg,
                "conditions": conditions,
                # which extra scheduler.step arguments the scheduler takes
                "step_options": sorted(step_options),
            },
        )

    def step(self, states: Sequence[DenoisingState]) -> None:
        transformer = self.pipe.transformer
        cfg = states[0].inputs["cfg"]
        rows = 2 if cfg else 1
        inputs, timesteps = [], []
        for state in states:
            latent_input = torch.cat([state.latents] * rows)
            inputs.append(
                state.scheduler.scale_model_input(latent_input, state.timestep)
            )
            timestep = state.timestep[None].to(latent_input.device)
            timesteps.append(timestep.expand(rows))
        conditions = {
            name: None
            if states[0].inputs["conditions"][name] is None
            else torch.cat([s.inputs["conditions"][name] for s in states])
            for name in ("resolution", "aspect_ratio")
        }
        latent_channels = transformer.config.in_channels
        with (
            torch.inference_mode(),
            self.batched(transformer, rows * len(states), len(states)),
        ):
            output = transformer(
                torch.cat(inputs),
                encoder_hidden_states=torch.cat(
                    [s.embeddings["prompt_embeds"] for s in states]
                ),
                encoder_attention_mask=torch.cat(
                    [s.embeddings["prompt_attention_mask"] for s in states]
                ),
                timestep=torch.cat(timesteps),
                added_cond_kwargs=conditions,
                return_dict=False,
            )[0]
            noise = []
            for state, prediction in zip(states, output.split(rows), strict=True):
                if cfg:
                    uncond, text = prediction.chunk(2)
                    prediction = uncond + state.guidance_scale * (text - uncond)
                if transformer.config.out_channels // 2 == latent_channels:
                    prediction = prediction.chunk(2, dim=1)[0]
                noise.append(prediction)
            advance(states, noise, [self.step_options(s) for s in states])

    def step_options(self, state: DenoisingState) -> dict:
        """The extra ``scheduler.step`` arguments the pipeline passes (its
        ``prepare_extra_step_kwargs``): the request's generator, eta 0."""
        values = {"generator": state.generator, "eta": 0.0}
        return {name: values[name] for name in state.inputs["step_options"]}

    def decode_latents(self, requests: Sequence, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(
            latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False
        )[0]
