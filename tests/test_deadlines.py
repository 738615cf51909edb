"""Deadlines: each pool serves earliest deadline first, requests past saving
last (:mod:`dflow.plugins.deadlines`), on a real in-process cluster of emulated
PixArt-Sigma-1024 workers (one per stage: a DiT call of 50 steps takes 1.8
emulated seconds, 0.9 s of wall time at the scale below, long
enough for a request's encode to reach the DiT during one on a busy host)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import dask.config
from distributed import Client

import dflow.client
from dflow import testing
from dflow.plugins.deadlines import PAST_SAVING, SAVABLE, priority
from dflow.request import Request

MODEL = "pixart-sigma-1024"
SCALE = 0.5
CONFIG = {
    "dflow.elastic.enabled": False,
    "dflow.runtime.backend": "emulated",
    "dflow.emulation.time-scale": SCALE,
    "dflow.client.model-timeout": "120s",
    "dflow.scheduler.check-interval": "50ms",
}


def fleet(order: str) -> Iterator[tuple[Any, Client]]:
    with dask.config.set({**CONFIG, "dflow.slo.order": order}):
        predictor = testing.emulated_predictor()
        layout = {"encoder": 1, "dit": 1, "vae": 1}
        with testing.emulated_fleet(MODEL, layout, predictor) as (cluster, client):
            yield cluster, client


@pytest.fixture(scope="module")
def by_deadline() -> Iterator[tuple[Any, Client]]:
    yield from fleet("deadline")


@pytest.fixture(scope="module")
def by_arrival() -> Iterator[tuple[Any, Client]]:
    yield from fleet("arrival")


def requests(count: int, seed: int) -> list[Request]:
    # distinct prompts: no shared encodings
    return [
        Request(model=MODEL, prompt=f"a fox number {seed + i}", seed=seed + i, steps=50)
        for i in range(count)
    ]


def finish_order(client: Client, named: dict[str, Any]) -> list[str]:
    """Names of the futures in the order they finished."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(done) < len(named):
        assert time.monotonic() < deadline, f"only {sorted(done)} finished"
        for name, future in named.items():
            if name not in done and future.done():
                assert future.status == "finished", (name, future.status)
                done[name] = time.monotonic()
        time.sleep(0.01)
    return sorted(done, key=done.__getitem__)


def queued_dits(cluster: Any, count: int) -> None:
    """Wait until ``count`` denoise tasks sit on the DiT worker."""
    scheduler = cluster.scheduler
    testing.poll(
        lambda: (
            sum(
                1
                for ws in scheduler.workers.values()
                for ts in ws.processing
                if str(ts.key).startswith("denoise-")
            )
            >= count
        ),
        60,
        f"{count} denoise tasks queued",
    )


@pytest.mark.slow
def test_an_urgent_request_overtakes_the_queue(by_deadline):
    """Five requests with SLOs of 1,000 to 1,004 s queue at the DiT and run in
    their deadlines' order (but the first, running at once); one with 30 s, submitted after them, runs as soon
    as the DiT is free."""
    cluster, client = by_deadline
    slos = [(1000 + i) * SCALE for i in range(5)]
    patient = dflow.client.map(client, requests(5, seed=0), slo=slos)
    queued_dits(cluster, 5)
    (urgent,) = dflow.client.map(client, requests(1, seed=10), slo=30 * SCALE)
    named = {f"patient-{i}": f for i, f in enumerate(patient)} | {"urgent": urgent}
    order = finish_order(client, named)
    # the DiT was busy with one or two patient requests when it arrived
    assert order.index("urgent") <= 2, order
    # the first patient request to reach a worker ran at once; the ones
    # queued behind it ran by deadline
    patients = [n for n in order if n != "urgent"]
    assert patients[1:] == sorted(patients[1:]), order


@pytest.mark.slow
def test_requests_past_saving_go_behind_the_savable_ones(by_deadline):
    """A request whose SLO has passed while it queued is served after a later
    request that can still make its own, though its deadline is earlier; it
    is still served."""
    cluster, client = by_deadline
    (blocker,) = dflow.client.map(client, requests(1, seed=20), slo=1000 * SCALE)
    queued_dits(cluster, 1)
    (late,) = dflow.client.map(client, requests(1, seed=21), slo=0.5 * SCALE)
    (savable,) = dflow.client.map(client, requests(1, seed=22), slo=100 * SCALE)
    order = finish_order(client, {"blocker": blocker, "late": late, "savable": savable})
    assert order == ["blocker", "savable", "late"], order
    # the scheduler moved the late request's tasks behind, once
    deadlines = cluster.scheduler.plugins["dflow-deadlines"]
    assert len(deadlines.past_saving) <= 1


@pytest.mark.slow
def test_arrival_order_keeps_submission_order(by_arrival):
    """``dflow.slo.order: arrival`` (the baselines' order): the urgent
    request waits its turn."""
    cluster, client = by_arrival
    patient = dflow.client.map(client, requests(4, seed=30), slo=1000 * SCALE)
    queued_dits(cluster, 4)
    (urgent,) = dflow.client.map(client, requests(1, seed=40), slo=30 * SCALE)
    named = {f"patient-{i}": f for i, f in enumerate(patient)} | {"urgent": urgent}
    assert finish_order(client, named)[-1] == "urgent"


def test_priorities_rank_savable_requests_by_deadline():
    class Task:
        priority = (0, 7, 3)

    early, late = priority(SAVABLE, 10.0, Task()), priority(SAVABLE, 20.0, Task())
    past = priority(PAST_SAVING, 5.0, Task())
    assert early < late < past
    assert early[-2:] == (7, 3)


def test_slo_is_checked_at_submit():
    with pytest.raises(ValueError, match="slo: must be positive"):
        dflow.client._slos(-1, 1)
    with pytest.raises(ValueError, match=r"slo: expected one value per request \(2\)"):
        dflow.client._slos([1.0], 2)
    assert dflow.client._slos(["2s", None], 2) == [2.0, None]
