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

from dflow.plugins.extension import DflowExtension

logger = logging.getLogger(__name__)


def dask_setup(scheduler: Scheduler) -> None:
    from dflow.protocol import register_serializers

    register_serializers()
    if "dflow" not in scheduler.plugins:
        scheduler.add_plugin(DflowExtension())
    logger.info("dflow scheduler extension installed")
