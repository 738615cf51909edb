"""StageCluster: per-stage pools of worker processes that scale one stage at a time.

One cluster serves the whole module; the tests run in order (grow the DiT pool,
shrink it under load, then remove every pool).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

import dask.config
from distributed import Client, get_task_stream

import dflow
from dflow.cluster import StageCluster
from dflow.events import TOPIC, request_id
from dflow.request import Request
from dflow.testing import fleet_settled, move, poll, wait_for_pools
from dflow.worker import StagePlugin, stage_slots
from dflow.worker_options import nanny_specs, worker_name

# worker processes (Nanny)
pytestmark = pytest.mark.slow

MODEL = "tiny-pixart"
#: The cluster's workers by number, as it names them: host and CPU, not stage
W = [worker_name(None, number) for number in range(5)]


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


def test_workers_are_pinned_to_the_gpus_in_turn():
    """StageCluster builds its workers with the CLI's worker options: each worker
    process gets the next GPU first in ``CUDA_VISIBLE_DEVICES``."""

    async def specs() -> dict[str, dict]:
        cluster = StageCluster(
            MODEL, {"encoder": 1, "dit": 2}, gpus=["0", "1"], asynchronous=True
        )
        try:
            return {name: spec["options"] for name, spec in cluster.worker_spec.items()}
        finally:
            await cluster.close()

    options = asyncio.run(specs())
    gpu0, gpu1, gpu0_again = (
        worker_name("0", 0),
        worker_name("1", 1),
        worker_name("0", 2),
    )
    assert {name: o["env"] for name, o in options.items()} == {
        gpu0: {"CUDA_VISIBLE_DEVICES": "0,1"},
        gpu1: {"CUDA_VISIBLE_DEVICES": "1,0"},
        gpu0_again: {"CUDA_VISIBLE_DEVICES": "0,1"},
    }
    # the CLI's worker on GPU 1 of the same two
    cli = nanny_specs("dit", MODEL, ["0", "1"])[1]
    assert options[gpu1]["nthreads"] == cli["nthreads"] == stage_slots("dit")
    assert options[gpu1]["env"] == cli["env"]
    (plugin,) = options[gpu1]["plugins"]
    assert isinstance(plugin, StagePlugin)
    assert (plugin.stage, plugin.model, plugin.gpu_type) == ("dit", MODEL, "auto")


def test_a_client_of_the_cluster_object_fetches_outputs_from_the_workers(
    cluster, client
):
    """A request's output comes straight from its VAE worker to a client made
    from the cluster object; a client connected by address (which may reach
    only the scheduler) gathers it through the scheduler, as distributed does."""

    def count_gathers(dask_scheduler) -> None:
        gather = dask_scheduler.handlers["gather"]

        async def counted(*args, **kwargs):
            dask_scheduler.dflow_test_gathers += 1
            return await gather(*args, **kwargs)

        dask_scheduler.dflow_test_gathers = 0
        dask_scheduler.handlers["gather"] = counted

    def gathers(dask_scheduler) -> int:
        return dask_scheduler.dflow_test_gathers

    client.run_on_scheduler(count_gathers)
    first, second = requests(2, start=200)
    assert dflow.submit(client, first).result().array.shape[0] == 1
    assert client.run_on_scheduler(gathers) == 0
    with Client(cluster.scheduler_address) as by_address:
        assert dflow.submit(by_address, second).result().array.shape[0] == 1
    assert client.run_on_scheduler(gathers) == 1


def test_progress_events_skip_steps_within_the_interval_and_the_last(client):
    """A DiT reports its first step, then one per progress interval; never the
    last (its task's end says it)."""

    def set_interval(value: str) -> None:
        dask.config.set({"dflow.runtime.progress-interval": value})

    def reported(future) -> list[int]:
        request = request_id(future.key)
        return [
            m["step"] for _, m in client.get_events(TOPIC) if m["request"] == request
        ]

    default = dask.config.get("dflow.runtime.progress-interval")
    try:
        client.run(set_interval, "0")
        every = dflow.submit(client, requests(1, start=100, steps=6)[0])
        every.result()
        client.run(set_interval, "1h")
        first_only = dflow.submit(client, requests(1, start=101, steps=6)[0])
        first_only.result()
    finally:
        client.run(set_interval, default)
    assert reported(every) == [1, 2, 3, 4, 5]
    assert reported(first_only) == [1]


def test_submit_shortens_the_clients_batching_of_messages(client):
    """``dflow.submit`` has the client's messages to the scheduler wait at most
    ``dflow.client.send-interval`` (distributed's 10 ms would hold a request's
    graph behind the previous request's release)."""
    request, other = requests(2, start=300)
    with dask.config.set({"dflow.client.send-interval": "3ms"}):
        assert dflow.submit(client, request).result().array.shape[0] == 1
    assert client.scheduler_comm.interval == pytest.approx(0.003)
    assert dflow.submit(client, other).result().array.shape[0] == 1
    assert client.scheduler_comm.interval == pytest.approx(0.001)  # the default


def test_one_pool_per_stage_serves(cluster, client):
    assert {s: cluster.stage_workers(s) for s in ("encoder", "dit", "vae", "all")} == {
        "encoder": [W[0]],
        "dit": [W[1]],
        "vae": [W[2]],
        "all": [],
    }
    for stage in ("encoder", "dit", "vae"):
        assert ready_workers(client, stage) == cluster.stage_workers(stage)
    output = dflow.submit(client, requests(1)[0]).result()
    assert output.images[0].size == (64, 64)


def test_scaling_a_stage_up_adds_a_worker_that_serves(cluster, client):
    cluster.scale(2, stage="dit")
    assert cluster.stage_workers("dit") == [W[1], W[3]]
    wait_for_pools(client, {MODEL: ["encoder", "dit", "dit", "vae"]})
    assert ready_workers(client, "dit") == [W[1], W[3]]
    assert ready_workers(client, "encoder") == [W[0]]

    names = {
        address: info["name"]
        for address, info in client.scheduler_info(n_workers=-1)["workers"].items()
    }
    with get_task_stream(client=client) as stream:
        client.gather(dflow.map(client, requests(8, start=10, steps=20)))
    ran_denoise = {
        names[r["worker"]] for r in stream.data if r["key"].startswith("denoise-")
    }
    assert ran_denoise == {W[1], W[3]}


def test_scaling_a_stage_down_under_load_loses_no_request(cluster, client):
    (leaving,) = [
        address
        for address, info in client.scheduler_info(n_workers=-1)["workers"].items()
        if info["name"] == W[3]
    ]
    burst = requests(12, start=100, steps=30)
    futures = dflow.map(client, burst)
    poll(lambda: any(f.done() for f in futures), 60, "the burst to start")
    assert not all(f.done() for f in futures)

    cluster.scale(1, stage="dit")
    assert cluster.stage_workers("dit") == [W[1]]

    outputs = client.gather(futures)
    assert [o.request for o in outputs] == burst
    poll(
        lambda: ready_workers(client, "dit") == [W[1]],
        60,
        "the second DiT worker to leave",
    )
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


def test_a_role_switch_moves_a_worker_between_the_clusters_pools(cluster, client):
    """Pool membership has one source, the scheduler's: a worker switched to the
    DiT counts in the DiT pool when the cluster scales, not in the pool it was
    started for."""
    move(client, W[2], "dit", MODEL, "test: switch a VAE worker to the DiT")
    poll(
        lambda: fleet_settled(client) and ready_workers(client, "dit") == [W[1], W[2]],
        120,
        "the VAE worker serving the DiT",
    )
    assert cluster.stage_workers("dit") == [W[1], W[2]]
    assert cluster.stage_workers("vae") == []

    cluster.scale(1, stage="vae")  # the emptied pool gets a new worker
    assert cluster.stage_workers("vae") == [W[4]]
    wait_for_pools(client, {MODEL: ["encoder", "dit", "dit", "vae"]})
    assert ready_workers(client, "vae") == [W[4]]
    cluster.scale(1, stage="dit")  # two DiT workers as the scheduler counts them
    assert cluster.stage_workers("dit") == [W[1]]
    poll(lambda: ready_workers(client, "dit") == [W[1]], 60, "vae-2 to leave")
    assert W[2] not in cluster.worker_spec
    output = dflow.submit(client, requests(1, start=200)[0]).result()
    assert output.images[0].size == (64, 64)


def test_scale_needs_a_stage_except_to_zero(cluster, client):
    with pytest.raises(ValueError, match="stage="):
        cluster.scale(2)
    assert cluster.stage_workers("dit") == [W[1]]

    cluster.scale(0)
    poll(
        lambda: not client.scheduler_info(n_workers=-1)["workers"],
        60,
        "every worker to leave",
    )
    assert not cluster.worker_spec
    assert client.sync(client.scheduler.dflow_pools) == {}
