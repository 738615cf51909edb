"""dflow on a scheduler, in one call: :func:`install` wires every part.

``dask scheduler --preload dflow.preload`` calls it; so do the benchmarks that
build their own schedulers. Nothing else puts dflow's plugins on a scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import dask.config
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

import dflow.config  # noqa: F401
from dflow.dashboards import metrics
from dflow.plugins.actuators import Actuator
from dflow.plugins.admission import Admission, MemoryRouting
from dflow.plugins.deadlines import Deadlines
from dflow.plugins.elastic import ElasticController, make_actuator
from dflow.plugins.extension import DflowExtension
from dflow.plugins.health import Health
from dflow.plugins.placement import SpeedPlacement
from dflow.plugins.policing import TaskPolicing
from dflow.plugins.predictions import Predictions, default_predictor
from dflow.plugins.speeds import WorkerSpeeds
from dflow.plugins.status import status
from dflow.plugins.telemetry import Telemetry
from dflow.predictor import Predictor
from dflow.protocol import register_serializers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Installation:
    """dflow's parts on one scheduler."""

    extension: DflowExtension
    predictions: Predictions
    admission: Admission
    policing: TaskPolicing
    telemetry: Telemetry
    controller: ElasticController
    deadlines: Deadlines
    #: ``None`` with ``dflow.health.enabled`` (placement: ``.placement``) off
    health: Health | None = None
    placement: SpeedPlacement | None = None


async def install(
    scheduler: Scheduler,
    *,
    predictor: Predictor | None = None,
    actuator: Actuator | None = None,
) -> Installation:
    """Put dflow on ``scheduler``: its state (the extension), deadlines,
    admission, task policing, telemetry, the elastic controller, the health
    collaborator (hung and slow workers) with placement by speed,
    ``dflow.status`` and the Prometheus metrics.

    Parameters
    ----------
    predictor
        Prices stage calls; default: the shipped profiles plus
        ``dflow.elastic.profiles``, built on a thread (it takes seconds) while
        pools are priced by their observed times.
    actuator
        What the controller acts through; default: the one
        ``dflow.elastic.actuator`` names.

    Call it from a preload's ``dask_setup`` (the scheduler starts the plugins)
    or on a running scheduler (they start here). Raises ``RuntimeError`` on a
    scheduler that has dflow already.
    """
    if DflowExtension.name in scheduler.plugins:
        raise RuntimeError(f"dflow is installed on {scheduler.address} already")
    register_serializers()
    metrics.register()
    extension = DflowExtension()
    predictions = Predictions(predictor)
    routing = MemoryRouting(extension, predictions)
    telemetry = Telemetry(extension, predictions)
    if actuator is None:
        actuator = make_actuator(
            dask.config.get("dflow.elastic.actuator"), scheduler, extension
        )
    health = placement = None
    if dask.config.get("dflow.health.enabled"):
        speeds = WorkerSpeeds(extension, predictions, telemetry)
        telemetry.listeners.append(speeds.observe)
        health = Health(extension, predictions, speeds)
        telemetry.listeners.append(health.observe)
        if dask.config.get("dflow.health.placement"):
            placement = SpeedPlacement(extension, speeds)
    parts = Installation(
        extension=extension,
        predictions=predictions,
        admission=Admission(extension, routing),
        policing=TaskPolicing(extension, routing),
        telemetry=telemetry,
        controller=ElasticController(
            scheduler, extension, telemetry, predictions, actuator
        ),
        deadlines=Deadlines(extension, predictions),
        health=health,
        placement=placement,
    )
    # the extension first: the others read its request records
    plugins: list[SchedulerPlugin] = [
        parts.extension,
        parts.deadlines,
        parts.admission,
        parts.policing,
        parts.telemetry,
        parts.controller,
        *(p for p in (health, placement) if p is not None),
    ]
    running = scheduler.status == Status.running
    for plugin in plugins:
        scheduler.add_plugin(plugin)
        if running:
            await plugin.start(scheduler)

    # a named function: distributed logs each handler's __name__, which a
    # functools.partial lacks (the call then fails)
    def dflow_status() -> dict[str, Any]:
        return status(extension, telemetry, health)

    scheduler.handlers["dflow_status"] = dflow_status
    if predictor is None:
        seed_predictor(predictions)
    logger.info("dflow installed on the scheduler")
    return parts


def seed_predictor(predictions: Predictions) -> None:
    """Build the default predictor on a daemon thread (closing the scheduler
    does not wait for it) and hand it to ``predictions`` on the event loop."""
    loop = asyncio.get_running_loop()

    def build() -> None:
        try:
            predictor = default_predictor()
        except Exception:
            logger.exception("No stage-cost predictor; pricing by observed times")
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(predictions.use, predictor)

    threading.Thread(target=build, daemon=True, name="dflow-predictor").start()
