"""Scheduler preload: ``dask scheduler --preload dflow.preload``.

Installs dflow's scheduler extension (pools, request bookkeeping) and the parts
that hang off it. Also set through dask config::

    distributed:
      scheduler:
        preload: [dflow.preload]
"""

from __future__ import annotations

import logging

from distributed.scheduler import Scheduler

from dflow import dashboards
from dflow.plugins.elastic import ElasticController
from dflow.plugins.extension import DflowExtension
from dflow.plugins.telemetry import Telemetry

logger = logging.getLogger(__name__)

# At import, not in dask_setup: Scheduler.__init__ imports its preload modules and
# then builds the dashboard's Bokeh server from distributed's table of pages, all
# before dask_setup runs, so pages added in dask_setup would not be served.
dashboards.register()


def dask_setup(scheduler: Scheduler) -> None:
    from dflow.protocol import register_serializers

    register_serializers()
    if "dflow" in scheduler.plugins:
        return
    extension = DflowExtension()
    scheduler.add_plugin(extension)
    scheduler.add_plugin(Telemetry(extension))
    scheduler.add_plugin(ElasticController(extension))
    logger.info("dflow scheduler extension installed")
