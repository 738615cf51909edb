"""Scheduler preload: ``dask scheduler --preload dflow.preload``.

Puts dflow on the scheduler (:func:`dflow.plugins.install.install`) and its
pages on the scheduler's dashboard. Also set through dask config::

    distributed:
      scheduler:
        preload: [dflow.preload]
"""

from __future__ import annotations

from distributed.scheduler import Scheduler

from dflow import dashboards, logs
from dflow.plugins.extension import DflowExtension
from dflow.plugins.install import install
from dflow.protocol import configure_ucx_progress

# At import, not in dask_setup: Scheduler.__init__ imports its preload modules and
# then builds the dashboard's Bokeh server from distributed's table of pages, all
# before dask_setup runs, so pages added in dask_setup would not be served.
dashboards.register()
# Before the scheduler listens: over ucx:// its listener starts ucxx.
configure_ucx_progress()


async def dask_setup(scheduler: Scheduler) -> None:
    logs.configure()
    if DflowExtension.name not in scheduler.plugins:
        await install(scheduler)
