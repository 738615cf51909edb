"""Network jitter in the emulated fleet (``dflow.emulation.transfer-delay``) and
the synchronous hand-off of the jitter benchmark (:mod:`dflow.bench.handoff`):
the delay lands on the receiving worker's fetch of a stage's input, not in a
stage's compute, and the synchronous hand-off sends a stage only once the
previous one finished."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import dask.config
from distributed import Client, get_task_stream
from distributed.diagnostics.plugin import SchedulerPlugin

import dflow.client
from dflow import testing
from dflow.bench.handoff import SynchronousHandoff
from dflow.emulation.network import TransferDelay
from dflow.request import Request

MODEL = "pixart-sigma-1024"
SCALE = 0.5
#: the fixed delay of the delayed fleet, emulated seconds
DELAY = 0.4
CONFIG = {
    "dflow.elastic.enabled": False,
    "dflow.runtime.backend": "emulated",
    "dflow.emulation.time-scale": SCALE,
    "dflow.client.model-timeout": "120s",
}
DELAYED = {"dflow.emulation.transfer-delay": {"distribution": "fixed", "fixed": DELAY}}
KEY = "dflow.emulation.transfer-delay"


# -- the delay distributions ----------------------------------------------------------


def draws(delay: TransferDelay, count: int, stream: str = "dit-0") -> np.ndarray:
    draw = delay.sampler(stream)
    return np.array([draw() for _ in range(count)])


def test_uniform_delays_stay_in_their_range():
    values = draws(TransferDelay("uniform", low=0.01, high=0.05), 20_000)
    assert values.min() >= 0.01 and values.max() <= 0.05
    assert values.mean() == pytest.approx(0.03, rel=0.02)


def test_lognormal_delays_have_the_median_and_p99_asked():
    values = draws(TransferDelay("lognormal", median=0.01, p99=0.25), 200_000)
    assert np.median(values) == pytest.approx(0.01, rel=0.03)
    assert np.percentile(values, 99) == pytest.approx(0.25, rel=0.1)


def test_draws_are_seeded_per_seed_and_worker():
    delay = TransferDelay("uniform", high=0.05, seed=3)
    assert list(draws(delay, 5)) == list(draws(delay, 5))
    assert list(draws(delay, 5)) != list(draws(delay, 5, stream="dit-1"))
    other = TransferDelay("uniform", high=0.05, seed=4)
    assert list(draws(delay, 5)) != list(draws(other, 5))


def test_the_default_config_delays_nothing():
    delay = TransferDelay.from_config()
    assert delay.distribution == "none" and not delay.enabled
    assert set(draws(delay, 3)) == {0.0}


def test_configured_durations_are_parsed():
    setting = {"distribution": "lognormal", "median": "10ms", "p99": "250ms"}
    with dask.config.set({KEY: setting}):
        delay = TransferDelay.from_config()
    assert (delay.median, delay.p99) == (0.01, 0.25)


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ({"distribution": "gamma"}, "transfer-delay.distribution"),
        ({"distribution": "uniform", "low": "50ms", "high": "10ms"}, "high"),
        ({"distribution": "lognormal", "median": "0ms"}, "median"),
        ({"distribution": "fixed", "fixed": -1}, "fixed"),
        ({"distribution": "fixed", "fixed": "soon"}, "fixed"),
    ],
)
def test_bad_settings_name_the_key(setting, field):
    with dask.config.set({KEY: setting}), pytest.raises(ValueError, match=field):
        TransferDelay.from_config()


# -- on a fleet ------------------------------------------------------------------------


class GraphTimes(SchedulerPlugin):
    """Per request, its stage tasks' keys; when each task reached the scheduler
    and when it finished."""

    name = "test-graph-times"

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.keys: dict[str, dict[str, str]] = defaultdict(dict)
        self.arrived: dict[str, float] = {}
        self.finished: dict[str, float] = {}

    def transition(self, key: Any, start: str, finish: str, *args, **kwargs) -> None:
        ts = self.scheduler.tasks.get(key)
        info = (ts.annotations or {}).get("dflow") if ts is not None else None
        if not info:
            return
        self.keys[info["request"]][info["stage"]] = str(key)
        if start == "released" and finish == "waiting":
            self.arrived.setdefault(str(key), time.time())
        elif finish == "memory":
            self.finished.setdefault(str(key), time.time())

    def chains(self, finals: list[str]) -> list[dict[str, str]]:
        """The stage keys of the requests whose last tasks are ``finals``."""
        by_final = {keys["vae"]: keys for keys in self.keys.values() if "vae" in keys}
        return [by_final[key] for key in finals]


@contextlib.contextmanager
def graph_times(cluster: Any) -> Iterator[GraphTimes]:
    times = GraphTimes(cluster.scheduler)
    cluster.scheduler.add_plugin(times)
    try:
        yield times
    finally:
        cluster.scheduler.remove_plugin(name=times.name)


def fleet(config: dict[str, Any]) -> Iterator[tuple[Any, Client]]:
    with dask.config.set({**CONFIG, **config}):
        layout = {"encoder": 1, "dit": 1, "vae": 1}
        predictor = testing.emulated_predictor()
        with testing.emulated_fleet(MODEL, layout, predictor) as (cluster, client):
            yield cluster, client


@pytest.fixture(scope="module")
def delayed() -> Iterator[tuple[Any, Client]]:
    yield from fleet(DELAYED)


@pytest.fixture(scope="module")
def undelayed() -> Iterator[tuple[Any, Client]]:
    # the default, set: the delayed fleet's config holds while both are up
    yield from fleet({KEY: {"distribution": "none"}})


def requests(count: int, seed: int, **fields: Any) -> list[Request]:
    # distinct prompts: no shared encodings
    return [
        Request(
            model=MODEL, prompt=f"a heron number {seed + i}", seed=seed + i, **fields
        )
        for i in range(count)
    ]


def incoming(dask_worker: Any) -> list[dict[str, Any]]:
    return [
        {"start": e["start"], "stop": e["stop"], "keys": [str(k) for k in e["keys"]]}
        for e in dask_worker.transfer_incoming_log
    ]


def compute_spans(stream: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each stage task's compute span (task stream times)."""
    spans = {}
    for record in stream:
        for part in record["startstops"]:
            if part["action"] == "compute":
                spans[str(record["key"])] = (part["start"], part["stop"])
    return spans


@pytest.mark.slow
def test_the_delay_lands_on_the_fetch_of_each_hand_off(delayed):
    """With a fixed delay D, each stage output's transfer into the next stage's
    worker lasts at least D, each hand-off (a stage's end to the next stage's
    start) takes at least D, and the DiT fetches a queued request's input
    while it computes another request: the delay sits in the transfer, not in
    a stage's compute."""
    cluster, client = delayed
    wall = DELAY * SCALE
    with graph_times(cluster) as times, get_task_stream(client) as stream:
        # 50 steps: a DiT call (0.9 s wall) four times the delay; submitted
        # apart, so that each encoding after the first is fetched on its own
        # while the DiT computes an earlier request
        futures = []
        for request in requests(4, seed=0, steps=50):
            futures += dflow.client.map(client, [request])
            time.sleep(0.3)
        client.gather(futures)
    spans = compute_spans(stream.data)
    moved = {
        key: transfer
        for log in client.run(incoming).values()
        for transfer in log
        for key in transfer["keys"]
    }
    chains = times.chains([f.key for f in futures])
    for chain in chains:
        for upstream, downstream in (("encoder", "dit"), ("dit", "vae")):
            key = chain[upstream]
            transfer = moved[key]
            assert transfer["stop"] - transfer["start"] >= wall, (key, transfer)
            hand_off = spans[chain[downstream]][0] - spans[key][1]
            assert hand_off >= wall, (key, hand_off)
    denoising = [spans[chain["dit"]] for chain in chains]
    overlapped = [
        chain["encoder"]
        for chain in chains
        if any(
            start <= moved[chain["encoder"]]["start"]
            and moved[chain["encoder"]]["stop"] <= stop
            for start, stop in denoising
        )
    ]
    assert overlapped, (denoising, [moved[c["encoder"]] for c in chains])


@pytest.mark.slow
def test_no_delay_configured_leaves_the_transfers_alone(undelayed):
    """The default: workers serve transfers with Dask's own handler."""
    _, client = undelayed

    def own_handler(dask_worker: Any) -> bool:
        return dask_worker.handlers["get_data"] == dask_worker.get_data

    assert all(client.run(own_handler).values())
    assert len(client.gather(dflow.client.map(client, requests(2, seed=10)))) == 2


@pytest.mark.slow
def test_the_synchronous_hand_off_sends_a_stage_when_the_previous_finished(
    undelayed,
):
    """Ahead of need, a request's stage tasks reach the scheduler together;
    synchronously, each only once the previous stage's task finished, and every
    request is served."""
    cluster, client = undelayed
    with graph_times(cluster) as times:
        ahead = dflow.client.map(client, requests(3, seed=20))
        client.gather(ahead)
        handoff = SynchronousHandoff(client)
        chains = handoff.map(requests(3, seed=30))
        testing.poll(lambda: all(c.done() for c in chains), 60, "chains done")
        handoff.close()
    for chain in times.chains([f.key for f in ahead]):
        # the whole chain was there before its first stage finished
        assert times.arrived[chain["vae"]] <= times.finished[chain["encoder"]]
    for chain in times.chains([c.key for c in chains]):
        assert chain["vae"] in times.finished, f"{chain['vae']} did not finish"
        for upstream, downstream in (("encoder", "dit"), ("dit", "vae")):
            assert times.arrived[chain[downstream]] >= times.finished[chain[upstream]]
