"""StageCluster: per-stage pools of worker processes that scale one stage at a time.

One cluster serves the whole module; the tests run in order (grow the DiT pool,
shrink it under load, then remove every pool).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

import dask.config
from distributed import Client, get_task_stream

import dflow
from dflow.cluster import StageCluster
from dflow.request import Request
from dflow.testing import poll, wait_for_pools

MODEL = "tiny-pixart"


def requests(count: int, start: int = 0, steps: int = 4) -> list[Request]:
    return [
        Request(model=MODEL, prompt="a lighthouse at dusk", seed=seed, steps=steps)
        for seed in range(start, start + count)
    ]


def ready_workers(client: Client, stage: str) -> list[str]:
    records = client.sync(client.scheduler.dflow_workers)
    return sorted(
        r["name"] for r in records if r["stage"] == stage and r["state"] == "ready"
    )


def denoise_completions(dask_scheduler, ids: set[str]) -> Counter:
    """How often each denoise of ``ids`` went from processing to memory."""
    return Counter(
        str(entry[0])
        for entry in dask_scheduler.transition_log
        if str(entry[0]).startswith("denoise-")
        and str(entry[0]).partition("-")[2] in ids
        and (entry[1], entry[2]) == ("processing", "memory")
    )


@pytest.fixture(scope="module")
def cluster(tiny_folders) -> Iterator[StageCluster]:
    # the elastic controller would move workers between pools on its own
    with (
        dask.config.set({"dflow.elastic.enabled": False}),
        StageCluster(
            MODEL,
            dashboard_address="127.0.0.1:0",
            worker_options={"dashboard_address": "127.0.0.1:0"},
        ) as cluster,
    ):
        yield cluster


@pytest.fixture(scope="module")
def client(cluster) -> Iterator[Client]:
    with Client(cluster) as client:
        wait_for_pools(client, {MODEL: ["encoder", "dit", "vae"]})
        yield client


def test_one_pool_per_stage_serves(cluster, client):
    assert {s: cluster.stage_workers(s) for s in ("encoder", "dit", "vae", "all")} == {
        "encoder": ["encoder-0"],
        "dit": ["dit-1"],
        "vae": ["vae-2"],
        "all": [],
    }
    for stage in ("encoder", "dit", "vae"):
        assert ready_workers(client, stage) == cluster.stage_workers(stage)
    output = dflow.submit(client, requests(1)[0]).result()
    assert output.images[0].size == (64, 64)


def test_scaling_a_stage_up_adds_a_worker_that_serves(cluster, client):
    cluster.scale(2, stage="dit")
    assert cluster.stage_workers("dit") == ["dit-1", "dit-3"]
    wait_for_pools(client, {MODEL: ["encoder", "dit", "dit", "vae"]})
    assert ready_workers(client, "dit") == ["dit-1", "dit-3"]
    assert ready_workers(client, "encoder") == ["encoder-0"]

    names = {
        address: info["name"]
        for address, info in client.scheduler_info(n_workers=-1)["workers"].items()
    }
    with get_task_stream(client=client) as stream:
        client.gather(dflow.map(client, requests(8, start=10, steps=20)))
    ran_denoise = {
        names[r["worker"]] for r in stream.data if r["key"].startswith("denoise-")
    }
    assert ran_denoise == {"dit-1", "dit-3"}


def test_scaling_a_stage_down_under_load_loses_no_request(cluster, client):
    (leaving,) = [
        address
        for address, info in client.scheduler_info(n_workers=-1)["workers"].items()
        if info["name"] == "dit-3"
    ]
    burst = requests(12, start=100, steps=30)
    futures = dflow.map(client, burst)
    poll(lambda: any(f.done() for f in futures), 60, "the burst to start")
    assert not all(f.done() for f in futures)

    cluster.scale(1, stage="dit")
    assert cluster.stage_workers("dit") == ["dit-1"]

    outputs = client.gather(futures)
    assert [o.request for o in outputs] == burst
    poll(lambda: ready_workers(client, "dit") == ["dit-1"], 60, "dit-3 to leave")
    # it left through retirement, which hands its data over first ...
    retirements = [
        event
        for _, event in client.get_events("all")
        if event.get("action") == "retire-workers"
    ]
    assert [list(e["retired"]) for e in retirements] == [[leaving]]
    # ... so no latents were lost and recomputed: no denoise ran twice
    ids = {f.key.partition("-")[2] for f in futures}
    completions = client.run_on_scheduler(denoise_completions, ids=ids)
    assert sorted(completions.values()) == [1] * len(burst)


def test_scale_needs_a_stage_except_to_zero(cluster, client):
    with pytest.raises(ValueError, match="stage="):
        cluster.scale(2)
    assert cluster.stage_workers("dit") == ["dit-1"]

    cluster.scale(0)
    poll(
        lambda: not client.scheduler_info(n_workers=-1)["workers"],
        60,
        "every worker to leave",
    )
    assert not cluster.worker_spec
    assert client.sync(client.scheduler.dflow_pools) == {}
