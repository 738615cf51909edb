"""dflow's Prometheus metrics on the scheduler's ``/metrics``.

:class:`DflowMetricCollector` yields ``dflow_*`` metric families from dflow's
scheduler extension: request counters and an end-to-end latency histogram per
model, queue depth and workers per pool, service times, and the elastic
controller's decisions. :func:`register` adds it to distributed's list of
scheduler collectors (``distributed.http.scheduler.prometheus.core.COLLECTORS``),
so it is served exactly like distributed's own: one instance in
``prometheus_client``'s global registry per process, pointed by the
``/metrics`` handler at the scheduler being scraped. Processes that start many
schedulers (tests) therefore register it once, and each scrape reads the
scheduler that serves it.

Counters and the histogram are cumulative. The extension and the elastic
controller keep bounded logs (``dflow.scheduler.history`` entries) of finished
requests and of decisions; the collector folds in what each scrape finds new,
so it misses entries only if more than that many arrive between two scrapes.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from distributed.http.prometheus import PrometheusCollector
from distributed.scheduler import Scheduler

logger = logging.getLogger(__name__)

#: Upper bounds (seconds) of the latency histogram's buckets: from tiny models
#: on CPU (tens of milliseconds) to long videos (minutes)
LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
)
REQUEST_STATUSES = ("submitted", "completed", "failed", "cancelled")

T = TypeVar("T", bound=Hashable)


class LogCursor:
    """Reads what was appended to a bounded, time-ordered log since the last read.

    The log may drop its oldest entries; entries are told apart by value, so
    equal entries at the same time count as many times as they appear.
    """

    def __init__(self, time_of: Callable[[Any], float]):
        self.time_of = time_of
        self.last = float("-inf")
        #: entries read at time ``last`` (more may follow at that same time)
        self.at_last: Counter[Any] = Counter()

    def read(self, log: Sequence[T]) -> list[T]:
        fresh: list[T] = []
        for entry in reversed(log):
            if self.time_of(entry) < self.last:
                break
            fresh.append(entry)
        fresh.reverse()
        seen = self.at_last.copy()
        new = []
        for entry in fresh:
            if self.time_of(entry) == self.last and seen[entry] > 0:
                seen[entry] -= 1
                continue
            new.append(entry)
        if new:
            last = self.time_of(new[-1])
            if last != self.last:
                self.last, self.at_last = last, Counter()
            self.at_last.update(e for e in new if self.time_of(e) == last)
        return new


class LatencyHistogram:
    """Cumulative bucket counts and sums of request latencies, per model."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts: defaultdict[str, list[int]] = defaultdict(
            lambda: [0] * (len(self.bounds) + 1)
        )
        self.sums: defaultdict[str, float] = defaultdict(float)

    def observe(self, model: str, seconds: float) -> None:
        counts = self.counts[model]
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.sums[model] += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            name, documentation, labels=["model"], unit="seconds"
        )
        for model, counts in sorted(self.counts.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            family.add_metric([model], buckets, sum_value=self.sums[model])
        return family


class _Totals:
    """What the collector accumulates for one scheduler's extension."""

    def __init__(self) -> None:
        self.latencies = LatencyHistogram()
        self.latency_cursor = LogCursor(lambda entry: entry[0])
        #: decisions per (source stage, target stage)
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.decision_cursor = LogCursor(lambda entry: entry[0])


class DflowMetricCollector(PrometheusCollector):
    """``dflow_*`` metrics of the scheduler's dflow extension (none without it)."""

    server: Scheduler

    def __init__(self, server: Scheduler):
        super().__init__(server)
        self.namespace = "dflow"
        # keyed by extension: the handler re-points ``server`` at each scrape
        self._totals: weakref.WeakKeyDictionary[Any, _Totals] = (
            weakref.WeakKeyDictionary()
        )

    def collect(self) -> Iterator[Metric]:
        extension = self.server.extensions.get("dflow")
        if extension is None:
            return
        totals = self._totals.setdefault(extension, _Totals())
        try:
            families = [
                *self._requests(extension, totals),
                *self._pools(extension),
                *self._decisions(extension, totals),
            ]
        except Exception:
            # a failing collector fails the whole page: keep distributed's metrics
            logger.exception("dflow's metrics failed")
            return
        yield from families

    def _requests(self, extension: Any, totals: _Totals) -> Iterator[Metric]:
        models = sorted({model for model, _ in extension.counts})
        for status in REQUEST_STATUSES:
            family = CounterMetricFamily(
                self.build_name(f"requests_{status}"),
                f"Requests {status}, per model",
                labels=["model"],
            )
            for model in models:
                family.add_metric([model], extension.counts[model, status])
            yield family
        in_flight = GaugeMetricFamily(
            self.build_name("requests_in_flight"),
            "Requests submitted and not finished yet, per model",
            labels=["model"],
        )
        for model, n in sorted(Counter(r.model for r in extension.in_flight()).items()):
            in_flight.add_metric([model], n)
        yield in_flight
        for _, model, seconds in totals.latency_cursor.read(extension.latencies):
            totals.latencies.observe(model, seconds)
        yield totals.latencies.family(
            self.build_name("request_latency"),
            "End-to-end latency of completed requests, submission to output, per model",
        )

    def _pools(self, extension: Any) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            self.build_name("workers"),
            "Workers per pool (a stage of a model), GPU type and state "
            "(loading, ready, draining, failed)",
            labels=["stage", "model", "gpu_type", "state"],
        )
        counts = Counter(
            (r.stage, r.model, r.gpu_type, r.state)
            for r in extension.workers.values()
            if r.pool is not None
        )
        for labels, n in sorted(counts.items()):
            workers.add_metric(list(labels), n)
        yield workers

        telemetry = extension.telemetry
        pools = sorted(telemetry.pools()) if telemetry is not None else []
        queue = GaugeMetricFamily(
            self.build_name("queue_depth"),
            "Stage tasks waiting for a worker or placed on one (queued or running), "
            "per pool",
            labels=["stage", "model"],
        )
        observed = GaugeMetricFamily(
            self.build_name("service_observed"),
            "Observed compute time of a stage task (moving average), per pool",
            labels=["stage", "model"],
            unit="seconds",
        )
        predicted = GaugeMetricFamily(
            self.build_name("service_predicted"),
            "Predicted compute time of the pool's recent stage tasks, per pool",
            labels=["stage", "model"],
            unit="seconds",
        )
        for pool in pools:
            queue.add_metric(list(pool), telemetry.queue(pool))
            if pool in telemetry.service:
                observed.add_metric(list(pool), telemetry.service[pool])
            estimate = telemetry.predicted(pool)
            if estimate is not None:
                predicted.add_metric(list(pool), estimate)
        yield queue
        yield observed
        yield predicted

    def _decisions(self, extension: Any, totals: _Totals) -> Iterator[Metric]:
        elastic = extension.elastic
        if elastic is not None:
            log = [_decision_entry(d) for d in elastic.decisions()]
            for _, source, target, *_ in totals.decision_cursor.read(log):
                totals.decisions[source, target] += 1
        family = CounterMetricFamily(
            self.build_name("rebalancing_decisions"),
            "Workers the elastic controller moved, per source and target stage "
            '("none": no pool)',
            labels=["source_stage", "target_stage"],
        )
        for (source, target), n in sorted(totals.decisions.items()):
            family.add_metric([source, target], n)
        yield family


def _decision_entry(decision: dict[str, Any]) -> tuple[Any, ...]:
    """A decision as a hashable log entry (time first), keeping only the stages
    of its pools for the counter's labels."""

    def stage(pool: Iterable[str] | None) -> str:
        return "none" if pool is None else next(iter(pool))

    return (
        decision["time"],
        stage(decision["source"]),
        stage(decision["target"]),
        decision["worker"],
        decision["reason"],
    )


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def register() -> None:
    """Serve dflow's metrics on ``/metrics`` of every scheduler in this process
    (idempotent)."""
    from distributed.http.scheduler.prometheus import core

    if DflowMetricCollector in core.COLLECTORS:
        return
    core.COLLECTORS.append(DflowMetricCollector)
    # The handler instantiates and registers COLLECTORS once per process, at the
    # first scrape; after that, join the instances it re-points at each scrape.
    handler: Any = core.PrometheusHandler
    if handler._collectors:
        collector = DflowMetricCollector(handler._collectors[0].server)
        prometheus_client.REGISTRY.register(collector)
        handler._collectors = (*handler._collectors, collector)
