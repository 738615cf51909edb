"""Admission control, deadlines and memory admission, on emulated stage workers.

The workers run in-process (``gen_cluster``) on dflow's emulated backend
(``dflow.runtime.backend: emulated``): stage calls of PixArt-Sigma-1024 sleep for
the time the H200 profile predicts (``time-scale`` 1: a 2048x2048 request of 200
steps denoises for about a minute, a 256x256 one-step request takes 0.1 s) and
the workers publish the memory of the GPU type they emulate. The scheduler's
elastic controller is off (workers keep their stages) but its predictor prices
peak memory for admission.

- ``dflow.admission.max-outstanding`` bounds the requests in flight per model:
  past it ``submit`` raises :class:`~dflow.errors.Overloaded` at once, or waits up
  to ``dflow.admission.timeout`` for room;
- a request past its deadline is cancelled on the scheduler
  (``FutureCancelledError``, reason ``deadline-exceeded``): its denoising loop
  stops and its tasks are forgotten;
- an admission only the pools could change is *standing*: the client reuses it
  without a round trip until the pools change, and a request sent on an answer
  the pools changed under is routed again when it reaches the scheduler;
- a request no worker of a stage has the memory for is refused at submit
  (:class:`~dflow.errors.InvalidRequest` naming ``height``); in a fleet of mixed
  GPU types its stage runs only on the workers that can hold it, and when those
  switch roles it follows the memory to the pool's other workers, or fails with
  the same reason when none is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import pytest
import yaml

import dask.config
from distributed import Worker
from distributed.client import FutureCancelledError
from distributed.utils_test import gen_cluster

import dflow
from dflow.client import _standing_admissions, encoding_key
from dflow.errors import InvalidRequest, Overloaded
from dflow.request import Request
from dflow.testing import wait_for_pools
from dflow.worker import StagePlugin

# emulated stage calls that sleep their profiled time (time-scale 1)
pytestmark = pytest.mark.slow

MODEL = "pixart-sigma-1024"
STAGES = ("encoder", "dit", "vae")
SCHEDULER = {"preload": ["dflow.preload"]}
#: A GPU type added to the shipped catalog for these tests only (no such card):
#: PixArt-Sigma's VAE fits it at the default 1024x1024 (2.3 GiB predicted) but
#: not at 2048x2048 (8.3 GiB)
SMALL_GPU = "test-6gb"
CONFIG = {
    "dflow.elastic.enabled": False,
    "dflow.runtime.backend": "emulated",
    "dflow.emulation.time-scale": 1.0,
    # loads and parks in a moment: these tests time requests, not switches
    "dflow.emulation.load-bandwidth": "1000GiB",
    "dflow.emulation.pin-bandwidth": "1000GiB",
    "dflow.scheduler.check-interval": "100ms",
}


@pytest.fixture
def session_config(keep_dflow_config, tmp_path):
    """dflow's session config inside gen_cluster (``keep_dflow_config``), plus a
    GPU catalog with :data:`SMALL_GPU`."""
    catalog = yaml.safe_load(files("dflow.configs").joinpath("gpus.yaml").read_text())
    catalog["gpus"][SMALL_GPU] = {
        **catalog["gpus"]["l4"],
        "label": "test-only GPU type: an L4 with 6 GiB",
        "memory-mib": 6144,
    }
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(catalog))
    keep_dflow_config["dflow"]["emulation"]["gpus"] = str(path)


def stage_workers(*stages: str | tuple[str, str]) -> list[tuple[str, int, dict]]:
    """gen_cluster workers, one per stage or ``(stage, gpu_type)``."""
    workers = []
    for entry in stages:
        stage, gpu_type = (entry, "h200") if isinstance(entry, str) else entry
        plugin = StagePlugin(stage, MODEL, gpu_type=gpu_type)
        workers.append(("127.0.0.1", 1, {"plugins": {plugin}}))
    return workers


def request(size: int = 256, steps: int = 1, seed: int = 0) -> Request:
    return Request(
        model=MODEL,
        prompt="a lighthouse",
        height=size,
        width=size,
        steps=steps,
        seed=seed,
    )


def long_request(seed: int = 0) -> Request:
    """Denoises for about a minute: it is cancelled, never waited for. Its own
    prompt, so it shares no encode task with the short requests."""
    return request(2048, steps=200, seed=seed).replace(prompt="a lighthouse at night")


def in_thread(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """A blocking dflow client call, off the event loop the cluster runs on."""
    return asyncio.to_thread(function, *args, **kwargs)


async def until(condition: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def request_id(key: str) -> str:
    return str(key).partition("-")[2]


def executing(workers) -> set[str]:
    return {str(ts.key) for w in workers for ts in w.state.executing}


# -- requests in flight -----------------------------------------------------------------


@gen_cluster(
    client=True,
    nthreads=stage_workers(*STAGES),
    scheduler_kwargs=SCHEDULER,
    config={**CONFIG, "dflow.admission.max-outstanding": 2},
    timeout=120,
)
async def test_overloaded_past_max_outstanding_or_waits_for_room(
    c, s, *workers, session_config
):
    await in_thread(wait_for_pools, c, {MODEL: STAGES})
    extension = s.extensions["dflow"]
    busy = await in_thread(dflow.map, c, [long_request(1), long_request(2)])
    # the graph follows admission in its own message
    await until(lambda: len(extension.in_flight()) == 2)

    start = time.monotonic()
    with pytest.raises(
        Overloaded, match=rf"'{MODEL}' has 2 requests in flight.*limit is 2"
    ):
        await in_thread(dflow.submit, c, request())
    assert time.monotonic() - start < 5  # dflow.admission.timeout is 0: at once
    assert extension.counts[MODEL, "submitted"] == 2  # the refused one never entered

    # with a timeout, submit waits until a request in flight ends
    with dask.config.set({"dflow.admission.timeout": "60s"}):
        waiting = asyncio.ensure_future(in_thread(dflow.submit, c, request(seed=3)))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await busy[0].cancel()
        admitted = await asyncio.wait_for(waiting, 30)
    await until(lambda: len(extension.in_flight()) == 2)

    # a per-model limit: the default does not apply to models named
    per_model = {"dflow.admission.max-outstanding": {MODEL: 1, "default": 8}}
    with dask.config.set(per_model), pytest.raises(Overloaded, match="limit is 1"):
        await in_thread(dflow.submit, c, request(seed=4))
    await c.cancel([busy[1], admitted])
    await until(lambda: not extension.in_flight())
    assert not extension.reserved[MODEL]
    assert (
        extension.counts[MODEL, "submitted"]
        == extension.counts[MODEL, "cancelled"]
        == 3
    )


# -- deadlines ----------------------------------------------------------------------------


@gen_cluster(
    client=True,
    nthreads=stage_workers(*STAGES),
    scheduler_kwargs=SCHEDULER,
    config=CONFIG,
    timeout=120,
)
async def test_a_deadline_cancels_the_chain_and_frees_it(
    c, s, *workers, session_config
):
    await in_thread(wait_for_pools, c, {MODEL: STAGES})
    extension = s.extensions["dflow"]
    submitted = time.monotonic()
    late = await in_thread(dflow.submit, c, long_request(1), deadline="1.5s")
    prompt = await in_thread(dflow.submit, c, request(seed=2), deadline="60s")
    rid = request_id(late.key)
    keys = {encoding_key(long_request(1)), f"denoise-{rid}", f"decode-{rid}"}
    await until(lambda: f"denoise-{rid}" in executing(workers))

    with pytest.raises(FutureCancelledError) as caught:
        await late
    assert caught.value.reason == "deadline-exceeded"
    assert "missed its deadline of 1.5s" in str(caught.value)
    assert time.monotonic() - submitted < 6  # 1.5 s, one check interval, slack
    assert (await prompt).request == request(seed=2)  # in time: not cancelled

    # the chain is gone from the scheduler and the denoising loop stopped
    await until(lambda: not keys & set(map(str, s.tasks)), timeout=10)
    await until(lambda: not keys & executing(workers), timeout=10)
    assert not any(keys & set(map(str, w.data)) for w in workers)
    assert extension.counts[MODEL, "cancelled"] == 1
    assert extension.counts[MODEL, "completed"] == 1

    # the default deadline comes from config; a request in time is untouched
    with dask.config.set({"dflow.client.deadline": "30s"}):
        output = await (await in_thread(dflow.submit, c, request(seed=3)))
    assert output.request == request(seed=3)


# -- memory ---------------------------------------------------------------------------------


async def predictor_ready(s) -> None:
    """dflow's install seeds the predictor in a thread at start."""
    controller = s.plugins["dflow-elastic"]
    await until(lambda: controller.predictions.predictor is not None, timeout=60)


def ran_on(s, key: str) -> str:
    """The worker a finished stage task ran on (the telemetry's record)."""
    records = s.plugins["dflow-telemetry"].records
    (worker,) = [r.worker for r in records if r.key == key]
    return worker


@gen_cluster(
    client=True,
    nthreads=stage_workers("encoder", "dit", ("vae", SMALL_GPU), ("vae", "h200")),
    scheduler_kwargs=SCHEDULER,
    config=CONFIG,
    timeout=120,
)
async def test_memory_routes_requests_to_workers_that_hold_them(
    c, s, *workers, session_config
):
    await in_thread(wait_for_pools, c, {MODEL: [*STAGES, "vae"]})
    await predictor_ready(s)
    records = {r.address: r for r in s.extensions["dflow"].workers.values()}
    small, large = (w.address for w in workers[2:])
    assert (records[small].gpu_type, records[large].gpu_type) == (SMALL_GPU, "h200")
    assert records[small].memory == 6 * 2**30

    big = request(2048, seed=1)
    futures = await in_thread(dflow.map, c, [big, request(1024, seed=2)])
    rids = [request_id(f.key) for f in futures]
    await until(lambda: all(f"decode-{rid}" in s.tasks for rid in rids))
    # only the big request's VAE task is restricted, to the worker that holds it
    assert s.tasks[f"decode-{rids[0]}"].worker_restrictions == {large}
    assert not s.tasks[f"decode-{rids[1]}"].worker_restrictions
    assert not s.tasks[f"denoise-{rids[0]}"].worker_restrictions
    outputs = await c.gather(futures)
    assert [o.request for o in outputs] == [big, request(1024, seed=2)]
    assert ran_on(s, f"decode-{rids[0]}") == large


@gen_cluster(
    client=True,
    nthreads=stage_workers("encoder", "dit", ("vae", SMALL_GPU)),
    scheduler_kwargs=SCHEDULER,
    config=CONFIG,
    timeout=120,
)
async def test_memory_no_worker_can_hold_is_refused_at_submit(
    c, s, *workers, session_config
):
    await in_thread(wait_for_pools, c, {MODEL: STAGES})
    await predictor_ready(s)
    extension = s.extensions["dflow"]

    with pytest.raises(InvalidRequest) as caught:
        await in_thread(dflow.map, c, [request(seed=1), request(2048, seed=2)])
    error = caught.value
    assert isinstance(error, ValueError) and error.field == "height"
    message = str(error)
    assert message.startswith("height: the vae stage of pixart-sigma-1024 needs")
    assert "at 2048x2048" in message and "largest worker has 6.0 GiB" in message
    # admission is all or nothing: neither request entered
    assert extension.counts[MODEL, "submitted"] == 0
    assert not extension.reserved[MODEL]

    # what fits is admitted and runs
    output = await (await in_thread(dflow.submit, c, request(1024, seed=3)))
    assert output.request == request(1024, seed=3)


async def switch(c, s, address: str, stage: str) -> None:
    """Switch a worker's stage (the scheduler's ``dflow_move``), and wait until it
    serves the new stage."""
    await c.scheduler.dflow_move(
        worker=address, pool=f"{stage}:{MODEL}", reason="test: switch"
    )
    await until(
        lambda: (
            s.extensions["dflow"].workers[address].pool == (stage, MODEL)
            and s.extensions["dflow"].workers[address].state == "ready"
            and address not in s.plugins["dflow-elastic"].actuator.switching
        )
    )


@gen_cluster(
    client=True,
    nthreads=stage_workers(
        "encoder", "dit", ("vae", SMALL_GPU), ("vae", "h200"), ("encoder", "h200")
    ),
    scheduler_kwargs=SCHEDULER,
    config=CONFIG,
    timeout=120,
)
async def test_a_pinned_task_follows_the_memory_when_its_worker_switches(
    c, s, *workers, session_config
):
    """A decode admission pinned to the one VAE worker with the memory for it: that
    worker moves to the encoder and another large worker to the VAE while the
    request denoises. The decode runs on the newcomer (the small VAE worker still
    cannot hold it)."""
    await in_thread(wait_for_pools, c, {MODEL: ["encoder", "dit", "vae", "vae"]})
    await predictor_ready(s)
    large, spare = workers[3].address, workers[4].address

    big = request(2048, steps=8, seed=1)
    future = await in_thread(dflow.submit, c, big)
    rid = request_id(future.key)
    await until(lambda: f"decode-{rid}" in s.tasks)
    assert s.tasks[f"decode-{rid}"].worker_restrictions == {large}
    await switch(c, s, large, "encoder")
    await switch(c, s, spare, "vae")

    output = await future
    assert output.request == big
    assert ran_on(s, f"decode-{rid}") == spare
    events = [e for _, e in s.get_events("dflow") if e["action"] == "repinned"]
    assert events == [
        {"action": "repinned", "key": f"decode-{rid}", "workers": [spare]}
    ]


@gen_cluster(
    client=True,
    nthreads=stage_workers("encoder", "dit", ("vae", SMALL_GPU), ("vae", "h200")),
    scheduler_kwargs=SCHEDULER,
    config=CONFIG,
    timeout=120,
)
async def test_a_pinned_task_fails_clearly_when_no_worker_left_can_hold_it(
    c, s, *workers, session_config
):
    """The one VAE worker with the memory for a decode moves to the encoder: the
    request fails with the reason admission would have given, instead of waiting
    for a worker that no longer serves the VAE."""
    await in_thread(wait_for_pools, c, {MODEL: [*STAGES, "vae"]})
    await predictor_ready(s)
    large = workers[3].address

    future = await in_thread(dflow.submit, c, request(2048, steps=8, seed=1))
    await until(lambda: f"decode-{request_id(future.key)}" in s.tasks)
    await switch(c, s, large, "encoder")

    with pytest.raises(InvalidRequest, match=r"^height: the vae stage of pixart"):
        await future
    # the fleet serves on
    output = await (await in_thread(dflow.submit, c, request(1024, seed=3)))
    assert output.request == request(1024, seed=3)


def count_admissions(s) -> list[dict]:
    """The scheduler's ``dflow_admit`` calls from now on (their arguments)."""
    calls: list[dict] = []
    admit = s.handlers["dflow_admit"]

    async def counted(**kwargs: Any) -> dict:
        calls.append(kwargs)
        return await admit(**kwargs)

    s.handlers["dflow_admit"] = counted
    return calls


@gen_cluster(
    client=True,
    nthreads=stage_workers(*STAGES),
    scheduler_kwargs=SCHEDULER,
    config=CONFIG,
    timeout=120,
)
async def test_a_standing_admission_is_reused_until_the_pools_change(
    c, s, *workers, session_config
):
    """No limit and no restricted stage: the second request of the same shape is
    submitted without asking the scheduler; a worker joining a pool lapses the
    answer, so the next request asks again."""
    await in_thread(wait_for_pools, c, {MODEL: STAGES})
    await predictor_ready(s)
    calls = count_admissions(s)
    outputs = []
    for seed in range(3):
        future = await in_thread(dflow.submit, c, request(seed=seed))
        outputs.append(await future)
    assert [o.request.seed for o in outputs] == [0, 1, 2]
    assert len(calls) == 1
    # another shape is another question
    await (await in_thread(dflow.submit, c, request(512)))
    assert len(calls) == 2

    extension = s.extensions["dflow"]
    epoch = extension.epoch
    plugin = StagePlugin("vae", MODEL, gpu_type="h200")
    async with Worker(s.address, nthreads=1, plugins={plugin}):
        await in_thread(wait_for_pools, c, {MODEL: [*STAGES, "vae"]})
        assert extension.epoch > epoch
        standing = _standing_admissions(c)
        await until(lambda: standing._epoch == extension.epoch)
        output = await (await in_thread(dflow.submit, c, request(seed=4)))
        assert output.request == request(seed=4)
        assert len(calls) == 3
        await (await in_thread(dflow.submit, c, request(seed=5)))
        assert len(calls) == 3


@gen_cluster(
    client=True,
    nthreads=stage_workers(*STAGES),
    scheduler_kwargs=SCHEDULER,
    config=CONFIG,
    timeout=120,
)
async def test_a_request_sent_on_a_lapsed_answer_is_routed_again(
    c, s, *workers, session_config
):
    """A VAE worker too small for a 2048x2048 decode joins in the moment before
    the client hears of it: the request, sent on its standing answer (any VAE
    worker), is pinned to the worker that holds it when it reaches the
    scheduler."""
    await in_thread(wait_for_pools, c, {MODEL: STAGES})
    await predictor_ready(s)
    big = request(2048, seed=1)
    await (await in_thread(dflow.submit, c, big))
    standing = _standing_admissions(c)
    heard = standing._epoch
    large = workers[2].address

    plugin = StagePlugin("vae", MODEL, gpu_type=SMALL_GPU)
    async with Worker(s.address, nthreads=1, plugins={plugin}) as small:
        await in_thread(wait_for_pools, c, {MODEL: [*STAGES, "vae"]})
        await until(lambda: standing._epoch == s.extensions["dflow"].epoch)
        standing._epoch = heard  # as if the news had not reached the client yet
        calls = count_admissions(s)
        future = await in_thread(dflow.submit, c, big.replace(seed=2))
        assert not calls
        decode = f"decode-{request_id(future.key)}"
        await until(lambda: decode in s.tasks)
        assert s.tasks[decode].worker_restrictions == {large}
        output = await future
        assert output.request == big.replace(seed=2)
        assert ran_on(s, decode) == large != small.address


# -- a scheduler without dflow --------------------------------------------------------------


@gen_cluster(client=True, nthreads=[], timeout=60)
async def test_submit_to_a_scheduler_without_dflow_says_how_to_install_it(
    c, s, session_config
):
    """No partial install: the client names the preload instead."""
    with pytest.raises(RuntimeError) as caught:
        await in_thread(dflow.submit, c, request())
    message = str(caught.value)
    assert f"the scheduler at {s.address} does not run dflow" in message
    assert "--preload dflow.preload" in message
    assert "StageCluster" in message and "scheduler_kwargs" in message
    assert "dflow" not in s.extensions and "dflow_admit" not in s.handlers
