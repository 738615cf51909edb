"""CUDA tensors through dflow's serializers (runs where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from distributed.protocol import deserialize, serialize

from dflow.protocol import register_serializers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True, scope="module")
def serializers():
    register_serializers()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_host_fallback(dtype):
    """Over TCP a CUDA tensor travels through host memory and arrives on the host."""
    tensor = torch.arange(4096, device="cuda").reshape(64, 64).to(dtype)
    header, frames = serialize(tensor, serializers=("dask",))
    result = deserialize(header, frames)
    assert result.device.type == "cpu"
    assert result.dtype == dtype
    assert torch.equal(result, tensor.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_device_family(dtype):
    """The cuda family (what UCX uses) sends device buffers and rebuilds on the GPU."""
    tensor = torch.randn(16, 512, 64, device="cuda").to(dtype)
    header, frames = serialize(tensor, serializers=("cuda", "dask"))
    assert header["serializer"] == "cuda"
    assert all(frame.device.type == "cuda" for frame in frames)
    result = deserialize(header, frames)
    assert result.device.type == "cuda"
    assert torch.equal(result, tensor)


def test_device_family_passes_host_tensors_on():
    tensor = torch.ones(8)
    header, frames = serialize(tensor, serializers=("cuda", "dask"))
    assert header["serializer"] == "dask"
    assert torch.equal(deserialize(header, frames), tensor)
