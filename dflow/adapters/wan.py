"""Wan 2.1/2.2: UMT5 encoder, WanTransformer3DModel (Wan 2.2 A14B: two experts),
AutoencoderKLWan; text-to-video and image-to-video."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from dflow.adapters.base import (
    Adapter,
    Denoising,
    Embeddings,
    StepCallback,
    split_batch,
)
from dflow.adapters.denoising import DenoisingState, advance

if TYPE_CHECKING:
    from dflow.request import Request


class WanAdapter(Adapter):
    """Runs ``WanPipeline`` and ``WanImageToVideoPipeline`` (:mod:`dflow.families.wan`).

    Text-to-video on one worker is the stock pipeline called with precomputed
    embeddings. Where the stock call cannot run (an expert's worker holds one
    transformer; an image-to-video DiT worker has no VAE to encode the image
    with) the denoising loop runs step by step on the pipeline's own
    components, as the pipeline runs it: the transformer of each step chosen
    by the boundary, its scheduler, the encoder's image condition.
    """

    conditioning_modules = ("WanTimeTextImageEmbedding",)

    # -- encoder ---------------------------------------------------------------------

    def encode(self, requests: Sequence[Request]) -> list[Embeddings]:
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
            outputs = split_batch(batch, len(requests))
            if self.family.image_input:
                for request, output in zip(requests, outputs):
                    output["condition"] = self.condition(request)
        return outputs

    def condition(self, request: Request) -> torch.Tensor:
        """The image's condition as the pipeline's ``prepare_latents`` makes it:
        the image resized to the request's size, followed by zero frames,
        encoded by the VAE, normalized, after the first-frame mask. (The noise
        ``prepare_latents`` also draws is the DiT's business and left here.)"""
        assert request.image is not None and request.height and request.width
        assert request.seed is not None
        pipe = self.pipe
        image = pipe.video_processor.preprocess(
            request.image.pil(), height=request.height, width=request.width
        ).to(self.device, dtype=torch.float32)
        _, condition = pipe.prepare_latents(
            image,
            1,
            self.spec.latent_channels,
            request.height,
            request.width,
            request.num_frames,
            torch.float32,
            self.device,
            torch.Generator("cpu").manual_seed(request.seed),
        )
        return condition

    # -- DiT -------------------------------------------------------------------------

    def denoise_inputs(self, request: Request, embeddings: Embeddings) -> dict:
        return {
            **embeddings,
            "num_frames": request.num_frames,
            "max_sequence_length": self.spec.max_sequence_length,
        }

    def denoise(
        self,
        request: Request,
        embeddings: Embeddings,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        if not self.family.image_input:
            return super().denoise(request, embeddings, on_step)
        state = self.first_state(request)
        return self.run_steps(request, embeddings, state, None, on_step).latents

    def denoise_expert(
        self,
        request: Request,
        embeddings: Embeddings,
        expert: str,
        state: Denoising | None = None,
        on_step: StepCallback | None = None,
    ) -> Denoising:
        if state is None:
            state = self.first_state(request)
            if expert == "low":
                state = replace(state, step=self.boundary_step(state.scheduler))
        stop = self.boundary_step(state.scheduler) if expert == "high" else None
        return self.run_steps(request, embeddings, state, stop, on_step)

    def first_state(self, request: Request) -> Denoising:
        """Step 0 of ``request``: the initial noise the stock pipeline draws from
        ``torch.Generator("cpu").manual_seed(seed)``, and a scheduler of its own
        set for the request's steps."""
        assert request.height is not None and request.width is not None
        assert request.seed is not None
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(request.steps, device=self.device)
        if not self.family.image_input:
            scheduler.set_begin_index(0)  # as WanPipeline does
        shape = self.family.latents(
            self.spec, request.height, request.width, request.num_frames or 1
        ).shape
        latents = randn_tensor(
            shape,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            device=self.device,
            dtype=torch.float32,
        )
        return Denoising(latents, scheduler, 0)

    def boundary_step(self, scheduler: Any) -> int:
        """The first step of the low-noise expert: the first whose timestep is
        below the boundary (all steps for a model of one DiT)."""
        timesteps = scheduler.timesteps
        if self.spec.boundary_ratio is None:
            return len(timesteps)
        boundary = self.spec.boundary_ratio * scheduler.config.num_train_timesteps
        for index, timestep in enumerate(timesteps):
            if not timestep >= boundary:
                return index
        return len(timesteps)

    def run_steps(
        self,
        request: Request,
        embeddings: Embeddings,
        state: Denoising,
        stop: int | None,
        on_step: StepCallback | None = None,
    ) -> Denoising:
        """Steps ``state.step`` up to ``stop`` (default: the last) of the
        pipeline's denoising loop on this worker's transformers."""
        pipe = self.pipe
        scheduler = state.scheduler
        timesteps = scheduler.timesteps
        stop = len(timesteps) if stop is None else stop
        first = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        dtype = first.dtype
        prompt = embeddings["prompt_embeds"].to(dtype)
        negative = embeddings.get("negative_prompt_embeds")
        cfg = self.uses_negative(request)
        condition = embeddings.get("condition")
        latents = state.latents.to(self.device)
        boundary_step = self.boundary_step(scheduler)
        with torch.inference_mode():
            for index in range(state.step, stop):
                timestep = timesteps[index]
                model = (
                    pipe.transformer if index < boundary_step else pipe.transformer_2
                )
                if model is None:
                    raise RuntimeError(
                        f"step {index} of {request.model} needs the "
                        f"{'high' if index < boundary_step else 'low'}-noise expert, "
                        "which this worker does not hold"
                    )
                inputs = (
                    latents
                    if condition is None
                    else torch.cat([latents, condition], dim=1)
                )
                arguments: dict[str, Any] = {
                    "hidden_states": inputs.to(dtype),
                    "timestep": timestep.expand(latents.shape[0]),
                    "attention_kwargs": None,
                    "return_dict": False,
                }
                if self.family.image_input:
                    arguments["encoder_hidden_states_image"] = None
                with model.cache_context("cond"):
                    noise = model(encoder_hidden_states=prompt, **arguments)[0]
                if cfg:
                    assert negative is not None
                    with model.cache_context("uncond"):
                        uncond = model(
                            encoder_hidden_states=negative.to(dtype), **arguments
                        )[0]
                    # one guidance scale for both experts (the pipeline's default)
                    noise = uncond + request.guidance_scale * (noise - uncond)
                latents = scheduler.step(noise, timestep, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(index)
        return Denoising(latents, scheduler, stop)

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

    # -- VAE -------------------------------------------------------------------------

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
