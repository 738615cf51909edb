"""Chaos suite: requests complete exactly once while workers die, pause and switch.

Runs ``benchmarks/chaos.py`` at CI size (one round of chaos, about a minute of
requests): one scheduler serving tiny PixArt-Sigma on the real backend (36
requests) and PixArt-Sigma-1024 on the emulated one (200 requests), each with
encoder, two DiT and VAE worker processes. During the run the worker process of
every stage of both models is SIGKILLed (its Nanny restarts it), a worker of
each model is paused with SIGSTOP for 3 s (within the scheduler's worker TTL, so
it stays in the cluster) and a DiT worker of each model is switched to another
stage and back. The script's docstring defines completed, failed, lost and
duplicated; here lost and duplicated must be zero, every request must end
completed or with a clear error, and the scheduler's counts must agree.

The longer run (more rounds and requests, and pauses past the worker TTL) is
``python benchmarks/chaos.py``; its results are in
``benchmarks/results-reliability.md``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"


def load_chaos():
    spec = importlib.util.spec_from_file_location("dflow_chaos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look it up
    spec.loader.exec_module(module)
    return module


chaos = load_chaos()


@pytest.mark.timeout(900)
def test_every_request_completes_exactly_once_or_fails_clearly(
    tiny_folders, tmp_path, record_property
):
    settings = chaos.Settings(tiny_requests=36, emulated_requests=200)
    with chaos.cluster(settings, tmp_path / "logs") as (client, processes):
        report = chaos.run(settings, client, processes)
    print(report.table())
    for action in report.actions:
        print(
            f"{action['at']:7.2f}s {action['what']}{'' if action['ok'] else ' (skipped)'}"
        )

    for model, r in report.models.items():
        record_property(f"{model} counts", f"{r}")
        assert r.lost == 0, (model, r)
        assert r.duplicated == 0, (model, r)
        assert r.submitted == r.completed + r.failed, (model, r)
        ext = r.extension
        assert ext["completed"] == r.completed, (model, r)
        assert ext["submitted"] == r.submitted - r.refused, (model, r)
        assert ext["failed"] + ext["cancelled"] == r.failed - r.refused, (model, r)
    assert report.models[chaos.TINY].submitted >= 30
    assert report.models[chaos.EMULATED].submitted >= 200

    # every kind of chaos happened: a kill of each stage of each model, pauses
    # and role switches (a switch is skipped only if its worker was not ready)
    done = [a["what"] for a in report.actions if a["ok"]]
    for model in (chaos.TINY, chaos.EMULATED):
        for stage in ("encoder", "dit", "vae"):
            assert any(w.startswith(f"SIGKILL {stage} worker of {model}") for w in done)
    assert sum(w.startswith("SIGSTOP") for w in done) == 2
    assert sum(w.startswith("SIGCONT") for w in done) == 2
    assert sum(w.startswith("switch") for w in done) >= 2
