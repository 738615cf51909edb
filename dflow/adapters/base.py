"""What every adapter shares: loading one stage of a diffusers pipeline and
running the three stage calls on it.

What a family *is* (components per stage, shapes, defaults) is its
:mod:`dflow.families` module's; an adapter subclass only runs the family's
pipeline: which ``encode_prompt`` arguments it takes, which embeddings its
``__call__`` accepts and how latents become pixels. Denoising runs either as the
family's own diffusers pipeline, called with precomputed embeddings and
``output_type="latent"`` (:meth:`Adapter.denoise`), or a step at a time on the
same pipeline's pieces (:meth:`Adapter.start`, :meth:`Adapter.step`,
:meth:`Adapter.finish`: :mod:`dflow.adapters.denoising`), which lets requests
share steps and move between workers mid-way.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

import dask.config

from dflow import catalog, families, presets, quantization
from dflow.adapters.denoising import DenoisingState, per_request
from dflow.families import Family
from dflow.logs import quiet_progress_bars
from dflow.spec import ModelSpec

if TYPE_CHECKING:
    from dflow.request import Request

logger = logging.getLogger(__name__)

Embeddings = dict[str, torch.Tensor]


@dataclass
class Denoising:
    """A request's denoising between two steps, as it moves from the high-noise
    expert's worker to the low-noise expert's: the latents, the scheduler (set
    for the request's steps, holding its multistep state; ``None`` where no
    real scheduler runs) and the next step."""

    latents: torch.Tensor
    scheduler: Any
    step: int


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
        The stages this instance serves: ``("dit",)`` on a DiT worker,
        ``("dit-high",)`` on a worker of one expert, all three for a monolithic
        worker. Only those stages' components are loaded.
    device, dtype
        Where and in which precision the components run.
    quantize
        ``"int8"`` or ``"fp8"``: load the DiT's transformers with 8-bit
        weights (:mod:`dflow.quantization`); ``None``: in ``dtype``.
    """

    #: Whether several instances may load at once in one process; loading
    #: diffusers models is not thread-safe (lazy imports, meta-device builds)
    parallel_load_safe: ClassVar[bool] = False
    #: Class names of the transformer's modules whose inputs are per-request
    #: vectors (conditioning embedders, adaptive norms): an exact batch runs
    #: them one request at a time (:func:`~dflow.adapters.denoising.per_request`)
    conditioning_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        spec: ModelSpec,
        stages: Sequence[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        quantize: str | None = None,
    ):
        self.spec = spec
        self.stages = tuple(stages)
        self.device = torch.device(device)
        self.dtype = dtype
        self.quantize = quantize
        self.pipe = self._load()
        # each request steps its own copy of the scheduler as loaded
        self.scheduler = copy.deepcopy(getattr(self.pipe, "scheduler", None))
        self.exact_batches = bool(dask.config.get("dflow.runtime.exact-dit-batch"))
        self._conditioning: dict[int, list[torch.nn.Module]] = {}
        self._swapping = threading.Lock()
        #: page-locked host buffers the weights park in (:meth:`reserve_host`)
        self._host: list[torch.Tensor] | None = None
        self._host_lock = threading.Lock()
        self._unreserve = threading.Event()

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
        quantization.check_offload(self.quantize, offload, self.device)
        self.offloaded = offload != "none"
        # offloaded weights live in host memory and visit the device per use
        home = self.device if offload == "none" else torch.device("cpu")
        source = presets.folder_of(self.spec)
        if source is not None:
            import diffusers

            configs = catalog.read_configs(source)[1]
            skipped = {
                name: None
                for name in configs
                if not name.startswith("_")
                and not set(self.family.stages_of(name)) & set(self.stages)
            }
            options = {}
            if self.quantize:
                present = [
                    name
                    for name in self.family.transformers
                    if name in configs
                    and configs[name].get("_class_name")
                    and name not in skipped
                ]
                options["quantization_config"] = quantization.pipeline_config(
                    self.quantize, present, self.device
                )
            with quiet_progress_bars():
                pipe = getattr(diffusers, self.spec.pipeline).from_pretrained(
                    source, dtype=self.dtype, **skipped, **options
                )
            pipe.to(home)
        else:
            pipe = presets.build(
                self.spec.preset or "", self.stages, str(home), self.dtype
            )
            if self.quantize:
                built = {
                    name: getattr(pipe, name)
                    for name in self.family.transformers
                    if getattr(pipe, name, None) is not None
                }
                quantization.quantize_built(built, self.quantize, self.device)
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

    # -- parking ------------------------------------------------------------------

    def reserve_host(self) -> None:
        """Page-lock host buffers for the weights (slow: the host locks pages
        at about 1 GiB/s), so that :meth:`park` only copies into them. Workers
        call it in the background once the stage serves."""
        if self.device.type == "cpu" or self.offloaded:
            return
        with self._host_lock:
            if self._host is not None:
                return
            host = []
            for tensor in self._weights():
                if self._unreserve.is_set():  # closing: buffers no one will use
                    return
                host.append(
                    torch.empty(
                        tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True
                    )
                )
            self._host = host

    def unreserve(self) -> None:
        """Stop a :meth:`reserve_host` under way (the stage is closing)."""
        self._unreserve.set()

    def park(self) -> None:
        """Move the weights to pinned host memory and free the device, so that
        :meth:`resume` copies them back over the host link rather than loading
        them from disk. Offloaded or CPU weights are in host memory already."""
        if self.device.type == "cpu" or self.offloaded:
            return
        self._unreserve.clear()
        self.reserve_host()
        with self._host_lock:
            assert self._host is not None
            for tensor, host in zip(self._weights(), self._host):
                if tensor.device.type != "cpu":
                    host.copy_(tensor)
                    tensor.data = host
        torch.cuda.empty_cache()

    def resume(self) -> None:
        """Bring parked weights back to the device (:meth:`park`); their host
        buffers stay for the next park."""
        if self.device.type == "cpu" or self.offloaded:
            return
        with self._host_lock:
            for tensor in self._weights():
                tensor.data = tensor.data.to(self.device, non_blocking=True)
        torch.cuda.synchronize(self.device)

    def _weights(self) -> list[torch.Tensor]:
        return [
            tensor
            for module in self.pipe.components.values()
            if isinstance(module, torch.nn.Module)
            for tensor in [*module.parameters(), *module.buffers()]
        ]

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

    def denoise_expert(
        self,
        request: Request,
        embeddings: Embeddings,
        expert: str,
        state: Denoising | None = None,
        on_step: StepCallback | None = None,
    ) -> Denoising:
        """One expert's share of the steps of a model of two experts: the
        high-noise expert's from the start to the boundary, or the low-noise
        expert's from ``state`` (where the high-noise expert left it) to the
        end. Without ``state`` the low-noise expert starts from fresh noise at
        the boundary (what warming it up runs)."""
        raise NotImplementedError(f"{self.spec.name} has no experts")

    # -- step-level denoising (dflow.adapters.denoising) -----------------------------

    def start(self, request: Request, embeddings: Embeddings) -> DenoisingState:
        """The request's denoising before its first step: the pipeline's noise
        from the request's seed, its timesteps on a scheduler of its own."""
        raise NotImplementedError

    def step(self, states: Sequence[DenoisingState]) -> None:
        """Advance each of ``states`` (equal keys, not done) by one step, in one
        transformer call where the family allows."""
        raise NotImplementedError

    def finish(self, state: DenoisingState) -> torch.Tensor:
        """The latents of a finished state, as the pipeline returns them for
        ``output_type="latent"``."""
        return state.latents

    def new_scheduler(self) -> Any:
        """A copy of the pipeline's scheduler as loaded, for one request."""
        return copy.deepcopy(self.scheduler)

    @contextlib.contextmanager
    def using(self, scheduler: Any) -> Iterator[None]:
        """The pipeline with ``scheduler`` as its own, for pipeline methods that
        read the scheduler (``prepare_latents`` scales noise by its sigma)."""
        with self._swapping:
            loaded = self.pipe.scheduler
            self.pipe.scheduler = scheduler
            try:
                yield
            finally:
                self.pipe.scheduler = loaded

    def on_device(self, embeddings: Embeddings) -> Embeddings:
        return {k: v.to(self.device, non_blocking=True) for k, v in embeddings.items()}

    def state_key(
        self, request: Request, latents: torch.Tensor, embeddings: Embeddings
    ) -> tuple:
        """What states must share to step together: latent shape and dtype,
        guidance mode, and the embeddings' names and shapes."""
        return (
            tuple(latents.shape),
            str(latents.dtype),
            self.uses_negative(request),
            tuple(sorted((k, tuple(v.shape)) for k, v in embeddings.items())),
        )

    @contextlib.contextmanager
    def batched(
        self, transformer: torch.nn.Module, rows: int, groups: int
    ) -> Iterator[None]:
        """The block of one transformer call on ``rows`` rows from ``groups``
        per-request groups (each the rows a stock call has): exact
        (``dflow.runtime.exact-dit-batch``) computes per group what rounding
        would make depend on the batch."""
        if not self.exact_batches or groups <= 1:
            yield
            return
        modules = self._conditioning.get(id(transformer))
        if modules is None:
            wanted = set(self.conditioning_modules)
            modules = [m for m in transformer.modules() if type(m).__name__ in wanted]
            self._conditioning[id(transformer)] = modules
        with per_request(modules, rows, groups):
            yield

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
