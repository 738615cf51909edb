"""Which stage backend this process runs (config ``dflow.runtime.backend``): the
model families' adapters on a real device, or the emulation (docs/emulation.md).

The one place that reads the setting: :class:`~dflow.runtime.StageRuntime`
takes its adapter from :func:`current`, and stage workers publish the GPU type
and memory it names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dask.config

import dflow.config  # noqa: F401
from dflow import hardware
from dflow.spec import ModelSpec

if TYPE_CHECKING:
    from distributed import Worker

    from dflow.adapters import Adapter
    from dflow.predictor import Prediction

#: The price of a DiT batch: (request features, batch size) -> Prediction
BatchPrice = Callable[[Mapping[str, Any], int], "Prediction"]


class RealBackend:
    """Run the models: the family's adapter on this process's device."""

    name = "real"

    def adapter(
        self, spec: ModelSpec, gpu_type: str | None
    ) -> tuple[type[Adapter], dict[str, Any]]:
        """The adapter class of ``spec`` and its extra keyword arguments."""
        from dflow.adapters import adapter_for

        return adapter_for(spec), {}

    def setup_worker(self, worker: Worker) -> None:
        """What this backend changes on a stage worker as it starts: nothing."""

    def gpu(self, gpu_type: str | None, device: str) -> tuple[str, int]:
        """The GPU type (``gpu_type`` if given, else read from ``device``) and
        the device's memory bytes, as a stage worker publishes them."""
        return gpu_type or hardware.gpu_type_of(device), hardware.device_memory(device)

    def dit_batch_price(
        self,
        spec: ModelSpec,
        stages: Sequence[str],
        gpu_type: str | None,
        device: str,
    ) -> tuple[BatchPrice, int | None]:
        """How a runtime serving ``stages`` prices a DiT batch, and the device
        bytes the DiT's batch has: the shipped profiles' prediction (on a GPU
        type without one, a profiled type's: its batch speedups and peak bytes
        stand in), the device's memory less the other stages' weights."""
        from dflow.predictor import Prediction, shipped_predictor

        gpu, memory = self.gpu(gpu_type, device)
        predictor = shipped_predictor()
        others = sum(spec.weight_bytes.get(s, 0) for s in stages if s != "dit")

        def price(features: Mapping[str, Any], batch: int) -> Prediction:
            priced = gpu
            if (spec.name, "dit", gpu) not in predictor.fits:
                profiled = sorted(
                    g for m, s, g in predictor.fits if (m, s) == (spec.name, "dit")
                )
                if not profiled:
                    raise LookupError(f"no DiT profile of {spec.name}")
                priced = profiled[0]
            seconds = predictor.predict(spec.name, "dit", priced, features, batch)
            peak = predictor.peak_bytes(spec.name, "dit", gpu, features, batch)
            return Prediction(seconds.seconds, peak)

        return price, memory - others


class EmulatedBackend:
    """Sleep for the profiled GPU time of each stage call on a catalog GPU type."""

    name = "emulated"

    def adapter(
        self, spec: ModelSpec, gpu_type: str | None
    ) -> tuple[type[Adapter], dict[str, Any]]:
        """The emulated adapter and its arguments, the cost model built here so
        that a runtime's ``load_seconds`` times the emulated load alone."""
        from dflow.emulation import cost_model
        from dflow.emulation.adapter import EmulatedAdapter

        return EmulatedAdapter, {"gpu_type": gpu_type, "cost": cost_model()}

    def setup_worker(self, worker: Worker) -> None:
        """Delay the transfers the worker serves to its peers as
        ``dflow.emulation.transfer-delay`` says (network jitter; default none)."""
        from dflow.emulation.network import delay_transfers

        delay_transfers(worker)

    def gpu(self, gpu_type: str | None, device: str) -> tuple[str, int]:
        """The emulated GPU type (``gpu_type``, else ``dflow.runtime.gpu-type``,
        else the catalog's reference) and its memory bytes."""
        gpu = hardware.resolve_gpu(gpu_type)
        return gpu.name, gpu.memory_bytes

    def dit_batch_price(
        self,
        spec: ModelSpec,
        stages: Sequence[str],
        gpu_type: str | None,
        device: str,
    ) -> tuple[BatchPrice, int | None]:
        """The cost model's price of a DiT batch on the emulated GPU type
        (:meth:`~dflow.emulation.CostModel.dit_batch_price`); the placement's
        memory check covers the device."""
        from dflow.emulation import cost_model

        gpu = hardware.resolve_gpu(gpu_type).name
        return cost_model().dit_batch_price(spec, stages, gpu), None


BACKENDS: dict[str, RealBackend | EmulatedBackend] = {
    backend.name: backend for backend in (RealBackend(), EmulatedBackend())
}


def current() -> RealBackend | EmulatedBackend:
    """The backend ``dflow.runtime.backend`` names."""
    name = dask.config.get("dflow.runtime.backend", "real")
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"dflow.runtime.backend must be one of {', '.join(BACKENDS)}, got {name!r}"
        ) from None
