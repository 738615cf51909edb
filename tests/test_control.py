"""The elastic controller's pipeline without a scheduler: observations priced and
planned by pure functions (:mod:`dflow.plugins.pricing`), pools as one value
(:mod:`dflow.pools`), and the ``scale-pools`` actuator's sizing. The
``switch-roles`` actuator, which needs workers, is tested with the scheduler's
handlers on emulated workers at the end."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import dask.config
from distributed.utils_test import gen_cluster

import dflow
from dflow.planner import Demand, Move, Plan
from dflow.plugins.actuators import ClusterScaler
from dflow.plugins.pricing import (
    DUE_GROUPS,
    Memory,
    Observation,
    PlannerRecords,
    PoolView,
    Settings,
    WorkerView,
    barring,
    demands,
    due_groups,
    dwelling,
    forecast_rate,
    plan_pools,
    planned,
    planner_worker,
    planner_workers,
    pool_targets,
    price,
    price_pools,
    rate_since_change,
    target_sizes,
    timing,
    trend,
)
from dflow.pools import Pool, stage_resources, task_pool, task_resources
from dflow.predictor import Prediction
from dflow.request import Request
from dflow.testing import wait_for_pools
from dflow.worker import StagePlugin

MODEL = "m"
ENC, DIT, VAE = Pool("encoder", MODEL), Pool("dit", MODEL), Pool("vae", MODEL)
SETTINGS = Settings(
    horizon=30.0,
    cooldown=60.0,
    dwell=2.0,
    default_switch=10.0,
    window=30.0,
    target_utilization=0.8,
)
DIT_HEAVY = {"steps": 50, "height": 1024, "width": 1024}


class StageCosts:
    """A predictor of fixed shape: seconds per stage and GPU type, the DiT's per
    step; ``peak`` bytes of every call."""

    def __init__(self, covers: tuple[str, ...] = ("encoder", "dit", "vae")):
        self.covers = covers
        self.base = {"encoder": 0.04, "dit": 0.04, "vae": 0.08}
        self.speed = {"h200": 1.0, "l4": 0.25}

    def predict(
        self, model: str, stage: str, gpu_type: str, features: dict[str, Any]
    ) -> Prediction:
        if stage not in self.covers or gpu_type not in self.speed:
            raise LookupError(f"no profile of {stage} on {gpu_type}")
        seconds = self.base[stage] * (features["steps"] if stage == "dit" else 1)
        return Prediction(seconds / self.speed[gpu_type], 2**30)


def worker(name: str, pool: Pool | None, **fields: Any) -> WorkerView:
    return WorkerView(
        address=f"tcp://{name}",
        name=name,
        state=fields.pop("state", "ready"),
        pool=pool,
        gpu_type=fields.pop("gpu_type", "h200"),
        memory=fields.pop("memory", 2**34),
        **fields,
    )


def fleet(*pools: Pool, **views: PoolView) -> Observation:
    return Observation(
        now=1000.0,
        workers=tuple(worker(f"w{i}", p) for i, p in enumerate(pools)),
        pools={Pool.parse(k.replace("_", ":")): v for k, v in views.items()},
    )


# -- pools ----------------------------------------------------------------------------


def test_a_pool_has_one_string_form():
    pool = Pool("dit", "tiny-flux")
    assert str(pool) == pool.resource == "dit:tiny-flux"
    assert Pool.parse("dit:tiny-flux") == pool
    stage, model = pool
    assert (stage, model) == ("dit", "tiny-flux")
    assert sorted([VAE, DIT, ENC]) == [DIT, ENC, VAE]
    assert {pool: 1}[Pool.parse(str(pool))] == 1
    assert stage_resources(pool, 8) == {"dit": 8, "dit:tiny-flux": 8}
    assert task_resources(pool) == {"dit": 1, "dit:tiny-flux": 1}
    assert task_pool({"dflow": {"stage": "dit", "model": "tiny-flux"}}) == pool
    assert task_pool({"other": 1}) is None
    for text in ("dit/tiny-flux", "dit:", "gpu:tiny-flux", "tiny-flux"):
        with pytest.raises(ValueError, match="'stage:model'"):
            Pool.parse(text)


# -- workers ---------------------------------------------------------------------------


def test_planner_workers_keep_settling_workers_in_place():
    observation = Observation(
        now=1000.0,
        workers=(
            worker("ready", DIT),
            worker("loading", DIT, state="loading"),
            worker("moving", ENC, moving_to=DIT, busy=True),
            worker("failed", VAE, state="failed"),
        ),
        pools={},
    )
    workers = {w.name: w for w in planner_workers(observation, {"tcp://ready": 900})}
    assert workers["tcp://ready"].last_move == 900
    assert workers["tcp://loading"].last_move == 1000
    # a worker on its way counts in the pool it goes to, and stays put meanwhile
    assert workers["tcp://moving"].pool == DIT
    assert workers["tcp://moving"].last_move == 1000 and workers["tcp://moving"].busy
    assert workers["tcp://failed"].pool is None


def test_timing_dwelling_and_barring():
    prices = {
        DIT: price(
            DIT,
            PoolView(newest=DIT_HEAVY),
            "h200",
            ["h200", "l4"],
            StageCosts(),
            {},
            10.0,
        )
    }
    assert prices[DIT].seconds == pytest.approx(2.0)
    (busy,) = planner_workers(
        Observation(1000.0, (worker("a", DIT, busy=True, running_s=0.5),), {}), {}
    )
    # the running task has 1.5 of its 2 s left
    assert timing(
        busy, worker("a", DIT, busy=True, running_s=0.5), prices, {}, 1000.0
    ).drain_seconds == pytest.approx(1.5)
    # a whole task when none runs yet (placed, not started)
    assert timing(
        busy, worker("a", DIT, busy=True), prices, {}, 1000.0
    ).drain_seconds == pytest.approx(2.0)
    # a moving worker serves once its drain and load are done
    moving = worker("a", ENC, moving_to=DIT)
    (planned,) = planner_workers(Observation(1000.0, (moving,), {}), {})
    assert timing(planned, moving, prices, {"tcp://a": 1007.0}, 1000.0).ready_in == 7.0

    # a moved worker stays dwell x 2 s = 4 s: below the 60 s cooldown, unchanged
    moved = dataclasses.replace(busy, last_move=990.0)
    assert dwelling(moved, prices, SETTINGS).last_move == 990.0
    # on an L4 (4x slower) a 200-step request takes 32 s: dwell 64 s > 60 s
    slow = {
        DIT: price(
            DIT,
            PoolView(newest={**DIT_HEAVY, "steps": 200}),
            "h200",
            ["l4"],
            StageCosts(),
            {},
            10.0,
        )
    }
    on_l4 = dataclasses.replace(moved, gpu_type="l4")
    assert dwelling(on_l4, slow, SETTINGS).last_move == pytest.approx(994.0)

    # the encoder gave the DiT a worker that is not serving yet: the DiT's
    # other workers may not go back to the encoder until then
    flows = {(ENC, DIT): 1005.0}
    assert barring(busy, flows, 1000.0).barred == frozenset({ENC})
    assert barring(busy, flows, 1006.0).barred == frozenset()


def test_kept_planner_records_are_those_built_anew():
    """Step after step, the records kept between steps equal the ones built
    from scratch, whatever changed (time, a view, a move, a price, a barring
    flow, the settings, a worker gone); a worker nothing changed for keeps
    its very record."""

    def dit_price(steps: int) -> dict[Pool, Any]:
        view = PoolView(newest={**DIT_HEAVY, "steps": steps})
        return {DIT: price(DIT, view, "h200", ["h200"], StageCosts(), {}, 10.0)}

    views = {
        "a": worker("a", DIT),
        "b": worker("b", DIT, busy=True, running_s=0.5),
        "c": worker("c", ENC, state="loading"),
        "d": worker("d", ENC, moving_to=DIT),
        "e": worker("e", VAE, state="failed"),
        "f": worker("f", ENC),
    }
    records = PlannerRecords()
    last: dict[str, Any] = {}

    def step(now, prices, memory, settings=SETTINGS, **changed):
        fleet = {**views, **changed}
        observation = Observation(now, tuple(v for v in fleet.values() if v), {})
        kept = records(observation, prices, memory, settings)
        assert kept == [
            planned(v, prices, memory, settings, now) for v in observation.workers
        ]
        # made in one go, as the pipeline's steps make it one after another
        assert kept == [
            barring(
                timing(
                    dwelling(planner_worker(v, now, memory.moved), prices, settings),
                    v,
                    prices,
                    memory.ready_at,
                    now,
                ),
                memory.flows,
                now,
            )
            for v in observation.workers
        ]
        same = {w.name[6:] for w in kept if last.get(w.name) is w}
        last.clear()
        last.update((w.name, w) for w in kept)
        return same

    memory = Memory(ready_at={"tcp://d": 1007.0})
    step(1000.0, dit_price(50), memory)
    assert step(1000.0, dit_price(50), memory) == set("abcdef")
    # time: the settling workers (a failed one too) get new records
    assert step(1001.0, dit_price(50), memory) == set("abf")
    # the busy worker's task ran on
    later = worker("b", DIT, busy=True, running_s=1.5)
    assert step(1001.0, dit_price(50), memory, b=later) == set("acdef")
    # a move remembered
    moved = Memory(moved={"tcp://f": 950.0}, ready_at=memory.ready_at)
    assert step(1001.0, dit_price(50), moved, b=later) == set("abcde")
    # the DiT's price: its workers' drains and dwells
    assert step(1001.0, dit_price(200), moved, b=later) == set("cef")
    # a flow bars the DiT's workers from the encoder, till it settles
    flows = dataclasses.replace(moved, flows={(ENC, DIT): 1001.5})
    assert step(1001.0, dit_price(200), flows, b=later) == set("cef")
    assert step(1002.0, dit_price(200), flows, b=later) == {"f"}
    # new settings rebuild every record; a worker gone is forgotten
    wider = dataclasses.replace(SETTINGS, dwell=100.0)
    step(1002.0, dit_price(200), flows, wider, b=later, e=None)
    assert "tcp://e" not in records._kept


# -- pricing ---------------------------------------------------------------------------


def test_a_pool_is_priced_by_the_work_it_owes():
    costs = StageCosts()
    view = PoolView(
        owed=3, newest=DIT_HEAVY, recent={**DIT_HEAVY, "steps": 1}, observed_s=9.0
    )
    priced = price(DIT, view, "h200", ["h200", "l4"], costs, {(DIT, "l4"): 4.0}, 10.0)
    # the newest owed task's features, not the last finished one's nor the average
    assert priced.seconds == pytest.approx(2.0)
    assert priced.cost.speeds == {"h200": 1.0, "l4": pytest.approx(0.25)}
    assert priced.cost.memory_bytes == 2**30
    # measured load time where known, else the slowest known, else the default
    assert priced.cost.switch_seconds == {"h200": 4.0, "l4": 4.0}
    assert price(DIT, view, "h200", ["h200"], costs, {}, 10.0).cost.switch_seconds == {
        "h200": 10.0
    }
    # nothing owed: the last finished task's features
    idle = PoolView(recent={**DIT_HEAVY, "steps": 1}, observed_s=9.0)
    assert price(DIT, idle, "h200", ["h200"], costs, {}, 10.0).seconds == pytest.approx(
        0.04
    )
    # no profile covers the pool: the observed average, speeds unknown (1)
    uncovered = StageCosts(covers=("encoder", "vae"))
    priced = price(DIT, view, "h200", ["h200", "l4"], uncovered, {}, 10.0)
    assert priced.seconds == 9.0 and priced.cost.speeds == {"h200": 1.0, "l4": 1.0}
    assert price(DIT, view, "h200", ["h200"], None, {}, 10.0).seconds == 9.0
    # neither: unknown, 0
    assert (
        price(
            DIT, PoolView(owed=3, newest=DIT_HEAVY), "h200", ["h200"], None, {}, 10.0
        ).seconds
        == 0.0
    )


def test_pricing_modes_of_the_ablation():
    """hybrid: the profile, observed times where none covers; prediction: the
    profile alone; feedback: observed times alone."""
    costs = StageCosts(covers=("dit",))
    views = {
        DIT: PoolView(owed=1, newest=DIT_HEAVY, observed_s=9.0),
        VAE: PoolView(owed=1, newest=DIT_HEAVY, observed_s=0.5),
    }
    observation = Observation(time.time(), (), views)

    def seconds(pricing: str) -> dict[Pool, float]:
        settings = dataclasses.replace(SETTINGS, pricing=pricing)
        prices = price_pools(observation, [DIT, VAE], "h200", ["h200"], costs, settings)
        return {pool: p.seconds for pool, p in prices.items()}

    assert seconds("hybrid") == {DIT: pytest.approx(2.0), VAE: 0.5}
    assert seconds("prediction") == {DIT: pytest.approx(2.0), VAE: 0.0}
    assert seconds("feedback") == {DIT: 9.0, VAE: 0.5}
    with (
        dask.config.set({"dflow.elastic.pricing": "oracle"}),
        pytest.raises(ValueError, match=r"dflow\.elastic\.pricing must be one of"),
    ):
        Settings.from_config()


def poisson_ages(*phases: tuple[float, float], seed: int = 0) -> tuple[float, ...]:
    """Seconds since each arrival of Poisson phases ``(rate, seconds)``, the
    oldest phase first; youngest first."""
    rng = np.random.default_rng(seed)
    times, start = [], 0.0
    for rate, seconds in phases:
        count = rng.poisson(rate * seconds)
        times += sorted(start + rng.uniform(0, seconds, count))
        start += seconds
    return tuple(sorted(start - t for t in times))


def test_forecast_takes_the_rate_since_a_change_point():
    settings = dataclasses.replace(SETTINGS, window=10.0, horizon=60.0)
    # a steady load: no change point in any of 20 draws, the whole span's rate
    for seed in range(20):
        ages = poisson_ages((1.2, 60.0), seed=seed)
        assert forecast_rate(PoolView(arrivals=ages), settings) == pytest.approx(
            len(ages) / 60.0
        )
    # a shift from 0.5 to 3 per second 9 s ago: the rate since it, at once
    shifted = poisson_ages((0.5, 51.0), (3.0, 9.0))
    assert forecast_rate(PoolView(arrivals=shifted), settings) == pytest.approx(
        3.0, rel=0.35
    )
    # and back down: a backlog's phase ended 15 s ago
    dropped = poisson_ages((3.0, 45.0), (0.3, 15.0))
    assert forecast_rate(PoolView(arrivals=dropped), settings) < 0.8
    # a phase that ended 4 s ago, younger than the grid's youngest split (6 s
    # of a 120 s span): seen at once, while a steady load of that rate stays whole
    settings = dataclasses.replace(SETTINGS, window=30.0, horizon=120.0)
    ended = poisson_ages((3.0, 116.0), (0.0, 4.0))
    assert forecast_rate(PoolView(arrivals=ended), settings) == 0.0
    for seed in range(20):
        ages = poisson_ages((3.0, 120.0), seed=seed)
        assert forecast_rate(PoolView(arrivals=ages), settings) == pytest.approx(
            len(ages) / 120.0
        )
    # a busy phase that began 45 s ago and ended 4 s ago, after a quiet one:
    # the latest change is its end, not its start
    burst = poisson_ages((0.2, 71.0), (3.0, 45.0), (0.05, 4.0))
    assert forecast_rate(PoolView(arrivals=burst), settings) < 0.5
    assert rate_since_change(burst, 120.0, 5.0) < 0.5
    # while one that goes on is held
    going = poisson_ages((0.2, 75.0), (3.0, 45.0))
    assert forecast_rate(PoolView(arrivals=going), settings) == pytest.approx(
        3.0, rel=0.25
    )
    # a steady load of clients' batches (1 to 4 requests at once): the tests
    # count instants, so the batches split no span
    rng = np.random.default_rng(0)
    for seed in range(20):
        instants = poisson_ages((1.0, 120.0), seed=seed)
        batched = tuple(
            sorted(a + 0.001 * i for a in instants for i in range(rng.integers(1, 5)))
        )
        assert forecast_rate(PoolView(arrivals=batched), settings) == pytest.approx(
            len(batched) / 120.0
        )
    # nothing arrived
    assert forecast_rate(PoolView(), settings) == 0.0
    assert rate_since_change((1.0, 2.0), 0.0, 1.0) == 0.0


def ramp_ages(start: float, end: float, seconds: float, seed: int) -> tuple[float, ...]:
    """Seconds since each arrival of a Poisson rate rising along a line from
    ``start`` to ``end`` per second over ``seconds`` (thinned); youngest first."""
    rng = np.random.default_rng(seed)
    top = max(start, end)
    times = rng.uniform(0, seconds, rng.poisson(top * seconds))
    kept = times[
        rng.uniform(0, top, len(times)) < start + (end - start) * times / seconds
    ]
    return tuple(sorted(seconds - kept))


def test_forecast_follows_a_ramp():
    """A rate rising from 0.5 to 8 per second over the last 30 s averages 11.75
    over the next 30: the trend forecasts closer to that than the rate since
    a change point in most draws and farther in none; a steady load has no
    trend (the draws of the test above)."""
    settings = dataclasses.replace(SETTINGS, window=30.0, horizon=30.0)
    truth = 8.0 + 7.5 / 2
    closer = 0
    for seed in range(40):
        ages = ramp_ages(0.5, 8.0, 30.0, seed)
        forecast = forecast_rate(PoolView(arrivals=ages), settings)
        since = rate_since_change(ages, 30.0, 5.0)
        assert abs(forecast - truth) <= abs(since - truth) + 1e-9
        closer += abs(forecast - truth) < abs(since - truth)
    assert closer >= 15
    assert trend((), 30.0) == (0.0, 0.0, 0.0)


#: one arrival every 2 s over the last 30 s (0.5 per second)
STEADY_HALF = tuple(2.0 * i + 1.0 for i in range(15))


def test_demand_and_targets():
    view = PoolView(owed=4, rate=0.5, arrivals=STEADY_HALF, newest=DIT_HEAVY)
    observation = fleet(DIT, dit_m=view)
    prices = {DIT: price(DIT, view, "h200", ["h200"], StageCosts(), {}, 10.0)}
    (demand,) = demands(observation, prices, SETTINGS).values()
    assert demand.rate == pytest.approx(1.0) and demand.backlog == pytest.approx(8.0)
    # (1 x 30 + 8) / (30 x 0.5) = 2.53: three workers; no load: none
    assert pool_targets({DIT: demand}, 30.0, 0.5) == {DIT: 3}
    assert pool_targets({DIT: Demand(0.0, 0.0)}, 30.0, 0.5) == {DIT: 0}


def test_a_backlog_is_priced_by_its_own_tasks():
    """Arrivals have turned light (10 steps) while 3 heavy tasks (50 steps) are
    still owed: the arrivals are priced as the newest task, the backlog task
    by task."""
    light = {**DIT_HEAVY, "steps": 10}
    view = PoolView(
        owed=4,
        newest=light,
        shapes=((DIT_HEAVY, 3), (light, 1)),
        arrivals=STEADY_HALF,
    )
    (demand,) = demands(
        fleet(DIT, dit_m=view),
        {DIT: price(DIT, view, "h200", ["h200"], StageCosts(), {}, 10.0)},
        SETTINGS,
    ).values()
    assert demand.rate == pytest.approx(0.5 * 0.4)
    assert demand.backlog == pytest.approx(3 * 2.0 + 0.4)


def test_demand_carries_each_stages_deadlines():
    """An owed DiT task must finish by its request's deadline less the VAE's
    seconds; an arriving request has its SLO less its other stages' seconds
    for its DiT. Pools without deadlines are not counted."""
    views = {
        DIT: PoolView(
            owed=3,
            newest=DIT_HEAVY,
            arrivals=STEADY_HALF,
            due=(10.0, -1.0, 5.0),
            slo=20.0,
        ),
        ENC: PoolView(newest=DIT_HEAVY),
        VAE: PoolView(newest=DIT_HEAVY, slo=20.0),
    }
    observation = Observation(1000.0, (), views)
    prices = price_pools(
        observation, [ENC, DIT, VAE], "h200", ["h200"], StageCosts(), SETTINGS
    )
    result = demands(observation, prices, SETTINGS)
    dit = result[DIT]
    assert dit.task_seconds == pytest.approx(2.0)
    # the late task in a group of its own, then the rest earliest first
    assert [x for group in dit.due for x in group] == pytest.approx(
        [-1.08, 1, 4.92, 1, 9.92, 1]
    )
    assert dit.slo == pytest.approx(20.0 - 0.04 - 0.08)
    assert result[VAE].slo == pytest.approx(20.0 - 0.04 - 2.0)
    assert result[VAE].task_seconds == pytest.approx(0.08)
    assert result[ENC].task_seconds == 0.0 and result[ENC].slo == math.inf
    # many owed tasks: at most DUE_GROUPS groups, every task counted once
    groups = due_groups([float(i) for i in range(-5, 95)])
    assert len(groups) <= DUE_GROUPS and sum(n for _, n in groups) == 100
    assert groups[0] == (-5.0, 6.0)  # -5 .. 0: late


# -- planning --------------------------------------------------------------------------


def test_a_dit_heavy_backlog_moves_an_encoder_worker_to_the_dit():
    observation = fleet(
        ENC,
        ENC,
        DIT,
        VAE,
        encoder_m=PoolView(owed=1, newest=DIT_HEAVY),
        dit_m=PoolView(owed=20, newest=DIT_HEAVY),
        vae_m=PoolView(owed=20, newest=DIT_HEAVY),
    )
    step = plan_pools(observation, StageCosts(), Memory(), SETTINGS)
    assert step.plan is not None
    assert [(m.source, m.target) for m in step.plan.moves] == [(ENC, DIT)]
    assert "dit of m utilization" in step.plan.moves[0].reason
    assert step.summary["bottleneck"] == ["dit", MODEL]
    assert set(step.summary["utilization"]) == {"encoder:m", "dit:m", "vae:m"}
    # a step later the mover is on its way: it counts in the DiT, and the
    # encoder's last worker stays
    (move,) = step.plan.moves
    moving = dataclasses.replace(
        observation,
        workers=tuple(
            dataclasses.replace(w, moving_to=DIT) if w.address == move.worker else w
            for w in observation.workers
        ),
    )
    memory = Memory(
        moved={move.worker: 1000.0},
        ready_at={move.worker: 1010.0},
        flows={(ENC, DIT): 1010.0},
    )
    after = plan_pools(moving, StageCosts(), memory, SETTINGS).plan
    assert after is not None and after.moves == []
    # a growing cluster would give the DiT 20 x 2 s / (30 s x 0.8): two workers
    assert target_sizes(observation, StageCosts(), SETTINGS)[DIT] == 2


def test_a_pool_not_priced_yet_keeps_its_workers():
    """Until its first task finishes, a pool no profile covers has no price: its
    demand is unknown, not zero. Long denoises behind fast encodes (the encoder
    priced, the DiT not yet) must not send DiT workers to the encoder; once the
    DiT is priced, its backlog keeps them."""
    views = {
        "encoder_m": PoolView(owed=8, newest=DIT_HEAVY),
        "dit_m": PoolView(owed=8, newest=DIT_HEAVY),
        "vae_m": PoolView(owed=8, newest=DIT_HEAVY),
    }
    costs = StageCosts(covers=("encoder", "vae"))
    step = plan_pools(fleet(ENC, DIT, DIT, VAE, **views), costs, Memory(), SETTINGS)
    assert step.plan is None
    assert step.summary["reason"] == (
        "no move: waiting for a first service time of dit of m"
    )
    views["dit_m"] = PoolView(owed=8, newest=DIT_HEAVY, observed_s=1.5)
    step = plan_pools(fleet(ENC, DIT, DIT, VAE, **views), costs, Memory(), SETTINGS)
    assert step.plan is not None and step.plan.moves == []


def test_unserved_pools_enter_the_plan_only_with_work():
    quiet = fleet(ENC, DIT, VAE, all_m=PoolView(), encoder_x=PoolView())
    assert set(
        plan_pools(quiet, StageCosts(), Memory(), SETTINGS).summary["utilization"]
    ) == {"encoder:m", "dit:m", "vae:m"}
    # tasks wait for a pool of another model nobody serves
    busy = fleet(ENC, DIT, VAE, encoder_x=PoolView(waiting=2, newest=DIT_HEAVY))
    assert (
        "encoder:x"
        in plan_pools(busy, StageCosts(), Memory(), SETTINGS).summary["utilization"]
    )


# -- the scale-pools actuator ----------------------------------------------------------


def test_cluster_scaler_grows_at_once_and_shrinks_after_its_wait():
    scaler = ClusterScaler(minimum=1, maximum=3, wait=3600.0)
    assert scaler.act(None, {DIT: 2, ENC: 0, Pool("all", MODEL): 4}) == []
    assert scaler.sizes == {DIT: 2, ENC: 1}  # at least the minimum; no monolithic
    scaler.act(None, {DIT: 5, ENC: 0})
    assert scaler.sizes[DIT] == 3  # at most the maximum
    scaler.act(None, {DIT: 1, ENC: 0})
    assert scaler.sizes[DIT] == 3  # the largest target of the last hour
    eager = ClusterScaler(minimum=0, maximum=None, wait=0.0)
    eager.act(None, {DIT: 4})
    time.sleep(0.01)
    eager.act(None, {DIT: 0})
    assert eager.sizes == {DIT: 0}


# -- the switch-roles actuator and the controller's handlers, on emulated workers ------


EMULATED = "pixart-sigma-1024"
CONFIG = {
    "dflow.elastic.enabled": False,
    "dflow.runtime.backend": "emulated",
    "dflow.emulation.time-scale": 0.1,
    "dflow.emulation.load-bandwidth": "1000GiB",
}


def emulated_workers(*stages: str) -> list[tuple[str, int, dict]]:
    return [
        ("127.0.0.1", 1, {"plugins": {StagePlugin(stage, EMULATED, "h200")}})
        for stage in stages
    ]


async def until(condition: Callable[[], Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@gen_cluster(
    client=True,
    nthreads=emulated_workers("encoder", "encoder", "dit", "vae"),
    scheduler_kwargs={"preload": ["dflow.preload"]},
    config=CONFIG,
    timeout=180,
)
async def test_role_switcher_moves_workers_and_the_pools_follow(
    c, s, *workers, keep_dflow_config
):
    await asyncio.to_thread(
        wait_for_pools, c, {EMULATED: ["encoder", "encoder", "dit", "vae"]}
    )
    extension, controller = s.extensions["dflow"], s.plugins["dflow-elastic"]
    await until(lambda: controller.predictions.predictor is not None)
    spare = workers[1]
    assert await c.scheduler.dflow_elastic() == {
        "enabled": False,
        "actuator": "switch-roles",
        "switching": {},
    }

    # a dry run plans without moving anyone
    request = Request(model=EMULATED, prompt="a fox", steps=200)
    futures = await asyncio.to_thread(
        dflow.map, c, [request.replace(seed=i) for i in range(12)]
    )
    await until(lambda: len(extension.in_flight()) == 12)
    dry = await c.scheduler.dflow_plan()
    assert {
        "source": f"encoder:{EMULATED}",
        "target": f"dit:{EMULATED}",
    }.items() <= dry["moves"][0].items()
    assert not extension.decisions and not controller.actuator.switching
    assert list(dry["bottleneck"]) == ["dit", EMULATED]
    targets = await c.scheduler.dflow_pool_targets(utilization=0.5)
    assert targets[f"dit:{EMULATED}"] >= 2
    await c.cancel(futures)
    await until(lambda: not extension.in_flight() and not s.tasks)

    # the actuator applies a plan's moves; the pools and the resources follow
    plan = Plan(
        moves=[
            Move(
                spare.address, Pool("encoder", EMULATED), Pool("dit", EMULATED), "test"
            )
        ],
        assignment={},
        utilization={},
        bottleneck=None,
        feasible=True,
        reason="test",
    )
    moves = controller.actuator.act(plan, {})
    assert [m.worker for m in moves] == [spare.address]
    assert controller.actuator.switching == {spare.address: Pool("dit", EMULATED)}
    await until(
        lambda: (
            extension.workers[spare.address].pool == ("dit", EMULATED)
            and extension.workers[spare.address].state == "ready"
            and not controller.actuator.switching
        )
    )
    assert s.workers[spare.address].resources[f"dit:{EMULATED}"] == 1
    assert not s.workers[spare.address].resources.get(f"encoder:{EMULATED}")
    members = await c.scheduler.dflow_pool_members()
    assert sorted(members[f"dit:{EMULATED}"]) == sorted(
        str(w.name) for w in (workers[1], workers[2])
    )
    pools = await c.scheduler.dflow_pools()
    assert pools[EMULATED]["dit"] == {"ready": 2, "loading": 0, "slots": 2}
    events = [e for _, e in s.get_events("dflow") if e["address"] == spare.address]
    assert [e["action"] for e in events][-3:] == [
        "worker-draining",
        "worker-loading",
        "worker-ready",
    ]
    assert events[-1]["pool"] == f"dit:{EMULATED}"
    assert events[-1]["previous"] == f"dit:{EMULATED}"
    # it kept the encoder's weights in host memory, and loaded the DiT's
    record = extension.workers[spare.address]
    assert record.parked == (f"encoder:{EMULATED}",) and not record.resumed

    # an operator's move goes through a handler and is a decision
    await c.scheduler.dflow_move(
        worker=str(spare.name), pool=f"encoder:{EMULATED}", reason="operator: back"
    )
    await until(
        lambda: (
            extension.workers[spare.address].pool == ("encoder", EMULATED)
            and extension.workers[spare.address].state == "ready"
        )
    )
    # back to the encoder: the parked weights resume, and the controller
    # prices the next such switch by that resume
    record = extension.workers[spare.address]
    assert record.resumed and record.parked == (f"dit:{EMULATED}",)
    gpu_type = record.gpu_type
    assert controller.resume_seconds[Pool("encoder", EMULATED), gpu_type] == (
        record.load_seconds
    )
    assert (
        record.load_seconds < controller.load_seconds[Pool("dit", EMULATED), gpu_type]
    )
    (decision,) = await c.scheduler.dflow_decisions()
    assert decision["worker"] == str(spare.name)
    assert list(decision["source"]) == ["dit", EMULATED]
    assert list(decision["target"]) == ["encoder", EMULATED]
    assert extension.decision_counts["dit", "encoder"] == 1

    # under scale-pools nobody switches roles
    settings = await c.scheduler.dflow_elastic(actuator="scale-pools", minimum=1)
    assert settings["actuator"] == "scale-pools"
    with pytest.raises(ValueError, match="needs the switch-roles actuator"):
        await c.scheduler.dflow_move(worker=spare.address, pool=f"dit:{EMULATED}")
    await c.scheduler.dflow_elastic(actuator="switch-roles")


@gen_cluster(
    client=True,
    nthreads=[],
    scheduler_kwargs={"preload": ["dflow.preload"]},
    config={"dflow.elastic.actuator": "scale-pools", "dflow.elastic.enabled": False},
    timeout=60,
)
async def test_the_actuator_is_chosen_by_config(c, s, keep_dflow_config):
    settings = await c.scheduler.dflow_elastic()
    assert settings["actuator"] == "scale-pools"
    assert await c.scheduler.dflow_pool_sizes() == {}
    with pytest.raises(ValueError, match="needs the switch-roles actuator"):
        await c.scheduler.dflow_move(worker="any", pool=f"dit:{EMULATED}")
    # one step sizes every pool to at least its minimum
    scaler = s.plugins["dflow-elastic"].actuator
    scaler.act(None, {Pool("dit", EMULATED): 0})
    assert await c.scheduler.dflow_pool_sizes() == {f"dit:{EMULATED}": 1}
