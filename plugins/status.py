"""``dflow.status``: the fleet per stage, its workers, the recent decisions
and the workers' health.

A read-only view over dflow's extension and telemetry, served by the
scheduler's ``dflow_status`` handler (:func:`~dflow.plugins.install.install`
registers it). Times are local and human-readable (``"2026-05-01 12:03:04"``),
each with its epoch ``timestamp`` beside it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dflow.plugins.extension import DflowExtension, WorkerRecord
from dflow.plugins.health import Health
from dflow.plugins.telemetry import Telemetry
from dflow.pools import EXPERT_STAGES, WORKER_STAGES

#: Decisions and load failures ``dflow.status`` reports, the newest
DECISIONS = 20


def status(
    extension: DflowExtension, telemetry: Telemetry, health: Health | None = None
) -> dict[str, Any]:
    """Per stage: workers, queue, arrival rate, predicted and observed service
    time; every worker with its state (and the reason of a failed one); recent
    load failures, including those of workers that left; the recent decisions
    (the elastic controller's moves, and fences, retirements and slow workers);
    each worker's health and speed
    (:meth:`~dflow.plugins.health.Health.summary`; empty with health off). An
    expert's stage (Wan 2.2) is listed while a worker serves it."""
    served = {r.stage for r in extension.workers.values()}
    stages = {
        stage: stage_summary(extension, stage)
        for stage in WORKER_STAGES
        if stage not in EXPERT_STAGES.values() or stage in served
    }
    for stage, summary in stages.items():
        summary.update(stage_rates(telemetry, stage))
    return {
        "stages": stages,
        "workers": [
            worker_summary(r)
            for r in sorted(extension.workers.values(), key=lambda r: r.name)
        ],
        "failures": [worker_summary(r) for r in list(extension.failures)[-DECISIONS:]],
        "decisions": [
            {**d, "time": readable(d["time"]), "timestamp": d["time"]}
            for d in extension.recent_decisions(DECISIONS)
        ],
        "health": health.summary() if health is not None else {},
    }


def readable(timestamp: float) -> str:
    """An epoch time as local ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def worker_summary(record: WorkerRecord) -> dict[str, Any]:
    """One worker as ``dflow.status`` lists it: what it serves, its state since
    when, and why it failed (``reason``: ``None`` unless it did)."""
    return {
        "name": record.name,
        "address": record.address,
        "stage": record.stage,
        "model": record.model,
        "state": record.state,
        "gpu_type": record.gpu_type,
        "since": readable(record.since),
        "timestamp": record.since,
        "reason": record.error if record.state == "failed" else None,
    }


def stage_summary(extension: DflowExtension, stage: str) -> dict[str, Any]:
    """Workers and queued tasks of one stage, over all models."""
    scheduler = extension.scheduler
    assert scheduler is not None
    records = [r for r in extension.workers.values() if r.stage == stage]
    workers = [r for r in records if r.state == "ready"]
    queue = sum(
        1
        for ts in scheduler.unrunnable
        if ts.resource_restrictions and stage in ts.resource_restrictions
    )
    for record in workers:
        ws = scheduler.workers.get(record.address)
        if ws is not None:
            queue += len(ws.processing)
    return {
        "workers": len(workers),
        "loading": sum(1 for r in records if r.state == "loading"),
        "failed": sum(1 for r in records if r.state == "failed"),
        "queue": queue,
        "arrival_rate": None,
        "predicted_s": None,
        "observed_s": None,
    }


def stage_rates(telemetry: Telemetry, stage: str) -> dict[str, Any]:
    """Arrival rate and service times of one stage, summed or averaged over its
    models, and per model."""
    pools = [p for p in telemetry.pools() if p.stage == stage]
    observed = [telemetry.service[p] for p in pools if p in telemetry.service]
    predicted = [s for p in pools if (s := telemetry.predicted(p)) is not None]
    return {
        "arrival_rate": sum(telemetry.arrival_rate(p) for p in pools),
        "observed_s": float(np.mean(observed)) if observed else None,
        "predicted_s": float(np.mean(predicted)) if predicted else None,
        "models": {
            pool.model: {
                "arrival_rate": telemetry.arrival_rate(pool),
                "queue": telemetry.queue(pool),
                "observed_s": telemetry.service.get(pool),
                "predicted_s": telemetry.predicted(pool),
            }
            for pool in pools
        },
    }
