"""``tidecast serve``: a Kafka consumer-group member with checkpointed per-series state, built from parts.

The worker reads like ``replay``: decode -> engine -> sinks -> checkpoint.

Threads
-------
* **poll thread** (the caller of :meth:`Service.run`) runs the :class:`~tidecast.stream.fetcher.Fetcher`, the only
  user of the group consumer: poll, hand records to the worker, pause/resume for backpressure, seek restored
  partitions, commit durable offsets, lag gauges.
* **worker** (:class:`~tidecast.stream.worker.Worker`) owns the :class:`~tidecast.stream.engine.Engine`: it decodes
  (:mod:`~tidecast.stream.kafka_source`), screens by ownership and checkpoints through the
  :class:`~tidecast.stream.partitions.PartitionTable`, and writes to the Kafka sinks
  (:class:`~tidecast.stream.kafka.KafkaForecastSink`, :class:`~tidecast.stream.kafka.KafkaEventSink` for drift
  events, :class:`~tidecast.stream.kafka.KafkaDeadLetterSink`).
* **trainer** (:class:`~tidecast.stream.worker.Trainer`) runs model maintenance (fits, replay training), so the
  worker never waits for a fit.
* **output processes** (``--output-processes``, 2 by default in the JSON format): child processes that encode and
  send the forecasts (:mod:`~tidecast.stream.output_process`), so that kafka-python's per-message cost does not
  share the worker's core; the worker hands each batch's forecasts over as raw columns.
* **fetch process** (``--fetch-process``, off by default): a child process that fetches and decodes the input
  (:mod:`~tidecast.stream.fetch_process`); the group consumer then only keeps the membership and commits, and
  the poll thread hands the child's decoded columns to the worker.
* kafka-python's IO thread runs the rebalance listener, which hands revoked partitions to the worker for a
  final checkpoint, awaits it without blocking heartbeats, and commits.
* a lag probe (:class:`~tidecast.stream.kafka.HighwaterProbe`) refreshes the end of paused partitions.
* the health server (:class:`~tidecast.stream.health.HealthServer`) answers ``/metrics``, ``/healthz`` (the
  poll and worker loops' heartbeats) and ``/readyz`` (every assigned partition restored).

Threads talk through typed messages (:mod:`tidecast.stream.messages`).

Unreachable versus refusing
---------------------------
An unreachable cluster (at start or during an outage) is waited out: every operation retries with backoff through
one :class:`~tidecast.stream.kafka.BrokerLink` (``tidecast_broker_up``, a log line when the outage starts and one when
it ends) until the outage lasts ``broker_outage_budget`` seconds; then serve exits 1 with one line. A broker that
*refuses* an output (a message too large, no authorisation) stops the member at once: retrying cannot help, and
offsets are never committed past records whose outputs were lost.

Effectively-once state
----------------------
For each input partition the worker keeps the *position*: every record below it has been applied, skipped as a
duplicate or dead-lettered. A checkpoint (every ``checkpoint_records`` records or ``checkpoint_interval`` seconds,
on revocation and at shutdown) makes, in order: outputs durable (sinks flushed, all acknowledged), the changelog
group durable (every series of each changed partition + a marker with the position), the local snapshot durable;
only then are offsets committed. A restore takes the newest state per series (local snapshot, then changelog) and
seeks to the checkpoint's position; records a series already applied (offset at or below its applied offset) are
skipped. Outputs are at-least-once: a crash re-sends forecasts and drift events issued after the last checkpoint,
byte-identical (the detectors' state is part of each series' checkpoint, so a restore neither resets nor doubles an
alarm).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from tidecast.monitors.metrics import Metrics
from tidecast.stream.config import READER_FETCH_WAIT_MS, EngineConfig, ServeConfig
from tidecast.stream.engine import Engine
from tidecast.stream.fetch_process import FetchProcess
from tidecast.stream.fetcher import Fetcher, rebalance_listener
from tidecast.stream.health import HealthServer, Heartbeat, Readiness
from tidecast.stream.kafka import (
    SERVE_LINGER_MS,
    BrokerLink,
    BrokerUnavailable,
    HighwaterProbe,
    KafkaDeadLetterSink,
    KafkaEventSink,
    KafkaForecastSink,
    assignors,
    client_settings,
    compact_message_limit,
    ensure_topics,
    is_unavailable,
    partition_count,
    producer_settings,
    warn_without_crc32c,
)
from tidecast.stream.kafka_source import SERVE_REASONS
from tidecast.stream.output_process import ProcessForecastSink
from tidecast.stream.partitioner import HomePartitions
from tidecast.stream.partitions import PartitionTable
from tidecast.stream.state import ChangelogStore, IncompatibleState, LocalStateStore
from tidecast.stream.worker import Trainer, Worker

log = logging.getLogger(__name__)

def build_worker(cfg: ServeConfig, engine: Engine, metrics: Metrics, producer: Any, changelog: ChangelogStore,
                 local: LocalStateStore, outbox: queue.Queue, output_partitions: dict[str, int], input_partitions: int,
                 link: BrokerLink | None = None, producer_config: dict[str, Any] | None = None,
                 output_processes: int = 0, **worker_kw: Any) -> Worker:
    """The worker and its parts: the partition table (checking records against their home partition under
    ``cfg.partitioner``) and the Kafka sinks, co-partitioned where counts match. With ``output_processes``
    (:func:`output_processes` of the settings, in serve) the forecasts go through that many child processes, each
    with a producer of ``producer_config``."""
    co_partitioned = {name: n == input_partitions for name, n in output_partitions.items()}
    flush_timeout = cfg.shutdown_timeout * 4
    homes = HomePartitions(input_partitions, cfg.partitioner)
    table = PartitionTable(cfg.topic, engine, changelog, local, metrics, homes=homes)
    heartbeat = worker_kw.get("heartbeat")
    progress = heartbeat.tick if heartbeat is not None else None
    forecast_partition = table.owner_of if co_partitioned.get(cfg.forecast_topic) else None
    forecasts: KafkaForecastSink | ProcessForecastSink
    if output_processes:
        forecasts = ProcessForecastSink(producer_config or {}, cfg.forecast_topic, metrics.output_errors,
                                        flush_timeout, forecast_partition, cfg.output_format,
                                        cfg.broker_outage_budget, progress, processes=output_processes,
                                        compression=cfg.compact_compression)
    else:
        forecasts = KafkaForecastSink(producer, cfg.forecast_topic, metrics.output_errors, flush_timeout,
                                      forecast_partition, link, progress, output_format=cfg.output_format,
                                      compression=cfg.compact_compression,
                                      message_bytes=compact_message_limit(cfg.max_request_size))
    events = KafkaEventSink(producer, cfg.events_topic, metrics.output_errors, flush_timeout,
                            table.owner_of if co_partitioned.get(cfg.events_topic) else None, link, progress)
    letters = KafkaDeadLetterSink(producer, cfg.dead_letter_topic, metrics.output_errors, flush_timeout,
                                  cfg.dead_letter_max_bytes, co_partitioned.get(cfg.dead_letter_topic, False), link,
                                  progress)
    table.outputs = (forecasts, events, letters)  # flushed first in every checkpoint (they need the table)
    return Worker(cfg, engine, table, forecasts, letters, outbox, metrics, events=events, **worker_kw)


def output_processes(cfg: Any) -> int:
    """``--output-processes``, or its default: 2 in the JSON format (one message per forecast: two processes passed
    the client's ceiling where one could not), 0 in the compact format (a few messages per round: sending them is
    cheap, the hand-over would cost more than it saves)."""
    if cfg.output_processes is not None:
        return int(cfg.output_processes)
    return 2 if cfg.output_format == "json" else 0


class StartupError(Exception):
    """The cluster or the host is not as the settings say (a missing topic, a port in use): said in one line, exit 2."""


class Service:
    """A ``tidecast serve`` process: :meth:`run` blocks until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None,
                 engine_factory: Callable[[EngineConfig, Metrics], Engine] | None = None) -> None:
        self.cfg = config
        self.metrics = metrics or Metrics(reasons=SERVE_REASONS)
        self._engine_factory = engine_factory or Engine.from_config
        self._stop = threading.Event()
        self.link = BrokerLink(config.broker_outage_budget, self.metrics.broker_up, self.metrics.broker_retries,
                               self._stop)
        self.heartbeats = {"poll": Heartbeat(), "worker": Heartbeat()}
        self.readiness = Readiness()
        self.consumer: Any = None
        self.producer: Any = None
        self.changelog_producer: Any = None
        self.worker: Worker | None = None
        self.trainer: Trainer | None = None
        self.fetcher: Fetcher | None = None
        self.probe: HighwaterProbe | None = None
        self.fetch_process: FetchProcess | None = None
        self.health: HealthServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask for a graceful stop (thread- and signal-safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> int:
        """Serve until stopped; 0 after a clean stop, 1 if the worker or the trainer failed (also while finishing
        its last batch after a stop) or the cluster stayed unreachable for the outage budget (said in one line,
        without a traceback), 2 if the setup failed on the environment or the settings (a missing input topic, a
        metrics port in use: one line too)."""
        code = 1
        try:
            code = self._serve()
        finally:
            self._shutdown()
        failed = self._failure()
        if code == 0 and isinstance(failed, IncompatibleState):  # a restore refused as the stop came: exit 2 still
            log.error("serve cannot restore its state: %s", failed)
            return 2
        if code == 0 and failed is not None and not (isinstance(failed, BrokerUnavailable) and not self.link.down):
            # the batch in hand when the stop came failed (a refused message): no clean stop for a supervisor
            log.error("serve stopped: the worker failed while finishing its last batch: %r", failed)
            return 1
        return code

    def _serve(self) -> int:
        try:
            try:
                self._start()
            except StartupError as err:  # the environment: a missing topic, a port in use - one line, no traceback
                log.error("serve could not start: %s", err)
                return 2
            assert self.fetcher is not None
            while not self._stop.is_set():
                failed = self._failure()
                if isinstance(failed, BrokerUnavailable):
                    raise failed
                if isinstance(failed, IncompatibleState):  # a settings mistake, like a bad option: one line, exit 2
                    log.error("serve cannot restore its state: %s", failed)
                    return 2
                if failed is not None:
                    raise RuntimeError("the engine's worker or trainer failed") from failed
                self.fetcher.poll_once()
            return 0
        except BrokerUnavailable as err:
            if self._stop.is_set() and not self.link.down:
                return 0
            log.error("serve stopped: %s", err)
            return 1
        except Exception:
            log.exception("serve stopped on an error")
            return 1

    def _failure(self) -> BaseException | None:
        return next((t.error for t in (self.worker, self.trainer) if t is not None and t.error is not None), None)

    def worker_failed(self) -> bool:
        return self.worker is None or self._failure() is not None or not self.worker.is_alive()

    def _start(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.admin import KafkaAdminClient

        from tidecast.models.runtime import set_torch_threads

        cfg = self.cfg
        try:
            self._serve_health()
        except OSError as err:
            raise StartupError(f"the metrics and health server on {cfg.metrics_address}:{cfg.metrics_port}: {err}") \
                from err
        self.consumer = self._connect(KafkaConsumer, self._consumer_settings(KafkaConsumer))
        try:  # the topics as they are on the cluster: missing, or a changelog of another partition count
            n_input = partition_count(self.consumer, cfg.topic)
            output_partitions = self._prepare_topics(KafkaAdminClient, n_input)
        except ValueError as err:
            raise StartupError(str(err)) from err
        producer = client_settings(
            cfg.options, KafkaProducer, cfg.kafka_extra, max_request_size=cfg.max_request_size,
            linger_ms=SERVE_LINGER_MS, batch_size=256 * 1024, acks="all",
            **producer_settings(cfg.broker_outage_budget, cfg.kafka_extra))
        self.producer = self._connect(KafkaProducer, producer)
        # The changelog gets a producer of its own: a checkpoint's megabytes, written while the worker goes on,
        # must not fill the buffer the forecasts go through (a full buffer blocks send).
        self.changelog_producer = self._connect(KafkaProducer, producer)
        reader_settings = self._reader_settings(KafkaConsumer)
        changelog = ChangelogStore(cfg.changelog_topic, self.changelog_producer,
                                   lambda: KafkaConsumer(**reader_settings), progress=self.heartbeats["worker"].tick,
                                   link=self.link)
        local = LocalStateStore(cfg.state_dir, cfg.group_id, cfg.topic)
        engine = self._engine_factory(cfg.engine, self.metrics)
        set_torch_threads(cfg.torch_threads)  # after the models exist: a no-op unless one of them imported torch
        self.trainer = Trainer(engine)
        outbox: queue.Queue = queue.Queue()
        epochs: dict[int, int] = {}
        self.worker = build_worker(cfg, engine, self.metrics, self.producer, changelog, local, outbox,
                                   output_partitions, n_input, self.link, producer_config=producer,
                                   output_processes=output_processes(cfg), epochs=epochs,
                                   heartbeat=self.heartbeats["worker"], after_batch=self.trainer.wake)
        self.worker.start()
        self.trainer.start()
        # The probe only wants the fetch response's highwater: keep what it drags along small.
        probe_settings = {**reader_settings, "max_partition_fetch_bytes": 65_536, "fetch_max_bytes": 1_048_576}
        self.probe = HighwaterProbe(cfg.topic, lambda: KafkaConsumer(**probe_settings), cfg.lag_interval)
        self.probe.start()
        if cfg.fetch_process:
            self.fetch_process = FetchProcess(self._fetch_settings(KafkaConsumer), cfg.topic, cfg.max_record_bytes,
                                              self.consumer, epochs)
        self.fetcher = Fetcher(cfg, self.consumer, self.worker, outbox, epochs, self.readiness, self.probe,
                               self.metrics, self.heartbeats["poll"], self.link, self.fetch_process)
        # /readyz stays "starting" until the group's first assignment (rebalance_listener marks it), so a rolling
        # restart does not take the next member down before this one owns its partitions
        self.consumer.subscribe([cfg.topic], listener=rebalance_listener(self.fetcher, self._stop, self.worker_failed))
        log.info("serving %s as group %s -> %s (drift events %s, dead letters %s, changelog %s)", cfg.topic,
                 cfg.group_id, cfg.forecast_topic, cfg.events_topic, cfg.dead_letter_topic, cfg.changelog_topic)
        log.info("series ids are expected on their home partition under the %s; records on another partition "
                 "are dead-lettered as wrong_partition (set --partitioner to the producers': crc32 for librdkafka "
                 "clients, fnv1a for Sarama)", self.worker.table.homes.describe() if self.worker.table.homes else "")

    def _connect(self, client: type, settings: dict[str, Any]) -> Any:
        """A kafka-python client, retried with backoff while the cluster is unreachable (within the budget).

        kafka-python logs every refused connection as an error; while connecting, the link's own lines (outage
        start, reachable again, or the final one) say it once instead.
        """
        servers = ",".join(settings.get("bootstrap_servers", []))
        kafka_log = logging.getLogger("kafka")  # its modules' loggers inherit this level
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)
        try:
            return self.link.call(f"connecting to {servers}",
                                  lambda timeout: client(**{**settings, "bootstrap_timeout_ms": int(timeout * 1000)}),
                                  self._tick_waiting)
        finally:
            kafka_log.setLevel(level)

    def _tick_waiting(self) -> None:
        """While a client waits for the cluster: the poll thread is alive, and so is the worker until it starts
        (it has nothing to be stuck on yet; a startup outage keeps /healthz 200, as a later one does)."""
        self.heartbeats["poll"].tick()
        if self.worker is None:
            self.heartbeats["worker"].tick()

    def _consumer_settings(self, client: type) -> dict[str, Any]:
        cfg = self.cfg
        return client_settings(
            cfg.options, client, cfg.kafka_extra, group_id=cfg.group_id, session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms, max_poll_interval_ms=cfg.max_poll_interval_ms,
            partition_assignment_strategy=assignors(cfg.assignment_strategy), **self._input_fetch())

    def _input_fetch(self) -> dict[str, Any]:
        """How the input is fetched, by the group consumer or by the fetch process's (never auto-committing)."""
        cfg = self.cfg
        return {"enable_auto_commit": False, "auto_offset_reset": cfg.auto_offset_reset,
                "max_poll_records": cfg.max_poll_records, "max_partition_fetch_bytes": cfg.max_partition_fetch_bytes,
                "fetch_max_bytes": cfg.fetch_max_bytes, "fetch_max_wait_ms": cfg.fetch_max_wait_ms}

    def _reader_settings(self, client: type) -> dict[str, Any]:
        """A group-less consumer (changelog restore, lag probe): short fetch waits, never commits."""
        cfg = self.cfg
        return client_settings(cfg.options, client, cfg.kafka_extra, group_id=None, enable_auto_commit=False,
                               auto_offset_reset="earliest", fetch_max_wait_ms=READER_FETCH_WAIT_MS,
                               max_partition_fetch_bytes=max(cfg.max_partition_fetch_bytes, cfg.max_request_size),
                               fetch_max_bytes=max(cfg.fetch_max_bytes, cfg.max_request_size))

    def _fetch_settings(self, client: type) -> dict[str, Any]:
        """The fetch process's consumer: the group consumer's fetch settings, without the group."""
        return client_settings(self.cfg.options, client, self.cfg.kafka_extra, group_id=None, **self._input_fetch())

    def _prepare_topics(self, admin_cls: type, n_input: int) -> dict[str, int]:
        cfg = self.cfg
        if cfg.create_topics:
            admin = self._connect(admin_cls, client_settings(cfg.options, admin_cls, cfg.kafka_extra))
            try:
                changelog_configs = {"cleanup.policy": "compact", "max.message.bytes": str(cfg.max_request_size)}
                created = ensure_topics(admin, {cfg.forecast_topic: (n_input, {}),
                                                cfg.events_topic: (n_input, {}),
                                                cfg.dead_letter_topic: (n_input, {}),
                                                cfg.changelog_topic: (n_input, changelog_configs)},
                                        cfg.replication_factor)
            finally:
                admin.close()
            if created:
                log.info("created topics %s", created)
        counts = {t: partition_count(self.consumer, t) for t in (cfg.forecast_topic, cfg.events_topic,
                                                                  cfg.dead_letter_topic, cfg.changelog_topic)}
        if counts[cfg.changelog_topic] != n_input:
            raise ValueError(f"changelog {cfg.changelog_topic} has {counts[cfg.changelog_topic]} partitions, the "
                             f"input {n_input}; they must match (state of input partition P lives in changelog P)")
        return counts

    def _serve_health(self) -> None:
        if self.cfg.metrics_port is None:
            return
        self.health = HealthServer(self.cfg.metrics_address, self.cfg.metrics_port, self.metrics.registry,
                                   self.heartbeats, self.readiness, self.cfg.liveness_timeout).start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz and /readyz", self.cfg.metrics_address,
                 self.health.port)

    def _shutdown(self) -> None:
        """Stop fetching, let the worker finish its batch, final checkpoint + commit (via the revoke
        listener that ``close`` runs), leave the group, close clients, stop the health server."""
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        if self.consumer is not None:
            try:
                if self.fetcher is not None:
                    self.fetcher.pause_all()
                    self.fetcher.drain()
                self.consumer.close(timeout_ms=int(max(1.0, deadline - time.monotonic()) * 1000))
            except Exception as err:
                _log_close_error("closing the consumer", err)
        if self.fetch_process is not None:
            self.fetch_process.close(max(0.5, deadline - time.monotonic()))
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(timeout=max(0.5, deadline - time.monotonic()))
            self.worker.table.changelog.close()
            self.worker.forecasts.close()  # the output processes (--output-processes) stop here
        if self.trainer is not None:
            self.trainer.stop()
        if self.probe is not None:
            self.probe.stop()
        for producer in (self.producer, self.changelog_producer):
            if producer is not None:
                _close_producer(producer, max(0.5, deadline - time.monotonic()))
        if self.health is not None:
            self.health.stop()
        log.info("stopped")


def _log_close_error(what: str, err: Exception) -> None:
    if is_unavailable(err):  # the cluster is gone: one line, the outage was said already
        log.warning("%s: %s", what, err)
    else:
        log.exception(what)


def _close_producer(producer: Any, timeout: float) -> None:
    """Close the producer; unacknowledged messages are dropped after ``timeout`` (nothing past them was committed).

    kafka-python 3.0 raises from ``close`` when its flush times out, before it stops its sender thread, and its
    ``__del__`` then tries again at exit (a traceback on stderr): stop the sender and mark the client closed.
    """
    try:
        producer.close(timeout=timeout)
    except Exception as err:
        _log_close_error("closing the producer", err)
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
        producer._closed = True


def run_serve(config: ServeConfig) -> int:
    """Run the service in this process with signal handlers; the exit status."""
    level = getattr(logging, str(config.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(max(level, logging.WARNING))  # its INFO is per-connection chatter
    warn_without_crc32c()
    service = Service(config)
    service.install_signal_handlers()
    return service.run()
