"""Torch tensors in Dask: their size, and their trip between processes."""

from __future__ import annotations

import os

import pytest
import torch

from dask.sizeof import sizeof
from distributed.protocol import deserialize, serialize

from dflow import protocol


@pytest.fixture(scope="module", autouse=True)
def serializers():
    protocol.register_serializers()
    protocol.register_serializers()  # idempotent


def frame_bytes(frames) -> int:
    return sum(memoryview(frame).nbytes for frame in frames)


BASE = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)

TENSORS = [
    pytest.param(torch.randn(3, 16, 20), id="float32"),
    pytest.param(torch.randn(2, 77, 32).to(torch.bfloat16), id="bfloat16"),
    pytest.param(torch.randn(4, 5).to(torch.float16), id="float16"),
    pytest.param(torch.arange(-50, 50, dtype=torch.int64).reshape(4, 25), id="int64"),
    pytest.param(torch.tensor([[True, False, True]]), id="bool"),
    pytest.param(torch.arange(256, dtype=torch.uint8), id="uint8"),
    pytest.param(torch.tensor(3.5), id="scalar"),
    pytest.param(torch.zeros(0, 4), id="empty"),
    pytest.param(BASE.T, id="transposed"),
    pytest.param(BASE[:, ::3], id="strided"),
    pytest.param(BASE[2:4], id="slice-view"),
    pytest.param(BASE.to(torch.bfloat16).T, id="bfloat16-transposed"),
]


@pytest.mark.parametrize("tensor", TENSORS)
def test_sizeof_counts_elements(tensor):
    assert sizeof(tensor) == tensor.nelement() * tensor.element_size()


def test_sizeof_of_views_and_dtypes():
    x = torch.zeros(1024, 256)
    assert sizeof(x) == 1024 * 256 * 4
    assert sizeof(x.to(torch.bfloat16)) == 1024 * 256 * 2
    # a view counts what it shows, not its whole storage
    assert sizeof(x[:10]) == 10 * 256 * 4
    assert sizeof(x[:, ::2]) == 1024 * 128 * 4


def test_sizeof_of_a_payload():
    payload = {
        "prompt_embeds": torch.zeros(1, 512, 4096, dtype=torch.bfloat16),
        "pooled_prompt_embeds": torch.zeros(1, 768, dtype=torch.bfloat16),
        "timings": {"encode": 0.035, "encode_batch": 1},
    }
    tensor_bytes = (512 * 4096 + 768) * 2
    assert tensor_bytes <= sizeof(payload) <= tensor_bytes + 4096


# Frames as a comm delivers them: read-only bytes, or writable buffers.
WIRES = [
    pytest.param(lambda frames: [bytes(f) for f in frames], id="bytes"),
    pytest.param(lambda frames: [bytearray(f) for f in frames], id="bytearray"),
]


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("tensor", TENSORS)
def test_dask_family_roundtrip(tensor, wire):
    header, frames = serialize(tensor, serializers=("dask",))
    assert header["serializer"] == "dask"
    # raw elements, nothing pickled alongside (bf16 goes as its 16-bit words)
    assert frame_bytes(frames) == tensor.nelement() * tensor.element_size()

    result = deserialize(header, wire(frames))

    assert isinstance(result, torch.Tensor)
    assert result.dtype == tensor.dtype
    assert result.shape == tensor.shape
    assert result.device.type == "cpu"
    assert torch.equal(result, tensor)
    result.fill_(1)  # writable
    assert bool((result == 1).all())


def test_roundtrip_of_a_payload():
    payload = {
        "prompt_embeds": torch.randn(1, 32, 16).to(torch.bfloat16),
        "prompt_attention_mask": torch.ones(1, 32, dtype=torch.int64),
        "negative_prompt_embeds": torch.randn(1, 16, 32).mT,
        "timings": {"encode": 0.25, "encode_batch": 3},
    }
    header, frames = serialize(payload, serializers=("dask", "pickle"))
    families = {sub["key"]: sub["serializer"] for sub in header["sub-headers"]}
    assert families == {
        "prompt_embeds": "dask",
        "prompt_attention_mask": "dask",
        "negative_prompt_embeds": "dask",
        "timings": "pickle",
    }
    tensor_bytes = sum(
        v.nelement() * v.element_size()
        for v in payload.values()
        if isinstance(v, torch.Tensor)
    )
    assert frame_bytes(frames) < tensor_bytes + 1024

    result = deserialize(header, [bytes(f) for f in frames])

    assert result.keys() == payload.keys()
    assert result["timings"] == payload["timings"]
    for name in ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds"):
        assert result[name].dtype == payload[name].dtype
        assert torch.equal(result[name], payload[name])
        result[name].zero_()  # writable


def test_host_tensors_skip_the_cuda_family():
    """Host tensors are not device buffers: the cuda family passes them on."""
    tensor = torch.randn(4, 4)
    header, frames = serialize(tensor, serializers=("cuda", "dask"))
    assert header["serializer"] == "dask"
    assert torch.equal(deserialize(header, frames), tensor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_tensors(dtype):
    tensor = torch.randn(3, 64, 80, device="cuda").to(dtype)
    header, frames = serialize(tensor, serializers=("cuda",))
    assert header["serializer"] == "cuda"
    result = deserialize(header, frames)
    assert result.device.type == "cuda"
    assert result.dtype == dtype
    assert torch.equal(result, tensor)
    # the dask family copies a device tensor to the host
    header, frames = serialize(tensor.mT, serializers=("dask",))
    host = deserialize(header, frames)
    assert host.device.type == "cpu"
    assert torch.equal(host, tensor.mT.cpu())


def test_ucx_progress_settings_leave_a_users_own_choice(monkeypatch):
    monkeypatch.setenv("UCXPY_PROGRESS_MODE", "polling")
    monkeypatch.delenv("UCXPY_ENABLE_PYTHON_FUTURE", raising=False)
    protocol.configure_ucx_progress()
    assert os.environ["UCXPY_PROGRESS_MODE"] == "polling"
    assert os.environ["UCXPY_ENABLE_PYTHON_FUTURE"] == "1"
