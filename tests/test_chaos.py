"""Chaos suite: requests complete exactly once while workers die, pause and switch.

Runs the chaos run (:mod:`dflow.bench.chaos`) at CI size (one round of chaos,
about a minute of requests): one scheduler serving tiny PixArt-Sigma on the real
backend (36 requests) and PixArt-Sigma-1024 on the emulated one (200 requests),
each with encoder, two DiT and VAE worker processes. During the run the worker
process of every stage of both models is SIGKILLed (its Nanny restarts it), a
worker of each model is paused with SIGSTOP for 3 s (within the scheduler's
worker TTL, so it stays in the cluster) and a DiT worker of each model is
switched to another stage and back. ``ModelReport`` defines completed, failed,
lost and duplicated; here every request must complete exactly once (none lost,
failed or duplicated), and the scheduler's counts must agree.

The longer run (more rounds and requests, and pauses past the worker TTL) is
``python benchmarks/chaos.py``; its results are in
``benchmarks/results-reliability.md``.
"""

from __future__ import annotations

import pytest

from dflow.bench import chaos


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_request_completes_exactly_once(tiny_folders, tmp_path, record_property):
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
        assert r.failed == 0, (model, r)
        assert r.completed == r.submitted, (model, r)
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
