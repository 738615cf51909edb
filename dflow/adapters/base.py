"""What every adapter shares: loading one stage of a diffusers pipeline and
running the three stage calls on it.

What a family *is* (components per stage, shapes, defaults) is its
:mod:`dflow.families` module's; an adapter subclass only runs the family's
pipeline: which ``encode_prompt`` arguments it takes, which embeddings its
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

from dflow import catalog, families, presets
from dflow.families import Family
from dflow.logs import quiet_progress_bars
from dflow.spec import ModelSpec

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

    #: Whether several instances may load at once in one process; loading
    #: diffusers models is not thread-safe (lazy imports, meta-device builds)
    parallel_load_safe: ClassVar[bool] = False

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

    @property
    def family(self) -> Family:
        return families.of(self.spec)

    # -- loading -----------------------------------------------------------------

    def _load(self) -> Any:
        offload = dask.config.get("dflow.runtime.offload") or "none"
        if offload not in OFFLOAD_MODES:
            raise ValueError(
                f"dflow.runtime.offload must be one of {', '.join(OFFLOAD_MODES)}, "
                f"got {offload!r}"
            )
        # offloaded weights live in host memory and visit the device per use
        home = self.device if offload == "none" else torch.device("cpu")
        source = presets.folder_of(self.spec)
        if source is not None:
            import diffusers

            skipped = {
                name: None
                for name in catalog.read_configs(source)[1]
                if self.family.stage_of(name) not in self.stages
            }
            with quiet_progress_bars():
                pipe = getattr(diffusers, self.spec.pipeline).from_pretrained(
                    source, dtype=self.dtype, **skipped
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
        if self.family.video:
            array = self.pipe.video_processor.postprocess_video(
                pixels, output_type="np"
            )
        else:
            array = self.pipe.image_processor.postprocess(pixels, output_type="np")
        # The rounding diffusers' numpy_to_pil applies, so pixels equal a stock "pil" output
        array = (array * 255).round().astype(np.uint8)
        if self.family.video:
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
        return self.family.uses_cfg(self.spec, guidance)


def split_batch(batch: dict[str, torch.Tensor], n: int) -> list[Embeddings]:
    """Per-request copies of a batched encoder output (not views that pin the batch)."""
    return [{k: v[i : i + 1].clone() for k, v in batch.items()} for i in range(n)]
