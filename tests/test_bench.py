"""dflow bench: metrics math, physical bounds, the replica autoscaler's policy, and
a tiny emulated run of all four modes (figures emulated)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from dflow.bench.baselines import apportion
from dflow.bench.metrics import (
    Outcome,
    busy_fraction,
    metrics,
    per_phase,
    percentiles,
)
from dflow.bench.physics import best_allocation, bound, capacity, fluid_departures

DIT, ENC, VAE = ("dit", "m"), ("encoder", "m"), ("vae", "m")


def test_percentiles_interpolate_linearly():
    assert percentiles(list(range(1, 101)), [50, 95, 99]) == pytest.approx(
        [50.5, 95.05, 99.01]
    )
    assert percentiles([], [50]) == [None]


def test_metrics_count_window_slo_and_unfinished():
    outcomes = [
        Outcome(arrival=5, model="a", done=8),  # before the window
        Outcome(arrival=10, model="a", done=14),  # latency 4, meets 5
        Outcome(arrival=20, model="a", done=30),  # latency 10, misses
        Outcome(arrival=30, model="b", done=32),  # latency 2, meets 3
        Outcome(arrival=40, model="b", done=None),  # unfinished: 60 - 40
        Outcome(arrival=45, model="b", done=50, failed=True),  # failed: 60 - 45
    ]
    m = metrics(
        outcomes,
        window=(10, 50),
        stop=60,
        slo={"a": 5, "b": 3},
        bound_rps=0.1,
    )
    assert m["arrived"] == 5
    # completions in [10, 50): 14, 30, 32 (8 is before; 50 is the end)
    assert m["throughput_rps"] == pytest.approx(3 / 40)
    assert m["goodput_rps"] == pytest.approx(2 / 40)
    assert m["slo_attainment"] == pytest.approx(2 / 5)
    assert m["unfinished"] == 2
    assert m["p50_s"] == pytest.approx(10)  # of 4, 10, 2, 20, 15
    assert m["p99_s"] == pytest.approx(np.percentile([4, 10, 2, 20, 15], 99))
    assert m["bound_ratio"] == pytest.approx((3 / 40) / 0.1)


def test_per_phase_metrics_take_each_phase_requests_over_its_span():
    outcomes = [
        Outcome(arrival=5, model="a", done=7, phase="light"),  # before the window
        Outcome(arrival=12, model="a", done=14, phase="light"),  # latency 2
        Outcome(arrival=18, model="a", done=24, phase="light"),  # done in heavy's span
        Outcome(arrival=21, model="a", done=30, phase="heavy"),  # latency 9
        Outcome(arrival=25, model="a", done=None, phase="heavy"),  # 40 - 25
    ]
    result = per_phase(
        outcomes,
        spans={"light": (0, 20), "heavy": (20, 60)},
        window=(10, 35),
        stop=40,
        slo={"a": 5},
    )
    light, heavy = result["light"], result["heavy"]
    # light over [10, 20): one completion, latencies 2 and 6
    assert light["throughput_rps"] == pytest.approx(1 / 10)
    assert light["p50_s"] == pytest.approx(4)
    assert light["slo_attainment"] == pytest.approx(1 / 2)
    # heavy over [20, 35): one completion of its own, latencies 9 and 15
    assert heavy["throughput_rps"] == pytest.approx(1 / 15)
    assert heavy["p50_s"] == pytest.approx(12)
    assert heavy["slo_attainment"] == 0


def test_best_allocation_homogeneous():
    # seconds per request: the DiT 10, encoder 1, VAE 1 on one type
    work = {DIT: {"g": 10.0}, ENC: {"g": 1.0}, VAE: {"g": 1.0}}
    rate, allocation = best_allocation({"g": 8}, work, fill=False)
    # 6 DiT workers: 0.6/s; the encoder and VAE need one each
    assert rate == pytest.approx(0.6, rel=1e-6)
    assert allocation == {DIT: {"g": 6}, ENC: {"g": 1}, VAE: {"g": 1}}
    assert capacity(allocation, work) == pytest.approx(0.6)
    # a VAE of 2 s needs two workers past 0.5/s: 5 / 1 / 2 is best
    work[VAE] = {"g": 2.0}
    assert best_allocation({"g": 8}, work)[0] == pytest.approx(0.5)
    # too few workers for the pools: nothing can be served
    assert best_allocation({"g": 2}, work)[0] == 0.0


def test_best_allocation_uses_comparative_advantage():
    # fast type: 4x the DiT, 1.5x the encoder; slow type cannot hold the DiT
    work = {
        DIT: {"fast": 2.5, "slow": 10.0},
        ENC: {"fast": 2.0, "slow": 3.0},
    }
    rate, allocation = best_allocation({"fast": 2, "slow": 2}, work)
    # fast on the DiT (0.8/s), slow on the encoder (0.67/s): 0.67; the other
    # way round is far worse (0.2 + ... )
    assert allocation[DIT].get("fast") == 2
    assert allocation[ENC] == {"slow": 2}
    assert rate == pytest.approx(2 / 3)
    # a pool no type can hold makes the fleet unable to serve the mix
    unfit = {DIT: {"fast": math.inf, "slow": math.inf}, ENC: {"fast": 1.0}}
    assert best_allocation({"fast": 2, "slow": 2}, unfit)[0] == 0.0


def test_fill_gives_leftover_workers_to_the_tightest_pool():
    work = {DIT: {"g": 10.0}, ENC: {"g": 1.0}}
    # 10 DiT and 1 encoder make 1.0/s; past it the encoder needs a second
    # worker and the DiT an eleventh: the twelfth worker goes to the DiT
    rate, allocation = best_allocation({"g": 12}, work)
    assert allocation == {DIT: {"g": 11}, ENC: {"g": 1}}
    assert rate == pytest.approx(1.0)


def test_fluid_bound_saturated_and_light():
    # 2/s arrive for 100 s; capacity 1/s: 1/s done
    arrivals = list(np.arange(0, 100, 0.5))
    assert bound(arrivals, [(0, 100)], [1.0], (20, 100)) == pytest.approx(1.0, rel=0.02)
    # capacity 5/s: every arrival is done (2/s)
    assert bound(arrivals, [(0, 100)], [5.0], (20, 100)) == pytest.approx(2.0, rel=0.02)
    # a backlog from a phase of low capacity is served in the next
    departures = fluid_departures([0.0] * 10, [(0, 0.0), (5, 1.0)], 20)
    assert departures[5] == 0 and departures[15] == pytest.approx(10)


def test_busy_fraction_merges_overlapping_batches():
    intervals = {"w": [(0, 4), (2, 6), (8, 10)]}  # busy 8 of 10
    assert busy_fraction(intervals, {"w": 10}, (0, 10)) == pytest.approx(0.8)
    assert busy_fraction(intervals, {"w": 5}, (5, 10)) == pytest.approx(0.6)
    assert busy_fraction({}, {}, (0, 1)) is None


def test_apportion_fits_wanted_replicas_to_the_fleet():
    assert apportion({"a": 2, "b": 1}, 8, 1) == {"a": 2, "b": 1}
    assert apportion({"a": 30, "b": 10, "c": 1}, 8, 1) == {"a": 5, "b": 2, "c": 1}
    assert sum(apportion({"a": 7, "b": 7, "c": 7}, 8, 1).values()) == 8


def test_bench_cli_rejects_unknown_scenarios():
    from dflow.cli import dflow

    result = CliRunner().invoke(dflow, ["bench", "--scenario", "S9", "--out", "x"])
    assert result.exit_code != 0
    assert "unknown scenario" in result.output


FOUR = ("monolithic", "monolithic_autoscaled", "static", "elastic")


@pytest.mark.slow
def test_tiny_run_of_all_four_modes(tmp_path):
    """Steady Flux on four emulated 4090s, 400 emulated seconds at 1/100 of
    real time: every mode's metrics, the bounds and the plots come out."""
    from dflow.bench.report import quiet, run_scenario
    from dflow.bench.scenarios import Scenario
    from dflow.bench.workload import Arrivals, Phase, Template, Workload

    scenario = Scenario(
        name="tiny",
        title="tiny",
        fleet={"rtx4090": 4},
        workload=Workload(
            [Phase(0, Arrivals("poisson", rate=0.1), [Template("flux.1-dev")])],
            seed=0,
        ),
        duration=400,
        warmup=50,
        drain=100,
        time_scale=0.01,
        goals="",
        modes=FOUR,
    )
    with quiet():
        results = run_scenario(scenario, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["scenario"] == "tiny"
    assert set(written["modes"]) == set(FOUR)
    physics = written["physics"]
    # 2 DiT workers at 25.3 s against 4 offloading replicas at 48.6 s
    assert physics["best_static_disaggregated"]["dit/flux.1-dev"] == {"rtx4090": 2}
    assert physics["physics_ratio"] == pytest.approx(
        (2 / 25.31) / (4 / 48.59), rel=0.05
    )
    for mode in FOUR:
        m = written["modes"][mode]
        for key in (
            "throughput_rps",
            "goodput_rps",
            "p50_s",
            "p95_s",
            "p99_s",
            "slo_attainment",
            "bound_ratio",
            "utilization",
        ):
            assert key in m, (mode, key)
        assert m["completed"] > 0
        assert 0 < m["bound_ratio"] < 1.2
    assert set(written["modes"]["static"]["utilization"]) == {"encoder", "dit", "vae"}
    assert set(written["modes"]["monolithic"]["utilization"]) == {"all"}
    assert results["ratios"]["physics_ratio"] == physics["physics_ratio"]
    assert (tmp_path / "load.png").stat().st_size > 0
    assert (tmp_path / "pools.png").stat().st_size > 0


@pytest.mark.slow
def test_ablation_and_disagfusion_modes(tmp_path):
    """A Flux-heavy phase, then a PixArt-heavy one, on eight emulated 4090s at
    1/50 of real time: DisagFusion's thresholds move stage workers, and the
    controller's prediction-only and feedback-only ablations serve the trace."""
    from dflow.bench.report import quiet, run_scenario
    from dflow.bench.scenarios import Scenario
    from dflow.bench.workload import Arrivals, Phase, Template, Workload

    modes = ("disagfusion", "prediction_only", "feedback_only")
    flux, pixart = "flux.1-dev", "pixart-sigma-1024"
    scenario = Scenario(
        name="tiny-shift",
        title="tiny shift",
        fleet={"rtx4090": 8},
        workload=Workload(
            [
                Phase(
                    0,
                    Arrivals("poisson", rate=0.15),
                    [Template(flux, weight=0.9), Template(pixart, weight=0.1)],
                ),
                Phase(
                    300,
                    Arrivals("poisson", rate=1.0),
                    [Template(flux, weight=0.1), Template(pixart, weight=0.9)],
                ),
            ],
            seed=0,
        ),
        duration=600,
        warmup=50,
        drain=150,
        time_scale=0.02,
        goals="",
        modes=modes,
    )
    with quiet():
        run_scenario(scenario, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert set(written["modes"]) == set(modes)
    for mode in modes:
        assert written["modes"][mode]["completed"] > 0, mode
    moves = written["modes"]["disagfusion"]["decision_log"]
    assert moves, "DisagFusion's thresholds moved no worker"
    for move in moves:
        assert move["source"].split(":")[0] in ("encoder", "dit", "vae"), move
        assert move["target"].split(":")[0] in ("encoder", "dit", "vae"), move
    for mode in ("prediction_only", "feedback_only"):
        assert written["modes"][mode]["controller_cpu_ms"]["p50"] is not None, mode


def test_s2_offers_twice_what_the_static_partition_sustains():
    """S2's rates (quoted in ``configs/scenarios/S2.yaml``) follow from the
    bounds: every phase at the same share of its best disaggregated
    allocation, and the phase that saturates (a), the best static monolithic
    split for the run's average mix, offered 2.0x what (a) sustains there."""
    import dask.config

    from dflow.bench.physics import physics
    from dflow.bench.scenarios import get

    with dask.config.set({"dflow.runtime.backend": "emulated"}):
        from dflow.emulation import cost_model

        cost = cost_model()
    scenario = get("S2")
    p = physics(scenario, cost)
    rates = [phase.arrivals.rate for phase in scenario.workload.phases]
    assert rates[:3] == [0.549, 1.976, 0.300]
    shares = [r / c for r, c in zip(rates, p.capacity["disaggregated"])]
    assert max(shares) == pytest.approx(min(shares), rel=0.01)
    static = p.static_capacity["monolithic"]
    assert max(r / c for r, c in zip(rates, static)) == pytest.approx(2.0, rel=0.01)
    # 12 Flux, 4 PixArt and 8 Wan replicas
    assert {m: a["rtx4090"] for (_, m), a in p.allocation["monolithic"].items()} == {
        "flux.1-dev": 12,
        "pixart-sigma-1024": 4,
        "wan2.1-t2v-1.3b": 8,
    }
