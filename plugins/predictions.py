"""The scheduler's stage-cost predictor, shared by admission, telemetry and the
elastic controller.

:class:`Predictions` holds the :class:`~dflow.predictor.Predictor`, or none yet:
:func:`~dflow.plugins.install.install` seeds the default one on a thread, and
until then pools are priced by their observed times and admission routes no
request by memory. Each plugin that needs predictions receives this one object.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import dask.config

import dflow.config  # noqa: F401
from dflow.pools import Pool
from dflow.predictor import Predictor, load_profile, shipped_rows

logger = logging.getLogger(__name__)


class Predictions:
    """The predictor of stage seconds and peak bytes, once there is one."""

    def __init__(self, predictor: Predictor | None = None):
        self.predictor = predictor

    def use(self, predictor: Predictor) -> None:
        """Predict with ``predictor`` from now on."""
        self.predictor = predictor

    def seconds(
        self, pool: Pool, gpu_type: str, features: Mapping[str, Any] | None
    ) -> float | None:
        """Predicted seconds of one task of ``pool`` on ``gpu_type`` (``None``: no
        predictor, no features, or no profile covers the pool)."""
        if self.predictor is None or not features:
            return None
        try:
            return self.predictor.predict(
                pool.model, pool.stage, gpu_type, features
            ).seconds
        except LookupError:
            return None

    def peak_bytes(
        self, pool: Pool, gpu_type: str, features: Mapping[str, Any]
    ) -> int | None:
        """Predicted peak bytes of a call of ``pool`` on ``gpu_type``. A type
        without a profile of its own (nor a speed to scale one from) takes the
        largest peak of the profiled types: peak memory follows the model and
        the request's shape, not the GPU's speed. Raises ``LookupError`` when
        there is no predictor or no type has a profile."""
        if self.predictor is None:
            raise LookupError("no predictor yet")
        return self.predictor.peak_bytes(pool.model, pool.stage, gpu_type, features)

    def observe(
        self,
        pool: Pool,
        gpu_type: str,
        features: Mapping[str, Any],
        seconds: float,
        batch: float,
    ) -> None:
        """A stage call finished in ``seconds``: correct the predictions."""
        if self.predictor is None:
            return
        try:
            self.predictor.observe(
                pool.model, pool.stage, gpu_type, features, seconds, batch
            )
        except LookupError:
            pass  # no profile prices this pool; telemetry's average still does

    def refit(self) -> None:
        if self.predictor is not None:
            self.predictor.refit()


def default_predictor() -> Predictor:
    """A predictor seeded with the shipped H200 measurements and the profiles
    named in ``dflow.elastic.profiles``."""
    rows = shipped_rows()
    for path in dask.config.get("dflow.elastic.profiles"):
        rows += load_profile(path)
    return Predictor(rows)
