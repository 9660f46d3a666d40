"""Prometheus metrics: the one place where tidecast's metric names are defined.

One :class:`prometheus_client.CollectorRegistry` per process (passed in, so tests can make their own). Base units
(seconds, ratios), ``_total`` counters, and only bounded label sets: ``model`` (the configured models),
``horizon`` (1..H), ``reason`` (:data:`stream.records.REASONS`), ``partition`` (the assigned partitions).
No per-series labels: a fleet of 100k series must not become 100k time series in Prometheus.

>>> m = Metrics()
>>> m.observations.inc(3)
>>> b"tidecast_observations_total 3.0" in m.exposition()
True
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """All of tidecast's metrics, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, reasons: Iterable[str] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.observations = Counter(
            "tidecast_observations", "Observations applied to per-series state (imputed gap fills excluded).",
            registry=r)
        self.forecasts = Counter(
            "tidecast_forecasts", "Forecast steps emitted (one per series, origin and horizon).", ["model"],
            registry=r)
        self.dead_letters = Counter(
            "tidecast_dead_letters", "Records rejected to the dead-letter output, by reason.", ["reason"],
            registry=r)
        self.duplicates = Counter(
            "tidecast_duplicates", "Observations skipped because their series already had that timestamp.",
            registry=r)
        self.gap_fills = Counter(
            "tidecast_gap_filled_ticks", "Missing grid steps filled by interpolation (learned, never scored).",
            registry=r)
        self.series_resets = Counter(
            "tidecast_series_resets", "Series whose model history was reset after a gap longer than max_gap.",
            registry=r)
        self.series_active = Gauge("tidecast_series", "Series with state in this process.", registry=r)
        self.coverage = Gauge(
            "tidecast_interval_coverage_ratio",
            "Rolling share of matured forecasts whose interval held the outcome.", ["model", "horizon"],
            registry=r)
        self.width = Gauge(
            "tidecast_interval_width", "Rolling mean interval width (in the series' own units).",
            ["model", "horizon"], registry=r)
        self.processing = Histogram(
            "tidecast_processing_seconds", "Wall time of one engine batch.", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.maintenance = Histogram(
            "tidecast_maintenance_seconds", "Wall time of deferred model work (fitting, replay training).",
            buckets=_LATENCY_BUCKETS, registry=r)
        for reason in reasons:
            self.dead_letters.labels(reason=reason)  # export zeros: absent != zero for alerting

    def exposition(self) -> bytes:
        """The text exposition format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)
