"""``dflow.status``: the fleet per stage and the controller's recent decisions.

A read-only view over dflow's extension and telemetry, served by the
scheduler's ``dflow_status`` handler (:func:`~dflow.plugins.install.install`
registers it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dflow.plugins.extension import DflowExtension
from dflow.plugins.telemetry import Telemetry
from dflow.pools import WORKER_STAGES

#: Decisions ``dflow.status`` reports, the newest
DECISIONS = 20


def status(extension: DflowExtension, telemetry: Telemetry) -> dict[str, Any]:
    """Per stage: workers, queue, arrival rate, predicted and observed service
    time; the elastic controller's recent decisions."""
    stages = {stage: stage_summary(extension, stage) for stage in WORKER_STAGES}
    for stage, summary in stages.items():
        summary.update(stage_rates(telemetry, stage))
    return {"stages": stages, "decisions": extension.recent_decisions(DECISIONS)}


def stage_summary(extension: DflowExtension, stage: str) -> dict[str, Any]:
    """Workers and queued tasks of one stage, over all models."""
    scheduler = extension.scheduler
    assert scheduler is not None
    workers = [
        r for r in extension.workers.values() if r.stage == stage and r.state == "ready"
    ]
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
        "loading": sum(
            1
            for r in extension.workers.values()
            if r.stage == stage and r.state == "loading"
        ),
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
