"""Bokeh components of dflow's dashboard pages: one class per plot.

Like distributed's own components (``distributed/dashboard/components/``), each
class builds a :class:`~bokeh.models.ColumnDataSource` and a Bokeh model
(``root``) once, and its ``update()`` refreshes the source from the scheduler:
from dflow's extension (``scheduler.extensions["dflow"]``: workers, decisions)
and its telemetry plugin (``scheduler.plugins["dflow-telemetry"]``: samples,
service times). They only read. Every part may be missing (a scheduler without
dflow's preload, a fresh cluster): a component then shows an empty plot and
fills in as data arrives.

The time series read telemetry's fleet samples (one a second) over the last
``window`` seconds, so each refresh sends a bounded amount of data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import cycle
from time import time
from typing import TYPE_CHECKING, Any, cast

from bokeh.core.properties import without_property_validation
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, DataRange1d, FactorRange, HoverTool
from bokeh.models.annotations import Label, Title
from bokeh.models.widgets import (
    DataTable,
    DateFormatter,
    NumberFormatter,
    TableColumn,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.transform import factor_cmap

from distributed.dashboard.components import DashboardComponent
from distributed.dashboard.utils import update
from distributed.scheduler import Scheduler
from distributed.utils import log_errors

from dflow.pools import WORKER_STAGES, Pool

if TYPE_CHECKING:
    from dflow.plugins.extension import DflowExtension
    from dflow.plugins.telemetry import Sample, Telemetry

#: Stages in display order: the three of a disaggregated chain, then monolithic
DISPLAY_STAGES = WORKER_STAGES
STAGE_COLORS = dict(zip(DISPLAY_STAGES, Category10_10, strict=False))
#: Seconds of history the time series show
WINDOW = 600.0
TOOLS = "pan,wheel_zoom,box_zoom,reset"
#: Milliseconds a time axis spans when its data is a single moment
SPAN = 60_000
NAN = float("nan")


def dflow_extension(scheduler: Scheduler) -> DflowExtension | None:
    return scheduler.extensions.get("dflow")


def telemetry_of(scheduler: Scheduler) -> Telemetry | None:
    """dflow's telemetry plugin, on a scheduler with dflow's extension."""
    if dflow_extension(scheduler) is None:
        return None
    return cast("Telemetry | None", scheduler.plugins.get("dflow-telemetry"))


def recent_samples(scheduler: Scheduler, window: float) -> list[Sample]:
    """Telemetry's fleet samples of the last ``window`` seconds, oldest first."""
    telemetry = telemetry_of(scheduler)
    if telemetry is None:
        return []
    cutoff = time() - window
    recent = []
    for sample in reversed(telemetry.samples):
        if sample.time < cutoff:
            break
        recent.append(sample)
    recent.reverse()
    return recent


def pool_label(pool: Iterable[str] | None) -> str:
    """``"dit:tiny-flux"`` (the pool's one string form), or ``"none"``."""
    return "none" if pool is None else str(Pool(*pool))


def stage_order(pool: Iterable[str]) -> tuple[int, str]:
    stage, model = pool
    rank = (
        DISPLAY_STAGES.index(stage) if stage in DISPLAY_STAGES else len(DISPLAY_STAGES)
    )
    return rank, model


def _nan_if_none(value: float | None) -> float:
    return NAN if value is None else float(value)


def _series_colors(stages: Iterable[str]) -> list[str]:
    """A stage's first series in the stage's color, more GPU types in others."""
    others = cycle(Category10_10[len(DISPLAY_STAGES) :])
    colors, seen = [], set()
    for stage in stages:
        first = stage not in seen and stage in STAGE_COLORS
        colors.append(STAGE_COLORS[stage] if first else next(others))
        seen.add(stage)
    return colors


def _timeseries_figure(title: str, name: str, **kwargs: Any) -> figure:
    fig = figure(
        title=title,
        name=name,
        x_axis_type="datetime",
        x_range=DataRange1d(
            follow="end", follow_interval=WINDOW * 1000, default_span=SPAN
        ),
        y_range=DataRange1d(start=0),
        tools=TOOLS,
        toolbar_location="above",
        **kwargs,
    )
    fig.xgrid.visible = False
    fig.yaxis.minor_tick_line_alpha = 0
    return fig


class StageWorkers(DashboardComponent):
    """Ready workers per stage over time, one line per stage and GPU type."""

    @log_errors
    def __init__(self, scheduler: Scheduler, window: float = WINDOW, **kwargs: Any):
        self.scheduler = scheduler
        self.window = window
        self.source = ColumnDataSource(
            {"xs": [], "ys": [], "label": [], "color": []},
            name="dflow-workers-per-stage-data",
        )
        self.root = _timeseries_figure(
            "Workers per stage (by GPU type)", "dflow-workers-per-stage", **kwargs
        )
        self.root.multi_line(
            xs="xs",
            ys="ys",
            line_color="color",
            line_width=2,
            legend_field="label",
            source=self.source,
        )
        self.root.legend.location = "top_left"
        self.root.yaxis.axis_label = "workers"
        self.root.add_tools(HoverTool(tooltips="@label", line_policy="nearest"))

    @without_property_validation
    @log_errors
    def update(self) -> None:
        samples = recent_samples(self.scheduler, self.window)
        series = sorted(
            {
                (stage, gpu)
                for s in samples
                for stage, gpus in s.workers.items()
                for gpu in gpus
            },
            key=lambda pair: (stage_order((pair[0], "")), pair[1]),
        )
        times = [s.time * 1000 for s in samples]
        update(
            self.source,
            {
                "xs": [times] * len(series),
                "ys": [
                    [s.workers.get(stage, {}).get(gpu, 0) for s in samples]
                    for stage, gpu in series
                ],
                "label": [f"{stage} ({gpu})" for stage, gpu in series],
                "color": _series_colors(stage for stage, _ in series),
            },
        )


class StageQueues(DashboardComponent):
    """Stage tasks queued or running per stage over time."""

    @log_errors
    def __init__(self, scheduler: Scheduler, window: float = WINDOW, **kwargs: Any):
        self.scheduler = scheduler
        self.window = window
        self.source = ColumnDataSource(
            {"time": [], **{stage: [] for stage in DISPLAY_STAGES}},
            name="dflow-queue-depth-data",
        )
        self.root = _timeseries_figure(
            "Queue depth per stage", "dflow-queue-depth", **kwargs
        )
        for stage in DISPLAY_STAGES:
            self.root.line(
                x="time",
                y=stage,
                color=STAGE_COLORS[stage],
                line_width=2,
                legend_label=stage,
                source=self.source,
            )
        self.root.legend.location = "top_left"
        self.root.yaxis.axis_label = "tasks queued or running"
        self.root.add_tools(
            HoverTool(
                tooltips=[("time", "@time{%H:%M:%S}")]
                + [(stage, f"@{stage}") for stage in DISPLAY_STAGES],
                formatters={"@time": "datetime"},
                mode="vline",
            )
        )

    @without_property_validation
    @log_errors
    def update(self) -> None:
        samples = recent_samples(self.scheduler, self.window)
        data: dict[str, list] = {"time": [s.time * 1000 for s in samples]}
        for stage in DISPLAY_STAGES:
            data[stage] = [s.queue.get(stage, 0) for s in samples]
        update(self.source, data)


class Throughput(DashboardComponent):
    """Requests completed per second over time."""

    @log_errors
    def __init__(self, scheduler: Scheduler, window: float = WINDOW, **kwargs: Any):
        self.scheduler = scheduler
        self.window = window
        self.source = ColumnDataSource(
            {"time": [], "throughput": []}, name="dflow-throughput-data"
        )
        self.root = _timeseries_figure(
            "Request throughput", "dflow-throughput", **kwargs
        )
        self.root.line(
            x="time", y="throughput", line_width=2, color="black", source=self.source
        )
        self.root.yaxis.axis_label = "requests / second"
        self.root.add_tools(
            HoverTool(
                tooltips=[
                    ("time", "@time{%H:%M:%S}"),
                    ("throughput", "@throughput{0.00} req/s"),
                ],
                formatters={"@time": "datetime"},
                mode="vline",
            )
        )

    @without_property_validation
    @log_errors
    def update(self) -> None:
        samples = recent_samples(self.scheduler, self.window)
        update(
            self.source,
            {
                "time": [s.time * 1000 for s in samples],
                "throughput": [s.throughput for s in samples],
            },
        )


class Latency(DashboardComponent):
    """End-to-end request latency percentiles over time (telemetry's window)."""

    PERCENTILES = {"p50": "#2ca02c", "p95": "#ff7f0e", "p99": "#d62728"}

    @log_errors
    def __init__(self, scheduler: Scheduler, window: float = WINDOW, **kwargs: Any):
        self.scheduler = scheduler
        self.window = window
        self.source = ColumnDataSource(
            {"time": [], **{p: [] for p in self.PERCENTILES}},
            name="dflow-latency-data",
        )
        self.root = _timeseries_figure(
            "End-to-end latency (p50, p95, p99)", "dflow-latency", **kwargs
        )
        for percentile, color in self.PERCENTILES.items():
            self.root.line(
                x="time",
                y=percentile,
                color=color,
                line_width=2,
                legend_label=percentile,
                source=self.source,
            )
        self.root.legend.location = "top_left"
        self.root.yaxis.axis_label = "seconds"
        self.root.add_tools(
            HoverTool(
                tooltips=[("time", "@time{%H:%M:%S}")]
                + [(p, f"@{p}{{0.000}} s") for p in self.PERCENTILES],
                formatters={"@time": "datetime"},
                mode="vline",
            )
        )

    @without_property_validation
    @log_errors
    def update(self) -> None:
        samples = recent_samples(self.scheduler, self.window)
        data: dict[str, list] = {"time": [s.time * 1000 for s in samples]}
        for percentile in self.PERCENTILES:
            # NaN (no request finished in the window) breaks the line
            data[percentile] = [_nan_if_none(getattr(s, percentile)) for s in samples]
        update(self.source, data)


class ServiceTimes(DashboardComponent):
    """Per pool: the predictor's service time next to the observed one (EWMA)."""

    TITLE = "Service time per stage: predicted vs observed"
    KINDS = ("predicted", "observed")

    @log_errors
    def __init__(self, scheduler: Scheduler, **kwargs: Any):
        self.scheduler = scheduler
        self.source = ColumnDataSource(
            {"x": [], "pool": [], "kind": [], "seconds": []},
            name="dflow-service-time-data",
        )
        self.pools = FactorRange(factors=[])
        self.title = Title(text=self.TITLE)
        #: why predicted times are missing, if they are
        self.note = Title(text="", text_font_style="italic", text_font_size="9pt")
        self.figure = figure(
            title=self.title,
            name="dflow-service-time",
            x_range=self.pools,
            y_range=DataRange1d(start=0),
            tools="",
            toolbar_location="above",
            **kwargs,
        )
        self.figure.vbar(
            x="x",
            top="seconds",
            width=0.9,
            source=self.source,
            line_color=None,
            fill_color=factor_cmap("kind", ["#7f7f7f", "#1f77b4"], list(self.KINDS)),
            legend_field="kind",
        )
        self.figure.yaxis.axis_label = "seconds per task"
        self.figure.xaxis.major_label_orientation = math.pi / 8
        self.figure.xgrid.visible = False
        self.figure.legend.location = "top_left"
        self.figure.add_tools(
            HoverTool(tooltips=[("pool", "@pool"), ("@kind", "@seconds{0.000} s")])
        )
        self.figure.add_layout(self.note, "above")
        self.root = self.figure

    @without_property_validation
    @log_errors
    def update(self) -> None:
        telemetry = telemetry_of(self.scheduler)
        data: dict[str, list] = {"x": [], "pool": [], "kind": [], "seconds": []}
        gaps: list[str] = []
        if telemetry is not None:
            pools = sorted(
                set(telemetry.pools()) | set(telemetry.service), key=stage_order
            )
            for pool in pools:
                predicted = telemetry.predicted(pool)
                if predicted is None:
                    gaps.append(prediction_gap(telemetry, Pool(*pool)))
                values = {
                    "predicted": _nan_if_none(predicted),
                    "observed": _nan_if_none(telemetry.service.get(pool)),
                }
                for kind in self.KINDS:
                    data["x"].append((pool_label(pool), kind))
                    data["pool"].append(pool_label(pool))
                    data["kind"].append(kind)
                    data["seconds"].append(values[kind])
            without_predictor = telemetry.predictions.predictor is None
        else:
            without_predictor = True
        title = self.TITLE + (" (no predictor attached)" if without_predictor else "")
        if self.title.text != title:
            self.title.text = title
        note = "No predicted time: " + "; ".join(dict.fromkeys(gaps)) if gaps else ""
        if self.note.text != note:
            self.note.text = note
        if list(self.pools.factors) != data["x"]:
            self.pools.factors = data["x"]
        update(self.source, data)


def prediction_gap(telemetry: Telemetry, pool: Pool) -> str:
    """Why the predictor has no service time for ``pool``, and what to do."""
    predictor = telemetry.predictions.predictor
    recent = telemetry.recent.get(pool)
    gpu_types = telemetry.gpu_types(pool)
    if predictor is None:
        return "no predictor attached"
    if not recent or not gpu_types:
        return f"no requests of {pool} yet"
    for gpu_type in gpu_types:
        try:
            predictor.predict(pool.model, pool.stage, gpu_type, recent[-1])
        except LookupError:
            return (
                f"no profile of {pool.stage} of {pool.model} on {gpu_type} (run "
                "dflow profile there, list the file in dflow.elastic.profiles)"
            )
    return f"no prediction for {pool}'s recent requests"


class RebalancingTimeline(DashboardComponent):
    """The decisions: when a worker moved, from which pool to which, and why;
    the health collaborator's fences, unfences, retirements (to or from "none")
    and slow reports among them, by kind. A timeline (one segment from source
    to target pool per decision) above a table that spells out the reasons."""

    COLUMNS = ("time", "worker", "kind", "source", "target", "reason")

    @log_errors
    def __init__(self, scheduler: Scheduler, limit: int = 1000, **kwargs: Any):
        self.scheduler = scheduler
        self.limit = limit
        self.source = ColumnDataSource(
            {**{c: [] for c in self.COLUMNS}, "color": []},
            name="dflow-rebalancing-data",
        )
        height = kwargs.pop("height", 220)
        self.pools = FactorRange(factors=[])
        self.figure = figure(
            title="Rebalancing decisions",
            name="dflow-rebalancing",
            x_axis_type="datetime",
            x_range=DataRange1d(default_span=SPAN),
            y_range=self.pools,
            tools=TOOLS,
            toolbar_location="above",
            height=height,
            **kwargs,
        )
        self.figure.segment(
            x0="time",
            y0="source",
            x1="time",
            y1="target",
            line_color="color",
            line_width=2,
            source=self.source,
        )
        self.figure.scatter(
            x="time",
            y="source",
            size=8,
            line_color="color",
            fill_color="white",
            source=self.source,
        )
        targets = self.figure.scatter(
            x="time",
            y="target",
            size=10,
            marker="triangle",
            color="color",
            source=self.source,
        )
        self.figure.yaxis.axis_label = "pool"
        #: shown until the first decision
        self.empty = Label(
            x=10,
            y=10,
            x_units="screen",
            y_units="screen",
            text="",
            text_font_size="10pt",
            text_color="#666666",
        )
        self.figure.add_layout(self.empty)
        self.figure.add_tools(
            HoverTool(
                renderers=[targets],
                tooltips=[
                    ("time", "@time{%H:%M:%S}"),
                    ("worker", "@worker"),
                    ("decision", "@kind: @source → @target"),
                    ("reason", "@reason"),
                ],
                formatters={"@time": "datetime"},
            )
        )
        self.table = DataTable(
            source=self.source,
            columns=[
                TableColumn(
                    field="time",
                    title="time",
                    formatter=DateFormatter(format="%H:%M:%S"),
                    width=80,
                ),
                TableColumn(field="worker", title="worker", width=120),
                TableColumn(field="kind", title="kind", width=60),
                TableColumn(field="source", title="from", width=140),
                TableColumn(field="target", title="to", width=140),
                TableColumn(field="reason", title="reason", width=500),
            ],
            name="dflow-rebalancing-table",
            index_position=None,
            height=160,
            sizing_mode="stretch_width",
        )
        self.root = column(
            self.figure, self.table, sizing_mode=kwargs.get("sizing_mode")
        )

    @without_property_validation
    @log_errors
    def update(self) -> None:
        extension = dflow_extension(self.scheduler)
        decisions = (
            extension.recent_decisions(self.limit) if extension is not None else []
        )
        decisions = decisions[::-1]  # newest first in the table
        data: dict[str, list] = {
            "time": [d["time"] * 1000 for d in decisions],
            "worker": [str(d["worker"]) for d in decisions],
            "kind": [str(d.get("kind", "move")) for d in decisions],
            "source": [pool_label(d["source"]) for d in decisions],
            "target": [pool_label(d["target"]) for d in decisions],
            "reason": [str(d["reason"]) for d in decisions],
            "color": [
                STAGE_COLORS.get(d["target"][0], "black") if d["target"] else "black"
                for d in decisions
            ],
        }
        pools = {
            tuple(d[end]) for d in decisions for end in ("source", "target") if d[end]
        }
        factors = [pool_label(p) for p in sorted(pools, key=stage_order)]
        if any(d[end] is None for d in decisions for end in ("source", "target")):
            factors.append("none")
        if list(self.pools.factors) != factors:
            self.pools.factors = factors
        empty = "" if decisions else self.empty_text()
        if self.empty.text != empty:
            self.empty.text = empty
        update(self.source, data)

    def empty_text(self) -> str:
        """What the timeline shows before the first decision."""
        controller: Any = self.scheduler.plugins.get("dflow-elastic")
        if controller is None or not controller.enabled:
            return (
                "No rebalancing decisions: the elastic controller is off "
                "(dflow.elastic.enabled)"
            )
        return (
            "No rebalancing decisions yet: the elastic controller moves a worker "
            "when another pool needs it more"
        )


class StageWorkerTable(DashboardComponent):
    """One row per worker: its pool, GPU type, state (and why it failed),
    memory in use, busy or idle, its speed against its GPU type and what is
    wrong with it (fenced, slow).

    Memory in use is the GPU's (NVML, when the worker reports it) or else the
    worker process's resident memory; device memory is what the worker reported
    for the stage's device.
    """

    COLUMNS = {
        "name": "worker",
        "stage": "stage",
        "model": "model",
        "gpu_type": "GPU type",
        "state": "state",
        "speed": "speed",
        "health": "health",
        "activity": "busy / idle",
        "tasks": "tasks",
        "memory": "memory in use",
        "device_memory": "device memory",
        "reason": "why it failed",
        "address": "address",
    }

    @log_errors
    def __init__(self, scheduler: Scheduler, **kwargs: Any):
        self.scheduler = scheduler
        self.source = ColumnDataSource(
            {c: [] for c in self.COLUMNS}, name="dflow-workers-data"
        )
        formatters = {
            "memory": NumberFormatter(format="0.0 b"),
            "device_memory": NumberFormatter(format="0.0 b"),
            "tasks": NumberFormatter(format="0"),
            "speed": NumberFormatter(format="0.00"),
        }
        self.root = DataTable(
            source=self.source,
            columns=[
                TableColumn(field=field, title=title, formatter=formatters[field])
                if field in formatters
                else TableColumn(field=field, title=title)
                for field, title in self.COLUMNS.items()
            ],
            name="dflow-workers",
            index_position=None,
            sortable=True,
            reorderable=True,
            **kwargs,
        )

    @without_property_validation
    @log_errors
    def update(self) -> None:
        extension = dflow_extension(self.scheduler)
        records = list(extension.workers.values()) if extension is not None else []
        records.sort(
            key=lambda r: (*stage_order((r.stage or "", r.model or "")), r.name)
        )
        data: dict[str, list] = {c: [] for c in self.COLUMNS}
        for record in records:
            ws = self.scheduler.workers.get(record.address)
            tasks = len(ws.processing) if ws is not None else 0
            data["name"].append(record.name)
            data["stage"].append(record.stage or "")
            data["model"].append(record.model or "")
            data["gpu_type"].append(record.gpu_type)
            data["state"].append(record.state)
            data["speed"].append(_nan_if_none(record.speed))
            data["health"].append(record.health)
            data["activity"].append("busy" if tasks else "idle")
            data["tasks"].append(tasks)
            data["memory"].append(_memory_in_use(ws))
            data["device_memory"].append(record.memory)
            data["reason"].append(record.error if record.state == "failed" else "")
            data["address"].append(record.address)
        update(self.source, data)


def _memory_in_use(ws: Any) -> int:
    if ws is None:
        return 0
    gpu = ws.metrics.get("gpu")
    if isinstance(gpu, dict) and gpu.get("memory-used") is not None:
        return int(gpu["memory-used"])
    return int(ws.memory.process)
