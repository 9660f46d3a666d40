"""Prometheus metrics: the one place where tidecast's metric names are defined.

One :class:`prometheus_client.CollectorRegistry` per process (passed in, so tests can make their own). Base units
(seconds, ratios), ``_total`` counters, and only bounded label sets: ``model`` (the configured models),
``horizon`` (1..H), ``level`` (the configured interval levels, coverage in percent: ``"90"``), ``reason``
(:data:`tidecast.stream.records.REASONS`, and ``serve``'s :data:`tidecast.stream.kafka_source.SERVE_REASONS`),
``partition`` (the assigned partitions), ``source`` (changelog, snapshot), ``detector`` (the configured drift
watchers), ``outcome`` (a retrain's: started, promoted, rejected, failed, rolled_back).
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
        self.snapped_collisions = Counter(
            "tidecast_snapped_collisions", "Observations skipped because their timestamp, newer than their series' "
            "last one, snapped onto the same grid tick (the grid is coarser than the data).", registry=r)
        self.gap_fills = Counter(
            "tidecast_gap_filled_ticks", "Missing grid steps filled by interpolation (learned, never scored).",
            registry=r)
        self.series_resets = Counter(
            "tidecast_series_resets", "Gaps longer than max_gap after which a series' model history was reset "
            "(one per gap: a series with two such gaps counts twice).",
            registry=r)
        self.series_active = Gauge("tidecast_series", "Series with state in this process.", registry=r)
        self.coverage = Gauge(
            "tidecast_interval_coverage_ratio",
            "Rolling share of matured forecasts whose interval held the outcome.", ["model", "horizon", "level"],
            registry=r)
        self.target_coverage = Gauge(
            "tidecast_interval_target_coverage_ratio",
            "Configured interval coverage target (1 - alpha of the level); alerts compare the rolling coverage "
            "with it.", ["model", "level"], registry=r)
        self.width = Gauge(
            "tidecast_interval_width", "Rolling mean interval width (in the series' own units).",
            ["model", "horizon", "level"], registry=r)
        self.drift_alarms = Counter(
            "tidecast_drift_alarms", "Drift alarms raised on a series' model, by lane and watcher.",
            ["model", "detector"], registry=r)
        self.retrains = Counter(
            "tidecast_retrains", "Retrain jobs of a lane's model by outcome: started, promoted, rejected, "
            "rolled_back, failed.",
            ["model", "outcome"], registry=r)
        self.model_version = Gauge(
            "tidecast_model_version", "Version of a lane's model: changes of its served model so far (promotions "
            "and probation rollbacks).",
            ["model"], registry=r)
        self.retrain_seconds = Histogram(
            "tidecast_retrain_seconds", "Time a retrain job spent fitting its candidate.",
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900), registry=r)
        self.shadow_error_ratio = Gauge(
            "tidecast_shadow_error_ratio", "The last shadow gate's squared error of the candidate over the "
            "incumbent's (below 1: the candidate was better).", ["model"], registry=r)
        self.series_warming_up = Gauge(
            "tidecast_series_warming_up", "Series with observations whose model has not issued a forecast yet (its "
            "warm-up: a cycle to detect, a first fit to wait for).", ["model"], registry=r)
        self.series_drifting = Gauge(
            "tidecast_series_drifting", "Series whose model raised a drift alarm within the last drift_window steps "
            "of their own grid.", ["model"], registry=r)
        self.bootstrap_spread_ratio = Gauge(
            "tidecast_bootstrap_spread_ratio", "Bootstrap replicas' forecast spread over the series' residual scale, "
            "median over series; horizon labels are buckets 1, 2, 4, 8, ... up to H, each labelled by its last "
            "horizon (lanes whose model runs bootstrap replicas only).", ["model", "horizon"], registry=r)
        self.processing = Histogram(
            "tidecast_processing_seconds", "Wall time of one engine batch.", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.maintenance = Histogram(
            "tidecast_maintenance_seconds", "Wall time of deferred model work (fitting, replay training).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self._add_consumer_metrics(r)
        for reason in reasons:
            self.dead_letters.labels(reason=reason)  # export zeros: absent != zero for alerting

    def _add_consumer_metrics(self, r: CollectorRegistry) -> None:
        """``tidecast serve``: the Kafka consumer, its checkpoints and rebalances (zero/empty elsewhere)."""
        self.consumer_lag = Gauge(
            "tidecast_consumer_lag", "Records in the partition not yet fetched: highwater minus position.",
            ["partition"], registry=r)
        self.consumer_records = Counter(
            "tidecast_consumer_records", "Records fetched from the input topic.", registry=r)
        self.consumer_rate = Gauge(
            "tidecast_consumer_records_per_second", "Records processed per second, over the last few seconds.",
            registry=r)
        self.last_record = Gauge(
            "tidecast_last_record_timestamp_seconds", "Unix time records were last fetched from the input topic "
            "(with tidecast_last_checkpoint_timestamp_seconds: consuming without checkpointing, as opposed to idle).",
            registry=r)
        self.consumer_skipped = Counter(
            "tidecast_consumer_skipped_records",
            "Re-delivered records skipped because their series had already applied them.", registry=r)
        self.queued_records = Gauge(
            "tidecast_consumer_queued_records", "Records fetched and waiting for the engine worker.", registry=r)
        self.paused_partitions = Gauge(
            "tidecast_consumer_paused_partitions", "Assigned partitions paused (backpressure or restoring).",
            registry=r)
        self.assigned_partitions = Gauge(
            "tidecast_consumer_assigned_partitions", "Input partitions assigned to this process.", registry=r)
        self.rebalances = Counter(
            "tidecast_rebalances", "Consumer group rebalances this process took part in (assignments).",
            registry=r)
        self.checkpoint = Histogram(
            "tidecast_checkpoint_seconds", "Wall time of one checkpoint (outputs flushed, state durable).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.last_checkpoint = Gauge(
            "tidecast_last_checkpoint_timestamp_seconds", "Unix time of the last durable checkpoint.",
            registry=r)
        self.checkpoint_deadline = Gauge(
            "tidecast_checkpoint_deadline_seconds", "Longest a checkpoint may be postponed while records arrive: "
            "checkpoint_interval, times 30 with a changelog budget (alert when the last one is older).",
            registry=r)
        self.checkpoint_series = Counter(
            "tidecast_checkpoint_series", "Series states written to the changelog.", registry=r)
        self.restore_seconds = Histogram(
            "tidecast_state_restore_seconds", "Wall time of restoring assigned partitions' state (local snapshot "
            "and changelog) into the engine.", buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r)
        self.restore_bytes = Counter(
            "tidecast_state_restore_bytes", "Changelog bytes read to restore partitions.", registry=r)
        self.restored_series = Counter(
            "tidecast_state_restored_series", "Series states restored (local snapshot or changelog).",
            registry=r)
        self.commits = Counter("tidecast_offset_commits", "Successful offset commits.", registry=r)
        self.commit_failures = Counter(
            "tidecast_offset_commit_failures", "Offset commits that failed (retried at the next checkpoint).",
            registry=r)
        self.output_errors = Counter(
            "tidecast_output_errors", "Forecast or dead-letter messages the broker did not acknowledge.",
            registry=r)
        self.broker_up = Gauge(
            "tidecast_broker_up", "1 while the Kafka cluster answers, 0 while it is unreachable (retried within "
            "the outage budget); NaN outside serve.", registry=r)
        self.broker_up.set(float("nan"))  # replay talks to no broker: neither up nor down
        self.broker_retries = Counter(
            "tidecast_broker_retries", "Broker operations retried because the cluster was unreachable (connecting "
            "at start, flushing outputs, writing or reading the changelog, probing).", registry=r)
        self.state_skipped = Counter(
            "tidecast_state_skipped", "State skipped at restore: changelog records that are no state blob, local "
            "snapshots of another topic, partition or group.", ["source"], registry=r)
        self.offset_resets = Counter(
            "tidecast_consumer_offset_resets", "Input partitions whose log went back under the consumer (topic "
            "recreated, log truncated) or whose position lay past the log end; reset per auto_offset_reset.",
            registry=r)
        self.processing_errors = Counter(
            "tidecast_processing_errors", "Batches (or forecasts) whose processing raised; their records are "
            "dead-lettered as processing_error. Always a bug to fix.", registry=r)
        for source in ("changelog", "snapshot"):
            self.state_skipped.labels(source=source)

    def exposition(self) -> bytes:
        """The text exposition format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)
