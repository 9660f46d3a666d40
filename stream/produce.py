"""``tidecast produce``: replay a history file into Kafka, as the live producers would have sent it.

The file is read by :mod:`tidecast.stream.sources` (the formats and rules of ``tidecast replay``), ordered by event
time, and sent one observation per message: key ``series_id``, value :func:`tidecast.stream.records.encode` (event
time in the message). Rows the file cannot yield (bad time, bad value) are counted and skipped, as ``replay``
dead-letters them. Pacing: as fast as possible, ``--rate`` messages per second, or ``--speed`` times event time.
Each message goes to its key's partition under ``--partitioner`` (:mod:`tidecast.stream.partitioner`; murmur2 by
default, as kafka-python and the Java client), so a history pushed here lands where the live producers put the same
series, and where ``serve`` expects it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import INPUT, KAFKA, KafkaClientSettings, check_kafka_table
from tidecast.stream.kafka import client_settings, ensure_topics, warn_without_crc32c
from tidecast.stream.partitioner import DEFAULT_PARTITIONER, PARTITIONERS, HomePartitions
from tidecast.stream.records import Observation, encode, from_ns
from tidecast.stream.settings import SettingsError, at_least, check_declared, positive, setting
from tidecast.stream.sources import DeadLetter, Replay, ReplaySpec, load_replay

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProduceOptions(KafkaClientSettings):
    """What ``tidecast produce`` sends, where, and how fast (the file comes in ``spec``)."""

    topic: str | None = setting(None, "topic to send observations to (required)", group=KAFKA, required=True)
    client_id: str = setting("tidecast-produce", "Kafka client id", group=KAFKA)
    partitions: int | None = setting(None, "create the topic with this many partitions if it does not exist",
                                     group=KAFKA, check=at_least(1))
    replication_factor: int = setting(1, "replication factor when creating the topic", group=KAFKA,
                                      check=at_least(1))
    partitioner: str = setting(DEFAULT_PARTITIONER, "the partition of each series id key: murmur2 (Java, "
                               "kafka-python), crc32 (librdkafka clients), fnv1a (Go's Sarama); match the live "
                               "producers and serve's --partitioner", group=KAFKA, choices=tuple(PARTITIONERS))
    rows: int | None = setting(None, "send only the file's first N rows", group=INPUT, check=at_least(0))
    rate: float | None = setting(None, "messages per second", group="pace", shown_default="as fast as possible",
                                 check=positive)
    speed: float | None = setting(None, "replay at X times event time", group="pace", check=positive,
                                  alternative_to="rate")
    spec: ReplaySpec = field(default_factory=ReplaySpec)
    kafka_extra: Mapping[str, Any] = field(default_factory=dict)  # the settings file's [kafka] table

    def __post_init__(self) -> None:
        check_declared(self)
        self.check_security()
        if self.rate is not None and self.speed is not None:
            raise SettingsError("give --rate or --speed, not both")
        object.__setattr__(self, "kafka_extra", check_kafka_table(self.kafka_extra))


def first_rows(replay: Replay, rows: int | None) -> tuple[ObservationBatch, list[DeadLetter]]:
    """The observations and the skipped rows (dead letters) among the file's first ``rows`` rows (all: ``None``);
    a skipped row further on is not counted (it was, in the summary's rows skipped)."""
    if rows is None:
        return replay.observations, list(replay.dead_letters)
    obs = replay.observations
    return (obs.take(np.flatnonzero(obs.offsets < rows)),
            [letter for letter in replay.dead_letters if letter.position[1] < rows])


@contextlib.contextmanager
def _reachable(options: ProduceOptions) -> Iterator[None]:
    """Connecting: a cluster that cannot be reached (kafka-python gives up after ~30 s) is one error line, not a
    kafka-python traceback."""
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    try:
        yield
    except (KafkaTimeoutError, KafkaConnectionError) as err:
        raise ValueError(f"cannot reach the Kafka cluster at {options.bootstrap_servers}: {err} (check "
                         "--bootstrap-servers and the security settings)") from None


def run_produce(options: ProduceOptions) -> dict[str, Any]:
    """Send the file's observations; returns counts and the measured rate."""
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    warn_without_crc32c()
    replay = load_replay(options.spec)
    obs, letters = first_rows(replay, options.rows)
    with _reachable(options):
        if options.partitions:
            admin = KafkaAdminClient(**client_settings(options.options, KafkaAdminClient, options.kafka_extra))
            try:
                ensure_topics(admin, {options.topic: (options.partitions, {})}, options.replication_factor)
            finally:
                admin.close()
        producer = KafkaProducer(**client_settings(options.options, KafkaProducer, options.kafka_extra,
                                                   linger_ms=20, batch_size=256 * 1024, acks="all"))
    partitions = _partitions(producer, options)
    failures: list[BaseException] = []
    started = time.perf_counter()
    first_ns = int(obs.timestamps_ns[0]) if len(obs) else 0
    handed, interrupted, refused = 0, False, None
    acknowledged: list[None] = []  # one item per message the cluster acknowledged (appends are atomic)
    try:
        homes = HomePartitions(partitions, options.partitioner)
        log.info("sending to %s by the %s partitioner", options.topic, homes.describe())
        for i, (sid, t_ns, value) in enumerate(zip(obs.series_ids.tolist(), obs.timestamps_ns.tolist(),
                                                   obs.values.tolist(), strict=True)):
            if failures:  # the cluster refused or lost one: stop now, not after hours of expiring messages
                break
            _pace(options, started, i, t_ns - first_ns)  # each message at its own time (--speed sent it a step early)
            payload = encode(Observation(sid, from_ns(t_ns), value))
            future = producer.send(options.topic, key=sid.encode(), value=payload, partition=homes(sid))
            handed += 1  # before the callbacks: a stop between them must not leave a delivered message uncounted
            future.add_callback(lambda _metadata: acknowledged.append(None))
            future.add_errback(failures.append)
        producer.flush()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the command's handler: what was handed over is sent
        interrupted = True
    except KafkaError as err:  # send() itself gave up (its buffer full while the cluster is gone)
        refused = err
    finally:
        try:
            producer.close()  # waits for the messages handed over: a stop loses none of them
        except KeyboardInterrupt:  # a second stop while it waits: what is still buffered is lost
            interrupted = True
    elapsed = time.perf_counter() - started
    if failures or refused is not None:
        lost = (f"{len(failures):,} of {handed:,} messages handed to the producer were not acknowledged (first: "
                f"{failures[0]}); {handed - len(failures):,} were" if failures
                else f"{handed:,} messages handed to the producer; the next was refused ({refused})")
        raise ValueError(f"{lost}; stopped there (check the cluster, then send the rest with --rows or a file of "
                         "the rest)")
    # "sent" counts what the cluster acknowledged: after a second stop during close the rest of the buffer is lost,
    # and resuming after "sent N" of the handed messages skipped them
    sent = len(acknowledged)
    return {"sent": sent, "handed": handed, "skipped_rows": len(letters), "elapsed_seconds": elapsed,
            "interrupted": interrupted, "messages_per_second": sent / elapsed if elapsed > 0 else None,
            "topic": options.topic}


def _partitions(producer: Any, options: ProduceOptions) -> int:
    """The topic's partition count, or one error line (the producer closed): its metadata can time out (a cluster
    that cannot be reached once ``api_version`` skips the version probe, a topic that does not exist) and was a
    kafka-python traceback."""
    from kafka.errors import KafkaError

    try:
        found = producer.partitions_for(options.topic)
    except KafkaError as err:
        producer.close()
        raise ValueError(f"no metadata for topic {options.topic!r} from {options.bootstrap_servers}: {err} (check "
                         "--bootstrap-servers and the security settings; a topic that does not exist: create it or "
                         "give --partitions N)") from None
    if not found:
        producer.close()
        raise ValueError(f"topic {options.topic!r} does not exist: create it or give --partitions N")
    return len(found)


def _pace(options: ProduceOptions, started: float, sent: int, event_ns: int) -> None:
    if options.rate is not None:
        ahead = sent / options.rate - (time.perf_counter() - started)
    elif options.speed is not None:
        ahead = event_ns / 1e9 / options.speed - (time.perf_counter() - started)
    else:
        return
    if ahead > 0.001:
        time.sleep(ahead)

