from __future__ import annotations

import json
import math
import random
import re
import time
from importlib.resources import files

import pytest
import torch

import dask.config

from dflow.predictor import (
    Prediction,
    Predictor,
    anchor_rows,
    load_profile,
    row_features,
)
from dflow.profile import run_profile
from dflow.request import Request

MODEL = "pixart-sigma-1024"


def dit_seconds(tokens: int, steps: int, batch: int = 1) -> float:
    """A DiT with CFG: per pass linear layers, attention and a fixed step cost."""
    passes = steps * batch * 2
    return passes * (2e-6 * tokens + 1.5e-10 * tokens**2 + 2e-3) + 0.05


def dit_bytes(tokens: int, batch: int = 1) -> float:
    return 1.2e9 + 2 * batch * tokens * 60_000


def synthetic_rows(stage: str, sizes, steps=(20,), batches=(1,), seed: int = 0):
    """Rows of a known cost function with 3% noise."""
    rng = random.Random(seed)
    rows = []
    for size in sizes:
        for step in steps:
            for batch in batches:
                row = {
                    "model": MODEL,
                    "stage": stage,
                    "gpu_type": "h200",
                    "batch": batch,
                    "height": size,
                    "width": size,
                    "frames": 1,
                    "steps": step,
                    "cfg": True,
                }
                tokens = row_features(row)["dit_tokens"]
                if stage == "dit":
                    seconds = dit_seconds(tokens, step, batch)
                    peak = dit_bytes(tokens, batch)
                elif stage == "vae":
                    seconds = 8e-8 * batch * size * size + 0.005
                    peak = 2e8 + batch * size * size * 2_000
                else:
                    seconds = 0.0084 * batch * 2 + 0.0127
                    peak = 9.5e9 + batch * 2 * 8e7
                noise = rng.lognormvariate(0, 0.03)
                rows.append({**row, "seconds": seconds * noise, "peak_bytes": peak})
    return rows


@pytest.mark.parametrize(
    "stage, train, test",
    [
        (
            "dit",
            dict(sizes=range(256, 769, 128), steps=(10, 20)),
            dict(sizes=(1024, 1280), steps=(15, 30, 50)),
        ),
        (
            "vae",
            dict(sizes=range(256, 769, 128), batches=(1, 2)),
            dict(sizes=(1024, 1536), batches=(1, 4)),
        ),
        (
            "encoder",
            dict(sizes=(1024,), batches=(1, 2, 4)),
            dict(sizes=(1024,), batches=(8, 16)),
        ),
    ],
)
def test_fit_predicts_unseen_shapes(stage, train, test):
    predictor = Predictor(synthetic_rows(stage, **train, seed=0))
    held_out = synthetic_rows(stage, **test, seed=1)
    assert predictor.mape(held_out) <= 0.10
    for row in held_out:
        predicted = predictor.predict(
            MODEL, stage, "h200", row_features(row), row["batch"]
        )
        assert predicted.peak_bytes == pytest.approx(row["peak_bytes"], rel=0.1)


def test_dit_fit_recovers_the_cost_terms():
    predictor = Predictor(synthetic_rows("dit", range(256, 769, 128), (10, 20)))
    request = Request(model=MODEL, prompt="a fox", steps=20)
    predicted = predictor.predict(MODEL, "dit", "h200", request)
    assert isinstance(predicted, Prediction)
    # 1024px: 4096 tokens, 2.6x past the largest profiled size, where attention
    # has grown 7x
    assert predicted.seconds == pytest.approx(dit_seconds(4096, 20), rel=0.05)
    assert predicted.peak_bytes == pytest.approx(dit_bytes(4096), rel=0.02)
    # a request or its features, alike
    assert predictor.predict(MODEL, "dit", "h200", request.features) == predicted


def anchor_ms(model: str, stage: str) -> list[dict]:
    text = files("dflow.configs").joinpath("profiles/h200-stages.json").read_text()
    rows = json.loads(text)["rows"]
    return [r for r in rows if (r["model"], r["stage"]) == (model, stage)]


@pytest.fixture(scope="module")
def anchored() -> Predictor:
    return Predictor(anchor_rows())


@pytest.mark.parametrize(
    "model, anchor, stage",
    [
        ("flux.1-dev", "flux.1-dev", "dit_step"),
        ("pixart-sigma-1024", "pixart-sigma", "dit_step_cfg"),
        ("wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b", "dit_step_cfg"),
        ("wan2.1-t2v-14b", "wan2.1-t2v-14b", "dit_step_cfg"),
    ],
)
def test_anchors_predict_end_to_end_dit_time(anchored, model, anchor, stage):
    request = Request(model=model, prompt="a red fox in the snow")
    for row in anchor_ms(anchor, stage):
        # the anchors time one step at the preset's default shape
        tokens = re.search(r"tokens=(\d+)", row["note"])
        assert int(tokens.group(1)) == request.features["dit_tokens"]
        expected = row["ms"] / 1000 * request.steps
        predicted = anchored.predict(model, "dit", "h200", request, row["batch"])
        assert predicted.seconds == pytest.approx(expected, rel=0.10)
        assert predicted.peak_bytes == pytest.approx(row["peak_gib"] * 2**30, rel=0.10)
    # other step counts scale with the steps
    fifty = anchored.predict(model, "dit", "h200", request.replace(steps=50))
    ms = anchor_ms(anchor, stage)[0]["ms"]
    assert fifty.seconds == pytest.approx(ms / 1000 * 50, rel=0.10)


def test_anchor_rows(anchored):
    rows = anchor_rows(steps=10)
    assert {r["model"] for r in rows} == {
        "flux.1-dev",
        "pixart-sigma-1024",
        "wan2.1-t2v-1.3b",
        "wan2.1-t2v-14b",
    }
    # Flux's encoder stage runs T5 and CLIP: their times add up
    (flux_encoder,) = [
        r
        for r in rows
        if (r["model"], r["stage"], r["batch"]) == ("flux.1-dev", "encoder", 1)
    ]
    assert flux_encoder["seconds"] == pytest.approx(0.0281 + 0.0069)
    (flux_dit,) = [
        r
        for r in rows
        if (r["model"], r["stage"], r["batch"]) == ("flux.1-dev", "dit", 1)
    ]
    assert flux_dit["seconds"] == pytest.approx(1.722)
    assert flux_dit["steps"] == 10
    assert not flux_dit["cfg"]
    # anchors reproduce themselves
    assert anchored.mape(anchor_rows()) <= 0.02
    flux = Request(model="flux.1-dev", prompt="a fox")
    assert anchored.predict("flux.1-dev", "encoder", "h200", flux).seconds == (
        pytest.approx(0.035, rel=0.01)
    )


def test_unknown_model_stage_or_gpu_type():
    predictor = Predictor(synthetic_rows("dit", (256, 512), (10, 20)))
    features = Request(model=MODEL, prompt="x").features
    with pytest.raises(
        LookupError,
        match=r"no profile for stage 'dit' of model 'flux.1-dev'; profiled: pixart-sigma-1024 dit",
    ):
        predictor.predict("flux.1-dev", "dit", "h200", features)
    with pytest.raises(LookupError, match="no profile for stage 'upscale'"):
        predictor.predict(MODEL, "upscale", "h200", features)
    with pytest.raises(LookupError, match="GPU type 'l4' and no speed"):
        predictor.predict(MODEL, "dit", "l4", features)


def test_unprofiled_gpu_type_scales_by_speed():
    rows = synthetic_rows("dit", (256, 512), (10, 20))
    predictor = Predictor(rows, speeds={"l4": 0.25, "a100": 0.5})
    features = Request(model=MODEL, prompt="x").features
    h200 = predictor.predict(MODEL, "dit", "h200", features)
    l4 = predictor.predict(MODEL, "dit", "l4", features)
    assert l4.seconds == pytest.approx(4 * h200.seconds)
    assert l4.peak_bytes == h200.peak_bytes
    # from the profiled type closest in speed
    a100_rows = [{**r, "gpu_type": "a100", "seconds": 3 * r["seconds"]} for r in rows]
    predictor = Predictor(rows + a100_rows, speeds={"l4": 0.25, "a100": 0.5})
    a100 = predictor.predict(MODEL, "dit", "a100", features)
    assert predictor.predict(MODEL, "dit", "l4", features).seconds == pytest.approx(
        2 * a100.seconds
    )


def test_correction_converges_to_observed_ratio():
    predictor = Predictor(synthetic_rows("dit", range(256, 769, 128), (10, 20)))
    request = Request(model=MODEL, prompt="x", height=512, width=512, steps=20)
    fitted = predictor.predict(MODEL, "dit", "h200", request).seconds
    predictor.observe(MODEL, "dit", "h200", request, 1.5 * fitted)
    assert predictor.correction(MODEL, "dit", "h200") == pytest.approx(1.1)  # alpha 0.2
    for _ in range(30):
        predictor.observe(MODEL, "dit", "h200", request, 1.5 * fitted)
    assert predictor.correction(MODEL, "dit", "h200") == pytest.approx(1.5, rel=0.01)
    # the correction applies to every shape of that model, stage and GPU type
    other = request.replace(height=1024, width=1024, steps=30)
    corrected = predictor.predict(MODEL, "dit", "h200", other)
    raw = predictor.predict(MODEL, "dit", "h200", other, corrected=False)
    assert corrected.seconds == pytest.approx(1.5 * raw.seconds, rel=0.01)
    # and to nothing else
    assert predictor.correction(MODEL, "dit", "a100") == 1.0


def test_correction_alpha_from_config():
    with dask.config.set({"dflow.predictor.ewma-alpha": 0.5}):
        predictor = Predictor(synthetic_rows("dit", (256, 512), (10, 20)))
    request = Request(model=MODEL, prompt="x", height=512, width=512, steps=20)
    fitted = predictor.predict(MODEL, "dit", "h200", request).seconds
    predictor.observe(MODEL, "dit", "h200", request, 2 * fitted)
    assert predictor.correction(MODEL, "dit", "h200") == pytest.approx(1.5)


def test_correction_of_a_scaled_gpu_type():
    predictor = Predictor(
        synthetic_rows("dit", (256, 512), (10, 20)), speeds={"l4": 0.25}
    )
    request = Request(model=MODEL, prompt="x", height=512, width=512, steps=20)
    scaled = predictor.predict(MODEL, "dit", "l4", request).seconds
    for _ in range(40):
        predictor.observe(MODEL, "dit", "l4", request, 0.8 * scaled)
    assert predictor.predict(MODEL, "dit", "l4", request).seconds == pytest.approx(
        0.8 * scaled, rel=0.01
    )
    # a refit keeps it: the observations replay against the new fits
    predictor.refit()
    assert predictor.correction(MODEL, "dit", "l4") == pytest.approx(0.8, rel=0.01)


def test_refit_folds_observations_into_the_fit():
    rows = synthetic_rows("dit", range(256, 769, 128), (10, 20))
    predictor = Predictor(rows, max_samples=100)
    rng = random.Random(2)
    requests = [
        Request(model=MODEL, prompt="x", height=s, width=s, steps=t)
        for s in (512, 768, 1024)
        for t in (20, 30)
    ]
    truth = {r: 1.3 * dit_seconds(r.features["dit_tokens"], r.steps) for r in requests}
    for _ in range(10):
        for request in requests:
            predictor.observe(
                MODEL,
                "dit",
                "h200",
                request,
                truth[request] * rng.lognormvariate(0, 0.03),
            )
    predictor.refit()
    errors = []
    for request in requests:
        raw = predictor.predict(MODEL, "dit", "h200", request, corrected=False)
        corrected = predictor.predict(MODEL, "dit", "h200", request)
        # 60 observations outweigh 10 profile rows: the fit itself moved most of
        # the way, and the correction, replayed against the new fit, the rest
        assert truth[request] / 1.25 < raw.seconds < truth[request] * 1.05
        errors.append(abs(corrected.seconds / truth[request] - 1))
    assert max(errors) < 0.1
    assert sum(errors) / len(errors) < 0.05
    assert predictor.fits[MODEL, "dit", "h200"].samples == len(rows) + 60


def test_refit_keeps_only_recent_observations():
    rows = synthetic_rows("dit", range(256, 769, 128), (10, 20))
    predictor = Predictor(rows, max_samples=10)
    request = Request(model=MODEL, prompt="x", height=512, width=512, steps=20)
    fitted = predictor.predict(MODEL, "dit", "h200", request).seconds
    for ratio in [3.0] * 50 + [1.0] * 10:
        predictor.observe(MODEL, "dit", "h200", request, ratio * fitted)
    predictor.refit()
    # the 3x observations fell out of the buffer
    raw = predictor.predict(MODEL, "dit", "h200", request, corrected=False).seconds
    assert raw == pytest.approx(fitted, rel=0.05)
    assert predictor.correction(MODEL, "dit", "h200") == pytest.approx(1.0, rel=0.05)


def test_predict_is_cheap():
    predictor = Predictor(synthetic_rows("dit", (256, 512), (10, 20)))
    features = Request(model=MODEL, prompt="x").features
    start = time.thread_time()
    for _ in range(2000):
        predictor.predict(MODEL, "dit", "h200", features)
    # a few microseconds each
    assert (time.thread_time() - start) / 2000 < 100e-6


def test_mape_and_load_profile(tmp_path):
    rows = synthetic_rows("vae", (256, 512), batches=(1, 2))
    path = tmp_path / "profile.json"
    profile = {
        "gpu_type": "h200",
        "rows": [{k: v for k, v in r.items() if k != "gpu_type"} for r in rows],
    }
    path.write_text(json.dumps(profile))
    assert load_profile(path) == rows
    predictor = Predictor(load_profile(path))
    assert predictor.mape(rows) < 0.05
    with pytest.raises(ValueError, match="at least one row"):
        predictor.mape([])
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a dflow profile"):
        load_profile(path)


@pytest.fixture
def one_thread():
    """One torch thread: on a small machine shared with other work, OpenMP
    threads spinning for a busy core make CPU timings swing tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_profile_of_tiny_pixart_predicts_held_out_shapes(tmp_path, one_thread):
    """Real timings: tiny-pixart's DiT on this CPU, fitted on part of a grid and
    checked on the rest (another size, more steps). A tiny model on a busy CPU
    is dominated by per-step overhead and noisy even as medians of repeats, so
    the bound is 35%, not the 10% a GPU profile meets; it still fails a fit
    that ignores steps (off by 2x and more) or tokens."""
    profile = run_profile(
        "tiny-pixart",
        ["dit"],
        sizes=[64, 128, 192, 256, 320],
        steps=[2, 4, 8],
        repeats=3,
        out=tmp_path / "cpu.json",
    )
    rows = load_profile(tmp_path / "cpu.json")
    assert rows == profile["rows"]
    assert {r["gpu_type"] for r in rows} == {"cpu"}
    train = [r for r in rows if r["height"] != 192 and r["steps"] != 8]
    test = [r for r in rows if r not in train]
    assert (len(train), len(test)) == (8, 7)
    predictor = Predictor(train)
    assert predictor.mape(test) <= 0.35
    assert math.isfinite(predictor.mape(train))


def test_batch_limit_stops_at_memory_and_at_the_least_gain():
    from dflow.predictor import batch_limit

    # per-request speedup 1.9, 2.45, 3.0, then 1.7% more a request; 1 GiB more
    # per request
    speedups = {1: 1.0, 2: 1.9, 3: 2.45, 4: 3.0}

    def price(batch: int) -> Prediction:
        seconds = batch / speedups.get(batch, 3.0 + 0.05 * (batch - 4))
        return Prediction(seconds, (batch + 1) * 2**30)

    assert batch_limit(price, 8) == 8
    assert batch_limit(price, 8, min_gain=0.05) == 4
    assert batch_limit(price, 3, min_gain=0.05) == 3
    assert batch_limit(price, 8, memory=3 * 2**30, min_gain=0.05) == 2

    def unpriced(batch: int) -> Prediction:
        raise LookupError("no profile")

    assert batch_limit(unpriced, 6, min_gain=0.05) == 6
