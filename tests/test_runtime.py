"""Batcher and StageRuntime: batching, the encoding cache, warm-up, refusals, the
process registry, cancellation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import dask.config

from dflow import runtime
from dflow.errors import InvalidRequest
from dflow.request import Request
from dflow.runtime import Batcher, Cancelled, StageRuntime

TINY = ["tiny-flux", "tiny-pixart", "tiny-wan"]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.001)


class GatedFunction:
    """A batch function that records its batches and holds them until
    ``release()``, so that later calls queue behind the first."""

    def __init__(self, function: Callable[[object], object] = lambda x: x * 10):
        self.function = function
        self.batches: list[list] = []
        self.entered = threading.Event()
        self._gate = threading.Event()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.entered.set()
        self._gate.wait(timeout=30)
        return [self.function(item) for item in items]

    def release(self) -> None:
        self._gate.set()


def queue_behind_first(batcher: Batcher, gated: GatedFunction, calls: list[tuple]):
    """Run ``calls`` (item, key) in threads: the first alone, the rest queued while
    it runs. Returns the futures of the calls, in order."""
    pool = ThreadPoolExecutor(len(calls))
    futures = [pool.submit(batcher, *calls[0])]
    assert gated.entered.wait(timeout=30)
    for queued, call in enumerate(calls[1:], start=1):
        futures.append(pool.submit(batcher, *call))
        # queue one at a time, so the queue's order is the calls' order
        wait_for(lambda queued=queued: len(batcher._pending) == queued)
    gated.release()
    pool.shutdown(wait=True)
    return futures


# -- Batcher -------------------------------------------------------------------------


def test_batcher_single_call_runs_alone():
    batcher = Batcher(lambda items: [x + 1 for x in items], max_size=4)
    assert batcher(1, ()) == 2
    assert batcher(2, ()) == 3


def test_batcher_batches_concurrent_calls():
    gated = GatedFunction()
    batcher = Batcher(gated, max_size=8)
    futures = queue_behind_first(batcher, gated, [(i, ()) for i in range(5)])
    assert [f.result() for f in futures] == [0, 10, 20, 30, 40]
    assert gated.batches == [[0], [1, 2, 3, 4]]


def test_batcher_keys_separate_batches():
    gated = GatedFunction()
    batcher = Batcher(gated, max_size=8)
    calls = [(0, ("a",)), (1, ("b",)), (2, ("a",)), (3, ("b",)), (4, ("a",))]
    futures = queue_behind_first(batcher, gated, calls)
    assert [f.result() for f in futures] == [0, 10, 20, 30, 40]
    # the oldest waiting call's key goes first, and takes every call of its key
    assert gated.batches == [[0], [1, 3], [2, 4]]


def test_batcher_respects_max_size():
    gated = GatedFunction()
    batcher = Batcher(gated, max_size=2)
    futures = queue_behind_first(batcher, gated, [(i, ()) for i in range(6)])
    assert [f.result() for f in futures] == [0, 10, 20, 30, 40, 50]
    assert gated.batches == [[0], [1, 2], [3, 4], [5]]


def test_batcher_failure_fails_only_its_call():
    def tenfold_unless_negative(x):
        if x < 0:
            raise ValueError(f"bad item {x}")
        return x * 10

    gated = GatedFunction(tenfold_unless_negative)
    batcher = Batcher(gated, max_size=8)
    futures = queue_behind_first(batcher, gated, [(i, ()) for i in (0, 1, -2, 3)])
    assert futures[0].result() == 0
    assert futures[1].result() == 10
    with pytest.raises(ValueError, match="bad item -2"):
        futures[2].result()
    assert futures[3].result() == 30
    # the failed batch is retried item by item
    assert gated.batches == [[0], [1, -2, 3], [1], [-2], [3]]
    # and the batcher goes on working
    assert batcher(4, ()) == 40


# -- StageRuntime --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtimes(tiny_folders):
    """StageRuntime per (preset, stage), each loaded once, on CPU."""
    loaded: dict[tuple[str, str], StageRuntime] = {}

    def get(preset: str, stage: str) -> StageRuntime:
        if (preset, stage) not in loaded:
            loaded[preset, stage] = StageRuntime(preset, stage, device="cpu")
        return loaded[preset, stage]

    return get


@pytest.fixture
def clean_registry():
    """Uninstall the runtimes a test installed, leaving the others."""
    before = {(r.model, r.stage) for r in runtime.installed()}
    yield
    for r in runtime.installed():
        if (r.model, r.stage) not in before:
            runtime.uninstall(r.model, r.stage)


def requests_for(preset: str, count: int) -> list[Request]:
    """Requests of one batch key: same size and guidance, different prompts."""
    prompts = ["a cat", "a red bicycle on a wall", "mountains at dawn", "x y z " * 3]
    return [
        Request(model=preset, prompt=prompts[i % len(prompts)], seed=i, steps=2)
        for i in range(count)
    ]


def call_concurrently(stage_runtime: StageRuntime, batcher: Batcher, calls):
    """Run ``calls`` in threads while the runtime's device is busy, so that all but
    the first queue and run as one batch. Returns the results in order."""
    pool = ThreadPoolExecutor(len(calls))
    with stage_runtime._lock:  # the device is busy: the first call waits inside
        futures = [pool.submit(calls[0])]
        wait_for(lambda: batcher._busy)
        futures += [pool.submit(call) for call in calls[1:]]
        wait_for(lambda: len(batcher._pending) == len(calls) - 1)
    pool.shutdown(wait=True)
    return [f.result() for f in futures]


@pytest.mark.parametrize("preset", TINY)
def test_concurrent_encodes_batch_and_equal_unbatched(runtimes, preset):
    encoder = runtimes(preset, "encoder")
    requests = requests_for(preset, 4)
    alone = [encoder.encode(r) for r in requests]
    assert all(e["timings"]["encode_batch"] == 1 for e in alone)
    encoder.encodings.clear()  # encoded again, not reused

    batched = call_concurrently(
        encoder, encoder._encode, [lambda r=r: encoder.encode(r) for r in requests]
    )

    assert [e["timings"]["encode_batch"] for e in batched] == [1, 3, 3, 3]
    for one, other in zip(alone, batched):
        tensors = {k for k, v in one.items() if isinstance(v, torch.Tensor)}
        assert tensors == {k for k, v in other.items() if isinstance(v, torch.Tensor)}
        assert tensors >= {"prompt_embeds"}
        for name in tensors:
            assert other[name].shape[0] == 1
            assert torch.equal(one[name], other[name]), name


@pytest.mark.parametrize("preset", TINY)
def test_encoder_reuses_recent_encodings(runtimes, preset):
    encoder = runtimes(preset, "encoder")
    encoder.encodings.clear()
    first = Request(model=preset, prompt="a lighthouse in fog", seed=1, steps=2)
    computed = encoder.encode(first)
    assert "encode_cached" not in computed["timings"]
    hits, misses = encoder.encodings.hits, encoder.encodings.misses

    # same prompts, another seed, size and step count: the same encoding, no call
    again = encoder.encode(first.replace(seed=2, steps=3, height=64, width=64))
    assert again["timings"]["encode_cached"] == 1
    assert (encoder.encodings.hits, encoder.encodings.misses) == (hits + 1, misses)
    tensors = [k for k, v in computed.items() if isinstance(v, torch.Tensor)]
    assert "prompt_embeds" in tensors
    for name in tensors:
        assert torch.equal(again[name], computed[name]), name

    # another prompt is another encoding
    other = encoder.encode(first.replace(prompt="a lighthouse at dusk"))
    assert "encode_cached" not in other["timings"]
    assert not torch.equal(other["prompt_embeds"], computed["prompt_embeds"])

    # bounded: past its size, the least recently used goes first
    assert encoder.encode(first)["timings"]["encode_cached"] == 1
    for i in range(encoder.encodings.size - 1):
        encoder.encode(first.replace(prompt=f"filler {i}"))
    assert encoder.encode(first)["timings"]["encode_cached"] == 1
    dusk = encoder.encode(first.replace(prompt="a lighthouse at dusk"))
    assert "encode_cached" not in dusk["timings"]


def test_encoding_cache_of_size_zero_keeps_nothing():
    cache = runtime.EncodingCache(0)
    cache.put(("m", "a fox", "", True), {"prompt_embeds": torch.zeros(1)})
    assert cache.get(("m", "a fox", "", True)) is None
    assert (cache.hits, cache.misses) == (0, 1)


@pytest.mark.parametrize("preset", TINY)
def test_concurrent_decodes_batch_within_one_level(runtimes, preset):
    encoder, dit = runtimes(preset, "encoder"), runtimes(preset, "dit")
    vae = runtimes(preset, "vae")
    requests = requests_for(preset, 3)
    latents = [dit.denoise(r, encoder.encode(r)) for r in requests]
    alone = [vae.decode(r, x) for r, x in zip(requests, latents)]

    batched = call_concurrently(
        vae,
        vae._decode,
        [lambda r=r, x=x: vae.decode(r, x) for r, x in zip(requests, latents)],
    )

    assert [o.timings["decode_batch"] for o in batched] == [1, 2, 2]
    for one, other in zip(alone, batched):
        assert other.request == one.request
        a, b = pixels_of(one), pixels_of(other)
        assert a.shape == b.shape
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1


def pixels_of(output) -> np.ndarray:
    if output.request.spec.video:
        return output.frames
    return np.stack([np.asarray(image) for image in output.images])


@pytest.mark.parametrize("stage", ["encoder", "dit", "vae", "all"])
@pytest.mark.parametrize("preset", TINY)
def test_warmup(runtimes, preset, stage):
    stage_runtime = runtimes(preset, stage)
    seconds = stage_runtime.warmup()
    assert 0 < seconds < 60
    assert stage_runtime.load_seconds > 0


def test_runtime_refuses_other_stages_and_models(runtimes):
    encoder = runtimes("tiny-flux", "encoder")
    request = Request(model="tiny-flux", prompt="a cat", seed=0)
    with pytest.raises(RuntimeError, match="serves stage 'encoder', not 'dit'"):
        encoder.denoise(request, {})
    with pytest.raises(RuntimeError, match="serves stage 'encoder', not 'vae'"):
        encoder.decode(request, {"latents": torch.zeros(1)})
    other = Request(model="tiny-pixart", prompt="a cat", seed=0)
    with pytest.raises(
        RuntimeError, match="serves model 'tiny-flux', not 'tiny-pixart'"
    ):
        encoder.encode(other)
    assert runtimes("tiny-flux", "all").serves("vae")
    assert not encoder.serves("vae")


def test_runtime_rejects_unknown_stage(tiny_folders):
    with pytest.raises(
        ValueError,
        match="stage must be one of encoder, dit, vae, dit-high, dit-low, all",
    ):
        StageRuntime("tiny-flux", "decoder")
    # an expert's stage needs a model of two experts
    with pytest.raises(ValueError, match="tiny-wan has no experts"):
        StageRuntime("tiny-wan", "dit-high")


def test_install_and_lookup(runtimes, clean_registry):
    encoder = runtimes("tiny-pixart", "encoder")
    with pytest.raises(LookupError, match="no encoder runtime for model 'tiny-pixart'"):
        runtime.lookup("tiny-pixart", "encoder")
    runtime.install(encoder)
    assert runtime.lookup("tiny-pixart", "encoder") is encoder
    assert encoder in runtime.installed()
    with pytest.raises(LookupError, match=r"it serves: .*tiny-pixart encoder"):
        runtime.lookup("tiny-pixart", "dit")
    # a monolithic runtime serves every stage
    whole = runtimes("tiny-pixart", "all")
    runtime.install(whole)
    assert runtime.lookup("tiny-pixart", "dit") is whole
    assert runtime.lookup("tiny-pixart", "encoder") is encoder
    assert runtime.uninstall("tiny-pixart", "encoder") is encoder
    assert runtime.lookup("tiny-pixart", "encoder") is whole
    assert runtime.uninstall("tiny-pixart", "encoder") is None


def test_local_creates_once(tiny_folders, clean_registry):
    folder = tiny_folders["tiny-wan"]
    with dask.config.set({"dflow.runtime.device": "cpu"}):
        first = runtime.local(folder)
    assert first.stage == "all"
    assert first.device == "cpu"
    assert runtime.local(folder + "/") is first
    assert runtime.lookup(first.model, "vae") is first
    encoder = runtime.local(folder, "encoder")
    assert encoder is not first
    assert encoder.stage == "encoder"


@pytest.mark.parametrize("preset", TINY)
def test_denoise_stops_when_asked(runtimes, preset):
    encoder, dit = runtimes(preset, "encoder"), runtimes(preset, "dit")
    request = Request(model=preset, prompt="a cat", seed=0, steps=3)
    embeddings = encoder.encode(request)
    polls = []

    def stop_after_second_step() -> bool:
        polls.append(len(polls))
        return len(polls) == 2

    with pytest.raises(Cancelled, match="after 2 of 3 steps"):
        dit.denoise(request, embeddings, should_stop=stop_after_second_step)
    assert len(polls) == 2
    with pytest.raises(Cancelled, match="after 1 of 3 steps"):
        dit.denoise(request, embeddings, should_stop=lambda: True)
    # the runtime is free again and denoises normally
    finished = dit.denoise(request, embeddings, should_stop=lambda: False)
    assert torch.isfinite(finished["latents"]).all()
    assert finished["timings"]["denoise"] > 0
    assert finished["timings"]["encode"] == embeddings["timings"]["encode"]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def test_a_parked_runtime_frees_the_device_and_resumes_the_same(tiny_folders, device):
    """On CUDA a parked stage's weights wait in pinned host memory; on the CPU
    they are in host memory already and stay where they are."""
    dit = StageRuntime("tiny-pixart", "dit", device=device)
    request = Request(model="tiny-pixart", prompt="a cat", seed=0, steps=2)
    embeddings = dit.zero_embeddings(request)
    before = dit.denoise(request, embeddings)["latents"].cpu()
    transformer = dit.adapter.pipe.transformer
    weights = [t.data_ptr() for t in transformer.parameters()]
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    dit.park()
    if device == "cuda":
        parked = [*transformer.parameters()]
        assert all(t.device.type == "cpu" and t.is_pinned() for t in parked)
        freed = allocated - torch.cuda.memory_allocated()
        assert freed >= sum(t.numel() * t.element_size() for t in parked)
    else:
        assert [t.data_ptr() for t in transformer.parameters()] == weights
    assert dit.resume() >= 0
    assert all(t.device.type == device for t in transformer.parameters())
    after = dit.denoise(request, embeddings)["latents"].cpu()
    assert torch.equal(after, before)


@pytest.mark.parametrize("preset", TINY)
def test_zero_inputs_are_shaped_as_the_real_ones(runtimes, preset):
    """What a DiT or VAE runtime warms up and profiles on without the stage
    before it has the keys, shapes and dtypes the real stage sends."""
    encoder, dit = runtimes(preset, "encoder"), runtimes(preset, "dit")
    for guidance in (1.0, 5.0):
        request = Request(model=preset, prompt="a cat", seed=0, guidance_scale=guidance)
        real = {k: v for k, v in encoder.encode(request).items() if k != "timings"}
        zeros = dit.zero_embeddings(request)
        assert zeros.keys() == real.keys()
        for name, tensor in real.items():
            assert (zeros[name].shape, zeros[name].dtype) == (
                tensor.shape,
                tensor.dtype,
            ), name
        latents = dit.denoise(request, real)["latents"]
        zero = runtimes(preset, "vae").zero_latents(request)
        assert (zero.shape, zero.dtype) == (latents.shape, latents.dtype)


def test_loads_wait_for_each_other_unless_the_adapter_is_safe(tiny_folders):
    """Real adapters load one at a time in a process; the emulated one, which
    builds no model, loads beside them."""

    def load(**kwargs) -> threading.Thread:
        thread = threading.Thread(target=StageRuntime, kwargs=kwargs, daemon=True)
        thread.start()
        return thread

    with runtime._loading:
        with dask.config.set(
            {"dflow.runtime.backend": "emulated", "dflow.emulation.time-scale": 1e-6}
        ):
            emulated = load(model="pixart-sigma-1024", stage="vae")
            emulated.join(timeout=60)
        assert not emulated.is_alive()
        real = load(model="tiny-pixart", stage="vae", device="cpu")
        real.join(timeout=0.5)
        assert real.is_alive()  # waiting for the lock
    real.join(timeout=60)
    assert not real.is_alive()


def test_generate_refuses_a_prompt_over_the_token_limit(tiny_folders, clean_registry):
    request = Request(model="tiny-wan", prompt="a red fox " * 40, seed=0)
    before = runtime.installed()
    with pytest.raises(InvalidRequest, match="over the limit of 32 tokens") as error:
        runtime.generate(request)
    assert error.value.field == "prompt"
    assert runtime.installed() == before  # refused before loading anything
