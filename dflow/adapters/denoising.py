"""Step-level denoising: one request's denoising as a state that advances a step at a time.

The seam every adapter offers (the DiT path of :class:`~dflow.runtime.StageRuntime`
batches on it; Wan 2.2's expert split moves a state between pools on it)::

    state = adapter.start(request, embeddings)  # the pipeline's set-up: noise, timesteps
    adapter.step([state, other])                # one step of each, in one transformer call
    latents = adapter.finish(state)             # as the pipeline returns output_type="latent"

- :meth:`Adapter.start <dflow.adapters.base.Adapter.start>` makes a
  :class:`DenoisingState` with the family pipeline's own methods
  (``prepare_latents``, ``retrieve_timesteps`` or ``scheduler.set_timesteps``), its
  own copy of the pipeline's scheduler and the seed's noise, drawn from
  ``torch.Generator("cpu").manual_seed(seed)`` as the stock pipeline draws it.
- :meth:`Adapter.step <dflow.adapters.base.Adapter.step>` advances states whose
  :attr:`DenoisingState.key` is equal, each at its own timestep with its own
  embeddings and guidance scale: one transformer call on the stacked inputs, then
  each state's scheduler steps its own latents, guidance combined as the
  pipeline's ``__call__`` combines it. States are changed only after the
  transformer call succeeded.
- :meth:`Adapter.finish <dflow.adapters.base.Adapter.finish>` returns the latents.
- A state pickles (Dask sends it as any task result) and :meth:`DenoisingState.to`
  moves its tensors to another device, so it can continue on another worker
  between any two steps; its scheduler keeps the multistep history.

Identity: a state stepped alone gives the stock pipeline's latents bit for bit
(tests/test_equivalence.py). Stepped in a batch, the transformer's rows differ
from per-request calls only by float rounding: on CPU, GEMMs with a few rows per
request take other kernels than large ones, convolutions pick algorithms by
batch size, and vectorized transcendental functions round differently in a
vector's tail. :func:`per_request` (config ``dflow.runtime.exact-dit-batch``)
computes those parts one request at a time, which makes batched rows equal to
unbatched ones on CPU (docs/batching.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

#: Rows per request below which a linear layer runs one request at a time in an
#: exact batch: small GEMMs take kernels whose sums differ from large ones (on
#: MKL up to 11 rows were seen to differ, with 2 threads and more)
SMALL_GEMM_ROWS = 64


@dataclass
class DenoisingState:
    """One request's denoising between two steps.

    Attributes
    ----------
    key
        States with equal keys can share a step (same latent shape, guidance
        mode and embedding shapes).
    latents
        The latents after ``index`` steps.
    scheduler
        This request's own scheduler, set to its timesteps; multistep
        schedulers keep their history of model outputs in it.
    timesteps
        The request's timesteps; ``index`` is the next step's.
    embeddings
        The encoder's tensors as the transformer takes them.
    guidance_scale
        The request's guidance scale.
    generator
        The seeded generator the noise came from; schedulers that draw noise
        while stepping draw from it, as the stock pipeline's do.
    inputs
        The family's other per-request inputs (position ids, step arguments).
    """

    key: tuple
    latents: torch.Tensor
    scheduler: Any
    timesteps: torch.Tensor
    embeddings: dict[str, torch.Tensor]
    guidance_scale: float
    generator: torch.Generator | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    index: int = 0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.steps

    @property
    def timestep(self) -> torch.Tensor:
        """The timestep of the next step."""
        return self.timesteps[self.index]

    def to(self, device: str | torch.device) -> DenoisingState:
        """This state with its tensors on ``device`` (the scheduler's stay where
        the scheduler keeps them)."""

        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, torch.Tensor) else value

        self.latents = self.latents.to(device)
        self.timesteps = self.timesteps.to(device)
        self.embeddings = {k: v.to(device) for k, v in self.embeddings.items()}
        self.inputs = tree_map(move, self.inputs)
        return self


def advance(
    states: Sequence[DenoisingState],
    noise: Sequence[torch.Tensor],
    options: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Step each state's scheduler on its own noise prediction, with its own
    extra ``scheduler.step`` arguments (the pipeline's ``scheduler.step(noise_pred,
    t, latents, **extra_step_kwargs, return_dict=False)``)."""
    options = options or [{} for _ in states]
    for state, prediction, extra in zip(states, noise, options, strict=True):
        state.latents = state.scheduler.step(
            prediction, state.timestep, state.latents, **extra, return_dict=False
        )[0]
        state.index += 1


class _PerRequestKernels(TorchFunctionMode):
    """Run linear layers with few rows per request, and convolutions, one request
    group at a time: ``rows`` rows in ``groups`` groups of equal size."""

    def __init__(self, rows: int, groups: int):
        super().__init__()
        self.rows = rows
        self.groups = groups

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv1d, F.conv2d, F.conv3d):
            x = args[0]
            if x.dim() > 1 and x.shape[0] == self.rows:
                per_request = x.numel() // x.shape[-1] // self.groups
                if func is not F.linear or per_request < SMALL_GEMM_ROWS:
                    parts = x.chunk(self.groups)
                    return torch.cat([func(p, *args[1:], **kwargs) for p in parts])
        return func(*args, **kwargs)


def _batched(value: Any, rows: int) -> bool:
    return (
        isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
    )


def _split(value: Any, rows: int, index: int, size: int) -> Any:
    """Group ``index`` of a batched argument (a tensor with ``rows`` rows)."""
    if _batched(value, rows):
        return value[index * size : (index + 1) * size]
    return value


def _grouped_forward(module: torch.nn.Module, rows: int, groups: int):
    forward = module.forward
    size = rows // groups

    def run(*args: Any, **kwargs: Any) -> Any:
        leaves, _ = tree_flatten((args, kwargs))
        if not any(_batched(v, rows) for v in leaves):
            return forward(*args, **kwargs)
        outputs = []
        for index in range(groups):
            group_args, group_kwargs = tree_map(
                lambda v, index=index: _split(v, rows, index, size), (args, kwargs)
            )
            if group_kwargs.get("batch_size") == rows:
                group_kwargs["batch_size"] = size
            outputs.append(forward(*group_args, **group_kwargs))
        first = outputs[0]
        if isinstance(first, torch.Tensor):
            return torch.cat(outputs)
        return type(first)(
            None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs)
        )

    return run


@contextlib.contextmanager
def per_request(
    modules: Sequence[torch.nn.Module], rows: int, groups: int
) -> Iterator[None]:
    """Within this block, a transformer call on ``rows`` stacked rows, ``groups``
    requests' worth, computes per request group what float rounding would make
    depend on the batch: ``modules`` (a family's conditioning embedders and
    adaptive norms, whose inputs are per-request vectors), linear layers with
    fewer than :data:`SMALL_GEMM_ROWS` rows per request, and convolutions.
    Everything else (attention, the token GEMMs, norms) runs batched."""
    if groups <= 1:
        yield
        return
    # an instance's own forward (a hook's wrapper) is kept and restored
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = _grouped_forward(module, rows, groups)
    try:
        with _PerRequestKernels(rows, groups):
            yield
    finally:
        for module, forward in zip(modules, saved, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
