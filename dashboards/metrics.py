"""dflow's Prometheus metrics on the scheduler's ``/metrics``.

:class:`DflowMetricCollector` yields ``dflow_*`` metric families from dflow's
scheduler extension and telemetry: request counters and an end-to-end latency
histogram per model, queue depth and workers per pool, service times, the
elastic controller's decisions, and the health collaborator's fenced, retired
and slow workers. Like distributed's semaphore collector, it only reads: the
extension (and the health collaborator) keep the counters and the histogram
cumulative, at the source. :func:`register` adds it to distributed's list of scheduler collectors
(``distributed.http.scheduler.prometheus.core.COLLECTORS``), so it is served
exactly like distributed's own: one instance in ``prometheus_client``'s global
registry per process, pointed by the ``/metrics`` handler at the scheduler
being scraped. Processes that start many schedulers (tests) therefore register
it once, and each scrape reads the scheduler that serves it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from distributed.http.prometheus import PrometheusCollector
from distributed.scheduler import Scheduler

if TYPE_CHECKING:
    from dflow.plugins.extension import DflowExtension, LatencyHistogram

logger = logging.getLogger(__name__)

REQUEST_STATUSES = ("submitted", "completed", "failed", "cancelled")


def latency_family(
    histogram: LatencyHistogram, name: str, documentation: str
) -> HistogramMetricFamily:
    """``histogram`` as a Prometheus histogram family, one series per model."""
    family = HistogramMetricFamily(
        name, documentation, labels=["model"], unit="seconds"
    )
    for model, counts in sorted(histogram.counts.items()):
        cumulative, buckets = 0, []
        for bound, count in zip((*histogram.bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append((_bound(bound), cumulative))
        family.add_metric([model], buckets, sum_value=histogram.sums[model])
    return family


class DflowMetricCollector(PrometheusCollector):
    """``dflow_*`` metrics of the scheduler's dflow extension (none without it)."""

    server: Scheduler

    def __init__(self, server: Scheduler):
        super().__init__(server)
        self.namespace = "dflow"

    def collect(self) -> Iterator[Metric]:
        extension = self.server.extensions.get("dflow")
        if extension is None:
            return
        try:
            families = [
                *self._requests(extension),
                *self._pools(extension),
                *self._decisions(extension),
                *self._health(),
                *self._encoding_cache(),
            ]
        except Exception:
            # a failing collector fails the whole page: keep distributed's metrics
            logger.exception("dflow's metrics failed")
            return
        yield from families

    def _requests(self, extension: DflowExtension) -> Iterator[Metric]:
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
        pending = Counter(r.model for r in extension.in_flight())
        # every model served or seen has a sample: 0 when idle, not none
        served = {pool.model for pool in extension.served()}
        for model in sorted(served | set(models) | set(pending)):
            in_flight.add_metric([model], pending[model])
        yield in_flight
        yield latency_family(
            extension.latency_histogram,
            self.build_name("request_latency"),
            "End-to-end latency of completed requests, submission to output, per model",
        )

    def _pools(self, extension: DflowExtension) -> Iterator[Metric]:
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

        telemetry: Any = self.server.plugins.get("dflow-telemetry")
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

    def _encoding_cache(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self.build_name("encoding_cache_lookups"),
            "Encode tasks per model whose encoding the encoder worker had cached "
            '("hit") or computed ("miss")',
            labels=["model", "result"],
        )
        telemetry: Any = self.server.plugins.get("dflow-telemetry")
        if telemetry is not None:
            for (model, result), n in sorted(telemetry.encoding_cache.items()):
                family.add_metric([model, result], n)
        yield family

    def _decisions(self, extension: DflowExtension) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self.build_name("rebalancing_decisions"),
            "Workers the elastic controller moved, per source and target stage "
            '("none": no pool)',
            labels=["source_stage", "target_stage"],
        )
        for (source, target), n in sorted(extension.decision_counts.items()):
            family.add_metric([source, target], n)
        yield family

    def _health(self) -> Iterator[Metric]:
        """The health collaborator's fences, unfences, retirements and slow
        workers (nothing with ``dflow.health.enabled`` off)."""
        health: Any = self.server.plugins.get("dflow-health")
        if health is None:
            return
        families = {
            "fenced": CounterMetricFamily(
                self.build_name("workers_fenced"),
                "Workers fenced as hung, per stage and cause (heartbeat: silent; "
                "stalled: busy without progress)",
                labels=["stage", "cause"],
            ),
            "unfenced": CounterMetricFamily(
                self.build_name("workers_unfenced"),
                "Fenced workers that recovered and serve again, per stage",
                labels=["stage"],
            ),
            "retired": CounterMetricFamily(
                self.build_name("workers_retired"),
                "Workers retired from the cluster, per stage and cause "
                "(unrecovered, flapping, slow)",
                labels=["stage", "cause"],
            ),
            "slow": CounterMetricFamily(
                self.build_name("workers_slow_reports"),
                "Workers reported slow against their GPU type, per stage",
                labels=["stage"],
            ),
        }
        for (event, stage, cause), n in sorted(health.counts.items()):
            labels = [stage, cause] if event in ("fenced", "retired") else [stage]
            families[event].add_metric(labels, n)
        yield from families.values()
        slow = GaugeMetricFamily(
            self.build_name("workers_slow"),
            "Workers now reported slow against their GPU type, per stage and GPU type",
            labels=["stage", "gpu_type"],
        )
        extension = self.server.extensions["dflow"]
        counts = Counter(
            (record.stage or "none", record.gpu_type)
            for address, record in extension.workers.items()
            if (watch := health.watches.get(address)) is not None and watch.slow
        )
        for (stage, gpu_type), n in sorted(counts.items()):
            slow.add_metric([stage, gpu_type], n)
        yield slow


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
