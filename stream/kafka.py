"""Kafka plumbing shared by ``serve`` and ``produce``: client settings, topics, message formats, the output sinks,
lag probing.

Nothing here depends on a particular broker: only the plain Kafka protocol through kafka-python. In particular
the end of a partition is read from fetch responses (``highwater``), never from ListOffsets, which some
Kafka-compatible brokers answer wrongly.

Messages
--------
* input (``--topic``): key ``series_id`` (UTF-8), value one JSON observation (:mod:`tidecast.stream.records`), on
  the series' home partition under ``--partitioner`` (:mod:`tidecast.stream.partitioner`).
* forecasts (``--forecast-topic``): key ``series_id``, value one JSON object per (series, model, origin) holding
  all its steps as parallel arrays — one message instead of H keeps the per-message cost (the bottleneck of a
  Python Kafka client) H times lower::

    {"series_id": "ETTh1/OT", "model": "seasonal-naive", "issued_at": "2016-07-01T00:00:00Z", "alpha": 0.1,
     "h": [1, 2, ...], "target_timestamp": ["2016-07-01T01:00:00Z", ...],
     "mean": [...], "lower": [...], "upper": [...],
     "intervals": {"90": {"lower": [...], "upper": [...]}}, "has_interval": [true, ...], "schema_version": 2}

  ``lower``/``upper`` are the first interval level's (``1 - alpha``), so readers of schema 1 keep working;
  ``intervals`` holds every configured level (``--level 80,95``), keyed by its coverage in percent. A bound is
  ``null`` where the step has no interval yet (its calibrator cell had no data: ``has_interval`` false, every
  level) or where that side is unbounded (a calibrator may emit an infinite interval: ``has_interval`` true). A
  consumer de-duplicates on ``(series_id, model, issued_at, h)``; a re-sent message (after a crash) is identical.
* drift events (``--events-topic``): key ``series_id``, value one JSON object per alarm of a lane monitor
  (:func:`tidecast.stream.sinks.event_json`)::

    {"series_id": "ETTh1/OT", "model": "seasonal-naive", "detector": "cusum", "kind": "mean",
     "detected_at": "2016-07-09T04:00:00Z", "statistic": 18.3, "schema_version": 1}

  at-least-once like forecasts: a consumer de-duplicates on ``(series_id, model, detector, kind, detected_at)``; a
  re-sent event (after a crash) is identical.
* dead letters (``--dead-letter-topic``): the original key and raw value bytes, unchanged, with the why and
  where in headers: ``tidecast.reason`` (one of :data:`tidecast.stream.kafka_source.SERVE_REASONS`),
  ``tidecast.detail``, ``tidecast.source.topic``, ``tidecast.source.partition``, ``tidecast.source.offset``,
  ``tidecast.source.timestamp`` (ms) and, when the value was cut to ``dead_letter_max_bytes``,
  ``tidecast.raw.size`` (its original size). Fix and re-drive them by producing the value back to the input.

The outputs are sinks with the protocol of :mod:`tidecast.stream.sinks` (:class:`KafkaForecastSink`,
:class:`KafkaEventSink`, :class:`KafkaDeadLetterSink`): ``write`` sends asynchronously, ``flush`` waits until the
broker acknowledged everything sent and raises :class:`OutputError` if it refused anything.

Reachability: :class:`BrokerLink` waits out an unreachable cluster (retriable errors) within an outage budget and
raises :class:`BrokerUnavailable` past it; refusals (every other error) are never retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from tidecast.monitors.drift import DriftEvent
from tidecast.stream.batch import ForecastBatch, first_steps
from tidecast.stream.sinks import event_json
from tidecast.stream.sources import DeadLetter

log = logging.getLogger(__name__)
T = TypeVar("T")

#: 2: ``intervals`` (every level) and ``has_interval`` were added; everything of version 1 is unchanged.
FORECAST_SCHEMA_VERSION = 2
#: Settings passed through to both clients when given (flag, env or file).
SECURITY_SETTINGS = ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
                     "sasl_kerberos_service_name", "sasl_kerberos_domain_name", "ssl_cafile", "ssl_certfile",
                     "ssl_keyfile", "ssl_password", "ssl_crlfile", "ssl_ciphers", "ssl_check_hostname")
ASSIGNMENT_STRATEGIES = ("range", "roundrobin", "sticky", "cooperative-sticky")


#: serve's producers wait this long to batch records (the request timeout's budget counts it)
SERVE_LINGER_MS = 5

#: kafka-python keys tidecast sets on its clients itself, and why. A ``[kafka]`` table may not hold them: its value
#: would be overridden without a word (serve and produce pass these as overrides).
FIXED_CLIENT_KEYS = {
    "enable_auto_commit": "offsets are committed only after the forecasts are sent (at-least-once)",
    "acks": "every send waits for all in-sync replicas (acks=all: at-least-once)",
    "partition_assignment_strategy": "set it with --assignment-strategy",
    "linger_ms": "the producers' batching is tidecast's own",
    "batch_size": "the producers' batching is tidecast's own",
    "delivery_timeout_ms": "serve derives it from --broker-outage-budget",
    "max_block_ms": "a send blocks a few seconds at most, so the worker keeps its heartbeat",
    "bootstrap_timeout_ms": "serve retries connecting within --broker-outage-budget",
    "key_serializer": "tidecast encodes its messages itself",
    "value_serializer": "tidecast encodes its messages itself",
    "key_deserializer": "tidecast decodes its messages itself",
    "value_deserializer": "tidecast decodes its messages itself",
}


def client_settings(settings: Mapping[str, Any], client: type, extra: Mapping[str, Any] | None = None,
                    **overrides: Any) -> dict[str, Any]:
    """kafka-python keyword arguments for ``client`` (KafkaConsumer/KafkaProducer/KafkaAdminClient).

    Starts from ``bootstrap_servers``, ``client_id`` and the security settings, adds the ``[kafka]`` table of
    the settings file (``extra``) and then ``overrides``; keys the client does not know are dropped, since
    one ``[kafka]`` table serves every client.
    """
    known = getattr(client, "DEFAULT_CONFIG", {})
    cfg: dict[str, Any] = {"bootstrap_servers": parse_servers(settings["bootstrap_servers"])}
    if settings.get("client_id"):
        cfg["client_id"] = settings["client_id"]
    cfg.update({k: settings[k] for k in SECURITY_SETTINGS if settings.get(k) is not None})
    cfg.update(extra or {})
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if k in known}


def warn_without_crc32c() -> None:
    """kafka-python checksums every record batch (produced and fetched) with CRC32C; without the optional
    ``crc32c`` C extension it does so in pure Python, which caps a client at a few MB/s."""
    try:
        import crc32c  # noqa: F401
    except ImportError:
        log.warning("the 'crc32c' package is not installed: kafka-python computes record checksums in pure Python "
                    "(measured here: 1.2 kB messages at ~3k/s instead of ~15-20k/s); pip install crc32c")


def parse_servers(value: str | list[str]) -> list[str]:
    if isinstance(value, list):
        return value
    return [s.strip() for s in value.split(",") if s.strip()]


def assignors(name: str) -> list[type]:
    """The partition assignment strategy classes for a strategy name."""
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

    table = {"range": RangePartitionAssignor, "roundrobin": RoundRobinPartitionAssignor,
             "sticky": StickyPartitionAssignor, "cooperative-sticky": CooperativeStickyAssignor}
    return [table[name]]


# -- reachability --------------------------------------------------------------------------------------
class BrokerUnavailable(RuntimeError):
    """The Kafka cluster stayed unreachable for longer than the outage budget (or while stopping)."""


def is_unavailable(err: BaseException) -> bool:
    """Unavailability (wait: the cluster may come back) as opposed to refusal (stop: retrying cannot help).

    kafka-python marks its transient errors ``retriable``: timeouts, lost connections, leader elections, a moving
    coordinator. Everything else a broker answers (a record too large, no authorisation, an invalid topic) is a
    refusal.

    >>> from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, TopicAuthorizationFailedError
    >>> is_unavailable(KafkaTimeoutError()), is_unavailable(MessageSizeTooLargeError())
    (True, False)
    >>> is_unavailable(TopicAuthorizationFailedError())
    False
    """
    return bool(getattr(err, "retriable", False)) or isinstance(err, (TimeoutError, ConnectionError))


class BrokerLink:
    """Reachability of the Kafka cluster, shared by serve's threads: ``tidecast_broker_up``, a log line when an
    outage starts and one when it ends, and the *outage budget*.

    Operations that can wait out an outage run through :meth:`call`, which retries them with backoff while the
    errors mean "unreachable" (:func:`is_unavailable`). The budget is per outage, not per operation: its clock starts
    at the first failure of any operation and stops at the first success of any, so an outage spent partly in a
    checkpoint and partly in a restore is one outage. When it outlasts ``budget_seconds``, or ``stopping`` is set,
    :class:`BrokerUnavailable` is raised.

    >>> link = BrokerLink(budget_seconds=0.0, sleep=lambda s: None)
    >>> link.call("probing", lambda timeout: 42)
    42
    >>> def unreachable(timeout):
    ...     raise TimeoutError("no answer")
    >>> link.call("probing", unreachable)
    Traceback (most recent call last):
    ...
    tidecast.stream.kafka.BrokerUnavailable: the Kafka cluster was unreachable for 0 s, longer than the outage \
budget of 0 s (--broker-outage-budget); last: probing: TimeoutError: no answer
    """

    def __init__(self, budget_seconds: float, up: Any = None, retries: Any = None,
                 stopping: threading.Event | None = None, sleep: Callable[[float], None] = time.sleep,
                 attempt_seconds: float = 5.0) -> None:
        self.budget = budget_seconds
        self.attempt_seconds = attempt_seconds  # how long one attempt may wait (a flush, a bootstrap)
        self._up = up  # gauge: tidecast_broker_up
        self._retries = retries  # counter: tidecast_broker_retries_total
        self._stopping = stopping or threading.Event()
        self._sleep = sleep
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._said_at = 0.0  # when the outage was last logged
        self._last_ok = time.monotonic()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def quiet_seconds(self) -> float:
        """Seconds since an operation last reached the cluster."""
        return time.monotonic() - self._last_ok

    def ok(self) -> None:
        """An operation reached the cluster."""
        now = time.monotonic()
        with self._lock:
            since, self._down_since, self._last_ok = self._down_since, None, now
        if self._up is not None:
            self._up.set(1)
        if since is not None:
            log.warning("the Kafka cluster is reachable again after %.0f s", now - since)

    def failed(self, what: str, err: BaseException, enforce: bool = True, since: float | None = None) -> float:
        """An operation (started at ``since``, monotonic) could not reach the cluster; returns the seconds left of
        the budget. Raises :class:`BrokerUnavailable` once the budget is spent or the service is stopping (if
        ``enforce``)."""
        now = time.monotonic()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = now if since is None else min(since, now)
            elapsed = now - self._down_since
            remind = not first and now - self._said_at >= 30.0
            if first or remind:
                self._said_at = now
        if self._up is not None:
            self._up.set(0)
        if self._retries is not None:
            self._retries.inc()
        if first:
            log.warning("the Kafka cluster is unreachable (%s: %s); retrying for up to %.0f s (--broker-outage-budget)",
                        what, _describe(err), self.budget)
        elif remind:
            log.warning("the Kafka cluster is still unreachable after %.0f s (%s: %s); giving up after %.0f s",
                        elapsed, what, _describe(err), self.budget)
        if enforce and (elapsed >= self.budget or self._stopping.is_set()):
            why = "while stopping" if self._stopping.is_set() and elapsed < self.budget else (
                f"for {elapsed:.0f} s, longer than the outage budget of {self.budget:.0f} s (--broker-outage-budget)")
            raise BrokerUnavailable(f"the Kafka cluster was unreachable {why}; last: {what}: {_describe(err)}")
        return self.budget - elapsed

    def call(self, what: str, attempt: Callable[[float], T], progress: Callable[[], None] | None = None) -> T:
        """``attempt(timeout_seconds)``, retried with backoff while the cluster is unreachable; errors that are
        refusals propagate at once. ``progress`` is called between attempts (a heartbeat: waiting is not hanging)."""
        backoff = 0.2
        left = self.budget
        while True:
            started = time.monotonic()
            try:
                result = attempt(max(0.5, min(self.attempt_seconds, left)))
            except Exception as err:
                if not is_unavailable(err):
                    raise
                left = self.failed(what, err, since=started)
                if progress is not None:
                    progress()
                self._sleep(max(0.0, min(backoff, left)))
                backoff = min(backoff * 2, 5.0)
                continue
            self.ok()
            return result


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text and type(err).__name__ not in text else (text or type(err).__name__)


def producer_settings(budget_seconds: float, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Producer timeouts for an outage budget: records wait in the producer for the whole budget (kafka-python
    retries them until ``delivery_timeout_ms``), and ``send`` blocks at most a few seconds on a full buffer or
    missing metadata, so that the caller can keep its heartbeat and retry through :class:`BrokerLink`."""
    request_timeout_ms = int((extra or {}).get("request_timeout_ms", 30_000))
    return {"delivery_timeout_ms": max(int(budget_seconds * 1000), request_timeout_ms + SERVE_LINGER_MS + 1_000),
            "max_block_ms": 5_000}


# -- topics --------------------------------------------------------------------------------------------
def partition_count(consumer: Any, topic: str, timeout_seconds: float = 30.0) -> int:
    """Number of partitions of ``topic`` from cluster metadata (waits for the topic to appear)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return len(parts)
        if time.monotonic() > deadline:
            raise ValueError(f"topic {topic!r} does not exist (or has no partitions)")
        time.sleep(0.2)


def ensure_topics(admin: Any, wanted: Mapping[str, tuple[int, dict[str, str]]], replication_factor: int) -> list[str]:
    """Create the topics in ``wanted`` (name -> (partitions, configs)) that do not exist; returns the created."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    existing = set(admin.list_topics())
    new = [NewTopic(name, parts, replication_factor, topic_configs=dict(configs))
           for name, (parts, configs) in wanted.items() if name not in existing]
    if not new:
        return []
    with contextlib.suppress(TopicAlreadyExistsError):  # another member of the group created them first
        admin.create_topics(new)
    return [t.name for t in new]


# -- forecast messages -----------------------------------------------------------------------------------
def iso_utc(ns: np.ndarray) -> list[str]:
    """ISO-8601 UTC strings (``...Z``) for epoch nanoseconds: whole seconds when a value is one, else microseconds
    (decided per value, so a message reads the same whatever batch it was encoded in). Each distinct instant is
    formatted once: the forecasts of one round share their targets.

    >>> iso_utc(np.array([0, 1_500_000_000, 0]))
    ['1970-01-01T00:00:00Z', '1970-01-01T00:00:01.500000Z', '1970-01-01T00:00:00Z']
    """
    if not len(ns):
        return []
    unique, inverse = np.unique(ns, return_inverse=True)
    stamps = unique.astype("datetime64[ns]")
    whole = (unique % 1_000_000_000) == 0
    text = np.empty(len(unique), dtype=object)
    if whole.any():
        text[whole] = [s + "Z" for s in np.datetime_as_string(stamps[whole], unit="s").tolist()]
    if not whole.all():
        text[~whole] = [s + "Z" for s in np.datetime_as_string(stamps[~whole], unit="us").tolist()]
    return text[inverse.reshape(-1)].tolist()


def _orjson() -> Any:
    import orjson

    return orjson


def forecast_messages(batch: ForecastBatch) -> Iterable[tuple[str, bytes]]:
    """``(series_id, value)`` per (series, model, origin); rows of one forecast are contiguous in ``batch``."""
    for series_id, _issued, payload in forecast_payloads(batch):
        if isinstance(payload, Exception):
            raise payload
        yield series_id, payload


def forecast_payloads(batch: ForecastBatch) -> Iterable[tuple[str, int, bytes | ValueError]]:
    """``(series_id, issued_at_ns, value)`` like :func:`forecast_messages`, but a forecast that JSON cannot hold (a
    non-finite mean) comes as its error instead of ending the batch, so the caller can set it aside and send the
    others.

    Encoded with orjson (its float and array writers are ~40x faster than the standard library's, which took a
    third of a member's time in the default format); an unbounded or missing bound is ``null``, as before."""
    n = len(batch)
    if not n:
        return
    orjson = _orjson()
    opts = orjson.OPT_SERIALIZE_NUMPY
    sid, issued, model = batch.series_id, batch.issued_at_ns, batch.model
    starts = forecast_starts(batch)
    ends = np.append(starts[1:], n)
    issued_iso = iso_utc(issued[starts])
    issued_ns = issued[starts].tolist()
    targets = iso_utc(batch.target_ns)
    h = np.ascontiguousarray(batch.h, dtype=np.int64)
    mean = np.ascontiguousarray(batch.mean, dtype=np.float64)
    lower = np.ascontiguousarray(batch.lower, dtype=np.float64)
    upper = np.ascontiguousarray(batch.upper, dtype=np.float64)
    finite = np.isfinite(mean)
    bad = np.flatnonzero(~finite) if not finite.all() else np.zeros(0, np.int64)
    bad_message = set(np.searchsorted(starts, bad, side="right") - 1) if len(bad) else set()
    alpha = float(batch.alpha)
    lowers, uppers = batch.bounds()
    levels = [(name, np.ascontiguousarray(lowers[:, j], dtype=np.float64),
               np.ascontiguousarray(uppers[:, j], dtype=np.float64)) for j, name in enumerate(batch.level_names)]
    has_interval = ~np.isnan(lower) & ~np.isnan(upper)  # NaN: none yet; +-inf: unbounded
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        series_id = str(sid[s])
        if i in bad_message:  # orjson would write null: a forecast without a mean is no forecast
            value = mean[s:e][~np.isfinite(mean[s:e])][0]
            yield series_id, issued_ns[i], ValueError(f"Out of range float values are not JSON compliant: {value!r}")
            continue
        try:
            payload: bytes | ValueError = orjson.dumps({
                "series_id": series_id, "model": str(model[s]), "issued_at": issued_iso[i], "alpha": alpha,
                "h": h[s:e], "target_timestamp": targets[s:e], "mean": mean[s:e], "lower": lower[s:e],
                "upper": upper[s:e],
                "intervals": {name: {"lower": lo[s:e], "upper": hi[s:e]} for name, lo, hi in levels},
                "has_interval": has_interval[s:e], "schema_version": FORECAST_SCHEMA_VERSION,
            }, option=opts)
        except orjson.JSONEncodeError as err:  # a series id UTF-8 cannot hold (a lone surrogate)
            payload = ValueError(f"{err}")
        yield series_id, issued_ns[i], payload


# -- compact forecast messages -------------------------------------------------------------------------------
#: ``--output-format`` values: one JSON message per forecast, or one Arrow message per partition and batch.
OUTPUT_FORMATS = ("json", "compact")
COMPACT_SCHEMA = "tidecast.forecasts.compact/1"
#: Arrow IPC body compression of compact messages ("none": uncompressed). lz4 is the default: a third fewer bytes
#: for ~1 us of CPU an observation, which the producer and the broker more than save (README, serve at scale).
COMPACT_COMPRESSIONS = ("lz4", "zstd", "none")
_ARROW_STREAM = b"\xff\xff\xff\xff"  # an Arrow IPC stream starts with a continuation marker
#: Largest compact message a sink sends (bytes) unless told otherwise: a batch is cut into several messages below
#: Kafka's default 1 MB topic limit (``max.message.bytes`` 1,048,588 with the record's overhead). One message per
#: partition and batch reached 2 MB at 2,000 series, H = 48 and two levels: the broker refused it, and serve
#: exited at every restart on the same batch.
COMPACT_MESSAGE_BYTES = 900_000


def compact_message_limit(max_request_size: int | None) -> int:
    """The largest compact message a sink sends under the producer's ``max_request_size``: at most
    :data:`COMPACT_MESSAGE_BYTES`, and a kilobyte below a smaller request limit (the record's framing counts)."""
    if max_request_size is None:
        return COMPACT_MESSAGE_BYTES
    return max(1, min(COMPACT_MESSAGE_BYTES, int(max_request_size) - 1024))


def _check_compression(compression: str) -> None:
    if compression not in COMPACT_COMPRESSIONS:
        raise ValueError(f"compact compression {compression!r}: one of {', '.join(COMPACT_COMPRESSIONS)}")


def forecast_starts(batch: ForecastBatch) -> np.ndarray:
    """Index of the first step of each forecast (the rows of one (series, model, origin) are contiguous): the
    batch's own ``starts`` when its maker gave them."""
    if batch.starts is not None:
        return batch.starts
    n = len(batch)
    sid, issued, model = batch.series_id, batch.issued_at_ns, batch.model
    change = np.ones(n, dtype=bool)
    change[1:] = (sid[1:] != sid[:-1]) | (issued[1:] != issued[:-1]) | (model[1:] != model[:-1])
    return np.flatnonzero(change)


def encode_compact(batch: ForecastBatch, compression: str = "lz4") -> bytes:
    """Forecast steps (rows of one forecast contiguous, as the engine emits them) as one compact message: an Arrow
    IPC stream holding one record batch, one row per (series, model, origin), the steps as list columns.

    Columns: ``series_id`` (string), ``model`` (string), ``issued_at`` (timestamp[ns, UTC]), ``h`` (list<int32>),
    ``target_timestamp`` (list<timestamp[ns, UTC]>), ``mean``, ``lower``, ``upper`` (list<float64>). Steps that are
    not ready are left out, as in the JSON format; a bound is ``NaN`` where the step has no interval yet and
    ``+-inf`` where it is unbounded. Schema metadata: ``tidecast.schema`` (:data:`COMPACT_SCHEMA`) and ``alpha``.
    ``compression`` (one of :data:`COMPACT_COMPRESSIONS`) is Arrow's IPC body compression, which any Arrow IPC
    reader undoes by itself. :func:`read_forecasts` reads it back.
    """
    import pyarrow as pa

    n = len(batch)
    sid, issued, model = batch.series_id, batch.issued_at_ns, batch.model
    starts = forecast_starts(batch)
    offsets = pa.array(np.append(starts, n).astype(np.int32))
    utc = pa.timestamp("ns", tz="UTC")

    def steps(values: np.ndarray, kind: Any) -> Any:
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values), type=kind))

    columns = [
        pa.array(sid[starts].tolist(), type=pa.string()), pa.array(model[starts].tolist(), type=pa.string()),
        pa.array(issued[starts], type=utc), steps(batch.h.astype(np.int32), pa.int32()),
        steps(batch.target_ns, utc), steps(batch.mean, pa.float64()), steps(batch.lower, pa.float64()),
        steps(batch.upper, pa.float64()),
    ]
    names = ["series_id", "model", "issued_at", "h", "target_timestamp", "mean", "lower", "upper"]
    metadata = {"tidecast.schema": COMPACT_SCHEMA, "alpha": repr(float(batch.alpha))}
    if len(batch.level_names) > 1:  # every level's bounds too, as lower/<level> and upper/<level>
        lowers, uppers = batch.bounds()
        for j, level in enumerate(batch.level_names):
            columns += [steps(lowers[:, j], pa.float64()), steps(uppers[:, j], pa.float64())]
            names += [f"lower/{level}", f"upper/{level}"]
        metadata["levels"] = ",".join(batch.level_names)
    table = pa.RecordBatch.from_arrays(columns, names=names).replace_schema_metadata(metadata)
    _check_compression(compression)
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_batch(table)
    return sink.getvalue().to_pybytes()


def is_compact(value: bytes | None) -> bool:
    """Whether a forecast-topic value is a compact (Arrow) message rather than a JSON one."""
    return value is not None and bytes(value[:4]) == _ARROW_STREAM


def read_compact(value: bytes) -> Any:
    """A compact message as a ``pyarrow.Table`` (one row per forecast; see :func:`encode_compact`)."""
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.BufferReader(value)).read_all()
    schema = (table.schema.metadata or {}).get(b"tidecast.schema", b"").decode()
    if schema != COMPACT_SCHEMA:
        raise ValueError(f"not a {COMPACT_SCHEMA} message (schema {schema!r})")
    return table


def read_forecasts(values: Iterable[bytes | None]) -> ForecastBatch:
    """Forecast-topic values of either format (JSON or compact) as one :class:`ForecastBatch`, one row per step.

    Consumers need not parse either format by hand; re-sent forecasts (after a crash) appear again: de-duplicate
    on ``(series_id, model, issued_at_ns, h)``.

    >>> hour = 3_600_000_000_000
    >>> batch = ForecastBatch(np.array(["a", "a"], object), np.array([0, 0]), np.array(["m", "m"], object),
    ...                       np.array([1, 2]), np.array([hour, 2 * hour]), np.array([1.0, 2.0]),
    ...                       np.array([0.5, np.nan]), np.array([1.5, np.nan]), 0.1)
    >>> back = read_forecasts([encode_compact(batch), *(v for _, v in forecast_messages(batch))])
    >>> back.series_id.tolist(), back.h.tolist(), back.mean.tolist(), back.lower.tolist()[1]
    (['a', 'a', 'a', 'a'], [1, 2, 1, 2], [1.0, 2.0, 1.0, 2.0], nan)
    """
    parts, alpha = [], float("nan")
    for value in values:
        if value is None:
            continue
        if is_compact(value):
            table = read_compact(value)
            alpha = float(table.schema.metadata[b"alpha"])
            counts = table.column("h").combine_chunks().value_lengths().to_numpy()
            flat = {name: table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                    for name in ("h", "target_timestamp", "mean", "lower", "upper")}
            parts.append(ForecastBatch(
                np.repeat(np.array(table.column("series_id").to_pylist(), object), counts),
                np.repeat(table.column("issued_at").to_numpy().astype("datetime64[ns]").astype(np.int64), counts),
                np.repeat(np.array(table.column("model").to_pylist(), object), counts), flat["h"].astype(np.int32),
                flat["target_timestamp"].astype("datetime64[ns]").astype(np.int64), flat["mean"], flat["lower"],
                flat["upper"], alpha, **_compact_levels(table)))
        else:
            parts.append(_json_forecast(value))
            alpha = parts[-1].alpha
    return ForecastBatch.concat(parts, alpha, next((p.levels for p in parts if p.levels), ()))


def _compact_levels(table: Any) -> dict[str, Any]:
    """``levels``/``lowers``/``uppers`` of a compact message that carries several levels (else nothing)."""
    names = (table.schema.metadata or {}).get(b"levels", b"").decode()
    if not names:
        return {}
    levels = tuple(names.split(","))

    def flat(name: str) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)

    return {"levels": levels, "lowers": np.stack([flat(f"lower/{v}") for v in levels], axis=1),
            "uppers": np.stack([flat(f"upper/{v}") for v in levels], axis=1)}


def _json_forecast(value: bytes) -> ForecastBatch:
    msg = _orjson().loads(value)
    k = len(msg["h"])
    ns = np.array([_parse_iso_ns(t) for t in msg["target_timestamp"]], np.int64)
    has = np.array(msg.get("has_interval", [True] * k), bool)  # null is unbounded where an interval was issued

    def bound(values: list[float | None], unbounded: float) -> np.ndarray:
        out = np.array([unbounded if v is None else v for v in values], float)
        out[~has] = np.nan
        return out

    intervals = msg.get("intervals") or {}
    many: dict[str, Any] = {}
    if len(intervals) > 1:
        many = {"levels": tuple(intervals),
                "lowers": np.stack([bound(v["lower"], -np.inf) for v in intervals.values()], axis=1),
                "uppers": np.stack([bound(v["upper"], np.inf) for v in intervals.values()], axis=1)}
    return ForecastBatch(np.array([msg["series_id"]] * k, object), np.full(k, _parse_iso_ns(msg["issued_at"])),
                         np.array([msg["model"]] * k, object), np.array(msg["h"], np.int32), ns,
                         np.array(msg["mean"], float), bound(msg["lower"], -np.inf), bound(msg["upper"], np.inf),
                         float(msg["alpha"]), **many)


def _parse_iso_ns(text: str) -> int:
    return int(np.datetime64(text.rstrip("Z"), "ns").astype(np.int64))


# -- dead letters ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeadLetterMessage:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


#: Longest key a dead letter keeps (a valid key is a series id of at most 256 bytes): a megabyte key would make
#: the dead letter itself too large for the topic, and a refused dead letter stops the member on every restart.
MAX_DEAD_LETTER_KEY_BYTES = 1024


def dead_letter_message(record: Any, reason: str, detail: str, max_bytes: int) -> DeadLetterMessage:
    """The raw record, unchanged (value cut to ``max_bytes`` if larger; key to
    :data:`MAX_DEAD_LETTER_KEY_BYTES`), with reason and source in headers."""
    value, key = record.value, record.key
    headers = [("tidecast.reason", reason.encode()),
               ("tidecast.detail", detail[:1000].encode("utf-8", "backslashreplace")),
               ("tidecast.source.topic", str(record.topic).encode()),
               ("tidecast.source.partition", str(record.partition).encode()),
               ("tidecast.source.offset", str(record.offset).encode()),
               ("tidecast.source.timestamp", _source_timestamp(record.timestamp).encode())]
    if value is not None and max_bytes > 0 and len(value) > max_bytes:
        headers.append(("tidecast.raw.size", str(len(value)).encode()))
        value = bytes(value[:max_bytes])
    if key is not None and len(key) > MAX_DEAD_LETTER_KEY_BYTES:
        headers.append(("tidecast.key.size", str(len(key)).encode()))
        key = bytes(key[:MAX_DEAD_LETTER_KEY_BYTES])
    return DeadLetterMessage(key, value, headers)


def _source_timestamp(stamp: int | None) -> str:
    """A record's timestamp in ms as the header writes it: ``-1`` where it has none (kafka-python's -1; the fetch
    process hands on ``None``), so the header reads the same with and without ``--fetch-process``."""
    return "-1" if stamp is None or stamp < 0 else str(stamp)


def header_dict(headers: Iterable[tuple[str, bytes]] | None) -> dict[str, str]:
    """Headers as ``{name: text}`` (for readers of the dead-letter topic)."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in headers or ()}


# -- output sinks ------------------------------------------------------------------------------------------
class OutputError(RuntimeError):
    """The broker refused forecasts or dead letters; offsets are not committed past them."""


class UnsendableForecasts(ValueError):
    """Forecasts of some series could not be encoded (a key UTF-8 cannot hold, a value JSON cannot); the others
    of the batch were sent. ``series`` maps each such series id to its error, ``origins`` to the ``issued_at``
    (epoch ns: the timestamp of the observation that issued it) of each forecast not sent."""

    def __init__(self, series: dict[str, BaseException], origins: dict[str, set[int]] | None = None) -> None:
        first_sid, first = next(iter(series.items()))
        super().__init__(f"forecasts of {len(series)} series could not be encoded, first {first_sid!r}: {first}")
        self.series = series
        self.origins = origins or {}


class _TopicSink:
    """Sends to one topic through a shared, thread-safe producer and remembers the first failed delivery.

    With a :class:`BrokerLink`, an unreachable cluster is waited out (``send`` retried, ``flush`` repeated) within
    the outage budget; a delivery the producer gave up on for unavailability means the outage outlasted its
    delivery timeout (which :func:`producer_settings` sets to the budget): :class:`BrokerUnavailable`. A refusal
    (message too large, no authorisation) is :class:`OutputError` either way.
    """

    def __init__(self, producer: Any, topic: str, errors: Any, flush_timeout: float,
                 link: BrokerLink | None = None, progress: Callable[[], None] | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self._errors = errors  # a counter with inc(): tidecast_output_errors_total
        self.flush_timeout = flush_timeout
        self.link = link
        self.progress = progress  # the calling thread's heartbeat, ticked while waiting for the cluster
        self._failure: BaseException | None = None

    def _send(self, key: bytes | None, value: bytes | None, partition: int | None,
              headers: list[tuple[str, bytes]] | None = None) -> None:
        def send(_timeout: float = 0.0) -> Any:
            return self.producer.send(self.topic, key=key, value=value, headers=headers, partition=partition)

        try:
            future = send()
        except Exception as err:
            if self.link is None or not is_unavailable(err):
                self._errors.inc()  # as a refusal the errback reports: the output-errors alert must see it
                raise OutputError(f"the producer refused a message to {self.topic}: {err!r}") from err
            future = self.link.call(f"sending to {self.topic}", send, self.progress)
        future.add_errback(self._refused)

    def _refused(self, err: BaseException) -> None:  # runs on the producer's IO thread
        self._errors.inc()
        self._failure = self._failure or err

    def flush(self) -> None:
        """Wait until everything sent is acknowledged; :class:`OutputError` if the broker refused anything,
        :class:`BrokerUnavailable` if the cluster stayed out of reach for the outage budget."""
        if self.link is None:
            self.producer.flush(timeout=self.flush_timeout)
        else:
            self.link.call(f"flushing {self.topic}", lambda timeout: self.producer.flush(timeout=timeout),
                           self.progress)
        failure = self._failure
        if failure is not None and self.link is not None and is_unavailable(failure):
            raise BrokerUnavailable(f"messages to {self.topic} were not delivered within the outage budget "
                                    f"({self.link.budget:.0f} s): {failure!r}")
        if failure is not None:
            raise OutputError(f"the broker refused messages to {self.topic}: {failure!r}")

    def close(self) -> None:
        """The producer is shared: whoever created it closes it."""


class KafkaForecastSink(_TopicSink):
    """Forecasts as one message per (series, model, origin), keyed by series id.

    ``partition_of`` (series id -> input partition) pins each message to its series' input partition, for an
    output topic co-partitioned with the input; without it the producer's partitioner decides. A forecast that
    cannot be encoded does not stop the others: :meth:`write` sends the rest, then raises
    :class:`UnsendableForecasts` naming the series set aside. ``output_format="compact"`` sends one Arrow message
    per destination partition and batch instead (:func:`encode_compact`, with ``compression``), cut into several
    when it would exceed ``message_bytes`` (:func:`compact_messages`).
    """

    def __init__(self, producer: Any, topic: str, errors: Any, flush_timeout: float,
                 partition_of: Callable[[str], int | None] | None = None, link: BrokerLink | None = None,
                 progress: Callable[[], None] | None = None, output_format: str = "json",
                 compression: str = "lz4", message_bytes: int = COMPACT_MESSAGE_BYTES) -> None:
        super().__init__(producer, topic, errors, flush_timeout, link, progress)
        self.partition_of = partition_of
        self.message_bytes = message_bytes
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {output_format!r}: one of {', '.join(OUTPUT_FORMATS)}")
        _check_compression(compression)  # at start-up, not at the first compact batch
        self.output_format = output_format
        self.compression = compression

    def write(self, batch: ForecastBatch) -> None:
        if self.output_format == "compact":
            self._write_compact(batch)
            return
        unsendable: dict[str, BaseException] = {}
        origins: dict[str, set[int]] = {}
        for sid, issued_ns, payload in forecast_payloads(batch):
            try:
                if isinstance(payload, Exception):
                    raise payload
                key = sid.encode()  # a lone surrogate: no valid UTF-8 key exists
            except (ValueError, UnicodeEncodeError) as err:
                unsendable.setdefault(sid, err)
                origins.setdefault(sid, set()).add(issued_ns)
                continue
            partition = self.partition_of(sid) if self.partition_of is not None else None
            self._send(key, payload, partition)
        if unsendable:
            raise UnsendableForecasts(unsendable, origins)

    def _write_compact(self, batch: ForecastBatch) -> None:
        """One compact message per destination partition (the series' input partition when co-partitioned) for
        the whole batch; forecasts that cannot be encoded are set aside as in the JSON format. Works per forecast
        (not per step) and with dictionaries, never sorting the object column of series ids."""
        n = len(batch)
        if not n:
            return
        starts = forecast_starts(batch)
        counts = np.diff(np.append(starts, n))
        sids = batch.series_id[starts].tolist()
        unsendable, origins, bad = set_aside_unsendable(batch, starts, sids)
        dest = destinations(self.partition_of, sids)
        dest[bad] = -2
        for partition in np.unique(dest[~bad]).tolist():
            part = batch if len(np.unique(dest)) == 1 else take_forecasts(batch, dest == partition, counts)
            for value in compact_messages(part, self.compression, self.message_bytes):
                self._send(None, value, None if partition < 0 else partition)
        if unsendable:
            raise UnsendableForecasts(unsendable, origins)


def compact_messages(batch: ForecastBatch, compression: str, limit: int) -> Iterator[bytes]:
    """``batch`` as compact messages (:func:`encode_compact`) of at most ``limit`` bytes each, in order: cut between
    forecasts, never inside one, so a single forecast larger than ``limit`` still goes alone. Each message is a
    whole Arrow stream that :func:`read_forecasts` reads by itself."""
    value = encode_compact(batch, compression)
    starts = forecast_starts(batch)
    if len(value) <= limit or len(starts) == 1:
        yield value
        return
    counts = np.diff(np.append(starts, len(batch)))
    pieces = min(len(starts), -(-len(value) // limit) + 1)  # one more than the bytes ask: forecasts differ in size
    edges = np.linspace(0, len(starts), pieces + 1).astype(np.int64)
    order = np.arange(len(starts))
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        if hi > lo:  # a piece still too large is cut again
            yield from compact_messages(take_forecasts(batch, (order >= lo) & (order < hi), counts), compression,
                                        limit)


def set_aside_unsendable(batch: ForecastBatch, starts: np.ndarray, sids: list[str],
                         ) -> tuple[dict[str, BaseException], dict[str, set[int]], np.ndarray]:
    """The forecasts no message can hold, found per forecast without encoding any: a series id UTF-8 cannot hold
    (a lone surrogate) or a non-finite mean. Returns ``(unsendable, origins, bad)`` for
    :class:`UnsendableForecasts`; ``bad`` marks every forecast of such a series (``starts``/``sids``: each
    forecast's first row and series)."""
    finite = np.isfinite(batch.mean)
    ok = np.minimum.reduceat(finite, starts) if not finite.all() else np.ones(len(starts), bool)
    unsendable: dict[str, BaseException] = {}
    for sid in set(sids):
        try:
            sid.encode()
        except UnicodeEncodeError as err:
            unsendable[sid] = err
    for i in np.flatnonzero(~ok).tolist():
        unsendable.setdefault(sids[i], ValueError("Out of range float values are not JSON compliant: a "
                                                  "non-finite mean"))
    origins: dict[str, set[int]] = {}
    if not unsendable:
        return unsendable, origins, np.zeros(len(starts), bool)
    issued = batch.issued_at_ns[starts].tolist()
    bad = np.array([sid in unsendable for sid in sids])
    for i in np.flatnonzero(bad).tolist():
        origins.setdefault(sids[i], set()).add(issued[i])
    return unsendable, origins, bad


def destinations(partition_of: Callable[[str], int | None] | None, sids: list[str]) -> np.ndarray:
    """Each forecast's destination partition under ``partition_of`` (one call per series), ``-1`` where the
    producer's partitioner decides (no ``partition_of``, or it gave ``None``)."""
    if partition_of is None:
        return np.full(len(sids), -1)
    home: dict[str, int] = {}
    for sid in sids:
        if sid not in home:
            p = partition_of(sid)
            home[sid] = -1 if p is None else int(p)
    return np.array([home[sid] for sid in sids], np.int64)


def take_forecasts(batch: ForecastBatch, chosen: np.ndarray, counts: np.ndarray) -> ForecastBatch:
    """The forecasts ``chosen`` (a mask over them; ``counts``: each forecast's steps) of ``batch``, every level's
    bounds with them; the result knows its forecasts' first steps."""
    index = np.flatnonzero(np.repeat(chosen, counts))
    many = {}
    if batch.lowers is not None and batch.uppers is not None:
        many = {"levels": batch.levels, "lowers": batch.lowers[index], "uppers": batch.uppers[index]}
    return ForecastBatch(batch.series_id[index], batch.issued_at_ns[index], batch.model[index], batch.h[index],
                         batch.target_ns[index], batch.mean[index], batch.lower[index], batch.upper[index],
                         batch.alpha, **many, starts=first_steps(counts[chosen]))


class KafkaEventSink(_TopicSink):
    """Drift events as one message each, keyed by series id; ``partition_of`` as for :class:`KafkaForecastSink`."""

    def __init__(self, producer: Any, topic: str, errors: Any, flush_timeout: float,
                 partition_of: Callable[[str], int | None] | None = None, link: BrokerLink | None = None,
                 progress: Callable[[], None] | None = None) -> None:
        super().__init__(producer, topic, errors, flush_timeout, link, progress)
        self.partition_of = partition_of

    def write(self, events: Iterable[DriftEvent]) -> None:
        for event in events:
            partition = self.partition_of(event.series_id) if self.partition_of is not None else None
            self._send(event.series_id.encode(), event_json(event).encode(), partition)


class KafkaDeadLetterSink(_TopicSink):
    """Rejected input records, unchanged, with the reason and source in headers (:func:`dead_letter_message`).

    A letter's ``raw`` is the input record. ``co_partitioned`` keeps a letter on its record's partition number.
    """

    def __init__(self, producer: Any, topic: str, errors: Any, flush_timeout: float, max_bytes: int,
                 co_partitioned: bool = False, link: BrokerLink | None = None,
                 progress: Callable[[], None] | None = None) -> None:
        super().__init__(producer, topic, errors, flush_timeout, link, progress)
        self.max_bytes = max_bytes
        self.co_partitioned = co_partitioned

    def write(self, letter: DeadLetter) -> None:
        msg = dead_letter_message(letter.raw, letter.reason, letter.detail, self.max_bytes)
        self._send(msg.key, msg.value, letter.position[0] if self.co_partitioned else None, msg.headers)


# -- lag -------------------------------------------------------------------------------------------------------
class HighwaterProbe(threading.Thread):
    """Keeps the partition ends of *paused* partitions fresh.

    A paused partition is not fetched, so the group consumer's ``highwater()`` freezes exactly when lag matters
    most. This thread owns a second, group-less consumer that fetches from the paused partitions' positions
    once per ``interval`` and reads the highwater off the fetch response (the records are discarded). It only
    runs while something is paused.
    """

    def __init__(self, topic: str, consumer_factory: Any, interval_seconds: float = 1.0) -> None:
        super().__init__(name="tidecast-lag-probe", daemon=True)
        self.topic = topic
        self._factory = consumer_factory
        self.interval = interval_seconds
        self._lock = threading.Lock()
        self._wanted: dict[int, int] = {}  # partition -> position to fetch from
        self._highwater: dict[int, int] = {}
        self._stop = threading.Event()
        self._consumer: Any = None

    def want(self, positions: Mapping[int, int]) -> None:
        """Probe these partitions (partition -> current position) from now on; empty stops probing."""
        with self._lock:
            self._wanted = dict(positions)
            self._highwater = {p: hw for p, hw in self._highwater.items() if p in positions}

    def highwater(self, partition: int) -> int | None:
        with self._lock:
            return self._highwater.get(partition)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        failing = False
        try:
            while not self._stop.wait(self.interval):
                with self._lock:
                    wanted = dict(self._wanted)
                if not wanted:
                    continue
                try:
                    self._probe(wanted)
                    failing = False
                except Exception as err:  # never take the service down for a gauge; try again next round
                    if not failing:
                        log.warning("lag probe failed (%s); retrying every %.1f s", _describe(err), self.interval)
                    failing = True
        finally:
            if self._consumer is not None:
                self._consumer.close()

    def _probe(self, wanted: dict[int, int]) -> None:
        from kafka import TopicPartition

        if self._consumer is None:
            self._consumer = self._factory()
        tps = {p: TopicPartition(self.topic, p) for p in wanted}
        self._consumer.assign([])  # forget the previous round's highwaters
        self._consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            self._consumer.seek(tp, wanted[p])
        deadline = time.monotonic() + max(self.interval, 1.0)
        fresh: dict[int, int] = {}
        while len(fresh) < len(tps) and time.monotonic() < deadline and not self._stop.is_set():
            # Only the highwater of the response is wanted: take one record, so kafka-python does not parse the
            # rest in Python (probing a paused, lagging partition took a tenth of a member's time that way).
            self._consumer.poll(timeout_ms=100, max_records=1)
            for p, tp in tps.items():
                hw = self._consumer.highwater(tp)
                if hw is not None and p not in fresh:
                    fresh[p] = hw
                    # Done with it: paused, its buffered records are dropped instead of handed out one a poll,
                    # and the next poll waits for the others (a probe took ~3,000 one-record polls, all Python,
                    # while any partition was still missing).
                    self._consumer.pause(tp)
        with self._lock:
            for p, hw in fresh.items():
                if p in self._wanted:
                    self._highwater[p] = max(hw, self._highwater.get(p, hw))
