"""DiT batching through real worker processes.

A real ``dask scheduler`` with encoder, DiT, VAE and monolithic (``--stage
all``) ``dflow-worker`` processes of tiny PixArt-Sigma (classifier-free
guidance: two transformer rows per request, a multistep scheduler), every
worker with ``dflow.runtime.max-dit-batch: 4`` (and unbatched decodes). Requests that denoise together,
join a batch mid-way or leave it cancelled must give every other request the
pixels of its unbatched run (``dflow.generate`` in this process, which denoises
each request alone in the stock pipeline call).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

import dask.config
from distributed import Client
from distributed.worker_state_machine import TaskState

import dflow
from dflow import runtime
from dflow.pools import Pool
from dflow.request import Request
from dflow.spec import canonical_name
from dflow.testing import (
    pixels,
    poll,
    scheduler_process,
    stop,
    wait_for_pools,
    worker_processes,
)
from dflow.worker import StagePlugin

pytestmark = pytest.mark.slow

MODEL = "tiny-pixart"
LAYOUT = ("encoder", "dit", "vae", "all")
BATCH = 4
SCHEDULER_ENV = {"DASK_DFLOW__ELASTIC__ENABLED": "False"}
# VAE decode batches (dflow.runtime.max-batch) are not exact on CPU: convolutions,
# group norms and attention round by batch size. Requests leaving a DiT batch at
# one step reach the VAE together, so decode alone here to test the DiT's batches.
WORKER_ENV = {
    "DASK_DFLOW__RUNTIME__MAX_DIT_BATCH": str(BATCH),
    "DASK_DFLOW__RUNTIME__MAX_BATCH": "1",
}

# the functions run on the scheduler and workers travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@contextlib.contextmanager
def fleet(
    model: str, layout: tuple[str, ...], env: dict[str, str], logs: Path
) -> Iterator[Client]:
    """A scheduler with dflow's preload and one worker process per stage of
    ``layout`` serving ``model``, all ready."""
    with (
        scheduler_process(env=SCHEDULER_ENV, log_dir=logs) as address,
        worker_processes(
            address, [(s, model) for s in layout], env=env, log_dir=logs
        ) as workers,
        Client(address) as client,
    ):
        wait_for_pools(client, {model: layout}, processes=workers)
        yield client
        client.close()
        stop([address.process, *workers])


@pytest.fixture(scope="module")
def client(tiny_folders, tmp_path_factory) -> Iterator[Client]:
    logs = tmp_path_factory.mktemp("batching")
    with fleet(MODEL, LAYOUT, WORKER_ENV, logs) as client:
        yield client
    runtime.uninstall(canonical_name(MODEL), "all")


def request(seed: int, **changes) -> Request:
    fields = {
        "model": MODEL,
        "prompt": "a red bicycle leaning on a stone wall",
        "negative_prompt": "blurry",
        "height": 64,
        "width": 64,
        "steps": 3,
        "seed": seed,
    }
    return Request(**{**fields, **changes})


def assert_unbatched_pixels(outputs: list[dflow.Output]) -> None:
    """Each output has the pixels of its request denoised alone, here."""
    for output in outputs:
        alone = pixels(dflow.generate(output.request))
        assert np.array_equal(pixels(output), alone), output.request


def denoise_batches(dask_scheduler) -> dict[str, float]:
    """The batch each finished denoise or generate task reported, by request."""
    records = dask_scheduler.plugins["dflow-telemetry"].records
    return {r.request: r.batch for r in records if r.stage in ("dit", "all")}


def executing(dask_worker) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


def queued(dask_worker) -> list[str]:
    """Keys of the tasks waiting in this worker's queue for a resource slot."""
    return [str(ts.key) for ts in dask_worker.state.constrained]


def free_dit_slots(dask_worker) -> float:
    return dask_worker.state.available_resources.get("dit", 0)


def stage_failures(dask_worker, key: str) -> list[str]:
    return [
        event.exception_text
        for event in dask_worker.state.stimulus_story(key)
        if type(event).__name__ == "ExecuteFailureEvent"
    ]


def request_id(future) -> str:
    return str(future.key).partition("-")[2]


def start_running(client: Client, prefix: str, long: Request) -> tuple[object, str]:
    """Submit ``long`` and wait until its ``prefix`` task executes; returns its
    future and the worker running it."""
    future = dflow.submit(
        client, long, mode="monolithic" if prefix == "generate" else "disaggregated"
    )
    key = f"{prefix}-{request_id(future)}"
    (worker,) = poll(
        lambda: [a for a, keys in client.run(executing).items() if key in keys],
        timeout=60,
        what=f"{key} to start",
    )
    return future, worker


def test_one_prompt_several_seeds_batch_and_keep_their_pixels(client):
    """The n images of one prompt (and one with its own guidance scale and
    step count) denoise in shared steps, each with its own seed."""
    requests = [request(seed, steps=20) for seed in range(10, 14)]
    requests[1] = requests[1].replace(guidance_scale=7.0)
    requests[2] = requests[2].replace(steps=25)
    futures = dflow.map(client, requests)
    outputs = client.gather(futures)
    assert [o.request for o in outputs] == requests
    batches = client.run_on_scheduler(denoise_batches)
    shared = [batches[request_id(f)] for f in futures]
    assert max(shared) > 1, shared
    assert all(1 <= b <= BATCH for b in shared)
    assert_unbatched_pixels(outputs)


@pytest.mark.parametrize("prefix", ["denoise", "generate"])
def test_requests_join_a_running_batch_at_a_step_boundary(client, prefix):
    mode = "monolithic" if prefix == "generate" else "disaggregated"
    long = request(20, steps=60)
    first, _ = start_running(client, prefix, long)
    joiners = dflow.map(client, [request(seed) for seed in (21, 22)], mode=mode)
    outputs = client.gather([first, *joiners])
    batches = client.run_on_scheduler(denoise_batches)
    # the long request ran alone, then with the two that joined, then alone
    assert 1 < batches[request_id(first)] < 3
    assert all(batches[request_id(f)] > 1 for f in joiners)
    assert_unbatched_pixels(outputs)


def test_cancelling_one_request_of_a_batch_leaves_the_others_alone(client):
    spec = request(0).spec
    long = request(30, steps=spec.limit("max_steps"))
    future, worker = start_running(client, "denoise", long)
    others = dflow.map(client, [request(seed, steps=40) for seed in (31, 32, 33)])
    key = f"denoise-{request_id(others[0])}"
    poll(
        lambda: key in client.run(executing, workers=[worker])[worker],
        timeout=60,
        what="the others to join",
    )
    future.cancel()
    denoise = f"denoise-{request_id(future)}"
    poll(
        lambda: denoise not in client.run(executing, workers=[worker])[worker],
        timeout=10,
        what="the cancelled request to leave the batch",
    )
    (failure,) = client.run(stage_failures, key=denoise, workers=[worker])[worker]
    match = re.search(r"stopped after (\d+) of (\d+) steps", failure)
    assert match, failure
    assert int(match[1]) < int(match[2]) == long.steps
    outputs = client.gather(others)
    batches = client.run_on_scheduler(denoise_batches)
    assert all(batches[request_id(f)] > 1 for f in others)
    assert_unbatched_pixels(outputs)


def queue_and_free_slots(dask_worker) -> tuple[list[str], float]:
    """The worker's queued keys and its free DiT slots, at one moment."""
    return queued(dask_worker), free_dit_slots(dask_worker)


def test_a_request_of_another_shape_waits_queued_while_its_shape_joins(client):
    """A worker denoising a batch starts only requests that can join it: one of
    another shape stays in the worker's queue though slots are free, and one of
    the batch's shape joins the batch, ahead of it, while the batch holds a
    request due before it (pools run earliest deadline first: the SLOs set the
    order). Each keeps its unbatched pixels."""
    spec = request(0).spec
    # 512px: its steps take long enough on CPU for the others to arrive
    long = request(40, height=512, width=512, steps=spec.limit("max_steps"))
    first = dflow.submit(client, long, slo=600)
    key = f"denoise-{request_id(first)}"
    (worker,) = poll(
        lambda: [a for a, keys in client.run(executing).items() if key in keys],
        timeout=60,
        what=f"{key} to start",
    )
    other = dflow.submit(client, request(41, height=32, width=32), slo=3600)
    other_key = f"denoise-{request_id(other)}"
    _, free = poll(
        lambda: (
            found
            if other_key in (found := client.run(queue_and_free_slots)[worker])[0]
            else None
        ),
        timeout=60,
        what=f"{other_key} to reach the DiT worker",
    )
    # queued, though the worker denoises one request in its four slots
    assert free == BATCH - 1
    joiner = dflow.submit(client, request(42, height=512, width=512, steps=3), slo=7200)
    outputs = client.gather([first, joiner, other])
    batches = client.run_on_scheduler(denoise_batches)
    assert batches[request_id(joiner)] > 1
    assert batches[request_id(other)] == 1
    assert_unbatched_pixels(outputs)


# -- a request of another shape goes to the worker that falls idle -----------------

EMULATED = "pixart-sigma-1024"
#: two emulated H200 DiT workers with four task slots each
EMULATED_LAYOUT = ("encoder", "dit", "dit", "vae")
EMULATED_ENV = {
    "DASK_DFLOW__RUNTIME__BACKEND": "emulated",
    "DASK_DFLOW__RUNTIME__MAX_DIT_BATCH": str(BATCH),
}


@pytest.fixture(scope="module")
def emulated_client(tmp_path_factory) -> Iterator[Client]:
    logs = tmp_path_factory.mktemp("binding")
    with fleet(EMULATED, EMULATED_LAYOUT, EMULATED_ENV, logs) as client:
        yield client


def placement_moved(dask_scheduler) -> int:
    return dask_scheduler.plugins["dflow-placement"].moved


def denoise_workers(dask_scheduler) -> dict[str, str]:
    """The worker each finished denoise task ran on, by request."""
    records = dask_scheduler.plugins["dflow-telemetry"].records
    return {r.request: r.worker for r in records if r.stage == "dit"}


def test_a_request_of_another_shape_is_not_held_in_a_free_slot(emulated_client):
    """While both DiT workers denoise a request, a request of a third shape
    waits in a worker's queue, not in one of its free slots; once the other
    worker falls idle, the scheduler's rebalance moves it there rather than
    letting it wait for the whole denoise."""
    client = emulated_client

    def emulated(seed: int, **changes) -> Request:
        # a prompt of its own: requests with equal prompts share one encoding,
        # and Dask places a task where its input already is
        prompt = f"a red bicycle, take {seed}"
        return Request(model=EMULATED, prompt=prompt, seed=seed, **changes)

    longest = emulated(0).spec.limit("max_steps")
    first, worker_a = start_running(
        client, "denoise", emulated(1, height=1024, width=1024, steps=longest)
    )
    second, worker_b = start_running(
        client, "denoise", emulated(2, height=768, width=1024, steps=longest)
    )
    assert worker_b != worker_a, "the second request went to the busy worker"
    waiting = dflow.submit(client, emulated(3, height=512, width=512, steps=2))
    key = f"denoise-{request_id(waiting)}"
    (queued_on,) = poll(
        lambda: [a for a, keys in client.run(queued).items() if key in keys],
        timeout=60,
        what=f"{key} to reach a DiT worker",
    )
    assert client.run(free_dit_slots, workers=[queued_on])[queued_on] >= 1
    assert key not in client.run(executing, workers=[queued_on])[queued_on]
    busy, idle = (first, second) if queued_on == worker_a else (second, first)
    idle.cancel()
    output = waiting.result(timeout=60)
    assert output.request.seed == 3
    # it ran on the worker that fell idle, while the other still denoises
    moved_to = client.run_on_scheduler(denoise_workers)[request_id(waiting)]
    assert moved_to == ({worker_a, worker_b} - {queued_on}).pop()
    assert busy.status == "pending"
    assert client.run_on_scheduler(placement_moved) >= 1
    busy.cancel()


def test_a_batch_takes_no_joiner_past_a_request_due_before_all_of_it():
    """The gate's choice among queued tasks (Dask priorities: smaller runs
    first), on an emulated H200 that batches PixArt 512px up to 4 and 1024px
    not at all."""
    resource = Pool("dit", canonical_name(EMULATED)).resource
    plugin = StagePlugin("dit", EMULATED)

    def task(key: str, side: int, due: int) -> TaskState:
        request = Request(model=EMULATED, prompt="a fox", height=side, width=side)
        features = {
            k: v
            for k, v in request.features.items()
            if isinstance(v, (int, float, bool))
        }
        return TaskState(
            key,
            priority=(0, due),
            resource_restrictions={resource: 1},
            annotations={"dflow": {"features": features}},
        )

    batch = [task("running", 512, due=5)]
    behind = [task("other shape", 1024, due=7), task("same shape", 512, due=9)]
    ahead = [task("other shape", 1024, due=3), task("same shape", 512, due=9)]
    alone = [task("running", 1024, due=1)]
    with dask.config.set({"dflow.runtime.backend": "emulated"}):
        plugin.runtime = runtime.StageRuntime(
            EMULATED, "dit", gpu_type="h200", max_dit_batch=BATCH
        )
        assert plugin._joining(batch, iter(behind), resource) is behind[1]
        assert plugin._joining(batch, iter(ahead), resource) is None
        # a shape that does not batch takes no one
        same = [task("same shape", 1024, due=2)]
        assert plugin._joining(alone, iter(same), resource) is None
