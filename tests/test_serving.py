"""Disaggregated serving on Dask, end to end.

Real ``dask scheduler`` and ``dflow-worker`` processes on 127.0.0.1 serve each
model of the module's parametrization (tiny PixArt-Sigma for the
classifier-free-guidance path, tiny Flux, plus every ``--model-path`` /
``DFLOW_TEST_MODEL_PATHS`` folder): one scheduler with encoder, two DiT and VAE
workers, and one with a single ``--stage all`` worker. The tests check where each
stage task ran and where its input came from, that outputs equal
``dflow.generate`` and the stock pipeline, the futures API, cancellation, and
that requests survive a killed DiT worker and fail clearly when their pool is
gone. The ``gen_cluster`` tests check the API's graph, status and bookkeeping on
in-process workers.

Order matters: the ``gen_cluster`` tests come first (gen_cluster fails while
another client is alive in this process, as the clusters' clients are from their
first test to the module's end), and the last two tests kill DiT workers of the
module's cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import diffusers
import numpy as np
import pytest
import torch
import tqdm

import dask.config
from distributed import (
    Client,
    Worker,
    as_completed,
    get_task_stream,
    progress,
    wait,
)
from distributed.utils_test import gen_cluster

import dflow
from dflow import catalog, prompts, runtime
from dflow.client import encoding_key
from dflow.errors import InvalidRequest, ModelNotServed
from dflow.request import Request
from dflow.spec import canonical_name
from dflow.testing import (
    EQUIVALENCE_CASES,
    ServiceProcess,
    equivalence_request,
    external_model_paths,
    pixels,
    poll,
    scheduler_process,
    stock_pixels,
    stop,
    wait_for_pools,
    worker_processes,
)
from dflow.worker import StagePlugin

# real scheduler and worker processes
pytestmark = pytest.mark.slow

MODELS = ("tiny-pixart", "tiny-flux")
#: The disaggregated cluster's workers; two DiT workers, so one can be killed
LAYOUT = ("encoder", "dit", "dit", "vae")
#: Scheduler settings for every cluster here: the elastic controller stays off so
#: that workers keep their stages; a pool that disappears fails its requests fast
SCHEDULER_ENV = {
    "DASK_DFLOW__ELASTIC__ENABLED": "False",
    "DASK_DFLOW__SCHEDULER__UNSERVED_TIMEOUT": "2s",
    "DASK_DFLOW__SCHEDULER__CHECK_INTERVAL": "200ms",
}
INTERMEDIATE_PREFIXES = ("encode-", "denoise-")

# The functions this module runs on the scheduler and workers travel by value:
# those processes cannot import the test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "served_model" in metafunc.fixturenames:
        params = [pytest.param(name, id=name) for name in MODELS]
        params += [
            pytest.param(path, id=Path(path).name)
            for path in external_model_paths(metafunc.config)
        ]
        metafunc.parametrize("served_model", params, scope="module")


# -- fixtures ------------------------------------------------------------------------


@dataclass
class Serving:
    """The module's clusters for one model, and local references to compare with."""

    model: str
    client: Client
    workers: list[ServiceProcess]
    monolithic: Client
    _stock: Any = field(default=None, repr=False)

    def request(self, seed: int, **changes: Any) -> Request:
        """A small square request with the model's default guidance."""
        case = {"guidance_scale": None, "seed": seed, "aspect": (4, 4)}
        return equivalence_request(self.model, case, **changes)

    def generate(self, request: Request) -> np.ndarray:
        """``dflow.generate``'s pixels, in this process."""
        return pixels(dflow.generate(request))

    def stock(self, request: Request) -> np.ndarray:
        """The stock diffusers pipeline's pixels, in this process."""
        if self._stock is None:
            self._stock = diffusers.DiffusionPipeline.from_pretrained(
                request.spec.source, dtype=torch.float32
            )
            self._stock.set_progress_bar_config(disable=True)
        return stock_pixels(self._stock, request)

    def dit_processes(self) -> list[ServiceProcess]:
        return [p for p in self.workers if p.stage == "dit" and p.alive()]


@pytest.fixture(scope="module")
def serving(served_model, tiny_folders, tmp_path_factory) -> Iterator[Serving]:
    """Both clusters of one model; they start in parallel (imports and loading
    take seconds per worker) and stop together."""
    logs = tmp_path_factory.mktemp("serving")
    model = canonical_name(served_model)
    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        address = enter(scheduler_process(env=SCHEDULER_ENV, log_dir=logs / "split"))
        mono_address = enter(
            scheduler_process(env=SCHEDULER_ENV, log_dir=logs / "monolithic")
        )
        workers = enter(
            worker_processes(
                address, [(s, served_model) for s in LAYOUT], log_dir=logs / "split"
            )
        )
        mono_workers = enter(
            worker_processes(
                mono_address, [("all", served_model)], log_dir=logs / "monolithic"
            )
        )
        client = enter(Client(address))
        # not the default client: distributed.progress watches the default's
        mono = enter(Client(mono_address, set_as_default=False))
        wait_for_pools(client, {model: LAYOUT}, processes=workers)
        wait_for_pools(mono, {model: ["all"]}, processes=mono_workers)
        yield Serving(model, client, workers, mono)
        client.close()
        mono.close()
        # all at once, not cluster by cluster
        stop([address.process, mono_address.process, *workers, *mono_workers])
    runtime.uninstall(model, "all")  # the model dflow.generate loaded here


# -- helpers -------------------------------------------------------------------------


def request_id(key: str) -> str:
    return str(key).partition("-")[2]


def worker_stages(client: Client) -> dict[str, str]:
    """Address -> stage of the ready workers, as they reported to the extension."""
    records = client.sync(client.scheduler.dflow_workers)
    return {r["address"]: r["stage"] for r in records if r["state"] == "ready"}


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def incoming_transfers(dask_worker) -> list[tuple[str, str]]:
    """(key, source worker) of every key this worker fetched from another."""
    return [
        (str(key), entry["who"])
        for entry in dask_worker.transfer_incoming_log
        for key in entry["keys"]
    ]


def keys_wanted_by(dask_scheduler, client_id: str) -> list[str]:
    state = dask_scheduler.clients.get(client_id)
    return sorted(str(ts.key) for ts in state.wants_what) if state else []


def dflow_keys(dask_scheduler) -> list[str]:
    prefixes = (*INTERMEDIATE_PREFIXES, "decode-", "generate-")
    return [str(k) for k in dask_scheduler.tasks if str(k).startswith(prefixes)]


def intermediates_in_memory(dask_scheduler) -> list[str]:
    return [
        str(key)
        for key, ts in dask_scheduler.tasks.items()
        if str(key).startswith(INTERMEDIATE_PREFIXES) and ts.who_has
    ]


def intermediates_held(dask_worker) -> list[str]:
    return [
        str(k) for k in dask_worker.data if str(k).startswith(INTERMEDIATE_PREFIXES)
    ]


def request_counts(dask_scheduler) -> dict[str, int]:
    """The extension's request counts by status (each scheduler here serves one
    model)."""
    counts = dask_scheduler.extensions["dflow"].counts
    return {status: n for (_, status), n in counts.items()}


def executing(dask_worker) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


def stage_failures(dask_worker, key: str) -> list[str]:
    """Exception texts of ``key``'s executions that raised on this worker."""
    return [
        event.exception_text
        for event in dask_worker.state.stimulus_story(key)
        if type(event).__name__ == "ExecuteFailureEvent"
    ]


def executions(dask_worker, prefix: str) -> Counter:
    """How many times each key with ``prefix`` finished executing on this worker."""
    return Counter(
        str(entry[0])
        for entry in dask_worker.state.log
        if str(entry[0]).startswith(prefix)
        and entry[1] == "executing"
        and entry[2] == "memory"
    )


# -- the client API on in-process workers (gen_cluster; first, see the docstring) --------

TINY = "tiny-pixart"
STAGES = ("encoder", "dit", "vae")
#: In-process schedulers get dflow's preload, as ``dask scheduler --preload``
SCHEDULER = {"preload": ["dflow.preload"]}
API_CONFIG = {"dflow.elastic.enabled": False}


@pytest.fixture
def in_process(keep_dflow_config, monkeypatch):
    """What gen_cluster needs to host dflow workers in this process: dflow's
    config (``keep_dflow_config``), and no tqdm monitor: the first tqdm bar, even
    a disabled one (diffusers pipelines make one per call), starts tqdm's
    monitor thread, which lives on and fails gen_cluster's thread-leak check."""
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def stage_workers(*stages: str, model: str = TINY) -> list[tuple[str, int, dict]]:
    """gen_cluster workers, one per stage (fresh plugins for each test)."""
    return [("127.0.0.1", 1, {"plugins": {StagePlugin(s, model)}}) for s in stages]


def in_thread(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking dflow client call off the event loop the cluster runs on."""
    return asyncio.to_thread(function, *args, **kwargs)


def long_request(**changes: Any) -> Request:
    """A request whose denoise runs for seconds (it is cancelled, not awaited)."""
    fields = {"height": 512, "width": 512, "steps": 200, "seed": 1, **changes}
    return Request(model=TINY, prompt="a slow fox", **fields)


async def until(condition: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@gen_cluster(
    client=True,
    nthreads=stage_workers(*STAGES),
    scheduler_kwargs=SCHEDULER,
    config=API_CONFIG,
    timeout=120,
)
async def test_a_request_is_three_annotated_restricted_tasks(
    c, s, *workers, in_process
):
    await in_thread(wait_for_pools, c, {TINY: STAGES})
    request = long_request()
    future = await in_thread(dflow.submit, c, request)
    rid = request_id(future.key)
    keys = [encoding_key(request), f"denoise-{rid}", f"decode-{rid}"]
    assert future.key == keys[-1]
    await until(lambda: all(k in s.tasks for k in keys))

    features = {
        k: v for k, v in request.features.items() if isinstance(v, (int, float, bool))
    }
    assert features["steps"] == 200 and features["cfg"] is True
    documented = ("stage", "model", "request", "mode", "features")
    for key, stage in zip(keys, STAGES, strict=True):
        ts = s.tasks[key]
        annotation = ts.annotations["dflow"]
        assert {k: annotation[k] for k in documented} == {
            "stage": stage,
            "model": TINY,
            "request": rid,
            "mode": "disaggregated",
            "features": features,
        }
        assert ts.resource_restrictions == {stage: 1, f"{stage}:{TINY}": 1}
    assert [d.key for d in s.tasks[keys[1]].dependencies] == [keys[0]]
    assert [d.key for d in s.tasks[keys[2]].dependencies] == [keys[1]]
    assert {ts.key for ts in s.clients[c.id].wants_what} == {keys[2]}
    extension = s.extensions["dflow"]
    assert extension.requests[rid].final_key == keys[2]
    assert extension.requests[rid].status == "pending"

    await future.cancel()
    await until(lambda: not any(k in s.tasks for k in keys))
    assert extension.counts[TINY, "cancelled"] == 1
    assert rid not in extension.requests


@gen_cluster(
    client=True,
    nthreads=stage_workers(*STAGES),
    scheduler_kwargs=SCHEDULER,
    config=API_CONFIG,
    timeout=120,
)
async def test_status_has_every_stage_and_the_decisions(c, s, *workers, in_process):
    await in_thread(wait_for_pools, c, {TINY: STAGES})
    requests = [Request(model=TINY, prompt="a fox", seed=seed) for seed in range(3)]
    await c.gather(await in_thread(dflow.map, c, requests))

    status = await in_thread(dflow.status, c)
    assert set(status) == {"stages", "workers", "failures", "decisions", "health"}
    assert set(status["stages"]) == {*STAGES, "all"}
    assert sorted(w["stage"] for w in status["workers"]) == sorted(STAGES)
    assert {w["state"] for w in status["workers"]} == {"ready"}
    assert status["failures"] == []
    documented = {
        "workers",
        "loading",
        "queue",
        "arrival_rate",
        "predicted_s",
        "observed_s",
    }
    for stage, summary in status["stages"].items():
        assert documented <= set(summary), stage
        assert summary["workers"] == (0 if stage == "all" else 1)
        assert summary["loading"] == summary["queue"] == 0
    assert isinstance(status["decisions"], (list, tuple))


@gen_cluster(
    client=True,
    nthreads=stage_workers(*STAGES),
    scheduler_kwargs=SCHEDULER,
    config=API_CONFIG,
    timeout=120,
)
async def test_the_extension_counts_requests_by_outcome(
    c, s, encoder, dit, vae, in_process
):
    await in_thread(wait_for_pools, c, {TINY: STAGES})
    long = await in_thread(dflow.submit, c, long_request())
    denoise = f"denoise-{request_id(long.key)}"
    await until(lambda: denoise in {ts.key for ts in dit.state.executing})
    await long.cancel()

    good = [Request(model=TINY, prompt="a fox", seed=seed) for seed in range(2)]
    bad = Request(model=TINY, prompt="a fox", seed=3)
    object.__setattr__(bad, "height", 8)  # unchecked here: the DiT refuses it
    futures = await in_thread(dflow.map, c, [*good, bad])
    await wait(futures)
    assert [f.status for f in futures] == ["finished", "finished", "error"]

    counts = s.extensions["dflow"].counts
    expected = {"submitted": 4, "completed": 2, "failed": 1, "cancelled": 1}
    await until(lambda: {k: counts[TINY, k] for k in expected} == expected)


@gen_cluster(
    client=True,
    nthreads=[],
    scheduler_kwargs=SCHEDULER,
    config=API_CONFIG,
    timeout=120,
)
async def test_models_makes_folders_only_workers_have_resolvable(c, s, in_process):
    """A client on another machine than the model's folder: ``dflow.models``
    fetches the spec from the scheduler, and requests for it validate."""
    from dflow import presets

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "pixart-copy")
        shutil.copytree(presets.folder(TINY), folder)
        name = canonical_name(str(folder))
        async with Worker(s.address, nthreads=1, plugins={StagePlugin("all", name)}):
            await in_thread(wait_for_pools, c, {name: ["all"]})
            folder.rename(folder.with_name("moved"))
            # the worker runs in this process and registered the spec here: forget
            # it, as a client process without the folder never had it
            catalog._registry.pop(name)
            with pytest.raises(InvalidRequest, match="unknown model"):
                Request(model=name, prompt="a fox")

            assert name in await in_thread(dflow.models, c)
            request = Request(model=name, prompt="a fox", seed=1)
            output = await (await in_thread(dflow.submit, c, request))
            assert output.request == request


# -- where stages run and how data moves -----------------------------------------------


def test_stages_run_on_their_workers_and_pass_data_worker_to_worker(serving):
    client = serving.client
    stages = worker_stages(client)
    requests = [serving.request(seed) for seed in range(4)]

    with get_task_stream(client=client) as stream:
        futures = dflow.map(client, requests)
        finals = {f.key for f in futures}
        ids = {request_id(key) for key in finals}
        ours = lambda keys: {k for k in keys if request_id(k) in ids}  # noqa: E731
        # The client holds the outputs' futures only, and the scheduler agrees
        # (polled until it has the graph: both come in the same message).
        assert ours(client.futures) == finals
        wanted = poll(
            lambda: (
                ours(client.run_on_scheduler(keys_wanted_by, client_id=client.id))
                or None
            ),
            what="the scheduler to register the graph",
        )
        assert wanted == finals
        outputs = client.gather(futures)
    assert [o.request for o in outputs] == requests

    # the requests share a prompt, so one encode task serves them all
    encodings = {encoding_key(r) for r in requests}
    ours_or_encoding = lambda key: request_id(key) in ids or key in encodings  # noqa: E731
    ran_on = {r["key"]: r["worker"] for r in stream.data if ours_or_encoding(r["key"])}
    fetched = client.run(incoming_transfers)
    for future, request in zip(futures, requests, strict=True):
        rid, encoding = request_id(future.key), encoding_key(request)
        encoder, dit, vae = (
            ran_on[encoding],
            ran_on[f"denoise-{rid}"],
            ran_on[f"decode-{rid}"],
        )
        assert (stages[encoder], stages[dit], stages[vae]) == ("encoder", "dit", "vae")
        assert (encoding, encoder) in fetched[dit]
        assert (f"denoise-{rid}", dit) in fetched[vae]
    # Every hop went stage to stage: nothing else moved between workers.
    for address, transfers in fetched.items():
        for key, source in transfers:
            if not ours_or_encoding(key):
                continue
            hop = (stages[source], key.partition("-")[0], stages[address])
            assert hop in {("encoder", "encode", "dit"), ("dit", "denoise", "vae")}


@pytest.mark.parametrize(
    "case", list(EQUIVALENCE_CASES.values()), ids=list(EQUIVALENCE_CASES)
)
def test_output_equals_generate_and_stock_pipeline(serving, case, record_property):
    request = equivalence_request(serving.model, case)
    output = dflow.submit(serving.client, request).result()
    assert output.request == request
    assert output.timings["encode_batch"] == output.timings["decode_batch"] == 1

    ours = pixels(output)
    np.testing.assert_array_equal(ours, serving.generate(request))
    diff = max_diff(ours, serving.stock(request))
    record_property("max_abs_diff", diff)
    assert diff <= 1  # the bound of test_equivalence's stock comparison


def test_vae_batching_changes_pixels_by_at_most_one_level(serving):
    client = serving.client
    (vae,) = [a for a, stage in worker_stages(client).items() if stage == "vae"]
    # While the VAE decodes a large image, the small requests' latents arrive and
    # wait: the next decode batches them (a batch takes requests of one size).
    spec = serving.request(0).spec
    size = min(spec.limit("max_size"), 32 * spec.size_multiple)
    (large,) = dflow.map(client, [serving.request(99, height=size, width=size)])
    decode = f"decode-{request_id(large.key)}"
    poll(
        lambda: decode in client.run(executing, workers=[vae])[vae],
        what="the large decode to start",
    )
    requests = [serving.request(seed) for seed in range(100, 112)]
    outputs = client.gather(dflow.map(client, requests))
    assert large.result().timings["decode_batch"] == 1

    batch_sizes = [o.timings["decode_batch"] for o in outputs]
    assert max(batch_sizes) > 1, batch_sizes
    for output, request in zip(outputs, requests, strict=True):
        assert output.request == request
        diff = max_diff(pixels(output), serving.generate(request))
        # batched encodes are exact; batched decodes round differently
        bound = 0 if output.timings["decode_batch"] == 1 else 1
        assert diff <= bound, (output.timings, diff)


def test_monolithic_when_only_the_all_stage_serves_the_model(serving):
    request = serving.request(seed=7)
    future = dflow.submit(serving.monolithic, request)
    assert future.key.startswith("generate-")
    monolithic = future.result()
    assert "generate" in monolithic.timings
    split = dflow.submit(serving.client, request).result()
    assert split.timings["decode_batch"] == monolithic.timings["decode_batch"] == 1
    np.testing.assert_array_equal(pixels(monolithic), pixels(split))

    # the all-stage worker does not make a disaggregated pool
    with (
        dask.config.set({"dflow.client.model-timeout": "200ms"}),
        pytest.raises(ModelNotServed, match="disaggregated"),
    ):
        dflow.submit(serving.monolithic, request, mode="disaggregated")


# -- the futures API ----------------------------------------------------------------------


def test_futures_api_and_released_intermediates(serving, capsys):
    client = serving.client
    requests = [serving.request(seed) for seed in range(200, 206)]
    futures = dflow.map(client, requests)

    assert set(as_completed(futures)) == set(futures)
    done, not_done = wait(futures, timeout=60)
    assert done == set(futures) and not not_done
    progress(futures, notebook=False)
    assert "100% Completed" in capsys.readouterr().out
    assert [f.result().request for f in futures] == requests  # map keeps the order

    # the outputs are still held, their intermediates' data is gone everywhere
    # (the scheduler keeps their released tasks while the outputs need lineage)
    poll(
        lambda: not any(client.run(intermediates_held).values()),
        what="workers to release intermediates",
    )
    poll(
        lambda: not client.run_on_scheduler(intermediates_in_memory),
        what="the scheduler to release intermediates",
    )
    del futures, done
    poll(
        lambda: not client.run_on_scheduler(dflow_keys),
        what="the scheduler to forget the outputs",
    )


def test_cancelling_releases_the_chain_and_stops_the_denoise(serving):
    client = serving.client
    spec = serving.request(0).spec
    size = min(spec.limit("max_size"), 64 * spec.size_multiple)
    long = serving.request(1, height=size, width=size, steps=spec.limit("max_steps"))
    others = [serving.request(seed) for seed in range(300, 303)]
    stages = worker_stages(client)
    dits = [address for address, stage in stages.items() if stage == "dit"]

    future, *other_futures = dflow.map(client, [long, *others])
    rid = request_id(future.key)
    denoise = f"denoise-{rid}"
    running = poll(
        lambda: [
            a
            for a, keys in client.run(executing, workers=dits).items()
            if denoise in keys
        ],
        timeout=60,
        what="the long denoise to start",
    )
    (dit,) = running
    cancelled_at = time.monotonic()
    future.cancel()

    poll(
        lambda: not [k for k in client.run_on_scheduler(dflow_keys) if rid in k],
        timeout=5,
        what="the scheduler to forget the cancelled request",
    )
    poll(
        lambda: denoise not in client.run(executing, workers=[dit])[dit],
        timeout=5,
        what="the DiT worker to stop the cancelled denoise",
    )
    stopped_after = time.monotonic() - cancelled_at
    (failure,) = client.run(stage_failures, key=denoise, workers=[dit])[dit]
    match = re.search(r"stopped after (\d+) of (\d+) steps", failure)
    assert match, failure
    assert int(match[1]) < int(match[2]) == long.steps
    assert stopped_after < 5

    outputs = client.gather(other_futures)
    assert [o.request for o in outputs] == others
    counts = client.run_on_scheduler(request_counts)
    assert counts.get("cancelled", 0) >= 1


# -- failures ---------------------------------------------------------------------------


def test_a_model_nobody_serves_fails_fast(serving):
    request = Request(model="tiny-wan", prompt="a fox")
    start = time.monotonic()
    with (
        dask.config.set({"dflow.client.model-timeout": "300ms"}),
        pytest.raises(ModelNotServed, match="'tiny-wan'"),
    ):
        dflow.submit(serving.client, request)
    assert time.monotonic() - start < 5


#: Field values a client with stale limits, or without the model's tokenizer,
#: lets through; the worker must refuse them as an up-to-date client would
STALE = {
    "height": lambda spec: spec.vae_scale,  # below the DiT's patch size
    "prompt": lambda spec: "a red bicycle " * spec.max_sequence_length,
}


@pytest.mark.parametrize("field", sorted(STALE))
def test_a_failing_stage_fails_only_its_request(serving, field, monkeypatch):
    client = serving.client
    bad = serving.request(seed=5)
    value = STALE[field](bad.spec)
    with pytest.raises(InvalidRequest) as refused:
        prompts.check_length(bad.replace(**{field: value}))
    object.__setattr__(bad, field, value)  # sent without the client's check
    # a client that knows the model from the cluster alone has no tokenizer
    remote = dataclasses.replace(bad.spec, preset=None, source=None)
    monkeypatch.setitem(catalog._registry, bad.model, remote)
    good = [serving.request(seed) for seed in (400, 401)]
    before = client.run_on_scheduler(request_counts)

    first, failing, last = dflow.map(client, [good[0], bad, good[1]])
    with pytest.raises(InvalidRequest, match=re.escape(str(refused.value))) as raised:
        failing.result()
    assert raised.value.field == field
    assert [first.result().request, last.result().request] == good

    after = client.run_on_scheduler(request_counts)
    assert after.get("failed", 0) == before.get("failed", 0) + 1
    assert all(p.alive() for p in serving.workers)
    wait_for_pools(
        client, {serving.model: LAYOUT}, timeout=5, processes=serving.workers
    )
    assert dflow.submit(client, good[0]).result().request == good[0]


def test_killing_a_dit_worker_mid_run_loses_no_request(serving):
    """SIGKILL both the ``dflow-worker`` process (the Nanny) and its worker
    process, as a crashed machine: nothing restarts it, the other DiT worker
    takes over, and every request completes exactly once."""
    client = serving.client
    wait_for_pools(
        client, {serving.model: LAYOUT}, timeout=5, processes=serving.workers
    )
    stages = worker_stages(client)
    (vae,) = [address for address, stage in stages.items() if stage == "vae"]
    dits = {
        address: process
        for process in serving.dit_processes()
        for address in process.addresses(client)
    }
    before = client.run_on_scheduler(request_counts)
    # long enough that the kill lands mid-burst on a quiet machine too
    requests = [serving.request(seed, steps=200) for seed in range(500, 520)]
    futures = dflow.map(client, requests)

    def busy_dit() -> str | None:
        if not any(f.done() for f in futures):
            return None
        running = client.run(executing, workers=list(dits))
        return next((a for a, keys in running.items() if keys), None)

    victim = poll(busy_dit, 60, "a DiT worker busy mid-run", interval=0.02)
    dits[victim].kill()
    assert not all(f.done() for f in futures), "the burst ended before the kill"

    outputs = client.gather(futures)
    assert [o.request for o in outputs] == requests
    after = client.run_on_scheduler(request_counts)
    for status, delta in (("submitted", 20), ("completed", 20), ("failed", 0)):
        assert after.get(status, 0) - before.get(status, 0) == delta, status
    ids = {request_id(f.key) for f in futures}
    decoded = client.run(executions, prefix="decode-", workers=[vae])[vae]
    assert {k: n for k, n in decoded.items() if request_id(k) in ids} == {
        f.key: 1 for f in futures
    }
    poll(lambda: victim not in worker_stages(client), what="the victim to go")
    # the submitted requests: an output's holds its input image by reference
    for output, request in list(zip(outputs, requests))[:: len(outputs) // 3]:
        bound = 0 if output.timings["decode_batch"] == 1 else 1
        assert max_diff(pixels(output), serving.generate(request)) <= bound


def test_requests_fail_when_their_pool_disappears(serving):
    """With ``dflow.scheduler.unserved-timeout`` at 2s: once no DiT worker is left,
    the requests that still need one fail with ModelNotServed instead of hanging."""
    client = serving.client
    requests = [serving.request(seed, steps=100) for seed in range(600, 606)]
    futures = dflow.map(client, requests)
    dits = [a for a, s in worker_stages(client).items() if s == "dit"]
    poll(
        lambda: any(client.run(executing, workers=dits).values()),
        timeout=60,
        what="a denoise to start",
    )
    for process in serving.dit_processes():
        process.kill()
    killed_at = time.monotonic()

    errors = [f.exception(timeout=30) for f in futures]
    assert time.monotonic() - killed_at < 15
    failed = [e for e in errors if e is not None]
    assert failed, "every request finished before its DiT pool went away"
    for error in failed:
        assert isinstance(error, ModelNotServed)
        assert "dit stage" in str(error) and repr(serving.model) in str(error)
    for future, error in zip(futures, errors, strict=True):
        if error is None:
            assert future.result().timings["denoise"] > 0
