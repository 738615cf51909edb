"""Workloads: arrival processes, mixes, phase shifts, JSONL traces and replay."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dflow.bench.workload import (
    Arrivals,
    Phase,
    Template,
    TraceEntry,
    Workload,
    generate,
    read_trace,
    replay,
    write_trace,
)
from dflow.request import Request


def single(arrivals: Arrivals, mix=None, seed: int = 1) -> Workload:
    return Workload([Phase(0, arrivals, mix or [Template("m")])], seed=seed)


def counts(entries: list[TraceEntry], duration: float, window: float) -> np.ndarray:
    edges = np.arange(0, duration + window, window)
    return np.histogram([e.t for e in entries], bins=edges)[0]


def dispersion(values: np.ndarray) -> float:
    return float(values.var(ddof=1) / values.mean())


def test_poisson_rate_and_gaps():
    rate, duration = 5.0, 2000.0
    entries = generate(single(Arrivals("poisson", rate=rate)), duration)
    expected = rate * duration
    # a Poisson count's standard deviation is sqrt(mean): 4 sigma is 1 in 15000
    assert abs(len(entries) - expected) < 4 * math.sqrt(expected)
    gaps = np.diff([e.t for e in entries])
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(len(gaps))
    # exponential gaps: the standard deviation equals the mean
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.05)
    assert 0.8 < dispersion(counts(entries, duration, 10)) < 1.2
    assert all(0 <= e.t < duration for e in entries)


def test_bursty_keeps_the_mean_rate_with_more_variance():
    arrivals = Arrivals("bursty", rate=2.0, peak=4.0, on_fraction=0.2, mean_on=10.0)
    assert arrivals.low_rate == pytest.approx(2.0 * (1 - 0.8) / 0.8)
    duration = 20000.0
    entries = generate(single(arrivals), duration)
    # spells of 10 s (on) and 40 s (off) average out over 20000 s: within 10%
    assert len(entries) / duration == pytest.approx(2.0, rel=0.1)
    assert dispersion(counts(entries, duration, 10)) > 3
    on_off = Arrivals("bursty", rate=1.0, peak=5.0, on_fraction=0.2)
    assert on_off.low_rate == 0


def test_bad_arrivals_are_refused():
    with pytest.raises(ValueError, match="process"):
        Arrivals("uniform")
    with pytest.raises(ValueError, match="peak"):
        Arrivals("bursty", peak=6.0, on_fraction=0.2)
    with pytest.raises(ValueError, match="rate"):
        Arrivals(rate=-1)
    with pytest.raises(ValueError, match="first starting at 0"):
        Workload([Phase(5, Arrivals(), [Template("m")])])
    with pytest.raises(ValueError, match="weight"):
        Template("m", weight=0)


def test_mix_follows_weights():
    mix = [Template("a", weight=1), Template("b", weight=2), Template("c", weight=7)]
    entries = generate(single(Arrivals(rate=10.0), mix), 1000)
    n = len(entries)
    for template in mix:
        p = template.weight / 10
        seen = sum(e.model == template.model for e in entries)
        assert abs(seen - n * p) < 4 * math.sqrt(n * p * (1 - p))


def test_templates_carry_their_fields():
    template = Template(
        "wan", height=480, width=832, num_frames=33, steps=30, guidance_scale=6.0
    )
    (entry, *_) = generate(single(Arrivals(rate=5.0), [template]), 10)
    assert (entry.height, entry.width, entry.num_frames) == (480, 832, 33)
    assert (entry.steps, entry.guidance_scale) == (30, 6.0)
    assert 0 <= entry.seed < 2**63


def test_phase_shift_changes_mix_and_rate_at_its_start():
    workload = Workload(
        [
            Phase(300, Arrivals(rate=0.5), [Template("video")], name="video"),
            Phase(0, Arrivals(rate=4.0), [Template("image")], name="images"),
        ],
        seed=3,
    )
    assert [p.name for p in workload.phases] == ["images", "video"]
    assert workload.phase_at(299.9).name == "images"
    assert workload.phase_at(300).name == "video"
    entries = generate(workload, 900)
    before = [e for e in entries if e.t < 300]
    after = [e for e in entries if e.t >= 300]
    assert {e.model for e in before} == {"image"}
    assert {e.model for e in after} == {"video"}
    assert {e.phase for e in after} == {"video"}
    assert abs(len(before) - 1200) < 4 * math.sqrt(1200)
    assert abs(len(after) - 300) < 4 * math.sqrt(300)


def test_generation_is_reproducible():
    workload = single(Arrivals("bursty", rate=3.0), [Template("a"), Template("b")])
    assert generate(workload, 200) == generate(workload, 200)
    other = Workload(workload.phases, seed=2)
    assert generate(other, 200) != generate(workload, 200)
    prompts = {e.prompt for e in generate(workload, 200)}
    assert all(p.startswith("a ") and len(p.split()) <= 6 for p in prompts)


def test_jsonl_round_trip(tmp_path):
    workload = Workload(
        [
            Phase(0, Arrivals(rate=2.0), [Template("a", weight=2), Template("b")]),
            Phase(50, Arrivals("bursty", rate=1.0), [Template("c", num_frames=33)]),
        ],
        seed=7,
    )
    entries = generate(workload, 100)
    path = write_trace(
        tmp_path / "trace.jsonl", entries, workload=workload, duration=100, note="x"
    )
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 1 and header["kind"] == "dflow-trace"
    assert header["note"] == "x" and header["duration"] == 100
    assert len(lines) == len(entries) + 1
    trace = read_trace(path)
    assert trace.entries == entries
    assert trace.workload == workload
    assert generate(trace.workload, 100) == entries


def test_read_trace_refuses_other_files(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"t": 1, "model": "a", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="not a version 1 dflow trace"):
        read_trace(path)
    path.write_text('{"version": 1}\n{"t": 1, "model": "a", "prompt": "x", "y": 2}\n')
    with pytest.raises(ValueError, match="line 2: unknown trace fields: y"):
        read_trace(path)


def test_replay_in_time_order_with_pacing():
    entries = [
        TraceEntry(t=t, model="flux.1-dev", prompt=f"a fox {i}", seed=i)
        for i, t in enumerate([3.0, 1.0, 2.0, 0.5])
    ]
    now = [100.0]
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pairs = list(
        replay(entries, pace=True, time_scale=0.1, clock=lambda: now[0], sleep=sleep)
    )
    assert [t for t, _ in pairs] == [0.5, 1.0, 2.0, 3.0]
    assert all(isinstance(r, Request) for _, r in pairs)
    assert [r.prompt for _, r in pairs] == ["a fox 3", "a fox 1", "a fox 2", "a fox 0"]
    assert pairs[0][1].model == "flux.1-dev" and pairs[0][1].seed == 3
    assert slept == pytest.approx([0.05, 0.05, 0.1, 0.1])
    assert [t for t, _ in replay(entries)] == [0.5, 1.0, 2.0, 3.0]
