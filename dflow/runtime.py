"""The stage runtime: the resident model of a stage in one process.

Stage calls (``encode``, ``denoise``, ``decode``, ``generate``) take and return
plain data: a :class:`~dflow.request.Request` plus dicts of tensors, so they run
as Dask tasks whose intermediates move worker to worker. The model is never an
argument: a call looks the runtime up by model and stage in its process.

Concurrent ``encode`` and ``decode`` calls (a worker running several tasks at
once) are batched: while one batch runs, new calls queue, and the next batch
takes every queued call that can share it. No call waits for a batch to fill.
With ``dflow.runtime.max-dit-batch`` above 1, concurrent ``denoise`` calls share
denoising steps the same way, a step at a time (:class:`StepBatcher`: requests
join and leave at step boundaries; docs/batching.md).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import dask.config
from dask.utils import parse_bytes

import dflow.config  # noqa: F401
from dflow import backend, families, prompts, quantization
from dflow.adapters.denoising import DenoisingState
from dflow.catalog import resolve
from dflow.errors import Cancelled, StageOutOfMemory
from dflow.output import Output
from dflow.pools import MONOLITHIC, WORKER_STAGES, base_stage, batch_key, expert_of
from dflow.predictor import batch_limit
from dflow.request import Request
from dflow.spec import STAGES, ModelSpec

logger = logging.getLogger(__name__)

#: Building and loading models is not thread-safe (diffusers' lazy imports, models
#: built on the meta device): the runtimes of one process load one at a time,
#: unless their adapter is ``parallel_load_safe``.
_loading = threading.Lock()

#: The stages a runtime can host: one of ``STAGES``, an expert's DiT stage, or
#: ``"all"`` (monolithic).
RUNTIME_STAGES = WORKER_STAGES
#: Input image of the warm-up request of image-to-video models
_WARMUP_PIXEL = np.zeros((1, 1, 3), dtype=np.uint8)


def default_device() -> str:
    return dask.config.get("dflow.runtime.device", None) or (
        "cuda" if torch.cuda.is_available() else "cpu"
    )


def default_dtype(spec: ModelSpec, device: str) -> torch.dtype:
    """The spec's dtype on accelerators; float32 on CPU, where bf16 is slow."""
    configured = dask.config.get("dflow.runtime.dtype", None)
    if configured:
        return getattr(torch, configured)
    if torch.device(device).type == "cpu":
        return torch.float32
    return getattr(torch, spec.dtype)


@dataclass
class _Call:
    item: Any
    key: tuple
    done: bool = False
    result: Any = None
    error: BaseException | None = None


@dataclass
class Batcher:
    """Run ``function`` on batches of concurrent calls that share a key."""

    function: Callable[[list[Any]], list[Any]]
    max_size: int
    _pending: list[_Call] = field(default_factory=list)
    _busy: bool = False
    _condition: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, item: Any, key: tuple) -> Any:
        call = _Call(item, key)
        with self._condition:
            self._pending.append(call)
        while True:
            with self._condition:
                while self._busy and not call.done:
                    self._condition.wait()
                if call.done:
                    break
                self._busy = True
                first = self._pending[0]
                batch = [c for c in self._pending if c.key == first.key][
                    : self.max_size
                ]
                for c in batch:
                    self._pending.remove(c)
            try:
                self._run(batch)
            finally:
                with self._condition:
                    for c in batch:
                        c.done = True
                    self._busy = False
                    self._condition.notify_all()
        if call.error is not None:
            raise call.error
        return call.result

    def _run(self, batch: list[_Call]) -> None:
        try:
            results = self.function([c.item for c in batch])
        except Exception as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            # One bad request must not fail the others: retry them one by one.
            for c in batch:
                self._run([c])
            return
        for c, result in zip(batch, results, strict=True):
            c.result = result


class Drained(Exception):
    """A denoising call left its worker's queue before its first step: the
    worker is leaving the pool, or gave the call back for an idle worker to
    take (the task runs again elsewhere)."""


@dataclass(eq=False)
class _Denoising:
    """One request in the step loop."""

    state: DenoisingState
    should_stop: Callable[[], bool] | None
    on_step: Callable[[int], None] | None
    #: the thread waiting for it
    thread: int = field(default_factory=threading.get_ident)
    #: device seconds of the steps it took part in, and its share of them (each
    #: step's seconds over the number of requests that shared it)
    seconds: float = 0.0
    share: float = 0.0
    finished: bool = False
    error: BaseException | None = None


class StepBatcher:
    """Continuous batching of denoising steps.

    Each call hands in one request's :class:`~dflow.adapters.denoising.DenoisingState`
    and returns when it is done. While a step runs, new states queue; the next
    step takes the states that share the key of the oldest one, oldest first, up
    to ``limit(state)``: requests join a batch and leave it at step boundaries,
    each at its own timestep, and no step waits for a batch to fill. The oldest
    request's key goes next, so no shape starves. Before each step, requests
    whose ``should_stop`` returns True leave with :class:`Cancelled`; each
    request's ``on_step(step)`` is called after each of its steps.

    Parameters
    ----------
    step
        Advances a list of states by one step; returns its device seconds.
    limit
        The most states of a state's key one step takes.
    """

    def __init__(
        self,
        step: Callable[[list[DenoisingState]], float],
        limit: Callable[[DenoisingState], int],
    ):
        self.step = step
        self.limit = limit
        self._entries: list[_Denoising] = []
        self._busy = False
        self._draining = False
        #: the states of the step running now
        self._group: list[_Denoising] = []
        self._condition = threading.Condition()
        #: batch sizes per key after a step ran out of memory
        self._caps: dict[tuple, int] = {}

    def __call__(
        self,
        state: DenoisingState,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> tuple[float, float]:
        """Denoise ``state`` to its end. Returns the device seconds of the steps
        it took part in and its share of them."""
        entry = _Denoising(state, should_stop, on_step)
        with self._condition:
            if self._draining:
                raise Drained()
            self._entries.append(entry)
        while True:
            with self._condition:
                while self._busy and not entry.finished:
                    self._condition.wait()
                if entry.finished:
                    break
                self._busy = True
                group = self._group = self._next_group()
            try:
                if group:
                    self._run(group)
            finally:
                with self._condition:
                    self._busy = False
                    self._group = []
                    self._entries = [e for e in self._entries if not e.finished]
                    self._condition.notify_all()
        if entry.error is not None:
            raise entry.error
        return entry.seconds, entry.share

    def drain(self) -> None:
        """Take no new requests, and send back the queued ones that have not
        taken a step (:class:`Drained`); the others finish."""
        with self._condition:
            self._draining = True
            for entry in self._entries:
                if entry.state.index == 0 and not entry.finished:
                    entry.error, entry.finished = Drained(), True
            self._condition.notify_all()

    def give_back(self, batches: int = 1) -> list[int]:
        """Send back (:class:`Drained`) requests waiting for a step they cannot
        join: not stepped yet, in neither the running step nor the next one.
        At most ``batches`` batches go, the oldest request's first: each that
        request and up to its limit of the waiting ones sharing its key, so
        another worker can run them together. Returns the ids of the threads
        whose calls went."""
        with self._condition:
            staying = set(self._group) | set(self._peek_group())
            waiting = [
                e
                for e in self._entries
                if not e.finished and e.state.index == 0 and e not in staying
            ]
            leaving: list[_Denoising] = []
            while waiting and batches > 0:
                key = waiting[0].state.key
                batch = [e for e in waiting if e.state.key == key]
                batch = batch[: self.limit(waiting[0].state)]
                leaving += batch
                waiting = [e for e in waiting if e not in batch]
                batches -= 1
            for entry in leaving:
                entry.error, entry.finished = Drained(), True
            self._condition.notify_all()
            return [entry.thread for entry in leaving]

    def _peek_group(self) -> list[_Denoising]:
        """The states the next step would take, stopped ones included."""
        waiting = [e for e in self._entries if not e.finished]
        if not waiting:
            return []
        key = waiting[0].state.key
        size = self.limit(waiting[0].state)
        size = min(size, self._caps.get(key, size))
        return [e for e in waiting if e.state.key == key][:size]

    def _next_group(self) -> list[_Denoising]:
        """The next step's batch (called holding the condition): stopped
        requests leave, then the oldest request's key picks the batch."""
        for entry in self._entries:
            if entry.finished or entry.should_stop is None or not entry.should_stop():
                continue
            state = entry.state
            entry.error = Cancelled(
                f"request stopped after {state.index} of {state.steps} steps"
            )
            entry.finished = True
        return self._peek_group()

    def _run(self, group: list[_Denoising]) -> None:
        states = [e.state for e in group]
        before = [s.index for s in states]
        try:
            seconds = self.step(states)
        except StageOutOfMemory as error:
            if len(group) == 1:
                group[0].error, group[0].finished = error, True
                return
            # the states that have not stepped retry in smaller batches
            key, size = states[0].key, max(1, len(group) // 2)
            logger.warning("A denoising batch of %d ran out of memory", len(group))
            self._caps[key] = min(size, self._caps.get(key, size))
            seconds, group = (
                0.0,
                [e for e, index in zip(group, before) if e.state.index > index],
            )
        except Exception as error:
            for entry in group:
                entry.error, entry.finished = error, True
            return
        for entry in group:
            entry.seconds += seconds
            entry.share += seconds / len(group)
            entry.finished = entry.state.done
            if entry.on_step is not None:
                entry.on_step(entry.state.index - 1)


class EncodingCache:
    """Recent text encodings of one encoder, by
    :func:`dflow.prompts.encoding_fields`; past ``size`` the least recently used
    is dropped. ``hits`` and ``misses`` count the lookups."""

    def __init__(self, size: int):
        self.size = size
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> dict[str, Any] | None:
        with self._lock:
            embeddings = self._entries.get(key)
            if embeddings is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return embeddings

    def put(self, key: tuple, embeddings: dict[str, Any]) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._entries[key] = embeddings
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class StageRuntime:
    """The resident model of one stage of one model, on one device.

    Parameters
    ----------
    model
        A model name or path (see :class:`~dflow.request.Request`).
    stage
        ``"encoder"``, ``"dit"``, ``"vae"``, ``"all"`` for the whole pipeline,
        or one expert's DiT stage (``"dit-high"``, ``"dit-low"``) of a model of
        two experts.
    device, dtype
        Defaults: CUDA if present, else CPU; the model's dtype on CUDA, float32 on
        CPU (config ``dflow.runtime.device`` / ``dflow.runtime.dtype``).
    max_batch
        Most requests one encode or decode call batches (config
        ``dflow.runtime.max-batch``).
    max_dit_batch
        Most requests one denoising step batches (config
        ``dflow.runtime.max-dit-batch``; 1: each request denoises alone, in its
        pipeline's own call). Fewer where the profiles predict the batch would
        not fit the device or not gain ``dflow.runtime.dit-batch-min-gain``.
    gpu_type
        The GPU type an emulated runtime (config ``dflow.runtime.backend:
        emulated``, :mod:`dflow.backend`) costs its calls on; default
        ``dflow.runtime.gpu-type``.
    quantize
        ``"int8"`` or ``"fp8"``: the DiT's weights in 8 bits
        (:mod:`dflow.quantization`); default ``dflow.runtime.quantize`` for
        the stage.
    """

    def __init__(
        self,
        model: str,
        stage: str,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_batch: int | None = None,
        gpu_type: str | None = None,
        max_dit_batch: int | None = None,
        quantize: str | None = None,
    ):
        if stage not in RUNTIME_STAGES:
            raise ValueError(
                f"stage must be one of {', '.join(RUNTIME_STAGES)}, got {stage!r}"
            )
        self.stage = stage
        self.gpu_type = gpu_type
        max_batch = max_batch or dask.config.get("dflow.runtime.max-batch", 8)
        self.max_dit_batch = int(
            max_dit_batch or dask.config.get("dflow.runtime.max-dit-batch")
        )
        stages = STAGES if stage == MONOLITHIC else (stage,)
        self.stages = stages
        self.spec = resolve(model)
        if expert_of(stage) and not families.of(self.spec).chains(self.spec)[1:]:
            raise ValueError(
                f"{self.spec.name} has no experts to split its DiT by: serve stage "
                "'dit' (--expert applies to Wan 2.2 A14B models)"
            )
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.spec, self.device)
        self.quantize = quantization.configured(stage, quantize)
        adapter, options = backend.current().adapter(self.spec, gpu_type)
        loading = contextlib.nullcontext() if adapter.parallel_load_safe else _loading
        with loading:
            if self.serves("encoder"):
                # the tokenizer stage tasks check prompts with: loaded here, so
                # that neither a request nor the timed load pays for it
                prompts.tokenizer(self.spec)
            limit = dask.config.get("dflow.runtime.memory-limit")
            if limit and torch.device(self.device).type == "cuda":
                # as if the card had only this much memory (a smaller GPU type)
                index = torch.device(self.device).index
                if index is None:
                    index = torch.cuda.current_device()
                total = torch.cuda.get_device_properties(index).total_memory
                torch.cuda.set_per_process_memory_fraction(
                    min(1.0, parse_bytes(limit) / total), index
                )
            start = time.perf_counter()
            self.adapter = adapter(
                self.spec,
                stages,
                self.device,
                self.dtype,
                quantize=self.quantize,
                **options,
            )
            self.load_seconds = time.perf_counter() - start
        self.peak_memory: int | None = None
        #: encodings kept for equal prompts (``dflow.runtime.encoding-cache``)
        self.encodings = EncodingCache(
            int(dask.config.get("dflow.runtime.encoding-cache"))
        )
        #: one VAE call per request (``dflow.runtime.exact-decode``)
        self.exact_decode = bool(dask.config.get("dflow.runtime.exact-decode"))
        self._lock = threading.Lock()
        self._encode = Batcher(self._encode_each, max_batch)
        self._decode = Batcher(self._decode_each, max_batch)
        self._steps = StepBatcher(self._step, self._step_limit)
        #: batch limits by state key (the step loop's) and by batch key
        self._limits: dict[tuple, int] = {}
        self._shape_limits: dict[tuple, int] = {}
        logger.info(
            "Loaded %s stage %s on %s (%s%s) in %.1fs",
            self.spec.name,
            stage,
            self.device,
            self.dtype,
            f", {self.quantize} DiT weights" if self.quantize else "",
            self.load_seconds,
        )

    @property
    def model(self) -> str:
        return self.spec.name

    def serves(self, stage: str) -> bool:
        return self.stage in (stage, MONOLITHIC)

    @property
    def dit_stage(self) -> str | None:
        """The DiT stage this runtime denoises for: ``"dit"``, an expert's
        stage, or ``None`` for the encoder and VAE."""
        if self.stage == MONOLITHIC:
            return "dit"
        return self.stage if base_stage(self.stage) == "dit" else None

    # -- stage calls ---------------------------------------------------------------

    def encode(self, request: Request) -> dict[str, Any]:
        """Embeddings of the request's prompts (and its input image's condition,
        for image-to-video), as a dict of tensors plus ``timings``
        (``encode_cached`` 1: reused from :attr:`encodings`)."""
        self._check(request, "encoder")
        key = prompts.encoding_fields(request)
        cached = self.encodings.get(key)
        if cached is not None:
            timings = {"encode": 0.0, "encode_batch": 1, "encode_cached": 1}
            return {**cached, "timings": timings}
        embeddings, seconds, size = self._encode(
            request, self.adapter.batch_key("encoder", request)
        )
        self.encodings.put(key, embeddings)
        return {**embeddings, "timings": {"encode": seconds, "encode_batch": size}}

    def denoise(
        self,
        request: Request,
        embeddings: dict[str, Any],
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Denoised latents (``{"latents": tensor, "timings": ...}``).

        A runtime of one expert runs that expert's steps: the high-noise
        expert's output is the encoder's with the request's denoising so far
        added (``"denoising"``), which the low-noise expert's runtime takes as
        ``embeddings`` and finishes. Experts' runtimes and image-to-video
        models denoise one request at a time (no step batching).

        ``on_step(step)`` is called after each step. ``should_stop`` is polled
        between steps; when it returns True the call raises :class:`Cancelled`
        and frees the device.
        """
        stage = self.dit_stage
        if stage is None:
            raise RuntimeError(f"this runtime serves stage {self.stage!r}, not 'dit'")
        self._check(request, stage)
        tensors = {k: v for k, v in embeddings.items() if isinstance(v, torch.Tensor)}
        # a shape that cannot batch runs in one pipeline call, as unbatched
        if self.steps_batch(stage) and self.dit_batch_limit(request.features) > 1:
            return self._denoise_in_steps(
                request, tensors, embeddings, should_stop, on_step
            )

        def after_step(step: int) -> None:
            if on_step is not None:
                on_step(step)
            if should_stop is not None and should_stop():
                raise Cancelled(
                    f"request stopped after {step + 1} of {request.steps} steps"
                )

        expert = expert_of(stage)
        timings = dict(embeddings.get("timings", {}))
        output: dict[str, Any]
        with self._lock, self._measure() as elapsed:
            if expert is None:
                output = {"latents": self.adapter.denoise(request, tensors, after_step)}
            else:
                state = self.adapter.denoise_expert(
                    request, tensors, expert, embeddings.get("denoising"), after_step
                )
                if expert == "high":
                    output = {**tensors, "denoising": state}
                else:
                    output = {"latents": state.latents}
        if expert is None:
            timings["denoise"] = elapsed()
        else:
            timings[f"denoise_{expert}"] = elapsed()
            # the whole denoising, as one DiT stage reports it
            timings["denoise"] = timings.get("denoise", 0.0) + elapsed()
        return {**output, "timings": timings}

    def steps_batch(self, stage: str) -> bool:
        """Whether denoising runs through the step loop that batches concurrent
        requests (for shapes whose :meth:`dit_batch_limit` is above 1): not for
        one expert's runtime, whose state moves to the other expert's pool, nor
        an image-to-video model, whose image condition the step seam does not
        carry."""
        return (
            self.max_dit_batch > 1
            and expert_of(stage) is None
            and not families.of(self.spec).image_input
        )

    def _denoise_in_steps(
        self,
        request: Request,
        tensors: dict[str, torch.Tensor],
        embeddings: dict[str, Any],
        should_stop: Callable[[], bool] | None,
        on_step: Callable[[int], None] | None,
    ) -> dict[str, Any]:
        """:meth:`denoise` through the step loop, batched with concurrent calls.
        Its timings count the device seconds of its steps (``denoise``) and how
        many requests shared them on average (``denoise_batch``: the seconds
        over this request's share of them)."""
        start = time.perf_counter()
        state = self.adapter.start(request, tensors)
        if state.key not in self._limits:
            self._limits[state.key] = self.dit_batch_limit(request.features)
        own = time.perf_counter() - start
        seconds, share = self._steps(state, should_stop, on_step)
        start = time.perf_counter()
        latents = self.adapter.finish(state)
        own += time.perf_counter() - start
        timings = {
            **embeddings.get("timings", {}),
            "denoise": seconds + own,
            "denoise_batch": (seconds + own) / (share + own) if share + own else 1.0,
        }
        return {"latents": latents, "timings": timings}

    def dit_batch_limit(self, features: Mapping[str, Any]) -> int:
        """The most requests with ``features`` (a request's, or as annotated
        on its task) one denoising step takes: ``max_dit_batch``, less where
        the profiles predict a larger batch would not fit this device or not
        gain ``dflow.runtime.dit-batch-min-gain`` in throughput
        (:func:`~dflow.predictor.batch_limit`). Kept per
        :func:`~dflow.pools.batch_key`."""
        key = batch_key(features)
        limit = self._shape_limits.get(key)
        if limit is None:
            price, memory = backend.current().dit_batch_price(
                self.spec, self.stages, self.gpu_type, self.device
            )
            limit = self._shape_limits[key] = batch_limit(
                lambda batch: price(features, batch),
                self.max_dit_batch,
                memory,
                float(dask.config.get("dflow.runtime.dit-batch-min-gain")),
            )
        return limit

    def drain(self) -> None:
        """Stop taking denoising calls: queued ones that have not started leave
        with :class:`Drained`, started ones finish."""
        self._steps.drain()

    def give_back(self, batches: int = 1) -> list[int]:
        """Send back up to ``batches`` batches of the denoising calls waiting
        for a step they cannot join (:meth:`StepBatcher.give_back`), so that
        the scheduler places them on another worker. Returns the ids of the
        threads whose calls went."""
        return self._steps.give_back(batches)

    def decode(self, request: Request, latents: dict[str, Any]) -> Output:
        """The request's output from its latents."""
        self._check(request, "vae")
        pixels, seconds, size = self._decode(
            (request, latents["latents"]), self.adapter.batch_key("vae", request)
        )
        timings = {
            **latents.get("timings", {}),
            "decode": seconds,
            "decode_batch": size,
        }
        return Output.from_pixels(request, pixels, timings)

    def generate(
        self,
        request: Request,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Output:
        """All three stages in this process (the monolithic path).

        Its timings add ``generate`` (the call's seconds) and
        ``generate_batch``: the seconds over this request's own part of them,
        which leaves out the other requests' shares of the batched stage calls
        it took part in.
        """
        start = time.perf_counter()
        embeddings = self.encode(request)
        latents = self.denoise(request, embeddings, should_stop, on_step)
        output = self.decode(request, latents)
        timings = output.timings
        seconds = time.perf_counter() - start
        shared = sum(
            timings[stage] * (1 - 1 / timings.get(f"{stage}_batch", 1))
            for stage in ("encode", "denoise", "decode")
        )
        timings["generate"] = seconds
        timings["generate_batch"] = seconds / max(seconds - shared, 1e-9)
        return output

    def warmup(self) -> float:
        """Run the stage once on the smallest request, so no request pays for
        first-call costs (allocator, kernels, lazy imports). Returns seconds."""
        start = time.perf_counter()
        multiple = self.spec.size_multiple
        family = families.of(self.spec)
        # enough steps that each expert of a two-expert model runs one
        steps = next(
            (
                n
                for n in range(1, 9)
                if min((family.expert_steps(self.spec, n) or {"dit": n}).values())
            ),
            1,
        )
        request = Request(
            model=self.spec.name,
            prompt="warm up",
            height=multiple,
            width=multiple,
            num_frames=1 if self.spec.video else None,
            steps=steps,
            seed=0,
            image=_WARMUP_PIXEL if family.image_input else None,
        )
        if self.serves("encoder"):
            embeddings = self.encode(request)
        else:
            embeddings = self.zero_embeddings(request)
        if self.dit_stage is not None:
            latents = self.denoise(request, embeddings)
        else:
            latents = {"latents": self.zero_latents(request)}
        if self.serves("vae"):
            self.decode(request, latents)
        return time.perf_counter() - start

    def encode_batch(
        self, requests: Sequence[Request]
    ) -> tuple[list[dict[str, Any]], float]:
        """Embeddings of ``requests`` in one call, and its seconds (the batch
        that :meth:`encode` forms from concurrent calls, given outright)."""
        with self._lock, self._measure() as elapsed:
            embeddings = self.adapter.encode(requests)
        return embeddings, elapsed()

    def decode_batch(
        self, requests: Sequence[Request], latents: Sequence[torch.Tensor]
    ) -> tuple[list[np.ndarray], float]:
        """uint8 pixels of ``requests`` from their latents in one call, and its
        seconds (the batch that :meth:`decode` forms, given outright).

        With ``dflow.runtime.exact-decode`` each request's latents decode in a
        VAE call of their own: a batched convolution may round differently
        (pixels within 1 level of 255 of a single call's).
        """
        with self._lock, self._measure() as elapsed:
            if self.exact_decode:
                pixels = [
                    p
                    for r, x in zip(requests, latents, strict=True)
                    for p in self.adapter.decode([r], [x])
                ]
            else:
                pixels = self.adapter.decode(requests, latents)
        return pixels, elapsed()

    def zero_embeddings(self, request: Request) -> dict[str, torch.Tensor]:
        """Zero embeddings shaped as this model's encoder sends them for
        ``request`` (masks of ones), in this runtime's dtype: a DiT's input
        without an encoder."""
        assert request.height is not None and request.width is not None
        described = families.of(self.spec).embeddings(
            self.spec,
            self.adapter.uses_negative(request),
            str(self.dtype).removeprefix("torch."),
            height=request.height,
            width=request.width,
            frames=request.num_frames or 1,
        )
        return {
            name: (torch.zeros if t.floating else torch.ones)(
                t.shape, dtype=getattr(torch, t.dtype)
            )
            for name, t in described.items()
        }

    def zero_latents(self, request: Request) -> torch.Tensor:
        """Zero latents shaped as this model's pipeline returns them for
        ``request``: a VAE's input without a DiT."""
        assert request.height is not None and request.width is not None
        latents = families.of(self.spec).latents(
            self.spec,
            request.height,
            request.width,
            request.num_frames or 1,
            str(self.dtype).removeprefix("torch."),
        )
        return torch.zeros(latents.shape, dtype=getattr(torch, latents.dtype))

    @property
    def weight_bytes(self) -> int:
        """Bytes of its stages' weights in the model's dtype (8-bit DiT weights
        take less)."""
        return sum(self.spec.weight_bytes.get(s, 0) for s in self.stages)

    def reserve_host(self) -> None:
        """Page-lock the host memory :meth:`park` copies the weights into
        (slow; workers do it in the background, and :meth:`close` stops it)."""
        self.adapter.reserve_host()

    def park(self) -> None:
        """Free the device but keep the weights in host memory, for a worker
        that may serve this stage again (:meth:`resume`)."""
        self.encodings.clear()
        self.adapter.park()

    def resume(self) -> float:
        """Serve again after :meth:`park`. Returns the seconds it took."""
        start = time.perf_counter()
        self.adapter.resume()
        return time.perf_counter() - start

    def close(self) -> None:
        """Drop the model and return its device memory."""
        self.adapter.unreserve()
        self.encodings.clear()
        del self.adapter
        gc.collect()
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()

    # -- internals -----------------------------------------------------------------

    def _check(self, request: Request, stage: str) -> None:
        if not self.serves(stage):
            raise RuntimeError(
                f"this runtime serves stage {self.stage!r}, not {stage!r}"
            )
        if request.model != self.spec.name:
            raise RuntimeError(
                f"this runtime serves model {self.spec.name!r}, not {request.model!r}"
            )

    def _step(self, states: list[DenoisingState]) -> float:
        with self._lock, self._measure() as elapsed:
            self.adapter.step(states)
        return elapsed()

    def _step_limit(self, state: DenoisingState) -> int:
        return self._limits.get(state.key, 1)

    def _encode_each(self, requests: Sequence[Request]) -> list[tuple]:
        embeddings, seconds = self.encode_batch(requests)
        return [(e, seconds, len(requests)) for e in embeddings]

    def _decode_each(
        self, items: Sequence[tuple[Request, torch.Tensor]]
    ) -> list[tuple]:
        requests = [request for request, _ in items]
        pixels, seconds = self.decode_batch(requests, [latents for _, latents in items])
        return [(p, seconds, len(items)) for p in pixels]

    @contextlib.contextmanager
    def _measure(self) -> Iterator[Callable[[], float]]:
        """Time a device call (synchronized) and record its peak memory; turn an
        out-of-memory error (CUDA's, or the CPU allocator's) into
        :class:`StageOutOfMemory` after freeing what the call held."""
        cuda = torch.device(self.device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        stop: float | None = None

        def elapsed() -> float:
            return (stop or time.perf_counter()) - start

        try:
            yield elapsed
            if cuda:
                torch.cuda.synchronize(self.device)
                self.peak_memory = torch.cuda.max_memory_allocated(self.device)
            stop = time.perf_counter()
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not isinstance(error, torch.OutOfMemoryError) and not _host_oom(error):
                raise
            # The failed call's frames hold its tensors until the error is gone,
            # and the worker keeps the error: drop their locals so the memory
            # comes back now, to the cache and then to the device.
            traceback.clear_frames(error.__traceback__)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            raise StageOutOfMemory(
                f"{self.spec.name} {self.stage} ran out of device memory: {error}"
            ) from None


def _host_oom(error: RuntimeError) -> bool:
    """Whether ``error`` is torch's CPU allocator failing (it raises a plain
    RuntimeError, not ``torch.OutOfMemoryError``)."""
    message = str(error)
    return "DefaultCPUAllocator" in message and (
        "can't allocate memory" in message or "not enough memory" in message
    )


_runtimes: dict[tuple[str, str], StageRuntime] = {}
_runtimes_lock = threading.Lock()


def install(runtime: StageRuntime) -> None:
    """Make ``runtime`` the one stage calls in this process find."""
    with _runtimes_lock:
        _runtimes[runtime.model, runtime.stage] = runtime


def uninstall(model: str, stage: str) -> StageRuntime | None:
    with _runtimes_lock:
        return _runtimes.pop((model, stage), None)


def installed() -> list[StageRuntime]:
    with _runtimes_lock:
        return list(_runtimes.values())


def lookup(model: str, stage: str) -> StageRuntime:
    """The runtime of this process serving ``stage`` of ``model``."""
    with _runtimes_lock:
        runtime = _runtimes.get((model, stage)) or _runtimes.get((model, "all"))
        serving = sorted(f"{m} {s}" for m, s in _runtimes)
    if runtime is None:
        raise LookupError(
            f"no {stage} runtime for model {model!r} in this process; it serves: "
            f"{', '.join(serving) or 'nothing'}"
        )
    return runtime


def local(model: str, stage: str = "all") -> StageRuntime:
    """This process's runtime for ``model``, created on first use (for ``generate``)."""
    name = resolve(model).name
    with _runtimes_lock:
        runtime = _runtimes.get((name, stage))
    if runtime is None:
        runtime = StageRuntime(name, stage)
        with _runtimes_lock:
            runtime = _runtimes.setdefault((name, stage), runtime)
    return runtime


def generate(request: Request) -> Output:
    """Run all three stages of ``request`` in this process.

    The reference for the disaggregated path (same seed, same pixels) and the
    monolithic mode's task body. The model stays resident for later calls.
    Raises :class:`~dflow.errors.InvalidRequest` for a prompt over the model's
    token limit.

    Examples
    --------
    >>> output = dflow.generate(dflow.Request(model="tiny-flux", prompt="a fox"))  # doctest: +SKIP
    >>> output.images[0].save("fox.png")  # doctest: +SKIP
    """
    prompts.check_length(request)
    return local(request.model).generate(request)
