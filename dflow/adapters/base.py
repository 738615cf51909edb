"""What every model family shares: loading one stage of a diffusers pipeline and
running the three stage calls on it.

A family subclass says how to describe its configs as a :class:`ModelSpec`,
which ``encode_prompt`` arguments it takes, which embeddings its pipeline's
``__call__`` accepts and how latents become pixels. The denoising loop is always
the family's own diffusers pipeline, called with precomputed embeddings and
``output_type="latent"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

import dask.config

from dflow.presets import quiet_progress_bars
from dflow.spec import ModelSpec, read_configs, stage_of_component

if TYPE_CHECKING:
    from dflow.request import Request

logger = logging.getLogger(__name__)

Embeddings = dict[str, torch.Tensor]
#: How a pipeline too large for its device runs (config ``dflow.runtime.offload``):
#: resident, diffusers' model offload, or block-level group offload with streams
OFFLOAD_MODES = ("none", "model", "group")
StepCallback = Callable[[int], None]


class Adapter:
    """One model family's stages, built on its diffusers pipeline class.

    Parameters
    ----------
    spec
        The model.
    stages
        The stages this instance serves: ``("dit",)`` on a DiT worker, all three
        for a monolithic worker. Only those stages' components are loaded.
    device, dtype
        Where and in which precision the components run.
    """

    family: ClassVar[str]
    pipelines: ClassVar[tuple[str, ...]]
    video: ClassVar[bool] = False
    #: The tokenizer whose sequence length limits the prompt
    prompt_tokenizer: ClassVar[str] = "tokenizer"

    def __init__(
        self,
        spec: ModelSpec,
        stages: Sequence[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.spec = spec
        self.stages = tuple(stages)
        self.device = torch.device(device)
        self.dtype = dtype
        self.pipe = self._load()

    # -- description -------------------------------------------------------------

    @classmethod
    def pipeline_class(cls, name: str) -> Any:
        import diffusers

        return getattr(diffusers, name)

    @classmethod
    def describe(
        cls, *, configs: dict[str, dict], defaults: dict, **kwargs: Any
    ) -> ModelSpec:
        """A :class:`ModelSpec` from the pipeline's component configs."""
        raise NotImplementedError

    # -- loading -----------------------------------------------------------------

    def _components(self) -> list[str]:
        from dflow import presets

        if self.spec.source is not None:
            return list(read_configs(self.spec.source)[1])
        return list(presets.get(self.spec.preset or "")["components"])

    def _load(self) -> Any:
        from dflow import presets

        offload = dask.config.get("dflow.runtime.offload") or "none"
        if offload not in OFFLOAD_MODES:
            raise ValueError(
                f"dflow.runtime.offload must be one of {', '.join(OFFLOAD_MODES)}, "
                f"got {offload!r}"
            )
        # offloaded weights live in host memory and visit the device per use
        home = self.device if offload == "none" else torch.device("cpu")
        if self.spec.source is not None:
            skipped = {
                name: None
                for name in self._components()
                if stage_of_component(name) not in self.stages
            }
            with quiet_progress_bars():
                pipe = self.pipeline_class(self.spec.pipeline).from_pretrained(
                    self.spec.source, dtype=self.dtype, **skipped
                )
            pipe.to(home)
        else:
            pipe = presets.build(
                self.spec.preset or "", self.stages, str(home), self.dtype
            )
        if offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif offload == "group":
            pipe.enable_group_offload(
                onload_device=self.device,
                offload_type="block_level",
                num_blocks_per_group=1,
                # overlap the next block's copy with compute where streams exist
                use_stream=self.device.type == "cuda",
            )
        pipe.set_progress_bar_config(disable=True)
        self._configure(pipe)
        return pipe

    def _configure(self, pipe: Any) -> None:
        """Fix what a pipeline derives from components this stage did not load."""
        if hasattr(pipe, "vae_scale_factor"):
            pipe.vae_scale_factor = self.spec.vae_scale

    # -- stage calls -------------------------------------------------------------

    def encode(self, requests: Sequence[Request]) -> list[Embeddings]:
        """Text embeddings of each request, computed in one batch."""
        raise NotImplementedError

    def denoise_inputs(self, request: Request, embeddings: Embeddings) -> dict:
        """The pipeline ``__call__`` arguments besides the common ones."""
        raise NotImplementedError

    def denoise(
        self,
        request: Request,
        embeddings: Embeddings,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """The denoised latents, as the pipeline returns them for ``output_type="latent"``.

        The initial noise comes from ``torch.Generator("cpu").manual_seed(seed)``,
        as a stock pipeline given that generator makes it.
        """
        assert request.seed is not None  # a validated request has one
        embeddings = {
            k: v.to(self.device, non_blocking=True) for k, v in embeddings.items()
        }
        with torch.inference_mode():
            (latents,) = self.pipe(
                **self.denoise_inputs(request, embeddings),
                **(self.step_callback(on_step) if on_step else {}),
                height=request.height,
                width=request.width,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(request.seed),
                output_type="latent",
                return_dict=False,
            )
        return latents

    def step_callback(self, on_step: StepCallback) -> dict:
        """Pipeline arguments that call ``on_step(step)`` after each denoising step."""

        def callback(pipe, step, timestep, tensors):
            on_step(step)
            return tensors

        return {"callback_on_step_end": callback}

    def decode_latents(self, requests: Sequence[Request], latents: torch.Tensor):
        """Pixels in [-1, 1] of a batch of latents of one shape."""
        raise NotImplementedError

    def decode(
        self, requests: Sequence[Request], latents: Sequence[torch.Tensor]
    ) -> list[np.ndarray]:
        """uint8 pixels of each request: (images, H, W, 3) or (frames, H, W, 3)."""
        batch = torch.cat([x.to(self.device) for x in latents])
        with torch.inference_mode():
            pixels = self.decode_latents(requests, batch)
        if self.video:
            array = self.pipe.video_processor.postprocess_video(
                pixels, output_type="np"
            )
        else:
            array = self.pipe.image_processor.postprocess(pixels, output_type="np")
        # The rounding diffusers' numpy_to_pil applies, so pixels equal a stock "pil" output
        array = (array * 255).round().astype(np.uint8)
        if self.video:
            return list(array)
        sizes = [x.shape[0] for x in latents]
        return list(np.split(array, np.cumsum(sizes)[:-1]))

    def batch_key(self, stage: str, request: Request) -> tuple:
        """Requests with equal keys can share one batched call of ``stage``."""
        if stage == "encoder":
            return (self.uses_negative(request),)
        return (request.height, request.width, request.num_frames)

    def uses_negative(self, request: Request) -> bool:
        """Whether the request runs classifier-free guidance on a negative prompt."""
        guidance = request.guidance_scale
        assert guidance is not None  # a validated request has one
        return self.spec.negative_prompts and guidance > 1.0


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


def split_batch(batch: dict[str, torch.Tensor], n: int) -> list[Embeddings]:
    """Per-request copies of a batched encoder output (not views that pin the batch)."""
    return [{k: v[i : i + 1].clone() for k, v in batch.items()} for i in range(n)]
