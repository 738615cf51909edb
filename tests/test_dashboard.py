"""dflow's dashboard pages: registered by the preload, empty but whole on a fresh
scheduler, filled from dflow's extension, and drawn with data by Chromium while
requests run on real stage workers.

Set ``DFLOW_DASHBOARD_SCREENSHOT=PATH`` to keep the browser test's screenshot
(``dashboards/dflow-dashboard.png`` is made that way).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bokeh.client import pull_session
from bokeh.core.json_encoder import serialize_json
from tornado.websocket import websocket_connect

from distributed import Client, Scheduler, wait
from distributed.utils_test import gen_test

from dflow import client as dflow_client
from dflow import presets
from dflow.dashboards import components, pages
from dflow.plugins.extension import Decision, DflowExtension, WorkerRecord
from dflow.plugins.predictions import Predictions
from dflow.plugins.telemetry import Sample, StageRecord, Telemetry
from dflow.pools import Pool
from dflow.request import Request
from dflow.testing import scheduler_process, wait_for_pools, worker_processes

MODEL = "tiny-pixart"
TITLES = (
    "Workers per stage (by GPU type)",
    "Queue depth per stage",
    "Request throughput",
    "End-to-end latency (p50, p95, p99)",
    "Service time per stage: predicted vs observed",
    "Rebalancing decisions",
)
TABLE_COLUMNS = ("stage", "model", "GPU type", "memory in use", "busy / idle")
SOURCES = (
    "dflow-workers-per-stage-data",
    "dflow-queue-depth-data",
    "dflow-throughput-data",
    "dflow-latency-data",
    "dflow-service-time-data",
    "dflow-rebalancing-data",
    "dflow-workers-data",
)


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read().decode()


def document_json(document: Any) -> str:
    return serialize_json(document.to_json())


def source_data(document: Any, name: str) -> dict[str, list]:
    return {k: list(v) for k, v in document.get_model_by_name(name).data.items()}


# -- components with data -----------------------------------------------------------


class FakePredictor:
    class Prediction:
        def __init__(self, seconds: float):
            self.seconds = seconds

    def predict(self, model: str, stage: str, gpu_type: str, features: dict) -> Any:
        return self.Prediction({"encoder": 0.01, "dit": 0.5, "vae": 0.1}[stage])


def fill(scheduler: Scheduler, now: float) -> None:
    """Ten minutes of fleet samples, stage records, decisions and two workers."""
    extension = scheduler.extensions["dflow"]
    telemetry = scheduler.plugins["dflow-telemetry"]
    telemetry.samples.clear()
    for i in range(700):
        t = now - 700 + i
        telemetry.samples.append(
            Sample(
                time=t,
                workers={
                    "encoder": {"cpu": 1},
                    "dit": {"cpu": 1, **({"h200": 2} if i >= 650 else {})},
                    "vae": {"cpu": 1},
                },
                queue={"encoder": 0, "dit": i % 5, "vae": 1},
                throughput=2.0,
                p50=0.2,
                p95=0.4,
                p99=None if i == 699 else 0.9,
            )
        )
    for stage in ("encoder", "dit", "vae"):
        telemetry.records.append(
            StageRecord(now, "k", "r", stage, MODEL, "w", "cpu", 0.2, 0.0, 0, {})
        )
        telemetry.service[Pool(stage, MODEL)] = 0.2
        # the predictor prices the pool's recent requests on its workers' GPUs
        telemetry.recent[Pool(stage, MODEL)].append({"tokens": 64})
    telemetry.predictions.use(FakePredictor())
    extension.record_decision(
        Decision(
            now - 60,
            "encoder-7",
            Pool("encoder", MODEL),
            Pool("dit", MODEL),
            "dit backlog 12 s > horizon",
        )
    )
    extension.record_decision(
        Decision(now - 30, "dit-9", Pool("dit", MODEL), None, "retired")
    )
    extension.workers["tcp://127.0.0.1:1"] = WorkerRecord(
        "tcp://127.0.0.1:1", "dit-1", "ready", "dit", MODEL, "h200", "cuda:0", 2**30
    )
    extension.workers["tcp://127.0.0.1:2"] = WorkerRecord(
        "tcp://127.0.0.1:2", "encoder-0", "loading", "encoder", MODEL, "cpu"
    )
    extension.workers["tcp://127.0.0.1:3"] = WorkerRecord(
        "tcp://127.0.0.1:3", "vae-2", "ready", "vae", MODEL, "cpu"
    )


@pytest.mark.usefixtures("keep_dflow_config")
@gen_test()
async def test_components_show_the_extension() -> None:
    async with Scheduler(host="127.0.0.1", dashboard=False) as scheduler:
        # dflow's extension and telemetry, without the preload's other parts
        extension = DflowExtension()
        for plugin in (extension, Telemetry(extension, Predictions())):
            await plugin.start(scheduler)
            scheduler.add_plugin(plugin)
        now = time.time()
        fill(scheduler, now)

        workers = components.StageWorkers(scheduler)
        workers.update()
        data = workers.source.data
        assert list(data["label"]) == [
            "encoder (cpu)",
            "dit (cpu)",
            "dit (h200)",
            "vae (cpu)",
        ]
        assert data["color"][1] == components.STAGE_COLORS["dit"]
        assert data["color"][2] not in components.STAGE_COLORS.values()
        h200 = list(data["ys"][2])
        # only the last WINDOW (600) seconds; the last 50 samples with two H200s
        assert 590 <= len(h200) <= 600 and h200[-50:] == [2] * 50 and h200[0] == 0

        queues = components.StageQueues(scheduler)
        queues.update()
        assert list(queues.source.data["dit"][-5:]) == [0, 1, 2, 3, 4]
        assert set(queues.source.data["vae"]) == {1}

        throughput = components.Throughput(scheduler)
        throughput.update()
        assert set(throughput.source.data["throughput"]) == {2.0}

        latency = components.Latency(scheduler)
        latency.update()
        p99 = list(latency.source.data["p99"])
        assert p99[-2] == 0.9 and math.isnan(p99[-1])

        service = components.ServiceTimes(scheduler)
        service.update()
        data = service.source.data
        assert list(service.pools.factors) == list(data["x"])
        assert list(data["x"])[:2] == [
            (f"encoder:{MODEL}", "predicted"),
            (f"encoder:{MODEL}", "observed"),
        ]
        assert list(data["seconds"]) == [0.01, 0.2, 0.5, 0.2, 0.1, 0.2]
        assert "no predictor" not in service.title.text

        timeline = components.RebalancingTimeline(scheduler)
        timeline.update()
        data = timeline.source.data
        assert list(data["worker"]) == ["dit-9", "encoder-7"]  # newest first
        assert list(data["target"]) == ["none", f"dit:{MODEL}"]
        assert list(data["reason"]) == ["retired", "dit backlog 12 s > horizon"]
        assert list(timeline.pools.factors) == [
            f"encoder:{MODEL}",
            f"dit:{MODEL}",
            "none",
        ]

        table = components.StageWorkerTable(scheduler)
        table.update()
        data = table.source.data
        assert list(data["name"]) == ["encoder-0", "dit-1", "vae-2"]
        assert list(data["state"]) == ["loading", "ready", "ready"]
        assert list(data["gpu_type"]) == ["cpu", "h200", "cpu"]
        assert list(data["activity"]) == ["idle", "idle", "idle"]
        assert list(data["device_memory"]) == [0, 2**30, 0]

        # nothing left behind by a second refresh, nor by an absent extension
        for component in (workers, queues, service, timeline, table):
            component.update()
        del scheduler.extensions["dflow"]
        for cls in (components.Throughput, components.ServiceTimes):
            empty = cls(scheduler)
            empty.update()
            assert all(len(c) == 0 for c in empty.source.data.values())


# -- a real scheduler and workers --------------------------------------------------


@pytest.fixture(scope="module")
def scheduler() -> Iterator[tuple[str, str]]:
    """``dask scheduler --preload dflow.preload`` with its dashboard: the address
    and the dashboard's URL."""
    with scheduler_process(args=["--dashboard"]) as address, Client(address) as client:
        port = client.scheduler_info()["services"]["dashboard"]
        yield address, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(scheduler) -> Iterator[tuple[str, Client, list[str]]]:
    """One worker per stage of the model: the dashboard's URL, a client and the
    workers' names."""
    address, url = scheduler
    stages = ["encoder", "dit", "vae"]
    presets.folder(MODEL)  # built once here, not by each worker
    with (
        worker_processes(address, [(stage, MODEL) for stage in stages]) as workers,
        Client(address) as client,
    ):
        # generous: a loaded machine takes minutes to start three torch processes
        wait_for_pools(client, {MODEL: stages}, timeout=180, processes=workers)
        names = [
            w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values()
        ]
        yield url, client, names


@pytest.mark.slow
def test_pages_on_a_fresh_scheduler(scheduler) -> None:
    """Every page answers and holds its plots, empty, before any worker or request."""
    _, url = scheduler
    status, html = http_get(f"{url}/status")
    assert status == 200
    for path in pages.applications:
        assert http_get(url + path)[0] == 200, path
        if path.startswith("/individual-"):
            # listed in the dashboard's "More..." menu
            assert f'href="{path.lstrip("/")}"' in html
    with pull_session(url=f"{url}/dflow") as session:
        document = session.document
        assert document.title == "Dask: dflow"
        text = document_json(document)
        for title in (*TITLES, *TABLE_COLUMNS):
            assert title in text
        # telemetry samples an empty fleet: zero queues and throughput
        for name in SOURCES:
            data = source_data(document, name)
            values = [v for k, c in data.items() if k != "time" for v in c]
            assert all(v == 0 or math.isnan(v) for v in values), (name, data)


def run_requests(client: Client, n: int) -> None:
    futures = dflow_client.map(
        client, [Request(model=MODEL, prompt=f"a fox, {i}") for i in range(n)]
    )
    wait(futures)
    assert all(f.status == "finished" for f in futures)


@pytest.mark.slow
def test_dflow_page_with_requests(served) -> None:
    url, client, _ = served
    run_requests(client, 6)
    time.sleep(1.5)  # telemetry samples the fleet once a second
    status, _ = http_get(f"{url}/dflow")
    assert status == 200
    with pull_session(url=f"{url}/dflow") as session:
        document = session.document
        text = document_json(document)
        for title in TITLES:
            assert title in text
        table = source_data(document, "dflow-workers-data")
        assert sorted(table["stage"]) == ["dit", "encoder", "vae"]
        assert set(table["model"]) == {MODEL}
        assert set(table["state"]) == {"ready"}
        assert set(table["gpu_type"]) == {"cpu"}
        assert all(m > 0 for m in table["memory"])
        assert max(source_data(document, "dflow-throughput-data")["throughput"]) > 0
        p50 = source_data(document, "dflow-latency-data")["p50"]
        assert any(p > 0 for p in p50 if not math.isnan(p))
        labels = source_data(document, "dflow-workers-per-stage-data")["label"]
        assert set(labels) == {"encoder (cpu)", "dit (cpu)", "vae (cpu)"}
        service = source_data(document, "dflow-service-time-data")
        observed = [
            s
            for s, kind in zip(service["seconds"], service["kind"])
            if kind == "observed"
        ]
        assert len(observed) == 3 and all(s > 0 for s in observed)


# -- Chromium -----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
)

#: What the page shows, read in the browser: the length and largest value of
#: each data source BokehJS received, the canvases drawn (in Bokeh's shadow
#: roots) and the text of the tables' cells.
PAGE_STATE_JS = """(() => {
  const docs = window.Bokeh && window.Bokeh.documents;
  if (!docs || !docs.length) return null;
  const sources = {};
  for (const model of docs[0].all_models) {
    if (model.name && model.name.endsWith("-data")) {
      const columns = {};
      for (const [field, values] of Object.entries(model.data)) {
        const numbers = Array.from(values).filter((v) => typeof v === "number" && !isNaN(v));
        columns[field] = numbers.length ? Math.max(...numbers) : null;
      }
      sources[model.name] = {length: model.get_length(), max: columns};
    }
  }
  let canvases = 0;
  const cells = [];
  const walk = (root) => {
    for (const element of root.querySelectorAll("*")) {
      if (element.tagName === "CANVAS" && element.width > 0 && element.height > 0) canvases++;
      if (element.classList.contains("slick-cell")) cells.push(element.textContent);
      if (element.shadowRoot) walk(element.shadowRoot);
    }
  };
  walk(document);
  return {sources, canvases, cells};
})()"""


class Chromium:
    """Headless Chromium driven through the DevTools protocol over a websocket."""

    def __init__(self, binary: str, profile: Path, size: tuple[int, int]):
        self.profile = profile
        self.process = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--window-size={size[0]},{size[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ids = 0
        self.session: str | None = None

    async def open(self, url: str, timeout: float = 30) -> None:
        active_port = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while len(_read(active_port).split()) < 2:
            assert self.process.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open DevTools"
            await asyncio.sleep(0.1)
        port, path = _read(active_port).split()[:2]
        self.connection = await websocket_connect(
            f"ws://127.0.0.1:{port}{path}", max_message_size=64 * 2**20
        )
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]
        await self.send("Page.navigate", url=url)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.ids += 1
        message: dict[str, Any] = {"id": self.ids, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self.connection.write_message(json.dumps(message))
        while True:  # skip events until the answer
            reply = await self.connection.read_message()
            assert reply is not None, "chromium closed the connection"
            answer = json.loads(reply)
            if answer.get("id") == self.ids:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True
        )
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def shows_data(state: dict[str, Any] | None, workers: list[str]) -> bool:
    """Whether every time series and the table have data, and the plots are drawn."""
    if not state or state["canvases"] < len(TITLES):
        return False
    sources = state["sources"]
    if set(sources) != set(SOURCES):
        return False
    for name in SOURCES:
        if name != "dflow-rebalancing-data" and not sources[name]["length"]:
            return False
    maxima = (
        sources["dflow-throughput-data"]["max"]["throughput"],
        sources["dflow-latency-data"]["max"]["p50"],
        sources["dflow-service-time-data"]["max"]["seconds"],
    )
    if not all(m and m > 0 for m in maxima):
        return False
    return all(w in state["cells"] for w in workers) and "ready" in state["cells"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs it)")
def test_browser_shows_data_while_requests_run(served, tmp_path: Path) -> None:
    url, client, workers = served
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            run_requests(client, 4)

    loader = threading.Thread(target=load, name="dflow-load")
    loader.start()
    assert CHROMIUM is not None
    browser = Chromium(CHROMIUM, tmp_path / "profile", size=(1400, 1300))
    screenshot = tmp_path / "dflow-dashboard.png"

    async def check() -> dict[str, Any] | None:
        await browser.open(f"{url}/dflow")
        state = None
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            state = await browser.evaluate(PAGE_STATE_JS)
            if shows_data(state, workers):
                await asyncio.sleep(1)  # let the last refresh draw
                await browser.screenshot(screenshot)
                break
            await asyncio.sleep(0.5)
        return state

    try:
        state = asyncio.run(check())
    finally:
        browser.close()
        stop.set()
        loader.join(60)
    assert shows_data(state, workers), state
    assert screenshot.stat().st_size > 10_000
    keep = os.environ.get("DFLOW_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copyfile(screenshot, keep)
