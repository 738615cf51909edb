"""Scenario files (``configs/scenarios/``), their validation, ``--repeats`` and
``--capacity``."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from dflow.bench import MODES
from dflow.bench.report import (
    CAPACITY_ATTAINMENT,
    bisect_rate,
    combine,
    median_tree,
    spread_tree,
)
from dflow.bench.scenarios import ScenarioError, folder, get, load, names, schema
from dflow.bench.workload import generate

#: sha256 (first 16 hex digits) of the traces the Python scenarios of main at
#: 27aa28e generated, full and --quick: the files must give the same requests
TRACES = {
    ("S1", False): ("01304918e294e8dd", 469),
    ("S1", True): ("77689221dfb641fb", 234),
    ("S2", False): ("1d008d0d34585926", 1346),
    ("S2", True): ("f1fee81dc9a66d2b", 590),
    ("S2-80", False): ("e69f2d2f63a749df", 1075),
    ("S2-80", True): ("fd05b9e0b683b516", 448),
    ("S3", False): ("657c793d7174eccd", 1189),
    ("S3", True): ("c51bdac4055b38ab", 583),
}


def digest(entries) -> str:
    # entries without an input image as they were before TraceEntry had ``image``
    data = [
        {k: v for k, v in dataclasses.asdict(e).items() if k != "image" or v}
        for e in entries
    ]
    text = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def shipped(name: str) -> dict:
    return yaml.safe_load((folder() / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", names())
def test_shipped_files_validate_against_the_schema(name):
    data = shipped(name)
    jsonschema.validate(data, schema())
    scenario = get(name)
    assert scenario.name == name
    assert set(scenario.modes) <= set(MODES)
    quick = scenario.quick_variant()
    assert quick.duration <= scenario.duration


@pytest.mark.parametrize(("name", "quick"), sorted(TRACES))
def test_files_give_the_traces_of_the_python_scenarios(name, quick):
    scenario = get(name)
    if quick:
        scenario = scenario.quick_variant()
    entries = generate(scenario.workload, scenario.duration)
    assert (digest(entries), len(entries)) == TRACES[name, quick]


def test_s1_to_s3_keep_their_settings():
    s2 = get("s2")
    assert (s2.duration, s2.warmup, s2.drain, s2.time_scale) == (1440, 120, 300, 0.25)
    assert s2.fleet == {"rtx4090": 24}
    assert [p.arrivals.rate for p in s2.workload.phases[:3]] == [0.549, 1.976, 0.3]
    quick = s2.quick_variant()
    assert [p.start for p in quick.workload.phases] == [0, 200, 400]
    s3 = get("S3").quick_variant()
    assert (s3.duration, s3.warmup, s3.drain, s3.time_scale) == (600, 120, 100, 0.1)
    assert s3.fleet == {"h100-sxm": 4, "rtx4090": 8}


def broken(change) -> dict:
    data = copy.deepcopy(shipped("S2"))
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["workload"]["phases"][1]["arrivals"].update(rate="fast"),
            r"bad\.yaml: workload\.phases\[1\]\.arrivals\.rate: 'fast' is not of type",
        ),
        (
            lambda d: d["workload"]["phases"][2]["arrivals"].update(rate=-1),
            r"workload\.phases\[2\]\.arrivals\.rate: -1 is less than the minimum of 0",
        ),
        (lambda d: d["fleet"].update(rtx9090=2), r"fleet\.rtx9090: unknown GPU type"),
        (
            lambda d: d["workload"]["phases"][0]["mix"][0].update(height=1000),
            r"workload\.phases\[0\]\.mix\[0\]\.height: 1000 is not allowed",
        ),
        (
            lambda d: d["workload"]["phases"][0]["mix"][1].update(model="nope"),
            r"workload\.phases\[0\]\.mix\[1\]\.model: unknown model 'nope'",
        ),
        (
            lambda d: d["workload"]["phases"][0]["mix"][0].update(colour=1),
            r"workload\.phases\[0\]\.mix\[0\]: unknown key 'colour'; allowed: model",
        ),
        (lambda d: d.update(modes=["elastic", "magic"]), r"modes\[1\]: unknown mode"),
        (
            lambda d: d.update(modes=["static", "static_experts"]),
            r"modes\[1\]: static_experts splits a two-expert model's DiT .* no model",
        ),
        (lambda d: d.update({"time-scale": 0}), r"time-scale: 0 is less than or equal"),
        (lambda d: d.update(warmup=5000), r"warmup: must be less than duration"),
        (
            lambda d: d["workload"]["phases"][0].update(duration=[50, 20]),
            r"workload\.phases\[0\]\.duration: \[least, most\] with least <= most",
        ),
        (
            lambda d: d["workload"]["phases"][0]["mix"][0].update(images=[0, 3]),
            r"workload\.phases\[0\]\.mix\[0\]\.images\[0\]: 0 is less than the minimum",
        ),
        (
            lambda d: d["quick"].update({"time-scale": "x"}),
            r"bad\.yaml \(quick\): time-scale: 'x' is not of type 'number'",
        ),
        (
            lambda d: d.update(controller={"horizn": 3}),
            r"controller\.horizn: unknown setting; known: interval, horizon",
        ),
        (
            lambda d: d["workload"].pop("phase-duration"),
            r"workload\.phases\[0\]\.duration: required \(or workload\.phase-duration\)",
        ),
        (lambda d: d.update(speed=1), r"\(top level\): unknown key 'speed'"),
        (lambda d: d.pop("fleet"), r"\(top level\): 'fleet' is a required property"),
    ],
)
def test_invalid_files_name_the_field(change, message):
    with pytest.raises(ScenarioError, match=message):
        load(broken(change), "bad.yaml")


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(ScenarioError, match="unknown scenario 'S9'; known: S1"):
        get("S9")
    with pytest.raises(ScenarioError, match="does not exist"):
        get(str(tmp_path / "none.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(
        ScenarioError, match=r"list\.yaml: a scenario file is a mapping"
    ):
        get(str(tmp_path / "list.yaml"))
    (tmp_path / "bad.yaml").write_text("fleet: {rtx4090: [\n")
    with pytest.raises(ScenarioError, match=r"bad\.yaml: not valid YAML"):
        get(str(tmp_path / "bad.yaml"))


ALTERNATING = {
    "title": "Flux alternating",
    "fleet": {"rtx4090": 4},
    "warmup": 10,
    "workload": {
        "seed": 7,
        "cycles": 3,
        "order": "random",
        "phase-duration": [30, 120],
        "phases": [
            {
                "name": "high",
                "arrivals": {"rate": 0.2},
                "mix": [{"model": "flux.1-dev", "images": [1, 4]}],
            },
            {
                "name": "low",
                "arrivals": {"rate": 0.5},
                "mix": [
                    {"model": "flux.1-dev", "height": 512, "width": 512, "images": 2}
                ],
            },
            {
                "name": "mixed",
                "arrivals": {"process": "bursty", "rate": 0.3},
                "mix": [{"model": "flux.1-dev", "height": 768, "width": 768}],
            },
        ],
    },
}


def test_alternation_durations_order_and_images_follow_the_seed():
    scenario = load(ALTERNATING, "alt.yaml", default_name="alt")
    phases = scenario.workload.phases
    assert len(phases) == 9
    names_ = [p.name for p in phases]
    assert all(a != b for a, b in itertools.pairwise(names_))
    lengths = [b.start - a.start for a, b in itertools.pairwise(phases)]
    assert all(30 <= x <= 120 for x in lengths)
    assert phases[-1].start + 30 <= scenario.duration <= phases[-1].start + 120
    entries = generate(scenario.workload, scenario.duration)
    by_time: dict[float, list] = {}
    for entry in entries:
        by_time.setdefault(entry.t, []).append(entry)
    groups = list(by_time.values())
    for group in groups:
        assert len({e.prompt for e in group}) == 1
        seeds = [e.seed for e in group]
        assert seeds == list(range(seeds[0], seeds[0] + len(seeds)))
        if group[0].height == 512:
            assert len(group) == 2
    assert {len(g) for g in groups if g[0].height is None} == {1, 2, 3, 4}
    # the same seed, the same workload; another seed, other durations
    again = load(ALTERNATING, "alt.yaml")
    assert [p.start for p in again.workload.phases] == [p.start for p in phases]
    other = scenario.reseeded(8)
    assert [p.start for p in other.workload.phases] != [p.start for p in phases]
    assert other.workload.seed == 8


def test_rate_multiple_scales_every_phase():
    scenario = get("S2").at_rate(0.5)
    assert [p.arrivals.rate for p in scenario.workload.phases[:3]] == pytest.approx(
        [0.2745, 0.988, 0.15]
    )


def test_bisection_tries_steps_rates_and_keeps_the_highest_pass():
    capacity = 0.61  # attainment falls below 90% past this multiple
    tried = []

    def probe(multiple: float) -> dict:
        tried.append(multiple)
        return {"slo_attainment": 0.99 if multiple <= capacity else 0.5}

    probes = bisect_rate(probe, 0.25, 1.25, steps=5)
    assert len(probes) == len(tried) == 5
    assert tried[0] == pytest.approx(0.75)
    passed = [p["multiple"] for p in probes if p["slo_attainment"] >= 0.9]
    assert capacity - 1.0 / 2**5 <= max(passed) <= capacity
    assert CAPACITY_ATTAINMENT == 0.9


def test_repeats_report_median_min_and_max():
    runs = [
        {
            "requests": 10 + i,
            "slo_s": {"m": 5.0},
            "physics": {"physics_ratio": 1.2},
            "modes": {
                "elastic": {
                    "goodput_rps": g,
                    "p95_s": p,
                    "models": {"m": {"slo_attainment": a}},
                    "decision_log": [{"i": i}],
                },
                "static": {"goodput_rps": 1.0, "p95_s": 9.0, "models": {}},
            },
            "ratios": {
                "elastic_over_best_b_c_df_goodput": g,
                "best_of_b_c_df": "static",
            },
        }
        for i, (g, p, a) in enumerate(
            [(1.4, 30.0, 0.9), (1.2, 50.0, 0.7), (1.6, 40.0, 0.8)]
        )
    ]
    combined = combine(runs)
    elastic = combined["modes"]["elastic"]
    assert elastic["goodput_rps"] == pytest.approx(1.4)
    assert elastic["p95_s"] == 40.0
    assert elastic["models"]["m"]["slo_attainment"] == pytest.approx(0.8)
    assert elastic["decision_log"] == [{"i": 0}]
    assert combined["spread"]["elastic"]["goodput_rps"] == [1.2, 1.6]
    assert combined["spread"]["elastic"]["p95_s"] == [30.0, 50.0]
    ratio = combined["ratios"]
    assert ratio["elastic_over_best_b_c_df_goodput"] == pytest.approx(1.4)
    assert ratio["elastic_over_best_b_c_df_goodput_min"] == pytest.approx(1.2)
    assert ratio["elastic_over_best_b_c_df_goodput_per_repeat"] == [1.4, 1.2, 1.6]
    assert median_tree([{"x": None}, {"x": 2.0}]) == {"x": 2.0}
    assert spread_tree([{"x": "a"}, {"x": "b"}]) == {}


TINY = """
title: tiny Flux on two 4090s
fleet: {rtx4090: 3}
duration: 240
warmup: 40
drain: 120
time-scale: 0.01
modes: [static, elastic]
workload:
  seed: 5
  phases:
    - name: flux
      arrivals: {rate: 0.04}
      mix:
        - {model: flux.1-dev, height: 512, width: 512, steps: 8}
"""


def bench_file(
    tmp_path: Path, name: str, text: str, options: list[str]
) -> tuple[dict[str, Any], str]:
    """``dflow bench --scenario FILE`` of a scenario file ``name`` written from
    ``text``, with ``options``: its results.json and what it printed."""
    from dflow.cli import dflow

    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        dflow, ["bench", "--scenario", str(path), "--out", str(out), *options]
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text()), result.output


@pytest.mark.slow
def test_bench_cli_runs_a_file_with_repeats_and_capacity(tmp_path):
    """A scenario file through ``dflow bench``: two repeats of a mode on
    different seeds, then a two-step capacity sweep (real in-process fleets
    at 1/100 of real time)."""
    written, output = bench_file(
        tmp_path,
        "tiny.yaml",
        TINY,
        ["--mode", "static", "--repeats", "2", "--capacity", "--capacity-steps", "2"],
    )
    assert written["scenario"] == "tiny"
    assert [r["seed"] for r in written["runs"]] == [5, 6]
    low, high = written["spread"]["static"]["p95_s"]
    assert low <= written["modes"]["static"]["p95_s"] <= high
    sweep = written["capacity"]["modes"]["static"]
    assert written["capacity"]["steps"] == 2
    assert [len(r["probes"]) for r in sweep["repeats"]] == [2, 2]
    first = sweep["repeats"][0]
    assert first["probes"][0]["multiple"] == pytest.approx(
        0.75 * first["saturation_multiple"]
    )
    assert "Capacity: highest offered rate" in output


def test_s6_offers_four_fifths_of_each_phase_s_bound():
    """S6 alternates resolution and images per prompt at 0.8 of what the best
    stage pools sustain in each phase, one allocation for both; S6-MIX's
    phases need different allocations (its static pools sustain half the low
    phase's bound)."""
    from dflow.bench.physics import physics
    from dflow.emulation import cost_model

    cost = cost_model()
    for name in ("S6", "S6-MIX"):
        result = physics(get(name).quick_variant(), cost)
        best = result.capacity["disaggregated"]
        assert [r / b for r, b in zip(result.rates, best)] == pytest.approx(
            [0.8] * len(best), abs=0.01
        ), name
        # the offload-bound replicas saturate in every phase
        for rate, mono in zip(result.rates, result.capacity["monolithic"]):
            assert rate > mono, name
    s6 = physics(get("S6").quick_variant(), cost)
    assert s6.static_capacity["disaggregated"] == pytest.approx(
        s6.capacity["disaggregated"]
    )
    mix = physics(get("S6-MIX").quick_variant(), cost)
    low = mix.static_capacity["disaggregated"][1]
    assert low < 0.55 * mix.capacity["disaggregated"][1]


def test_s5_splits_the_experts_one_to_three_to_three_to_one():
    """S5 names the expert split among its modes; its physics is the chain
    encoder, dit-high, dit-low, VAE at 1:3:3:1 on the eight A10s, sustaining
    what 1:6:1 does (both DiT-bound)."""
    from dflow.bench.physics import physics
    from dflow.emulation import cost_model

    scenario = get("S5")
    assert "static_experts" in scenario.modes
    assert (scenario.jobs, get("S1").jobs) == (3, 1)
    result = physics(scenario.quick_variant(), cost_model())
    model = "wan2.2-i2v-a14b"
    split = {tuple(p): a["a10"] for p, a in result.allocation["experts"].items()}
    assert split == {
        ("encoder", model): 1,
        ("dit-high", model): 3,
        ("dit-low", model): 3,
        ("vae", model): 1,
    }
    assert result.average_capacity["experts"] == pytest.approx(
        result.average_capacity["disaggregated"], rel=1e-6
    )
    assert result.saturation("static_experts") == pytest.approx(
        result.saturation("static"), rel=1e-6
    )
    # a workload of one-DiT models: the split is the stage pools' physics
    s1 = physics(get("S1").quick_variant(), cost_model())
    assert s1.allocation["experts"] == s1.allocation["disaggregated"]


EXPERTS = """
title: Wan 2.2 I2V A14B on four A10s, the experts split
fleet: {a10: 4}
duration: 600
warmup: 100
drain: 300
time-scale: 0.01
modes: [static, static_experts]
jobs: 2
config:
  dflow.runtime.quantize: {dit: int8, dit-high: int8, dit-low: int8}
workload:
  seed: 3
  phases:
    - name: i2v
      arrivals: {rate: 0.012}
      mix:
        - {model: wan2.2-i2v-a14b, height: 480, width: 832, num_frames: 81, steps: 4, guidance_scale: 1.0, image: true}
"""


@pytest.mark.slow
def test_bench_cli_runs_and_sweeps_the_expert_split(tmp_path):
    """``static_experts`` through ``dflow bench``: four emulated A10s as one
    encoder, one worker per expert and one VAE, the requests' denoising split
    between the two expert pools, then a one-step capacity sweep; the file's
    ``jobs: 2`` runs both at once (real in-process fleets at 1/100 of real
    time, each in a process of its own)."""
    written, output = bench_file(
        tmp_path,
        "experts.yaml",
        EXPERTS,
        ["--mode", "static_experts", "--capacity", "--capacity-steps", "1"],
    )
    assert written["jobs"] == 2
    split = written["modes"]["static_experts"]
    model = "wan2.2-i2v-a14b"
    assert split["allocation"] == {
        f"{stage}/{model}": {"a10": 1}
        for stage in ("dit-high", "dit-low", "encoder", "vae")
    }
    assert split["physics"] == "experts"
    assert split["completed"] > 0
    # both experts' pools denoised: each busy about half of what one DiT would be
    use = split["utilization"]
    assert set(use) == {"encoder", "dit-high", "dit-low", "vae"}
    assert use["dit-high"] > 0 and use["dit-low"] > 0
    assert split["gpu_use"]["a10"]["dit-high"] == pytest.approx(
        split["gpu_use"]["a10"]["dit-low"], rel=0.25
    )
    sweep = written["capacity"]["modes"]["static_experts"]
    assert len(sweep["repeats"][0]["probes"]) == 1
    assert "| static_experts |" in output
