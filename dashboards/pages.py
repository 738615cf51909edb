"""dflow's pages on the scheduler's dashboard.

``/dflow`` shows every plot on one page; each plot also has a page of its own,
``/individual-dflow-*``, which the dashboard lists in its "More..." menu. The
pages join distributed's table of dashboard applications
(``distributed.dashboard.scheduler.applications``) through :func:`register`,
which ``dflow.preload`` calls when the scheduler imports it: the scheduler builds
its Bokeh server from that table right after importing its preload modules.
"""

from __future__ import annotations

from typing import Any

from bokeh.document import Document
from bokeh.layouts import column, row

from distributed.dashboard.components import add_periodic_callback
from distributed.dashboard.components.scheduler import (
    BOKEH_THEME,
    env,
    individual_doc,
)
from distributed.scheduler import Scheduler
from distributed.utils import log_errors

from dflow.dashboards.components import (
    Latency,
    RebalancingTimeline,
    ServiceTimes,
    StageQueues,
    StageWorkers,
    StageWorkerTable,
    Throughput,
)

#: Milliseconds between refreshes: telemetry samples the fleet once a second;
#: service times change slowly, and estimating them scans telemetry's records.
INTERVALS = {
    StageWorkers: 1000,
    StageQueues: 1000,
    Throughput: 1000,
    Latency: 1000,
    ServiceTimes: 5000,
    RebalancingTimeline: 1000,
    StageWorkerTable: 1000,
}
PLOT_HEIGHT = 280


@log_errors
def dflow_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Document) -> None:
    """Every dflow plot on one page, in the dashboard's page template."""
    plots = {
        cls: cls(scheduler, height=PLOT_HEIGHT, sizing_mode="stretch_width")
        for cls in (
            StageWorkers,
            StageQueues,
            Throughput,
            Latency,
            ServiceTimes,
            RebalancingTimeline,
        )
    }
    plots[StageWorkerTable] = StageWorkerTable(
        scheduler, height=PLOT_HEIGHT, sizing_mode="stretch_width"
    )
    for cls, component in plots.items():
        component.update()
        add_periodic_callback(doc, component, INTERVALS[cls])

    def pair(left: type, right: type) -> Any:
        return row(plots[left].root, plots[right].root, sizing_mode="stretch_width")

    # the decisions' table goes below the worker table, so the row of the
    # rebalancing timeline is no taller than its neighbour
    rebalancing = plots[RebalancingTimeline]
    assert isinstance(rebalancing, RebalancingTimeline)
    doc.title = "Dask: dflow"
    doc.add_root(
        column(
            pair(StageWorkers, StageQueues),
            pair(Throughput, Latency),
            row(
                plots[ServiceTimes].root,
                rebalancing.figure,
                sizing_mode="stretch_width",
            ),
            plots[StageWorkerTable].root,
            rebalancing.table,
            sizing_mode="stretch_width",
            name="dflow",
        )
    )
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


#: dflow's dashboard pages; "individual-*" names appear in the "More..." menu
applications = {
    "/dflow": dflow_doc,
    "/individual-dflow-pools": individual_doc(StageWorkers, INTERVALS[StageWorkers]),
    "/individual-dflow-queues": individual_doc(StageQueues, INTERVALS[StageQueues]),
    "/individual-dflow-throughput": individual_doc(Throughput, INTERVALS[Throughput]),
    "/individual-dflow-latency": individual_doc(Latency, INTERVALS[Latency]),
    "/individual-dflow-service-time": individual_doc(
        ServiceTimes, INTERVALS[ServiceTimes]
    ),
    "/individual-dflow-rebalancing": individual_doc(
        RebalancingTimeline, INTERVALS[RebalancingTimeline]
    ),
    "/individual-dflow-workers": individual_doc(
        StageWorkerTable, INTERVALS[StageWorkerTable]
    ),
}


def register() -> None:
    """Add dflow's pages to the dashboard of schedulers created from now on in
    this process (the table is global; pages of a scheduler without dflow's
    extension stay empty)."""
    from distributed.dashboard.scheduler import applications as dashboard

    dashboard.update(applications)
