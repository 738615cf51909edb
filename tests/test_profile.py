from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dflow.catalog import resolve
from dflow.predictor import load_profile
from dflow.profile import profile, run_profile


@pytest.fixture
def one_thread():
    """One torch thread: on a small machine shared with other work, OpenMP
    threads spinning for a busy core make CPU stage calls many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_profile_times_each_stage_over_its_grid(tmp_path, one_thread):
    out = tmp_path / "tiny-pixart.json"
    result = run_profile(
        "tiny-pixart",
        ["encoder", "dit", "vae"],
        sizes=[64, 72],
        steps=[2],
        batches=[1, 2],
        repeats=2,
        out=out,
    )
    assert json.loads(out.read_text()) == result
    assert result["gpu_type"] == "cpu"
    assert result["dtype"] == "float32"
    assert set(result["load_seconds"]) == {
        "tiny-pixart/encoder",
        "tiny-pixart/dit",
        "tiny-pixart/vae",
    }
    assert all(s > 0 for s in result["warmup_seconds"].values())
    shapes = [(r["stage"], r["batch"], r["height"], r["steps"]) for r in result["rows"]]
    # the encoder varies with the batch only; the DiT runs one request per call
    assert shapes == [
        ("encoder", 1, 64, 4),
        ("encoder", 2, 64, 4),
        ("dit", 1, 64, 2),
        ("vae", 1, 64, 4),
        ("vae", 2, 64, 4),
    ]
    weights = resolve("tiny-pixart").weight_bytes
    for row in result["rows"]:
        assert row["seconds"] > 0
        assert row["peak_bytes"] is None  # no device memory to measure on CPU
        assert row["weight_bytes"] == weights[row["stage"]]
        assert row["cfg"] is True
    # 72 is not a multiple of 16: skipped, and said so
    assert [(s["stage"], s["height"], s["batch"]) for s in result["skipped"]] == [
        ("dit", 72, 1),
        ("vae", 72, 1),
        ("vae", 72, 2),
    ]
    assert "use a multiple of 16" in result["skipped"][0]["reason"]
    assert load_profile(out) == result["rows"]


def test_run_profile_rejects_unknown_stages():
    with pytest.raises(ValueError, match="stage must be one of encoder, dit, vae"):
        run_profile("tiny-pixart", ["upscale"])


def test_profile_command_on_video(tmp_path, one_thread):
    out = tmp_path / "wan.json"
    result = CliRunner().invoke(
        profile,
        [
            "--model",
            "tiny-wan",
            "--stage",
            "vae",
            "--out",
            str(out),
            "--sizes",
            "32,32x48",
            "--frames",
            "5,6",
            "--repeats",
            "1",
            "--gpu-type",
            "emulated-h200",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = load_profile(out)
    assert [(r["height"], r["width"], r["frames"]) for r in rows] == [
        (32, 32, 5),
        (32, 48, 5),
    ]
    assert {r["gpu_type"] for r in rows} == {"emulated-h200"}
    # frames must be 4k + 1 for Wan's VAE
    assert result.output.count("Skipped") == 2
    assert f"Wrote 2 rows for emulated-h200 to {out}" in result.output


def test_profile_command_rejects_bad_lists(tmp_path):
    out = str(tmp_path / "x.json")
    result = CliRunner().invoke(
        profile,
        ["--model", "tiny-wan", "--stage", "vae", "--out", out, "--sizes", "32x"],
    )
    assert result.exit_code == 2
    assert "expected comma-separated values" in result.output
