"""Wan 2.2's two experts as pools: which chain admission picks, how the
predictor prices each expert's pool, how the planner sizes and moves them, and
the emulated backend running them (real scheduler, in-process workers).

Pixels against stock diffusers (both DiT layouts, image inputs, int8) are
tests/test_equivalence.py's.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

import dask.config
from distributed import Client

import dflow
from dflow import families
from dflow.bench import scenarios
from dflow.bench.physics import physics
from dflow.catalog import resolve
from dflow.client import encoding_key
from dflow.cluster import StageCluster
from dflow.emulation.cost import cost_model
from dflow.errors import InvalidRequest, StageOutOfMemory
from dflow.plugins.admission import _chain
from dflow.plugins.pricing import (
    Memory,
    Observation,
    PoolView,
    Settings,
    WorkerView,
    plan_pools,
)
from dflow.pools import EXPERT_CHAIN, MONOLITHIC, STAGES, Pool
from dflow.predictor import (
    WAN_ENCODE_OVER_DECODE,
    Predictor,
    anchor_rows,
    derived_rows,
)
from dflow.request import Request

GIB = 2**30
MODEL = "wan2.2-i2v-a14b"
IMAGE = np.zeros((480, 832, 3), dtype=np.uint8)


def features(steps: int, **changes) -> dict:
    request = Request(
        model=MODEL,
        prompt="a fox",
        steps=steps,
        guidance_scale=1.0,
        seed=0,
        image=IMAGE,
    )
    return {**request.features, **changes}


# -- admission ------------------------------------------------------------------------


def served(**workers: int) -> dict[str, dict[str, int]]:
    return {
        stage.replace("_", "-"): {"ready": n, "loading": 0, "slots": n}
        for stage, n in workers.items()
    }


def test_admission_picks_the_chain_whose_dit_workers_go_furthest():
    chains = families.of(resolve(MODEL)).chains(resolve(MODEL))
    assert chains == (STAGES, EXPERT_CHAIN)
    four = features(4)  # two steps per expert
    # only one layout served: that one
    assert _chain(served(encoder=1, dit=2, vae=1), chains, four) == STAGES
    split = served(encoder=1, dit_high=1, dit_low=1, vae=1)
    assert _chain(split, chains, four) == EXPERT_CHAIN
    # both: a pool of one expert does that expert's share of the steps, so 1+1
    # expert workers do what one worker of both does, and 2+2 what two do
    both = served(encoder=1, dit=1, dit_high=2, dit_low=2, vae=1)
    assert _chain(both, chains, four) == EXPERT_CHAIN
    both = served(encoder=1, dit=2, dit_high=1, dit_low=1, vae=1)
    assert _chain(both, chains, four) == STAGES
    # eight steps: three high, five low; the low pool is the expert chain's
    # limit: 3 low workers do 3 / (5/8) = 4.8 requests per DiT time
    eight = features(8)
    assert (eight["high_steps"], eight["low_steps"]) == (3, 5)
    fewer = served(encoder=1, dit=4, dit_high=3, dit_low=3, vae=1)
    assert _chain(fewer, chains, eight) == EXPERT_CHAIN
    more = served(encoder=1, dit=5, dit_high=3, dit_low=3, vae=1)
    assert _chain(more, chains, eight) == STAGES


def test_requests_share_an_encoding_only_with_the_same_image_and_shape():
    """An I2V encode task encodes the image into the output's conditioning
    latents too: equal prompts share it only for one image at one shape."""
    first = Request(model=MODEL, prompt="a fox", image=IMAGE, seed=1, steps=4)
    assert encoding_key(first) == encoding_key(first.replace(seed=2, steps=8))
    other = np.full_like(IMAGE, 7)
    assert encoding_key(first) != encoding_key(first.replace(image=other))
    assert encoding_key(first) != encoding_key(first.replace(height=240, width=416))
    assert encoding_key(first) != encoding_key(first.replace(num_frames=41))


def test_the_encode_task_gets_the_pixels_back_of_its_own_image_only():
    request = Request(model=MODEL, prompt="a fox", image=IMAGE)
    light = request.without_pixels()
    assert light == request and light.image.pixels is None
    full = light.with_pixels(request.image)
    assert full.image.pixels == request.image.pixels
    with pytest.raises(InvalidRequest) as other:
        light.with_pixels(Request(model=MODEL, prompt="a fox", image=IMAGE + 1).image)
    assert other.value.field == "image"


# -- prices -----------------------------------------------------------------------------

#: One step of an A14B expert at 480x832x81 and the weights of both experts:
#: illustrative figures (the A10 emulation measures its own)
STEP_S = 2.0
WEIGHTS = resolve(MODEL).weight_bytes


def row(stage: str, seconds: float, steps: int = 1, peak: int = 0) -> dict:
    return {
        "model": MODEL,
        "stage": stage,
        "gpu_type": "h200",
        "batch": 1,
        "height": 480,
        "width": 832,
        "frames": 81,
        "steps": steps,
        "cfg": False,
        "seconds": seconds,
        "peak_bytes": WEIGHTS[stage] + peak,
        "weight_bytes": WEIGHTS[stage],
    }


#: Rows of each stage, the DiT's (both experts on the worker) at 1, 4 and 8 steps
ROWS = [
    row("encoder", 0.1, peak=GIB),
    row("vae", 0.5, peak=4 * GIB),
    *(row("dit", 0.5 + STEP_S * steps, steps, 6 * GIB) for steps in (1, 4, 8)),
]


def predictor() -> Predictor:
    return Predictor(ROWS)


def test_an_experts_pool_costs_its_share_of_the_steps():
    fitted = predictor()
    four = features(4)
    whole = fitted.predict(MODEL, "dit", "h200", four)
    high = fitted.predict(MODEL, "dit-high", "h200", four)
    low = fitted.predict(MODEL, "dit-low", "h200", four)
    assert whole.seconds == pytest.approx(0.5 + 4 * STEP_S, rel=1e-6)
    # each expert runs two of the four steps (and sets its latents up once)
    assert high.seconds == low.seconds == pytest.approx(0.5 + 2 * STEP_S, rel=1e-6)
    # one expert resident: the other's weights are not on the card
    assert high.peak_bytes == pytest.approx(WEIGHTS["dit-high"] + 6 * GIB, rel=1e-6)
    assert whole.peak_bytes - high.peak_bytes == pytest.approx(
        WEIGHTS["dit-low"], rel=1e-6
    )
    eight = features(8)
    assert fitted.predict(MODEL, "dit-low", "h200", eight).seconds == pytest.approx(
        0.5 + 5 * STEP_S, rel=1e-6
    )
    # an expert's observed time corrects the DiT's fit, which prices both
    fitted.observe(MODEL, "dit-high", "h200", four, 2 * high.seconds)
    assert fitted.correction(MODEL, "dit", "h200") > 1.0
    assert fitted.predict(MODEL, "dit-low", "h200", four).seconds > low.seconds


def test_the_planner_sizes_expert_pools_by_their_share_and_moves_workers_between():
    """Eight workers on the split chain: the low-noise pool runs more of the
    steps (8-step requests: 3 high, 5 low), so it gets more workers; when the
    requests turn to 4 steps (2 and 2) a worker moves from low to high."""
    pools = [Pool(stage, MODEL) for stage in EXPERT_CHAIN]
    encoder, high, low, vae = pools
    layout = [encoder, high, high, low, low, low, low, vae]

    def observe(steps: int) -> Observation:
        shape = features(steps)
        return Observation(
            now=1000.0,
            workers=tuple(
                WorkerView(f"tcp://w{i}", f"w{i}", "ready", pool, "h200", 141 * GIB)
                for i, pool in enumerate(layout)
            ),
            # half a request a second: more DiT work than the DiT workers do
            pools={
                pool: PoolView(newest=shape, rate=0.5, arrivals=ages) for pool in pools
            },
        )

    settings = dataclasses.replace(
        Settings.from_config(), cooldown=0.0, dwell=0.0, horizon=60.0
    )
    # an arrival every 2 s over the horizon, youngest first
    ages = tuple(np.arange(1.0, settings.horizon, 2.0))
    prices = predictor()
    eight = plan_pools(observe(8), prices, Memory(), settings).plan
    assert eight is not None and eight.feasible
    assigned = list(eight.assignment.values())
    assert assigned.count(low) > assigned.count(high) >= 1
    layout[:] = [eight.assignment[f"tcp://w{i}"] for i in range(len(layout))]
    four = plan_pools(observe(4), prices, Memory(), settings).plan
    assert four is not None
    moved = [(m.source, m.target) for m in four.moves]
    assert (low, high) in moved
    assigned = list(four.assignment.values())
    assert assigned.count(high) == assigned.count(low)


# -- the emulated backend -----------------------------------------------------------------


@pytest.fixture
def emulated(tmp_path):
    """The emulated backend, costing the model by :data:`ROWS`."""
    profile = tmp_path / "wan22.json"
    profile.write_text(json.dumps({"gpu_type": "h200", "rows": ROWS}))
    with dask.config.set(
        {
            "dflow.runtime.backend": "emulated",
            "dflow.emulation.time-scale": 0.001,
            "dflow.emulation.profiles": [str(profile)],
            "dflow.elastic.enabled": False,
        }
    ):
        yield


def test_emulated_expert_pools_serve_the_split_chain(emulated):
    """Emulated workers of the real-size model: a request runs encoder,
    high-noise expert, low-noise expert and VAE, each on its pool, and its
    timings carry each expert's part."""
    layout = {"encoder": 1, "dit-high": 1, "dit-low": 1, "vae": 1}
    with (
        StageCluster(MODEL, layout, processes=False) as cluster,
        Client(cluster) as client,
    ):
        deadline = time.monotonic() + 120
        while set(client.sync(client.scheduler.dflow_pools).get(MODEL, {})) != set(
            layout
        ):
            assert time.monotonic() < deadline, "emulated pools not ready"
            time.sleep(0.1)
        request = Request(
            model=MODEL,
            prompt="a fox",
            height=240,
            width=416,
            num_frames=5,
            steps=4,
            guidance_scale=1.0,
            seed=1,
            image=IMAGE,
        )
        output = dflow.submit(client, request).result(timeout=120)
        assert output.frames.shape == (5, 240, 416, 3)
        timings = output.timings
        assert timings["denoise_high"] > 0 and timings["denoise_low"] > 0
        assert timings["denoise"] == pytest.approx(
            timings["denoise_high"] + timings["denoise_low"]
        )
        assert cluster.stage_workers("dit-high") and cluster.stage_workers("dit-low")
        # dflow.status lists an expert's stage while a worker serves it
        stages = dflow.status(client)["stages"]
        assert stages["dit-high"]["workers"] == stages["dit-low"]["workers"] == 1


# -- the emulated cost model: derived costs, 8-bit weights, offload ---------------------


def test_wan22_rows_are_derived_from_wan21_14b():
    """One expert's step without guidance is half Wan 2.1 14B's guided step, at
    its activations; the image-to-video encoder adds the condition's encode."""
    anchors = {
        (r["model"], r["stage"], r["batch"]): r
        for r in anchor_rows()
        if r["model"] == "wan2.1-t2v-14b"
    }
    derived = {
        (
            r["model"],
            r["stage"],
            r["steps"] if r["stage"] == "dit" else 1,
            r["batch"],
        ): r
        for r in derived_rows()
    }
    guided = anchors["wan2.1-t2v-14b", "dit", 1]
    step = guided["seconds"] / guided["steps"] / 2
    for model in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        dit = derived[model, "dit", 4, 1]
        assert not dit["cfg"] and dit["seconds"] == pytest.approx(4 * step)
        assert dit["peak_bytes"] - dit["weight_bytes"] == (
            guided["peak_bytes"] - guided["weight_bytes"]
        )
    text = derived["wan2.2-t2v-a14b", "encoder", 1, 1]["seconds"]
    image = derived["wan2.2-i2v-a14b", "encoder", 1, 1]["seconds"]
    decode = anchors["wan2.1-t2v-14b", "vae", 1]["seconds"]
    assert text == anchors["wan2.1-t2v-14b", "encoder", 1]["seconds"]
    assert image == pytest.approx(text + WAN_ENCODE_OVER_DECODE * decode)


def test_int8_weights_and_group_offload_with_cuda_streams_are_refused():
    """torchao's int8 tensors cannot be pinned, which diffusers' group offload
    with CUDA streams needs: a GPU worker given both is refused when it loads,
    the error naming the two settings. On CPU (no streams) the same worker
    group-offloads its int8 weights, and makes the resident worker's pixels."""
    pytest.importorskip("torchao", reason="int8 DiT weights need torchao")
    from dflow.quantization import check_offload
    from dflow.runtime import StageRuntime

    model = "tiny-wan22-t2v"
    request = Request(model=model, prompt="a fox", steps=4, seed=1)
    with dask.config.set({"dflow.runtime.offload": "group"}):
        with pytest.raises(
            ValueError,
            match=r"^quantize: int8 DiT weights cannot be group-offloaded with "
            r"CUDA streams \(dflow\.runtime\.offload: group\).*offload: none",
        ):
            StageRuntime(model, "dit-high", device="cuda", quantize="int8")
        grouped = StageRuntime(model, MONOLITHIC, device="cpu", quantize="int8")
        assert type(grouped.adapter.pipe.transformer.proj_out.weight).__name__ == (
            "Int8Tensor"
        )
        offloaded = grouped.generate(request).array
    resident = StageRuntime(model, MONOLITHIC, device="cpu", quantize="int8")
    assert np.array_equal(offloaded, resident.generate(request).array)
    # bf16 weights group-offload with streams; 8-bit ones resident or on CPU
    check_offload(None, "group", "cuda")
    check_offload("int8", "none", "cuda")
    check_offload("fp8", "model", "cuda:0")
    with pytest.raises(ValueError, match=r"^quantize: fp8 "):
        check_offload("fp8", "group", "cuda:0")


def a10_placement(stages, quantize=None):
    return cost_model().placement(
        resolve(MODEL), stages, "a10", features(4), quantize=quantize
    )


def test_an_int8_expert_fits_an_a10_where_bf16_and_both_experts_do_not():
    cost = cost_model()
    spec = resolve(MODEL)
    int8 = cost.weight_bytes(spec, "dit-high", "int8")
    assert int8 / GIB == pytest.approx(13.4, abs=0.05)
    assert cost.weight_bytes(spec, "encoder", "int8") == spec.weight_bytes["encoder"]
    high = a10_placement(["dit-high"], "int8")
    assert high.mode == "resident" and high.stages["dit-high"].steps == 2
    assert high.peak_bytes <= cost.usable_bytes("a10")
    with pytest.raises(StageOutOfMemory):
        a10_placement(["dit-high"])
    # both experts (2 x 13.4 GiB) do not fit 22 GiB: the DiT worker streams them
    both = a10_placement(["dit"], "int8")
    assert both.mode in ("group-offload", "model-offload")
    assert both.peak_bytes <= cost.usable_bytes("a10")


def test_block_offload_streams_one_expert_a_step_behind_compute():
    """Group offload of the whole pipeline: each step streams one expert's
    blocks while the last ones compute, so a step costs the longer of the two."""
    cost = cost_model()
    spec = resolve(MODEL)
    _, rate = cost.offload_rates("a10")
    offload = a10_placement(list(STAGES), "int8")
    assert offload.mode == "group-offload"
    dit = offload.stages["dit"]
    step = cost.seconds(spec, "dit", "a10", features(4)) / 4
    stream = cost.weight_bytes(spec, "dit-high", "int8") / rate
    assert dit.compute == pytest.approx(4 * max(step, stream))
    # model offload moves both experts in for each request (one at a time)
    forced = cost.placement(
        spec, list(STAGES), "a10", features(4), mode="model", quantize="int8"
    )
    assert forced.stages["dit"].transfer == pytest.approx(
        cost.weight_bytes(spec, "dit", "int8") / cost.offload_rates("a10")[0]
    )


def test_s5_physics_is_dit_bound_on_a10s():
    """The seed's experiment on 8 emulated A10s: the best split is 1 encoder /
    6 DiT / 1 VAE, bound by the DiT; the bench's predictor prices the int8
    DiT as the workers hold it (offloading), so admission lets its requests in."""
    scenario = scenarios.get("S5")
    cost = cost_model()
    with dask.config.set(scenario.config):
        bounds = physics(scenario, cost)
        rows = [
            r
            for r in cost.rows_for("a10")
            if r["model"] == MODEL and r["stage"] == "dit"
        ]
    split = bounds.allocation["disaggregated"]
    assert {pool.stage: n["a10"] for pool, n in split.items()} == {
        "encoder": 1,
        "dit": 6,
        "vae": 1,
    }
    dit = cost.placement(
        resolve(MODEL), ["dit"], "a10", features(4), quantize="int8"
    ).seconds
    assert bounds.average_capacity["disaggregated"] == pytest.approx(6 / dit)
    assert (
        bounds.average_capacity["monolithic"] > bounds.average_capacity["disaggregated"]
    )
    assert rows and all(r["peak_bytes"] <= cost.usable_bytes("a10") for r in rows)
