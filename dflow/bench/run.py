"""Run one serving mode of a scenario on a fresh in-process emulated fleet.

A scheduler and one in-process Dask worker per emulated GPU on one event loop
(``StageCluster(processes=False)``, ``inproc://`` comms), so dozens of emulated
GPUs fit two cores. Arrivals are paced at ``t x time-scale`` wall seconds, and
every controller period is set in emulated seconds times the scale.

What each mode runs: ``monolithic``, monolithic replicas partitioned per
model; ``monolithic_autoscaled``, the same moved by
:class:`~dflow.bench.baselines.ReplicaAutoscaler`; ``static``, dflow's stage
pools at a static ratio; ``disagfusion``, those pools moved by
:class:`~dflow.bench.disagfusion.ThresholdScaler`; ``elastic``, dflow's
controller (``dflow.elastic.pricing: hybrid``), and its ablations
``prediction_only`` (profiles alone) and ``feedback_only`` (observed service
times alone); ``synchronous``, the static pools with each stage task submitted
when the previous one finishes (:class:`~dflow.bench.handoff.SynchronousHandoff`)
rather than ahead of need; ``static_experts``, the static pools with a
two-expert model's DiT split into one pool per expert (the chain
:data:`~dflow.pools.EXPERT_CHAIN`: the high-noise pool hands its latents to
the low-noise pool at the boundary step). dflow's modes serve each pool earliest deadline first, each
request's SLO its deadline; the peers' policies (monolithic, autoscaled,
DisagFusion) in arrival order.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import dask.config
from distributed import Client

import dflow.client
from dflow.bench import CONTROLLED, MONOLITHIC_MODES
from dflow.bench.metrics import ModeRun
from dflow.bench.physics import Allocation
from dflow.bench.recorder import Recorder
from dflow.pools import MONOLITHIC

if TYPE_CHECKING:
    from dflow.bench.scenarios import Scenario
    from dflow.bench.workload import TraceEntry


async def _install(
    scheduler: Any,
    predictor: Any,
    recorder: Recorder,
    policy: Any,
) -> None:
    """dflow (:func:`~dflow.plugins.install.install`, with the fleet's
    predictor), the recorder, and the mode's scaling policy if any."""
    from dflow.plugins.install import install

    await install(scheduler, predictor=predictor)
    for plugin in [recorder] if policy is None else [recorder, policy]:
        scheduler.add_plugin(plugin)
        await plugin.start(scheduler)


def fleet_workers(
    allocation: Allocation, monolithic: bool
) -> list[tuple[str, str, str]]:
    """``(stage, model, gpu_type)`` of each worker of an allocation."""
    workers = []
    for (stage, model), per_type in sorted(allocation.items()):
        for gpu, count in sorted(per_type.items()):
            workers += [(stage, model, gpu)] * count
    return workers


def fleet_predictor(cost: Any, gpu_types: Sequence[str], scale: float) -> Any:
    """A predictor that prices every pool on every GPU type of the fleet as the
    emulation charges it, in wall seconds at ``scale`` (as the controller
    observes them): what a deployment profiled on its own GPU types knows.

    Its online correction is off (``ewma_alpha=0``): it would learn Dask's
    per-task CPU time divided by the time scale (25x at 0.04) and inflate the
    sub-second encoder and VAE calls many times over; the controller trusts the
    profile, which is what the emulation charges. (The predictor is built
    before the run's config is set, so the alpha is passed, not configured.)"""
    from dflow.predictor import Predictor

    rows = [row for gpu in sorted(set(gpu_types)) for row in cost.rows_for(gpu, scale)]
    return Predictor(rows, ewma_alpha=0.0)


#: The modes served in arrival order (the peers' policies)
ARRIVAL_ORDER = (*MONOLITHIC_MODES, "disagfusion")
#: The controller's pricing in each ablation (``dflow.elastic.pricing``)
PRICING = {"prediction_only": "prediction", "feedback_only": "feedback"}


def run_config(scenario: Scenario, mode: str, scale: float) -> dict[str, Any]:
    """Dask config of one mode's run: the emulated backend, the mode's pricing
    and task order, and every controller period in emulated seconds times the
    scale."""
    s = scenario.controller
    return {
        "dflow.elastic.pricing": PRICING.get(mode, "hybrid"),
        "dflow.slo.order": "arrival" if mode in ARRIVAL_ORDER else "deadline",
        "dflow.runtime.backend": "emulated",
        "dflow.emulation.time-scale": scale,
        # the elastic controller starts with the arrivals (run_mode)
        "dflow.elastic.enabled": False,
        "dflow.elastic.interval": s["interval"] * scale,
        "dflow.elastic.default-switch": s["default-switch"] * scale,
        "dflow.planner.horizon": s["horizon"] * scale,
        "dflow.planner.cooldown": s["cooldown"] * scale,
        "dflow.planner.hysteresis": s["hysteresis"],
        "dflow.telemetry.window": s["window"] * scale,
        "dflow.telemetry.max-records": 2000,
        # the online correction would learn Dask's per-task CPU time divided by
        # the time scale (25x at 0.04), inflating the sub-second encoder and
        # VAE: the controller trusts the profile, which the emulation charges
        "dflow.predictor.ewma-alpha": 0.0,
        "dflow.predictor.refit-interval": 3600,
        "dflow.client.model-timeout": "120s",
        "dflow.scheduler.unserved-timeout": "3600s",
        **scenario.config,
    }


def _wait_ready(cluster: Any, count: int, timeout: float) -> None:
    extension = cluster.scheduler.extensions["dflow"]
    deadline = time.monotonic() + timeout
    while True:
        states = [r.state for r in list(extension.workers.values())]
        if states.count("ready") >= count:
            return
        failed = [r for r in list(extension.workers.values()) if r.state == "failed"]
        if failed:
            raise RuntimeError(f"worker failed to load: {failed[0].error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{states.count('ready')} of {count} workers ready")
        time.sleep(0.05)


def run_mode(
    scenario: Scenario,
    mode: str,
    entries: Sequence[TraceEntry],
    allocation: Allocation,
    cost: Any,
    *,
    scale: float,
    duration: float,
    drain: float,
    progress: Callable[[float], None] | None = None,
    slos: Sequence[float] = (),
) -> ModeRun:
    """Serve ``entries`` on a fresh in-process fleet laid out as ``allocation``.

    Arrivals are paced over ``duration`` emulated seconds; the run then waits up
    to ``drain`` emulated seconds for requests in flight and cancels the rest.
    ``progress`` hears the emulated seconds elapsed.
    """
    from dflow.bench.baselines import ReplicaAutoscaler
    from dflow.bench.disagfusion import ThresholdScaler
    from dflow.bench.handoff import SynchronousHandoff
    from dflow.cluster import StageCluster

    monolithic = mode in MONOLITHIC_MODES
    workers = fleet_workers(allocation, monolithic)
    recorder = Recorder(interval=max(0.05, scenario.sample_every * scale))
    autoscaler = (
        ReplicaAutoscaler(scale=scale, **scenario.autoscaler)
        if mode == "monolithic_autoscaled"
        else None
    )
    thresholds = (
        ThresholdScaler(scale=scale, **scenario.disagfusion)
        if mode == "disagfusion"
        else None
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set(run_config(scenario, mode, scale)))
        # the run's config may quantize the DiT: the predictor prices that
        predictor = fleet_predictor(cost, list(scenario.fleet), scale)
        worker_log = logging.getLogger("distributed.worker")
        stack.callback(worker_log.setLevel, worker_log.level)
        cluster = stack.enter_context(
            StageCluster(
                workers[0][1],
                fleet=workers,
                processes=False,
                protocol="inproc",
                host=None,
                # a port of its own: fleets may run at once (--jobs)
                dashboard_address=":0",
                worker_options={"memory_limit": 0},
                scheduler_options={"preload": [], "dashboard": False},
            )
        )
        # while the fleet closes, workers whose heartbeat races the scheduler's
        # close log an error each: the run is over, nothing is lost
        stack.callback(worker_log.setLevel, logging.CRITICAL)
        cluster.sync(
            _install, cluster.scheduler, predictor, recorder, autoscaler or thresholds
        )
        _wait_ready(cluster, len(workers), timeout=300)
        client = stack.enter_context(Client(cluster))
        mode_name = "monolithic" if monolithic else "disaggregated"
        handoff = SynchronousHandoff(client) if mode == "synchronous" else None
        submit: Callable[..., list[Any]] = (
            functools.partial(dflow.client.map, client)
            if handoff is None
            else handoff.map
        )
        # a future of each request's output, or its chain under a synchronous hand-off
        futures: dict[int, Any] = {}
        keys: dict[Any, int] = {}
        enabled: float | None = None
        lock = threading.Lock()
        ordered = sorted(range(len(entries)), key=lambda i: entries[i].t)
        controller = cluster.scheduler.plugins["dflow-elastic"]
        start = time.time()
        position = 0
        while position < len(ordered):
            now = time.time()
            if mode in CONTROLLED and not controller.enabled:
                # from the first arrival: the controller prices a pool that has
                # not finished a task yet from the tasks it owes (dcb7b67)
                controller.enabled = True
                enabled = (now - start) / scale
            due = []
            while position < len(ordered) and (
                start + entries[ordered[position]].t * scale <= now
            ):
                due.append(ordered[position])
                position += 1
            if due:
                submitted = submit(
                    [entries[i].request() for i in due],
                    mode=mode_name,
                    slo=[slos[i] * scale for i in due] if slos else None,
                )
                with lock:
                    for i, future in zip(due, submitted):
                        futures[i] = future
                        keys[future.key] = i
            if progress is not None:
                progress((time.time() - start) / scale)
            if position < len(ordered):
                wait = start + entries[ordered[position]].t * scale - time.time()
                time.sleep(min(max(wait, 0.0), 0.05))
        # the arrivals are over: wait for what is in flight, up to the drain
        end = start + duration * scale
        while time.time() < end:
            time.sleep(0.05)
            if progress is not None:
                progress((time.time() - start) / scale)
        deadline = end + drain * scale
        while time.time() < deadline:
            if all(f.done() for f in futures.values()):
                break
            time.sleep(0.05)
        stop = time.time()
        if handoff is None:
            client.cancel([f for f in futures.values() if not f.done()], force=True)
        else:
            handoff.close()
        finals: dict[int, tuple[float, str] | None] = dict.fromkeys(range(len(entries)))
        for key, value in list(recorder.finals.items()):
            if key in keys:
                finals[keys[key]] = value
        extension = cluster.scheduler.extensions["dflow"]
        decisions = [
            {
                **d,
                "time": (d["time"] - start) / scale,
                "source": _pool_text(d["source"]),
                "target": _pool_text(d["target"]),
            }
            for d in extension.recent_decisions()
        ]
        if autoscaler is not None:
            decisions += [
                {
                    **asdict(d),
                    "time": (d.time - start) / scale,
                    "source": d.source and f"{MONOLITHIC}:{d.source}",
                    "target": f"{MONOLITHIC}:{d.target}",
                }
                for d in autoscaler.decisions
            ]
        if thresholds is not None:
            decisions += [
                {**asdict(d), "time": (d.time - start) / scale}
                for d in thresholds.decisions
            ]
        decisions.sort(key=lambda d: d["time"])
        roles = {
            r.name: (r.gpu_type, "/".join(r.pool) if r.pool else None)
            for r in extension.workers.values()
        }
        names = {r.address: r.name for r in extension.workers.values()}
        tasks = [(s, m, names.get(w, w), a, b) for s, m, w, a, b in recorder.tasks]
        planning = controller.planning_seconds()
        dit_batches = [
            r.batch
            for r in cluster.scheduler.plugins["dflow-telemetry"].records
            if r.stage in ("dit", "all")
        ]
        planning_cpu = controller.planning_seconds(cpu=True)
        futures.clear()
    return ModeRun(
        mode=mode,
        start=start,
        scale=scale,
        stop=stop,
        entries=list(entries),
        finals=finals,
        tasks=tasks,
        samples=list(recorder.samples),
        decisions=decisions,
        workers=roles,
        controller_start=enabled,
        planning=planning,
        plans=list(recorder.plans),
        dit_batches=dit_batches,
        events=list(recorder.events),
        controller_cpu=planning_cpu,
        slos=list(slos),
    )


def _pool_text(pool: Any) -> str | None:
    """A decision's pool as ``"stage:model"`` (``None``: no pool)."""
    return None if pool is None else ":".join(pool)
