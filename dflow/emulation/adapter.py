"""The emulated adapter: a stage backend that sleeps for what the cost model
charges and returns tensors and pixels of the real shapes, dtypes and bytes
(random, incompressible bytes), so real schedulers, workers and transfers run
on top of emulated GPUs (docs/emulation.md).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

import dask.config
from dask.utils import parse_bytes, parse_timedelta

from dflow.adapters.base import Adapter, Denoising, Embeddings, StepCallback
from dflow.adapters.denoising import DenoisingState
from dflow.emulation.cost import (
    CostModel,
    Placement,
    cost_model,
    shape_name,
    time_scale,
)
from dflow.errors import StageOutOfMemory
from dflow.hardware import resolve_gpu
from dflow.pools import EXPERT_STAGES, base_stage
from dflow.spec import ModelSpec

if TYPE_CHECKING:
    from dflow.request import Request

logger = logging.getLogger(__name__)


class _Noise:
    """Random bytes that emulated outputs are views of, so a call allocates nothing.

    Each output is its own tensor or array over a slice at a random offset: its
    ``sizeof`` and serialized frames are its own bytes (dflow's serializer sends a
    view's bytes only), and the data is incompressible.
    """

    #: Extra bytes beyond the largest output, so offsets vary
    SLACK = 8 * 2**20

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> np.ndarray:
        """The buffer, grown to hold ``nbytes`` at varying offsets (random bytes
        take ~0.3 s per 100 MB to draw, once per process and size)."""
        with self._lock:
            if nbytes + self.SLACK > len(self._buffer):
                words = max(2 * len(self._buffer), nbytes + self.SLACK) // 8 + 1
                self._buffer = np.random.SFC64().random_raw(words).view(np.uint8)
            return self._buffer

    def take(self, nbytes: int) -> np.ndarray:
        buffer = self.reserve(nbytes)
        # 64-byte aligned, so any dtype can view it
        offset = random.randrange(0, (len(buffer) - nbytes) // 64 + 1) * 64
        return buffer[offset : offset + nbytes]

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        element = torch.empty(0, dtype=dtype).element_size()
        raw = torch.from_numpy(self.take(math.prod(shape) * element))
        return raw.view(dtype).view(*shape)

    def pixels(self, shape: Sequence[int]) -> np.ndarray:
        return self.take(math.prod(shape)).reshape(shape)


_noise = _Noise()


class EmulatedAdapter(Adapter):
    """A stage backend that costs what the profile says and computes nothing.

    The :class:`~dflow.adapters.base.Adapter` interface that
    :class:`~dflow.runtime.StageRuntime` drives, over a model's
    :class:`~dflow.spec.ModelSpec` alone: no weights, no device memory.

    Parameters
    ----------
    spec, stages
        The model and the stages served (all three for a monolithic worker).
    device, dtype
        Accepted for the interface; outputs take the model's own dtypes.
    quantize
        8-bit DiT weights (int8, fp8): half the DiT's bytes on the device, at
        the profiles' bf16 times (:meth:`CostModel.placement`).
    gpu_type
        The emulated GPU type (default ``dflow.runtime.gpu-type``, else the
        catalog's reference).
    cost
        Default :func:`cost_model`.

    Attributes
    ----------
    speed
        The fraction of its GPU type's speed this emulated card runs stage
        calls at (``dflow.emulation.speed``, 1.0): a throttled or shared card.
        Set it on a running worker's adapter to slow that card down from then
        on (:func:`set_speed`).

    Raises
    ------
    StageOutOfMemory
        The stages do not fit the GPU type at the model's default request.
    """

    # builds no model: emulated workers of one process load side by side
    parallel_load_safe: ClassVar[bool] = True

    def __init__(
        self,
        spec: ModelSpec,
        stages: Sequence[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        quantize: str | None = None,
        gpu_type: str | None = None,
        cost: CostModel | None = None,
    ):
        start = time.perf_counter()
        self.spec = spec
        self.stages = tuple(stages)
        self.device = torch.device(device)
        self.dtype = dtype
        self.quantize = quantize
        self.cost = cost or cost_model()
        self.gpu = resolve_gpu(gpu_type)
        self.speed = float(dask.config.get("dflow.emulation.speed"))
        if not self.speed > 0:
            raise ValueError(
                f"dflow.emulation.speed must be positive, got {self.speed}"
            )
        self._first_call = parse_timedelta(
            dask.config.get("dflow.emulation.first-call")
        )
        self._called: set[str] = set()
        #: the stage of the latest call: a model-offloaded DiT moves its weights
        #: in when a step follows another stage's call
        self._last_stage: str | None = None
        self._placements: dict[tuple, Placement] = {}
        self._host_lock = threading.Lock()
        self._reserved_at: float | None = None
        default = self.family.default_features(spec)
        self.placement = self._placement(default)
        # draw the random bytes of the outputs now, as part of the load
        output_bytes = {"encoder": "embedding_bytes", "dit": "latent_bytes"}
        _noise.reserve(
            max(
                default[output_bytes.get(base_stage(s), "output_bytes")]
                for s in self.stages
            )
        )
        self.load_seconds = self.cost.load_seconds(spec, self.stages)
        logger.info(
            "Emulating %s %s on a %s (%s): load %.1fs, default request %.2fs",
            spec.name,
            "+".join(self.stages),
            self.gpu.name,
            self.placement.mode,
            self.load_seconds,
            self.placement.seconds,
        )
        self._sleep_until(start, self.load_seconds)

    def _placement(self, features: Mapping[str, Any], batch: int = 1) -> Placement:
        key = (shape_name(features), features["steps"], features["cfg"], batch)
        placement = self._placements.get(key)
        if placement is None:
            placement = self.cost.placement(
                self.spec,
                self.stages,
                self.gpu.name,
                features,
                batch,
                quantize=self.quantize,
            )
            if len(self._placements) < 1024:
                self._placements[key] = placement
        return placement

    # -- timing ------------------------------------------------------------------

    def _sleep_until(self, start: float, seconds: float) -> None:
        """Sleep until ``seconds`` emulated seconds (scaled) after ``start``: work
        done since (allocations) is part of the call, not added to it."""
        remaining = start + seconds * time_scale() - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def _run(
        self,
        stage: str,
        request: Request,
        batch: int,
        on_step: Callable[[int], None] | None = None,
    ) -> Callable[[], None]:
        """Check memory, then return a function that sleeps out the call's cost
        (per step, calling ``on_step`` after each)."""
        start = time.perf_counter()
        try:
            placement = self._placement(request.features, batch)
        except StageOutOfMemory as error:
            raise torch.OutOfMemoryError(str(error)) from None
        cost = placement.stages[stage]
        first = self._first_call if stage not in self._called else 0.0
        self._called.add(stage)
        self._last_stage = stage

        def sleep() -> None:
            elapsed = first + cost.transfer / self.speed
            self._sleep_until(start, elapsed)
            for index in range(cost.steps):
                # read at each step: a card may slow down mid-call
                elapsed += cost.compute / cost.steps / self.speed
                self._sleep_until(start, elapsed)
                if on_step is not None:
                    on_step(index)

        return sleep

    # -- parking -------------------------------------------------------------------

    def reserve_host(self) -> None:
        # the buffers are ready when page-locking them would be done: a park
        # before then waits for it, and no thread sleeps meanwhile
        with self._host_lock:
            if self._reserved_at is None:
                pin = self._host_seconds("pin") * time_scale()
                self._reserved_at = time.perf_counter() + pin

    def unreserve(self) -> None:
        pass

    def park(self) -> None:
        self.reserve_host()
        with self._host_lock:
            assert self._reserved_at is not None
            start = max(time.perf_counter(), self._reserved_at)
            self._sleep_until(start, self._host_seconds("copy"))

    def resume(self) -> None:
        with self._host_lock:
            self._sleep_until(time.perf_counter(), self._host_seconds("copy"))

    def _host_seconds(self, what: str) -> float:
        """Emulated seconds to page-lock host buffers for the weights
        (``"pin"``) or to copy them over the card's pinned host link
        (``"copy"``); an offloaded stage's are in host memory already."""
        if self.placement.mode != "resident":
            return 0.0
        if what == "pin":
            weights = sum(
                self.cost.weight_bytes(self.spec, s, self.quantize) for s in self.stages
            )
            return weights / parse_bytes(
                dask.config.get("dflow.emulation.pin-bandwidth")
            )
        return self.cost.resume_seconds(
            self.spec, self.stages, self.gpu.name, self.quantize
        )

    # -- stage calls ---------------------------------------------------------------

    def encode(self, requests: Sequence[Request]) -> list[Embeddings]:
        sleep = self._run("encoder", requests[0], len(requests))
        outputs = [self._embeddings(r) for r in requests]
        sleep()
        return outputs

    def denoise(
        self,
        request: Request,
        embeddings: Embeddings,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        sleep = self._run("dit", request, 1, on_step)
        latents = self._latents(request)
        sleep()
        return latents

    def start(self, request: Request, embeddings: Embeddings) -> DenoisingState:
        features = request.features
        latents = self._latents(request)
        return DenoisingState(
            key=(shape_name(features), features["cfg"]),
            latents=latents,
            scheduler=None,
            timesteps=torch.arange(features["steps"]),
            embeddings={},
            guidance_scale=request.guidance_scale or 0.0,
            inputs={"features": features},
        )

    def step(self, states: Sequence[DenoisingState]) -> None:
        """Sleep one step of the batch's call (first-call costs, and a model
        offload's weights when the DiT was not the last stage to run, before it)."""
        start = time.perf_counter()
        features = states[0].inputs["features"]
        try:
            placement = self._placement(features, len(states))
        except StageOutOfMemory as error:
            raise torch.OutOfMemoryError(str(error)) from None
        cost = placement.stages["dit"]
        # the card's speed, read at each step as in a whole call
        seconds = cost.compute / cost.steps / self.speed
        if "dit" not in self._called:
            seconds += self._first_call
            self._called.add("dit")
        if self._last_stage != "dit":
            seconds += cost.transfer / self.speed
            self._last_stage = "dit"
        self._sleep_until(start, seconds)
        for state in states:
            state.index += 1

    def denoise_expert(
        self,
        request: Request,
        embeddings: Embeddings,
        expert: str,
        state: Denoising | None = None,
        on_step: StepCallback | None = None,
    ) -> Denoising:
        stage = EXPERT_STAGES[expert]
        sleep = self._run(stage, request, 1, on_step)
        latents = self._latents(request)
        sleep()
        assert request.steps is not None
        split = self.family.expert_steps(self.spec, request.steps) or {}
        done = split.get("high", 0) if expert == "high" else request.steps
        return Denoising(latents, None, done)

    def decode(
        self, requests: Sequence[Request], latents: Sequence[torch.Tensor]
    ) -> list[np.ndarray]:
        sleep = self._run("vae", requests[0], len(requests))
        outputs = []
        for request in requests:
            features = request.features
            shape = (features["frames"], features["height"], features["width"], 3)
            outputs.append(_noise.pixels(shape))
        sleep()
        return outputs

    # -- outputs -------------------------------------------------------------------

    def _embeddings(self, request: Request) -> Embeddings:
        """What the family's encoder returns for one request
        (:meth:`dflow.families.Family.embeddings`): random embeddings, masks of ones."""
        assert request.height is not None and request.width is not None
        described = self.family.embeddings(
            self.spec,
            self.uses_negative(request),
            height=request.height,
            width=request.width,
            frames=request.num_frames or 1,
        )
        return {
            name: _noise.tensor(t.shape, getattr(torch, t.dtype))
            if t.floating
            else torch.ones(t.shape, dtype=getattr(torch, t.dtype))
            for name, t in described.items()
        }

    def _latents(self, request: Request) -> torch.Tensor:
        """Latents as the family's pipeline returns them for ``output_type="latent"``
        (:meth:`dflow.families.Family.latents`)."""
        assert request.height is not None and request.width is not None
        latents = self.family.latents(
            self.spec, request.height, request.width, request.num_frames or 1
        )
        return _noise.tensor(latents.shape, getattr(torch, latents.dtype))


def set_speed(speed: float, dask_worker: Any = None) -> None:
    """Run an emulated stage worker's card at ``speed`` times its GPU type's
    speed from now on (``dflow.emulation.speed`` for one worker, while it
    runs): ``client.run(set_speed, 0.3, workers=[address])``, or in a task."""
    from distributed import get_worker

    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    worker = dask_worker or get_worker()
    runtime = getattr(worker.plugins.get("dflow-stage"), "runtime", None)
    if runtime is None or not isinstance(runtime.adapter, EmulatedAdapter):
        raise RuntimeError("this worker does not serve an emulated stage")
    runtime.adapter.speed = float(speed)
