"""``tidecast produce``: replay a history file into Kafka, as the live producers would have sent it.

The file is read by :mod:`tidecast.stream.sources` (the formats and rules of ``tidecast replay``), ordered by event
time,
and sent one observation per message: key ``series_id``, value :func:`tidecast.stream.records.encode` (event time in the
message). Rows the file cannot yield (bad time, bad value) are counted and skipped, as ``replay`` dead-letters
them. Pacing: as fast as possible, ``--rate`` messages per second, or ``--speed`` times event time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidecast.stream.kafka import client_settings, ensure_topics, warn_without_crc32c
from tidecast.stream.records import Observation, encode, from_ns
from tidecast.stream.settings import Option
from tidecast.stream.sources import ReplaySpec, load_replay

log = logging.getLogger(__name__)


@dataclass
class ProduceOptions:
    """What ``tidecast produce`` sends, where, and how fast."""

    spec: ReplaySpec
    topic: str
    kafka: dict[str, Any]  # bootstrap_servers, client_id, security settings
    kafka_extra: dict[str, Any] = field(default_factory=dict)
    rate: float | None = None  # messages per second
    speed: float | None = None  # event-time speed-up
    rows: int | None = None  # only the first N rows of the file
    partitions: int | None = None  # create the topic with this many partitions if it does not exist
    replication_factor: int = 1

    def __post_init__(self) -> None:
        if self.rate is not None and self.speed is not None:
            raise ValueError("give --rate or --speed, not both")
        for name in ("rate", "speed"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")


def run_produce(options: ProduceOptions) -> dict[str, Any]:
    """Send the file's observations; returns counts and the measured rate."""
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient

    warn_without_crc32c()
    replay = load_replay(options.spec)
    obs = replay.observations
    if options.rows is not None:
        obs = obs.take(np.flatnonzero(obs.offsets < options.rows))
    if options.partitions:
        admin = KafkaAdminClient(**client_settings(options.kafka, KafkaAdminClient, options.kafka_extra))
        try:
            ensure_topics(admin, {options.topic: (options.partitions, {})}, options.replication_factor)
        finally:
            admin.close()
    producer = KafkaProducer(**client_settings(options.kafka, KafkaProducer, options.kafka_extra,
                                               linger_ms=20, batch_size=256 * 1024, acks="all"))
    failures: list[BaseException] = []
    started = time.perf_counter()
    first_ns = int(obs.timestamps_ns[0]) if len(obs) else 0
    try:
        for i, (sid, t_ns, value) in enumerate(zip(obs.series_ids.tolist(), obs.timestamps_ns.tolist(),
                                                   obs.values.tolist(), strict=True)):
            payload = encode(Observation(sid, from_ns(t_ns), value))
            producer.send(options.topic, key=sid.encode(), value=payload).add_errback(failures.append)
            _pace(options, started, i + 1, t_ns - first_ns)
        producer.flush()
    finally:
        producer.close()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} messages were not acknowledged, first: {failures[0]!r}")
    return {"sent": len(obs), "skipped_rows": len(replay.dead_letters), "elapsed_seconds": elapsed,
            "messages_per_second": len(obs) / elapsed if elapsed > 0 else None, "topic": options.topic}


def _pace(options: ProduceOptions, started: float, sent: int, event_ns: int) -> None:
    if options.rate is not None:
        ahead = sent / options.rate - (time.perf_counter() - started)
    elif options.speed is not None:
        ahead = event_ns / 1e9 / options.speed - (time.perf_counter() - started)
    else:
        return
    if ahead > 0.001:
        time.sleep(ahead)


PRODUCE_OPTIONS: tuple[Option, ...] = (
    Option("bootstrap_servers", str, None, "Kafka bootstrap servers, comma-separated (required)", "kafka"),
    Option("topic", str, None, "topic to send observations to (required)", "kafka"),
    Option("client_id", str, "tidecast-produce", "Kafka client id", "kafka"),
    Option("partitions", int, None, "create the topic with this many partitions if it does not exist", "kafka"),
    Option("replication_factor", int, 1, "replication factor when creating the topic", "kafka"),
)
