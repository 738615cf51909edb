"""Worker speeds: how fast each stage worker runs against its GPU type.

Every stage call telemetry records gives its worker one ratio, its seconds over
what the call was expected to take: the predictor's fit for the worker's GPU
type (without the online correction, which averages the type's workers), or,
where no profile covers the pool, the pool's observed average. A worker keeps
a moving average of the ratio's logarithm per pool; its *speed* is how far it
sits from the other workers of its GPU type in the pool (their median), or,
when it is the only one of its type, from the prediction. Speed 1 runs as its
type does; 0.3 takes 3.3 times as long. Below ``dflow.health.speed-samples``
calls a worker's speed is unknown (``None``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import dask.config

import dflow.config  # noqa: F401
from dflow.plugins.extension import DflowExtension
from dflow.plugins.predictions import Predictions
from dflow.plugins.telemetry import StageRecord, Telemetry
from dflow.pools import Pool

#: Speeds are kept within [1 / LIMIT, LIMIT]: a ratio outside says nothing more
LIMIT = 20.0


@dataclass
class Estimate:
    """A worker's moving average of log(observed / expected seconds) on a pool."""

    log_ratio: float
    samples: int
    #: the expected seconds came from the predictor's fit for its GPU type
    predicted: bool


class WorkerSpeeds:
    """Per-worker speeds from telemetry's stage records (it calls :meth:`observe`).

    Parameters
    ----------
    alpha
        Weight of each call in the moving average (default
        ``dflow.telemetry.ewma-alpha``).
    samples
        Calls before a worker's speed counts (default
        ``dflow.health.speed-samples``).
    """

    def __init__(
        self,
        extension: DflowExtension,
        predictions: Predictions,
        telemetry: Telemetry,
        *,
        alpha: float | None = None,
        samples: int | None = None,
    ):
        self.extension = extension
        self.predictions = predictions
        self.telemetry = telemetry
        self.alpha = telemetry.alpha if alpha is None else alpha
        self.samples = int(
            dask.config.get("dflow.health.speed-samples")
            if samples is None
            else samples
        )
        self.estimates: dict[tuple[str, Pool], Estimate] = {}
        #: speeds at the last refresh, by worker address
        self.current: dict[str, float] = {}

    def observe(self, record: StageRecord) -> None:
        """Fold one finished stage call into its worker's average."""
        pool = Pool(record.stage, record.model)
        expected, predicted = self.expected(record, pool)
        if not expected or record.call_s <= 0:
            return
        ratio = math.log(record.call_s / expected)
        key = (record.worker, pool)
        estimate = self.estimates.get(key)
        if estimate is None or estimate.predicted != predicted:
            self.estimates[key] = Estimate(ratio, 1, predicted)
            return
        estimate.log_ratio += self.alpha * (ratio - estimate.log_ratio)
        estimate.samples += 1

    def expected(self, record: StageRecord, pool: Pool) -> tuple[float | None, bool]:
        """Seconds ``record``'s call was expected to take on its worker's GPU
        type, and whether the predictor said so (else the pool's average)."""
        predictor = self.predictions.predictor
        if predictor is not None and record.features:
            try:
                seconds = predictor.predict(
                    pool.model,
                    pool.stage,
                    record.gpu_type,
                    record.features,
                    record.batch,
                    corrected=False,
                ).seconds
            except LookupError:
                pass
            else:
                return seconds, True
        average = self.telemetry.service.get(pool)
        return (average * record.batch if average else None), False

    def refresh(self) -> dict[str, float]:
        """Recompute every worker's speed on its pool now; returns them by
        address (workers whose speed is unknown are left out)."""
        groups: dict[tuple[Pool, str], list[tuple[str, Estimate]]] = {}
        # from the estimates, not the workers: of a large fleet, only those
        # that ran enough calls have a speed
        for (address, pool), estimate in self.estimates.items():
            if estimate.samples < self.samples:
                continue
            record = self.extension.workers.get(address)
            if record is None or record.pool != pool:
                continue  # gone, or serving another pool now
            key = (pool, record.gpu_type)
            groups.setdefault(key, []).append((address, estimate))
        speeds = {}
        for members in groups.values():
            ratios = [estimate.log_ratio for _, estimate in members]
            # The type's pace: the median of three or more, whoever is slow;
            # of two, the faster (one slow worker in two is likelier than one
            # fast); of one, the prediction, if there is one.
            if len(ratios) > 2:
                reference: float | None = statistics.median(ratios)
            elif len(ratios) == 2:
                reference = min(ratios)
            else:
                reference = 0.0 if members[0][1].predicted else None
            if reference is None:
                continue
            for address, estimate in members:
                speed = math.exp(reference - estimate.log_ratio)
                speeds[address] = min(LIMIT, max(1 / LIMIT, speed))
        self.current = speeds
        return speeds

    def speed(self, address: str) -> float | None:
        """The worker's speed relative to its GPU type at the last
        :meth:`refresh` (``None``: unknown)."""
        return self.current.get(address)

    def forget(self, address: str) -> None:
        """Drop a worker that left the cluster."""
        for key in [k for k in self.estimates if k[0] == address]:
            del self.estimates[key]
        self.current.pop(address, None)
