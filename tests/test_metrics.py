"""dflow's Prometheus metrics: the collector's bookkeeping, one registration per
process however many schedulers it starts, and the counters of real requests on
a real scheduler's ``/metrics``."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

import dask.config
from distributed import Client, Scheduler, wait
from distributed.http.scheduler.prometheus import core
from distributed.utils_test import gen_test

from dflow import client as dflow_client
from dflow import presets
from dflow.dashboards import metrics
from dflow.dashboards.metrics import DflowMetricCollector, latency_family
from dflow.plugins.extension import (
    LATENCY_BUCKETS,
    Decision,
    DflowExtension,
    LatencyHistogram,
    WorkerRecord,
)
from dflow.plugins.predictions import Predictions
from dflow.plugins.telemetry import Telemetry
from dflow.pools import Pool
from dflow.request import Request
from dflow.testing import scheduler_process, wait_for_pools, worker_processes

MODEL = "tiny-pixart"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """The dflow families' names and samples of a ``/metrics`` page."""
    names, samples = set(), {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("dflow_"):
            continue
        names.add(family.name)
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return names, samples


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


# -- bookkeeping --------------------------------------------------------------------


def test_latency_histogram_is_cumulative_per_model() -> None:
    histogram = LatencyHistogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 30.0):
        histogram.observe("a", seconds)
    histogram.observe("b", 2.0)
    family = latency_family(histogram, "latency", "help")
    values = {
        (s.name, s.labels["model"], s.labels.get("le")): s.value for s in family.samples
    }
    assert family.name == "latency_seconds"
    assert values["latency_seconds_bucket", "a", "0.1"] == 2
    assert values["latency_seconds_bucket", "a", "1.0"] == 3
    assert values["latency_seconds_bucket", "a", "+Inf"] == 4
    assert values["latency_seconds_count", "a", None] == 4
    assert values["latency_seconds_sum", "a", None] == pytest.approx(30.65)
    assert values["latency_seconds_bucket", "b", "1.0"] == 0
    assert values["latency_seconds_bucket", "b", "+Inf"] == 1


def test_latency_buckets_cover_tiny_models_and_long_videos() -> None:
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert LATENCY_BUCKETS[0] <= 0.01 and LATENCY_BUCKETS[-1] >= 600


def test_register_joins_collectors_built_before(monkeypatch: pytest.MonkeyPatch):
    """A process that served ``/metrics`` before importing dflow still gets
    dflow's metrics, from a collector the handler re-points at each scrape."""

    class Server:
        extensions: dict = {}

    class Earlier:
        server = Server()

    registry = prometheus_client.CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)
    monkeypatch.setattr(
        core,
        "COLLECTORS",
        [c for c in core.COLLECTORS if c is not DflowMetricCollector],
    )
    monkeypatch.setattr(core.PrometheusHandler, "_collectors", (Earlier(),))
    metrics.register()
    metrics.register()
    assert core.COLLECTORS.count(DflowMetricCollector) == 1
    _, collector = core.PrometheusHandler._collectors
    assert isinstance(collector, DflowMetricCollector)
    assert collector.server is Earlier.server
    assert prometheus_client.generate_latest(registry) == b""


# -- several schedulers in one process ----------------------------------------------


def move(
    extension: DflowExtension, worker: str, source: str | None, target: str | None
) -> None:
    """A controller decision, as the controller records it."""
    extension.record_decision(
        Decision(
            time.time(),
            worker,
            Pool(source, MODEL) if source else None,
            Pool(target, MODEL) if target else None,
            "test",
        )
    )


async def dflow_scheduler() -> tuple[Scheduler, DflowExtension, Telemetry]:
    """A scheduler with dflow's extension and telemetry (not the whole preload)."""
    scheduler = await Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0")
    extension = DflowExtension()
    telemetry = Telemetry(extension, Predictions())
    for plugin in (extension, telemetry):
        await plugin.start(scheduler)
        scheduler.add_plugin(plugin)
    return scheduler, extension, telemetry


async def scrape(scheduler: Scheduler) -> tuple[set[str], Samples]:
    port = scheduler.http_server.port
    response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/metrics")
    return parse(response.body.decode())


@pytest.mark.usefixtures("keep_dflow_config")
@gen_test(timeout=60)
async def test_each_scheduler_serves_its_own_metrics() -> None:
    metrics.register()
    a, extension_a, telemetry_a = await dflow_scheduler()
    # b keeps its last two decisions only
    with dask.config.set({"dflow.scheduler.history": 2}):
        b, extension_b, _ = await dflow_scheduler()
    try:
        extension_a.counts[MODEL, "submitted"] += 3
        extension_a.counts[MODEL, "completed"] += 2
        for seconds in (0.04, 0.3):
            extension_a.latency_histogram.observe(MODEL, seconds)
        extension_a.workers["tcp://127.0.0.1:1"] = WorkerRecord(
            "tcp://127.0.0.1:1", "dit-0", "ready", "dit", MODEL, "h200"
        )
        telemetry_a.service[Pool("dit", MODEL)] = 0.5
        move(extension_b, "encoder-0", "encoder", "dit")
        move(extension_b, "dit-1", "dit", None)

        names, samples = await scrape(a)
        assert {
            "dflow_requests_submitted",
            "dflow_requests_completed",
            "dflow_requests_failed",
            "dflow_request_latency_seconds",
            "dflow_workers",
            "dflow_queue_depth",
            "dflow_rebalancing_decisions",
        } <= names
        model = labels(model=MODEL)
        pool = labels(stage="dit", model=MODEL)
        assert samples["dflow_requests_submitted_total", model] == 3
        assert samples["dflow_requests_completed_total", model] == 2
        assert samples["dflow_requests_failed_total", model] == 0
        assert samples["dflow_request_latency_seconds_count", model] == 2
        assert (
            samples["dflow_request_latency_seconds_bucket", model | {("le", "0.05")}]
            == 1
        )
        workers = labels(stage="dit", model=MODEL, gpu_type="h200", state="ready")
        assert samples["dflow_workers", workers] == 1
        assert samples["dflow_queue_depth", pool] == 0
        assert samples["dflow_service_observed_seconds", pool] == 0.5
        assert not any(name.startswith("dflow_rebalancing") for name, _ in samples)

        _, samples_b = await scrape(b)
        assert not any(name.startswith("dflow_requests") for name, _ in samples_b)
        moves = "dflow_rebalancing_decisions_total"
        assert samples_b[moves, labels(source_stage="encoder", target_stage="dit")] == 1
        assert samples_b[moves, labels(source_stage="dit", target_stage="none")] == 1

        # counters keep counting what the bounded decision log has dropped
        move(extension_b, "encoder-2", "encoder", "dit")
        assert len(extension_b.decisions) == 2
        _, samples_b = await scrape(b)
        assert samples_b[moves, labels(source_stage="encoder", target_stage="dit")] == 2
        assert await scrape(a) == (names, samples)
    finally:
        await a.close()
        await b.close()

    # one collector in the registry, however many schedulers came and went
    collectors = [
        c
        for c in list(prometheus_client.REGISTRY._collector_to_names)
        if isinstance(c, DflowMetricCollector)
    ]
    assert len(collectors) == 1

    fresh, _, _ = await dflow_scheduler()
    try:
        names, samples = await scrape(fresh)
        assert "dflow_requests_submitted" in names
        assert not samples
    finally:
        await fresh.close()


# -- a real scheduler and workers ---------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Client, str]]:
    """``dask scheduler --preload dflow.preload`` and one ``dflow-worker`` per
    stage: a client and the scheduler's ``/metrics`` URL."""
    stages = ["encoder", "dit", "vae"]
    presets.folder(MODEL)  # built once here, not by each worker
    with (
        scheduler_process() as address,
        worker_processes(address, [(stage, MODEL) for stage in stages]) as workers,
        Client(address) as client,
    ):
        # generous: a loaded machine takes minutes to start three torch processes
        wait_for_pools(client, {MODEL: stages}, timeout=180, processes=workers)
        port = client.scheduler_info()["services"]["dashboard"]
        yield client, f"http://127.0.0.1:{port}/metrics"


@pytest.mark.slow
def test_request_counters_match_the_requests(served) -> None:
    client, url = served
    requests = [Request(model=MODEL, prompt=f"a fox, {i}", seed=i) for i in range(6)]
    # valid when made, broken on the way: it fails on the encoder worker
    object.__setattr__(requests[2], "prompt", None)
    futures = dflow_client.map(client, requests)
    wait(futures)
    assert [f.status for f in futures].count("error") == 1

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    _, samples = parse(text)
    model = labels(model=MODEL)
    assert samples["dflow_requests_submitted_total", model] == 6
    assert samples["dflow_requests_completed_total", model] == 5
    assert samples["dflow_requests_failed_total", model] == 1
    assert samples["dflow_requests_cancelled_total", model] == 0
    assert samples["dflow_request_latency_seconds_count", model] == 5
    assert samples["dflow_request_latency_seconds_sum", model] > 0
    buckets = [
        samples["dflow_request_latency_seconds_bucket", model | {("le", le)}]
        for le in [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    ]
    assert buckets == sorted(buckets) and buckets[-1] == 5
    for stage in ("encoder", "dit", "vae"):
        ready = labels(stage=stage, model=MODEL, gpu_type="cpu", state="ready")
        assert samples["dflow_workers", ready] == 1
        pool = labels(stage=stage, model=MODEL)
        assert samples["dflow_queue_depth", pool] == 0
        assert samples["dflow_service_observed_seconds", pool] > 0

    # the first request's prompt again: the encoder worker reuses its encoding
    lookups = "dflow_encoding_cache_lookups_total"
    assert samples[lookups, labels(model=MODEL, result="miss")] == 5
    assert (lookups, labels(model=MODEL, result="hit")) not in samples
    again = requests[0].replace(seed=100)
    assert dflow_client.submit(client, again).result().request == again
    with urllib.request.urlopen(url, timeout=30) as response:
        _, samples = parse(response.read().decode())
    assert samples[lookups, labels(model=MODEL, result="hit")] == 1
    assert samples[lookups, labels(model=MODEL, result="miss")] == 5
