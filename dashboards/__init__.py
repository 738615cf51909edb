"""dflow's dashboard pages and Prometheus metrics on the Dask scheduler.

:func:`register` adds both to every scheduler this process starts from then on;
``dflow.preload`` calls it when the scheduler imports the preload.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Add dflow's pages to the scheduler dashboard's applications and dflow's
    collector to the scheduler's ``/metrics`` (idempotent)."""
    from dflow.dashboards import metrics

    metrics.register()
    try:
        from dflow.dashboards import pages
    except (
        ImportError
    ) as error:  # distributed refuses Bokeh versions it does not support
        logger.warning("No dflow dashboard pages: %s", error)
        return
    pages.register()
