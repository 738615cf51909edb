"""The emulated stage backend: profiled costs, GPU types, memory, offload, loads,
real-size outputs, and the stage runtime driving it (all figures emulated)."""

from __future__ import annotations

import time
import zlib
from importlib.resources import files

import numpy as np
import psutil
import pytest
import torch
import yaml

import dask.config
from distributed.protocol import serialize

from dflow import backend, hardware
from dflow.catalog import resolve
from dflow.emulation import cost_model
from dflow.emulation.adapter import EmulatedAdapter
from dflow.errors import Cancelled, StageOutOfMemory
from dflow.predictor import Predictor
from dflow.protocol import register_serializers
from dflow.request import Request
from dflow.runtime import StageRuntime
from dflow.spec import STAGES
from dflow.worker import StagePlugin

SCALE = 0.02
FLUX = "flux.1-dev"
GIB = 2**30


@pytest.fixture(autouse=True)
def emulated():
    """The emulated backend at a time scale of 0.02, without first-call costs."""
    with dask.config.set(
        {
            "dflow.runtime.backend": "emulated",
            "dflow.emulation.time-scale": SCALE,
            "dflow.emulation.first-call": "0s",
        }
    ):
        yield


@pytest.fixture
def anchors_only():
    """Costs fitted on the shipped H200 anchors alone."""
    with dask.config.set({"dflow.emulation.profiles": []}):
        yield cost_model()


def adapter(model: str, stages, gpu: str = "h200", **config) -> EmulatedAdapter:
    with dask.config.set(config):
        return EmulatedAdapter(resolve(model), stages, gpu_type=gpu)


def timed(call, scale: float = SCALE) -> tuple[float, object]:
    """Emulated seconds of ``call`` at ``scale`` (larger scales time more precisely)."""
    with dask.config.set({"dflow.emulation.time-scale": scale}):
        start = time.perf_counter()
        result = call()
        return (time.perf_counter() - start) / scale, result


@pytest.mark.slow
def test_flux_dit_time_matches_the_profile(anchors_only):
    request = Request(model=FLUX, prompt="a fox", steps=28, seed=0)
    anchor = 28 * 0.1722  # profiles/h200-stages.json: dit_step at 4096 tokens
    dit = adapter(FLUX, ["dit"])
    steps = []
    seconds, _ = timed(lambda: dit.denoise(request, {}, steps.append), 0.05)
    assert seconds == pytest.approx(anchor, rel=0.05)
    assert steps == list(range(28))
    # with dflow's own profile rows fitted in too, the default shape stays put
    spec = resolve(FLUX)
    assert cost_model().seconds(spec, "dit", "h200", request.features) == (
        pytest.approx(anchor, rel=0.05)
    )


@pytest.mark.slow
def test_slower_gpu_takes_proportionally_longer():
    request = Request(model=FLUX, prompt="a fox", steps=8, seed=0)
    catalog = hardware.catalog()
    h200, l40s = catalog.gpu("h200"), catalog.gpu("l40s")
    mix = catalog.mixes["flux", "dit"]
    expected = (
        mix.host
        + mix.tensor * h200.bf16_tflops / l40s.bf16_tflops
        + mix.memory * h200.bandwidth_gbs / l40s.bandwidth_gbs
    )
    assert catalog.slowdown("l40s", "flux", "dit") == pytest.approx(expected)
    assert catalog.slowdown("h200", "wan", "vae") == pytest.approx(1.0)
    on_h200, on_l40s = adapter(FLUX, ["dit"]), adapter(FLUX, ["dit"], "l40s")
    fast, _ = timed(lambda: on_h200.denoise(request, {}), 0.1)
    slow, _ = timed(lambda: on_l40s.denoise(request, {}), 0.05)
    assert slow / fast == pytest.approx(expected, rel=0.05)


@pytest.mark.slow
def test_batch_8_encode_costs_the_batch_8_row(anchors_only):
    spec = resolve(FLUX)
    request = Request(model=FLUX, prompt="a fox", seed=0)
    # T5 and CLIP at batch 8 (165.2 + 6.4 ms), far below 8 x (28.1 + 6.9) ms
    one = anchors_only.seconds(spec, "encoder", "h200", request.features, 1)
    eight = anchors_only.seconds(spec, "encoder", "h200", request.features, 8)
    assert one == pytest.approx(0.035, rel=0.02)
    assert eight == pytest.approx(0.1716, rel=0.02)
    encoder = adapter(FLUX, ["encoder"])
    seconds, outputs = timed(lambda: encoder.encode([request] * 8), 0.2)
    assert len(outputs) == 8
    assert seconds == pytest.approx(eight, rel=0.1)


@pytest.mark.parametrize(
    "model, extra",
    [
        (FLUX, {}),
        ("pixart-sigma-1024", {"height": 512, "width": 768}),
        ("wan2.1-t2v-1.3b", {"num_frames": 17}),
    ],
)
def test_outputs_have_the_real_shapes_dtypes_and_bytes(model, extra):
    request = Request(model=model, prompt="a fox", seed=0, **extra)
    features, spec = request.features, request.spec
    served = adapter(model, STAGES)
    (embeddings,) = served.encode([request])
    floats = [v for v in embeddings.values() if v.is_floating_point()]
    assert sum(v.nbytes for v in floats) == features["embedding_bytes"]
    shape = (1, spec.max_sequence_length, spec.text_dim)
    assert embeddings["prompt_embeds"].shape == shape
    assert embeddings["prompt_embeds"].dtype == torch.bfloat16
    assert ("negative_prompt_embeds" in embeddings) == features["cfg"]
    if spec.family == "pixart":
        assert embeddings["prompt_attention_mask"].shape == shape[:2]
    if spec.family == "flux":
        assert embeddings["pooled_prompt_embeds"].shape == (1, spec.pooled_dim)
    latents = served.denoise(request, embeddings)
    assert latents.nbytes == features["latent_bytes"]
    assert latents.dtype == (torch.float32 if spec.video else torch.bfloat16)
    channels, *rest = features["latent_shape"]
    if spec.family == "flux":
        assert latents.shape == (1, rest[0] * rest[1] // 4, channels * 4)
    else:
        assert latents.shape == (1, channels, *rest)
    (pixels,) = served.decode([request], [latents])
    assert pixels.dtype == np.uint8 and pixels.nbytes == features["output_bytes"]
    assert pixels.shape == (features["frames"], request.height, request.width, 3)
    # random bytes: nothing for a compressing transport to squeeze
    sample = pixels.reshape(-1)[: 2**20].tobytes()
    assert len(zlib.compress(sample)) > 0.99 * len(sample)


def test_outputs_are_own_objects_that_serialize_their_own_bytes():
    register_serializers()
    request = Request(model=FLUX, prompt="a fox", seed=0)
    served = adapter(FLUX, ["encoder"])
    first, second = served.encode([request, request])
    a, b = first["prompt_embeds"], second["prompt_embeds"]
    assert a is not b and not torch.equal(a, b)
    _, frames = serialize(a, serializers=("dask",))
    assert sum(memoryview(f).nbytes for f in frames) == a.nbytes


def test_flux_dit_needs_24_gib():
    with pytest.raises(StageOutOfMemory) as error:
        adapter(FLUX, ["dit"], "rtx4080")
    message = str(error.value)
    for part in (FLUX, "dit", "rtx4080", "22.67 GiB", "15.49 GiB"):
        assert part in message
    # 22.66 GiB peak on the H200 (weights 22.17 GiB) fits 24 GiB less the context
    dit = adapter(FLUX, ["dit"], "rtx4090")
    assert dit.placement.mode == "resident"
    assert 22.6 * GIB < dit.placement.peak_bytes < 22.8 * GIB
    # the A10G's 24 GB have ECC: 22.49 GiB is too little
    with pytest.raises(StageOutOfMemory, match="a10g"):
        adapter(FLUX, ["dit"], "a10g")


def test_a_batch_that_does_not_fit_fails_like_an_out_of_memory_error():
    request = Request(model=FLUX, prompt="a fox", seed=0)
    vae = adapter(FLUX, ["vae"], "rtx4080")
    fake = torch.zeros(1, 4096, 64, dtype=torch.bfloat16)
    assert len(vae.decode([request] * 2, [fake] * 2)) == 2
    with pytest.raises(torch.OutOfMemoryError, match="rtx4080"):
        vae.decode([request] * 8, [fake] * 8)


@pytest.fixture
def h200_24gib(tmp_path):
    """A catalog with an H200 of 24 GiB: the reference's speed, a 24 GiB card's room."""
    catalog = yaml.safe_load(files("dflow.configs").joinpath("gpus.yaml").read_text())
    catalog["gpus"]["h200-24gib"] = {**catalog["gpus"]["h200"], "memory-mib": 24576}
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(catalog))
    with dask.config.set({"dflow.emulation.gpus": str(path)}):
        yield


def test_monolithic_offload_reproduces_the_measured_flux_runs(h200_24gib):
    spec, cost = resolve(FLUX), cost_model()
    features = Request(model=FLUX, prompt="a fox", seed=0).features
    resident = cost.placement(spec, STAGES, "h200", features)
    assert resident.mode == "resident"
    assert resident.seconds == pytest.approx(5.04, rel=0.05)
    assert resident.peak_bytes == pytest.approx(33.87 * GIB, rel=0.02)
    model = cost.placement(spec, STAGES, "h200-24gib", features, mode="model")
    group = cost.placement(spec, STAGES, "h200-24gib", features, mode="group")
    assert (model.mode, group.mode) == ("model-offload", "group-offload")
    assert model.seconds == pytest.approx(27.79, rel=0.01)
    assert group.seconds == pytest.approx(24.58, rel=0.01)
    assert cost.placement(spec, STAGES, "h200-24gib", features).mode == "group-offload"
    # many steps stream the DiT's weights once per step: model offload is cheaper
    long = Request(model=FLUX, prompt="a fox", seed=0, steps=50).features
    assert cost.placement(spec, STAGES, "h200-24gib", long).mode == "model-offload"


@pytest.mark.slow
def test_monolithic_flux_on_a_24_gib_card_pays_offload():
    request = Request(model=FLUX, prompt="a fox", seed=0)
    runtime = StageRuntime(FLUX, "all", gpu_type="rtx4090")
    placement = runtime.adapter.placement
    assert placement.mode in ("model-offload", "group-offload")
    resident = sum(
        cost_model().seconds(request.spec, s, "rtx4090", request.features)
        for s in STAGES
    )
    assert placement.seconds > resident + 10
    seconds, output = timed(lambda: runtime.generate(request))
    assert seconds == pytest.approx(placement.seconds, rel=0.05)
    assert output.images[0].size == (1024, 1024)
    # the DiT alone fits the same card and pays no offload
    dit = StageRuntime(FLUX, "dit", gpu_type="rtx4090").adapter.placement
    assert dit.mode == "resident"
    assert dit.seconds == pytest.approx(placement.stages["dit"].compute, rel=0.01)


@pytest.mark.slow
def test_load_time_is_paid_in_construction():
    spec = resolve(FLUX)
    cost_model()  # built once per process, before any load is timed
    expected = spec.weight_bytes["dit"] / (1.3 * GIB)
    seconds, _ = timed(lambda: adapter(FLUX, ["dit"]))
    assert seconds == pytest.approx(expected, rel=0.1)
    runtime = StageRuntime(FLUX, "dit")
    assert runtime.load_seconds / SCALE == pytest.approx(expected, rel=0.1)
    # the first call of a stage pays the warm-up cost once
    with dask.config.set({"dflow.emulation.first-call": "0.5s"}):
        vae = StageRuntime(FLUX, "vae")
    request = Request(model=FLUX, prompt="a fox", seed=0)
    latents = {"latents": vae.zero_latents(request)}
    first, _ = timed(lambda: vae.decode(request, latents), 0.2)
    second, _ = timed(lambda: vae.decode(request, latents), 0.2)
    assert first - second == pytest.approx(0.5, abs=0.1)


def test_a_parked_stage_resumes_over_the_host_link():
    """Parking and resuming copy the weights over the card's pinned host link
    (22 GiB of Flux DiT over PCIe 4.0 x16 in under a second, against 17 s to
    load them), once page-locked host buffers are reserved for them (22.6 s
    at 0.98 GiB/s, which a park waits for if the worker has not reserved them
    yet); an offloaded stage's weights are in host memory already."""
    spec, cost = resolve(FLUX), cost_model()
    weights = cost.weight_bytes(spec, "dit")
    # the H200's measured 51.6 GiB/s on Gen5 x16; half on the 4090's Gen4 x16
    assert cost.pinned_gibs("h200") == pytest.approx(51.6)
    assert cost.pinned_gibs("rtx4090") == pytest.approx(25.8)
    copy = weights / (25.8 * GIB)
    assert copy < 1.0 < 17.0 < cost.load_seconds(spec, ["dit"])
    dit = adapter(FLUX, ["dit"], gpu="rtx4090")
    seconds, _ = timed(dit.park)
    assert seconds == pytest.approx(weights / (0.98 * GIB) + copy, rel=0.1)
    for call in (dit.resume, dit.park):
        seconds, _ = timed(call, 0.2)
        assert seconds == pytest.approx(copy, rel=0.1)
    # a worker reserves them once the stage serves; a park after that copies
    reserved = adapter(FLUX, ["dit"], gpu="rtx4090")
    seconds, _ = timed(reserved.reserve_host)
    assert seconds < 0.05
    time.sleep(weights / (0.98 * GIB) * SCALE)
    seconds, _ = timed(reserved.park, 0.2)
    assert seconds == pytest.approx(copy, rel=0.1)
    offloaded = adapter(FLUX, STAGES, gpu="rtx4090")
    assert offloaded.placement.mode != "resident"
    seconds, _ = timed(offloaded.resume, 0.2)
    assert seconds < 0.05


def test_a_worker_keeps_what_fits_its_park_memory():
    """A worker that leaves a stage parks it if it fits
    ``dflow.runtime.park-memory``, the least recently parked going first,
    and takes it back by the model's name or alias."""
    pixart = "pixart-sigma-1024"
    dit, encoder = StageRuntime(pixart, "dit"), StageRuntime(pixart, "encoder")
    both = dit.weight_bytes + encoder.weight_bytes
    with dask.config.set({"dflow.runtime.park-memory": both - 1}):
        plugin = StagePlugin("dit", pixart)
        plugin._park(dit)
        assert list(plugin.parked) == [(pixart, "dit")]
        plugin._park(encoder)  # the two do not fit: the DiT is unloaded
        assert list(plugin.parked) == [(pixart, "encoder")]
        assert not hasattr(dit, "adapter")
        assert plugin._parked_pools() == [f"encoder:{pixart}"]
        assert plugin._unpark(pixart, "dit") is None
        assert plugin._unpark(pixart, "encoder") is encoder and not plugin.parked
    with dask.config.set({"dflow.runtime.park-memory": 0}):
        plugin._park(encoder)
        assert not plugin.parked and not hasattr(encoder, "adapter")


def test_runtime_api_on_the_emulated_backend():
    request = Request(model="pixart-sigma-1024", prompt="a fox", seed=0, steps=10)
    runtimes = {s: StageRuntime(request.model, s, gpu_type="l4") for s in STAGES}
    for runtime in runtimes.values():
        assert runtime.warmup() < 1
    embeddings = runtimes["encoder"].encode(request)
    assert embeddings["timings"]["encode_batch"] == 1
    with dask.config.set({"dflow.emulation.time-scale": 0.05}):
        latents = runtimes["dit"].denoise(request, embeddings)
    output = runtimes["vae"].decode(request, latents)
    assert output.images[0].size == (1024, 1024)
    assert set(output.timings) >= {"encode", "denoise", "decode"}
    assert output.timings["denoise"] / 0.05 == pytest.approx(
        cost_model().seconds(request.spec, "dit", "l4", request.features), rel=0.1
    )
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(Cancelled, match="after 3 of 10 steps"):
        runtimes["dit"].denoise(request, embeddings, should_stop=stop)


def test_worker_publishes_the_emulated_gpu():
    emulated = backend.current()
    assert emulated.name == "emulated"
    assert emulated.gpu("l4", "cpu") == ("l4", 23034 * 2**20)
    with dask.config.set({"dflow.runtime.gpu-type": "a100-80gb"}):
        assert emulated.gpu(None, "cpu") == ("a100-80gb", 81920 * 2**20)
    assert emulated.gpu(None, "cpu")[0] == "h200"
    with dask.config.set({"dflow.runtime.backend": "real"}):
        # a real worker names and sizes its own device
        real = backend.current()
        assert real.gpu("l4", "cpu") == ("l4", psutil.virtual_memory().total)
        assert real.gpu(None, "cpu")[0] == "cpu"
    with pytest.raises(ValueError, match="unknown GPU type 'b300'"):
        hardware.resolve_gpu("b300")
    with (
        dask.config.set({"dflow.runtime.backend": "simulated"}),
        pytest.raises(ValueError, match=r"dflow\.runtime\.backend must be one of"),
    ):
        backend.current()


def test_rows_for_a_gpu_type_price_it_as_the_emulation_does():
    cost = cost_model()
    predictor = Predictor(cost.rows_for("a10g"))
    request = Request(model="wan2.1-t2v-1.3b", prompt="a fox", seed=0)
    for stage in STAGES:
        predicted = predictor.predict(request.model, stage, "a10g", request, 1)
        assert predicted.seconds == pytest.approx(
            cost.seconds(request.spec, stage, "a10g", request.features), rel=1e-6
        )


@pytest.mark.parametrize("side, speedup, limit", [(512, 3.00, 4), (1024, 1.00, 1)])
def test_dit_batches_cost_and_stop_where_the_h200_curve_says(side, speedup, limit):
    """configs/profiles/h200-dit-batch.json: PixArt-Sigma's 512px step runs
    x3.00 faster per request at batch 4 on the H200, its 1024px step x1.00; an
    emulated runtime batches up to where one more request gains 5%."""
    spec = resolve("pixart-sigma-1024")
    request = Request(
        model=spec.name, prompt="a fox", height=side, width=side, steps=20, seed=0
    )
    price = cost_model().dit_batch_price(spec, ["dit"], "h200")
    one, four = price(request.features, 1), price(request.features, 4)
    assert one.seconds / (four.seconds / 4) == pytest.approx(speedup, rel=0.02)
    assert four.peak_bytes > one.peak_bytes
    with dask.config.set(
        {"dflow.runtime.backend": "emulated", "dflow.emulation.time-scale": 1e-4}
    ):
        runtime = StageRuntime(spec.name, "dit", gpu_type="h200", max_dit_batch=8)
        assert runtime.dit_batch_limit(request.features) == limit
