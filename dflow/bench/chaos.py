"""The chaos run: requests of two models in flight while workers of every stage
are SIGKILLed, paused and switched to other stages, and the accounting that
checks each request completed exactly once or failed with a clear error.

Used by ``benchmarks/chaos.py`` (the long runs) and ``tests/test_chaos.py`` (CI
size); both document the run, :class:`ModelReport` the accounting.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client, KilledWorker, wait
from distributed.client import FutureCancelledError
from distributed.diagnostics.plugin import SchedulerPlugin

import dflow
from dflow.bench.env import machine
from dflow.errors import InvalidRequest, ModelNotServed, Overloaded, StageOutOfMemory
from dflow.output import Output
from dflow.request import Request
from dflow.testing import (
    ServiceProcess,
    fleet_workers,
    move,
    scheduler_process,
    wait_for_pools,
    worker_processes,
)

logger = logging.getLogger(__name__)

TINY = "tiny-pixart"
EMULATED = "pixart-sigma-1024"
LAYOUT = ("encoder", "dit", "dit", "vae")
STAGE_PREFIXES = ("encode-", "denoise-", "decode-", "generate-")
FINAL_PREFIXES = ("decode-", "generate-")
CLEAR_ERRORS = (
    InvalidRequest,
    ModelNotServed,
    Overloaded,
    StageOutOfMemory,
    KilledWorker,
)


@dataclass
class Settings:
    tiny_requests: int = 36
    emulated_requests: int = 200
    rounds: int = 1
    #: seconds between request batches; a round of chaos takes about 25 s
    interval: float = 2.0
    pause: float = 3.0
    pause_past_ttl: bool = False
    time_scale: float = 1.0
    #: seconds to wait for the last outcome once chaos is over
    drain_timeout: float = 240.0


# -- the scheduler's ledger ----------------------------------------------------------------


class Ledger(SchedulerPlugin):
    """Every stage-task completion (time, key, worker), and when each worker
    was removed or fenced (the first of them)."""

    name = "dflow-chaos-ledger"

    def __init__(self) -> None:
        self.completions: list[tuple[float, str, str]] = []
        self.removed: dict[str, float] = {}

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        key = str(key)
        if (
            start == "processing"
            and finish == "memory"
            and key.startswith(STAGE_PREFIXES)
        ):
            self.completions.append((time.time(), key, kwargs.get("worker", "")))

    def remove_worker(self, scheduler, worker, **kwargs) -> None:
        self.removed.setdefault(worker, time.time())

    def log_event(self, topic, msg) -> None:
        # a fenced worker's outputs are recomputed as a removed one's are
        if topic == "dflow" and msg.get("action") == "worker-fenced":
            self.removed.setdefault(msg["address"], time.time())


def ledger_of(dask_scheduler) -> dict[str, Any]:
    ledger = dask_scheduler.plugins[Ledger.name]
    return {"completions": list(ledger.completions), "removed": dict(ledger.removed)}


def extension_counts(dask_scheduler) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (model, status), n in dask_scheduler.extensions["dflow"].counts.items():
        counts[model][status] = n
    return dict(counts)


# -- chaos ---------------------------------------------------------------------------------


@dataclass
class Action:
    at: float
    what: str
    ok: bool = True


@dataclass
class Chaos:
    """Kills, pauses and switches, one round after another, in a thread."""

    client: Client
    processes: dict[str, list[ServiceProcess]]
    settings: Settings
    actions: list[Action] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)
    _paused: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(self.settings.rounds):
                self.round()
        except BaseException as error:  # reported by the caller
            self.error = error
        finally:
            self.resume_all()

    def round(self) -> None:
        tiny, emulated = self.processes[TINY], self.processes[EMULATED]
        steps: list[tuple[float, Callable[[], Any]]] = [
            (1.0, lambda: self.kill(tiny, "encoder")),
            (1.0, lambda: self.switch(tiny, "dit", 1, "vae", TINY)),
            (1.0, lambda: self.pause(emulated, "vae")),
            (1.0, lambda: self.kill(emulated, "dit")),
            (2.0, lambda: self.kill(tiny, "vae")),
            (1.0, lambda: self.switch(emulated, "dit", 1, "encoder", EMULATED)),
            (2.0, lambda: self.kill(emulated, "encoder")),
            (1.0, lambda: self.pause(tiny, "dit")),
            (2.0, lambda: self.switch(tiny, "dit", 1, "dit", TINY)),
            (2.0, lambda: self.kill(tiny, "dit")),
            (2.0, lambda: self.kill(emulated, "vae")),
            (2.0, lambda: self.switch(emulated, "dit", 1, "dit", EMULATED)),
            # let the restarted workers come back, and the paused ones wake
            (max(6.0, self.settings.pause), lambda: None),
        ]
        for delay, step in steps:
            time.sleep(delay)
            step()

    def record(self, what: str, ok: bool = True) -> None:
        self.actions.append(Action(round(time.monotonic() - self.start, 2), what, ok))
        logger.info("chaos: %s%s", what, "" if ok else " (skipped)")

    def process(
        self, group: list[ServiceProcess], stage: str, index: int = 0
    ) -> ServiceProcess:
        return [p for p in group if p.stage == stage][index]

    def kill(self, group: list[ServiceProcess], stage: str) -> None:
        """SIGKILL the Dask worker process (the Nanny's child): the Nanny restarts it."""
        process = self.process(group, stage)
        pids = [pid for pid in process.worker_pids() if pid not in self._paused]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.record(
            f"SIGKILL {stage} worker of {process.model} (pid {pids})", bool(pids)
        )

    def pause(self, group: list[ServiceProcess], stage: str) -> None:
        """SIGSTOP a worker process for ``pause`` seconds (SIGCONT in a timer)."""
        process = self.process(group, stage, index=-1)
        pids = process.worker_pids()
        with self._lock:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
                self._paused.add(pid)
        self.record(
            f"SIGSTOP {stage} worker of {process.model} for {self.settings.pause:g}s"
        )
        timer = threading.Timer(self.settings.pause, self.resume, args=(pids, process))
        timer.daemon = True
        timer.start()

    def resume(self, pids: list[int], process: ServiceProcess) -> None:
        with self._lock:
            for pid in pids:
                if pid in self._paused:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                    self._paused.discard(pid)
        self.record(f"SIGCONT {process.stage} worker of {process.model}")

    def resume_all(self) -> None:
        with self._lock:
            for pid in list(self._paused):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self._paused.clear()

    def switch(
        self,
        group: list[ServiceProcess],
        stage: str,
        index: int,
        target: str,
        model: str,
    ) -> None:
        """Switch the worker of ``group``'s ``index``-th ``stage`` process to
        ``target`` (found by name: dflow-worker names CPU workers after the
        Nanny's pid, and a paused worker must not be asked anything)."""
        process = self.process(group, stage, index)
        ready = [
            w
            for name, w in fleet_workers(self.client).items()
            if name.endswith(f"-{process.pid}") and w["state"] == "ready"
        ]
        source = ready[0]["stage"] if ready else None
        if ready:
            move(self.client, ready[0]["address"], target, model, "chaos")
        self.record(
            f"switch a worker of {model} from {source} to {target}", bool(source)
        )


# -- a run ---------------------------------------------------------------------------------


@dataclass
class ModelReport:
    """One model's accounting of a chaos run.

    - *completed*: futures whose result is an ``Output`` of exactly the request
      submitted (``Output.request``), each request id seen once;
    - *failed*: futures that raised a clear error: dflow's own
      (``ModelNotServed``, ``InvalidRequest``, ``Overloaded``,
      ``StageOutOfMemory``), or distributed's ``KilledWorker``;
    - *lost*: submitted - completed - failed: futures not done by the end, or
      that raised anything else;
    - *duplicated*: completions of a request's final task beyond the first that
      were not recomputations of an output lost with its worker (Dask
      recomputes lost keys, and dflow's health check what only a fenced worker
      holds: a final task completing again is legitimate only if the worker
      holding its previous result had been removed or fenced first).
    """

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    #: of the failed: refused at admission (never reached the scheduler's graph)
    refused: int = 0
    #: final tasks completed again after the worker holding the output died
    final_recomputed: int = 0
    #: encode/denoise tasks completed more than once (lost with their worker)
    intermediate_recomputed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    extension: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    settings: dict[str, Any]
    models: dict[str, ModelReport]
    actions: list[dict[str, Any]]
    wall_s: float
    machine: dict[str, Any]

    def table(self) -> str:
        rows = [
            "| model | submitted | completed | failed (clear error) | lost | duplicated "
            "| outputs recomputed | intermediates recomputed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for model, r in self.models.items():
            errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "-"
            rows.append(
                f"| {model} | {r.submitted} | {r.completed} | {r.failed} ({errors}) "
                f"| {r.lost} | {r.duplicated} | {r.final_recomputed} "
                f"| {r.intermediate_recomputed} |"
            )
        return "\n".join(rows)


def requests_for(settings: Settings) -> list[Request]:
    tiny = [
        Request(
            model=TINY, prompt=f"a fox, take {i}", height=64, width=64, steps=10, seed=i
        )
        for i in range(settings.tiny_requests)
    ]
    emulated = [
        Request(
            model=EMULATED,
            prompt=f"a lighthouse {i}",
            height=256,
            width=256,
            steps=20,
            seed=i,
        )
        for i in range(settings.emulated_requests)
    ]
    # interleaved, so both models are in flight during every action
    mixed: list[Request] = []
    ratio = max(1, len(emulated) // max(1, len(tiny)))
    while tiny or emulated:
        mixed += emulated[:ratio] + tiny[:1]
        del emulated[:ratio], tiny[:1]
    return mixed


@contextlib.contextmanager
def cluster(settings: Settings, log_dir: Path | None) -> Iterator[tuple[Client, dict]]:
    scheduler_env = {
        "DASK_DFLOW__ELASTIC__ENABLED": "False",
        "DASK_DFLOW__SCHEDULER__CHECK_INTERVAL": "200ms",
        # a killed worker's pool is back once its Nanny restarted it; only a pool
        # gone for this long fails its requests
        "DASK_DFLOW__SCHEDULER__UNSERVED_TIMEOUT": "120s",
    }
    if settings.pause_past_ttl:
        scheduler_env["DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL"] = (
            f"{settings.pause / 2}s"
        )
    emulated_env = {
        "DASK_DFLOW__RUNTIME__BACKEND": "emulated",
        "DASK_DFLOW__EMULATION__TIME_SCALE": str(settings.time_scale),
        "DASK_DFLOW__EMULATION__LOAD_BANDWIDTH": "1000GiB",
    }
    logs = Path(log_dir) if log_dir else None
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(
            scheduler_process(env=scheduler_env, log_dir=logs)
        )
        tiny = stack.enter_context(
            worker_processes(
                address, [(s, TINY) for s in LAYOUT], log_dir=logs and logs / "tiny"
            )
        )
        emulated = stack.enter_context(
            worker_processes(
                address,
                [(s, EMULATED) for s in LAYOUT],
                env=emulated_env,
                log_dir=logs and logs / "emulated",
            )
        )
        client = stack.enter_context(Client(address))
        processes = {TINY: tiny, EMULATED: emulated}
        wait_for_pools(
            client,
            {TINY: LAYOUT, EMULATED: LAYOUT},
            processes=tiny + emulated,
            timeout=300,
        )
        yield client, processes


def run(
    settings: Settings, client: Client, processes: dict[str, list[ServiceProcess]]
) -> Report:
    """One chaos run on a cluster from :func:`cluster`."""
    start = time.monotonic()
    client.register_plugin(Ledger())
    before = client.run_on_scheduler(extension_counts)
    requests = requests_for(settings)
    chaos = Chaos(client, processes, settings)
    thread = threading.Thread(target=chaos.run, name="chaos", daemon=True)
    thread.start()

    # batches over the chaos rounds' span, so requests are in flight throughout
    batches = max(1, round(25 * settings.rounds / settings.interval))
    size = -(-len(requests) // batches)
    futures: list[Any] = []
    refused: list[tuple[Request, Exception]] = []
    # a pool whose only worker is restarting has none for a few seconds: wait
    # for it at admission rather than refuse the batch
    with dask.config.set({"dflow.client.model-timeout": "120s"}):
        for index in range(0, len(requests), size):
            batch = requests[index : index + size]
            try:
                futures += dflow.map(client, batch)
            except (ModelNotServed, Overloaded, InvalidRequest) as refusal:
                refused += [(r, refusal) for r in batch]
            time.sleep(settings.interval)
    thread.join()
    if chaos.error is not None:
        raise RuntimeError("the chaos thread failed") from chaos.error
    wait(futures, timeout=settings.drain_timeout)

    models: dict[str, ModelReport] = {m: ModelReport() for m in (TINY, EMULATED)}
    for request, reason in refused:  # refused at admission: a clear error too
        report = models[request.model]
        report.submitted += 1
        report.failed += 1
        report.refused += 1
        name = type(reason).__name__
        report.errors[name] = report.errors.get(name, 0) + 1
    refused_ids = {id(r) for r, _ in refused}
    requests = [r for r in requests if id(r) not in refused_ids]
    seen: Counter[str] = Counter()
    for request, future in zip(requests, futures, strict=True):
        report = models[request.model]
        report.submitted += 1
        rid = str(future.key).partition("-")[2]
        if future.status == "finished":
            output = future.result()
            assert isinstance(output, Output) and output.request == request, future.key
            seen[rid] += 1
            report.completed += 1
            continue
        error: BaseException | None = None
        if future.status in ("error", "cancelled"):
            try:
                future.result(timeout=0)
            except Exception as raised:
                error = raised
        if isinstance(error, CLEAR_ERRORS) or (
            isinstance(error, FutureCancelledError)
            and error.reason == "deadline-exceeded"
        ):
            report.failed += 1
            name = type(error).__name__
            report.errors[name] = report.errors.get(name, 0) + 1
        else:
            report.lost += 1
            logger.error("lost %s: %s %r", request.model, future.status, error)
    assert all(n == 1 for n in seen.values())

    ledger = client.run_on_scheduler(ledger_of)
    model_of = {
        str(f.key).partition("-")[2]: r.model for r, f in zip(requests, futures)
    }
    by_key: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for when, key, worker in ledger["completions"]:
        if key.partition("-")[2] in model_of:
            by_key[key].append((when, worker))
    for key, runs in by_key.items():
        report = models[model_of[key.partition("-")[2]]]
        runs.sort()
        for (_, holder), (when, _) in itertools.pairwise(runs):
            if key.startswith(FINAL_PREFIXES):
                removed = ledger["removed"].get(holder)
                if removed is not None and removed <= when:
                    report.final_recomputed += 1
                else:
                    report.duplicated += 1
            else:
                report.intermediate_recomputed += 1

    after = client.run_on_scheduler(extension_counts)
    for model, report in models.items():
        report.extension = {
            status: after.get(model, {}).get(status, 0)
            - before.get(model, {}).get(status, 0)
            for status in ("submitted", "completed", "failed", "cancelled")
        }
    return Report(
        settings=asdict(settings),
        models=models,
        actions=[asdict(a) for a in chaos.actions],
        wall_s=round(time.monotonic() - start, 1),
        machine=machine(),
    )
