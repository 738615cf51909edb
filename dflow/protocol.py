"""How torch tensors travel between Dask processes.

- ``sizeof``: Dask has no handler for torch and counts a 16 MB tensor as ~80 bytes,
  which makes the scheduler's transfer-cost estimates and memory accounting
  meaningless. dflow registers one through the ``dask.sizeof`` entry point, so
  every process with dflow installed (client, scheduler, workers) has it.
- ``dask`` family (TCP, TLS): tensors go as numpy frames; CUDA tensors are copied
  to the host and bfloat16 (which numpy lacks) travels as raw 16-bit words. The
  receiver gets a host tensor; the stage that uses it moves it to its device.
- ``cuda`` family (UCX through ``distributed-ucxx``): a CUDA tensor is sent as a
  device buffer, so GPU latents move GPU to GPU without a host round trip;
  host tensors fall through to the ``dask`` family.
"""

from __future__ import annotations

import os
from typing import Any

_registered = False

#: How dflow's processes progress UCX: on ucxx's own thread, with requests
#: completed through its notifier thread (ucxx's defaults). distributed-ucxx
#: otherwise picks "blocking", whose Python-side waits keep every process's event
#: loop busy and take the GIL from a stage's compute thread (BENCHMARKS.md, "UCX
#: against TCP between workers of one GPU").
UCX_PROGRESS_ENVIRON = {
    "UCXPY_PROGRESS_MODE": "thread",
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
}


def configure_ucx_progress() -> None:
    """Set :data:`UCX_PROGRESS_ENVIRON` in this process's environment where the
    variables are unset (a user's own choice wins). ucxx reads them when the
    process's first UCX connection starts; child processes inherit them."""
    for key, value in UCX_PROGRESS_ENVIRON.items():
        os.environ.setdefault(key, value)


def register_sizeof(sizeof: Any) -> None:
    """The ``dask.sizeof`` entry point: count the bytes of tensors and outputs,
    registered lazily on first use of torch or dflow types."""

    @sizeof.register_lazy("torch")
    def register_torch() -> None:
        import torch

        @sizeof.register(torch.Tensor)
        def sizeof_tensor(tensor: torch.Tensor) -> int:
            return tensor.element_size() * tensor.nelement()

    @sizeof.register_lazy("dflow")
    def register_dflow() -> None:
        from dflow.output import Output

        @sizeof.register(Output)
        def sizeof_output(output: Output) -> int:
            if output.array is not None:
                return output.array.nbytes
            return sum(len(data) for data in output.encoded or ())


def register_serializers() -> None:
    """Install dflow's tensor serializers in this process (idempotent)."""
    global _registered
    if _registered:
        return
    import torch

    # distributed registers its own torch serializers lazily on first use; load them
    # now so that ours, registered after, win.
    import distributed.protocol.torch  # noqa: F401
    from distributed.protocol import (
        cuda_deserialize,
        cuda_serialize,
        dask_deserialize,
        dask_serialize,
        deserialize,
        serialize,
    )

    @dask_serialize.register(torch.Tensor)
    def serialize_host(tensor: torch.Tensor) -> tuple[dict, list]:
        tensor = tensor.detach()
        header: dict[str, Any] = {"dtype": str(tensor.dtype).removeprefix("torch.")}
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        sub_header, frames = serialize(tensor.numpy(), serializers=("dask",))
        header["sub-header"] = sub_header
        return header, frames

    @dask_deserialize.register(torch.Tensor)
    def deserialize_host(header: dict, frames: list) -> torch.Tensor:
        array = deserialize(header["sub-header"], frames)
        if not array.flags.writeable:
            array = array.copy()
        tensor = torch.from_numpy(array)
        if header["dtype"] == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor

    @cuda_serialize.register(torch.Tensor)
    def serialize_device(tensor: torch.Tensor) -> tuple[dict, list]:
        if tensor.device.type != "cuda":
            raise NotImplementedError("host tensors use the dask family")
        tensor = tensor.detach().contiguous()
        # UCX only orders sends after the default stream
        torch.cuda.current_stream(tensor.device).synchronize()
        header = {
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
        }
        return header, [tensor.view(-1).view(torch.uint8)]

    @cuda_deserialize.register(torch.Tensor)
    def deserialize_device(header: dict, frames: list) -> torch.Tensor:
        (frame,) = frames
        if hasattr(frame, "__cuda_array_interface__"):
            raw = torch.as_tensor(frame, device="cuda")
        else:  # a transport that staged the frame through host memory
            raw = torch.frombuffer(bytearray(frame), dtype=torch.uint8).cuda()
        return raw.view(getattr(torch, header["dtype"])).reshape(header["shape"])

    _registered = True
