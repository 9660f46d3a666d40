"""Which input partition a series id belongs on: the key hashes of the common Kafka producers.

A producer that keys by ``series_id`` puts every observation of a series on one partition, but *which* one depends
on the client's hash function:

* ``murmur2`` — the Java client and kafka-python (and librdkafka's ``murmur2`` / ``murmur2_random``): Kafka's
  murmur2 variant, sign bit cleared, modulo the partition count.
* ``crc32`` — librdkafka's default ``consistent_random`` (confluent-kafka, kcat, confluent-kafka-go,
  node-rdkafka) and ``consistent``: the zlib CRC-32 of the key as an unsigned number, modulo the count.
* ``fnv1a`` — Go's Sarama (its default hash partitioner; also librdkafka's ``fnv1a``): 32-bit FNV-1a read as a signed
  number, made non-negative, modulo the count.

``serve`` computes every record's *home partition* with the configured partitioner, so that every member of a
group agrees on where a series lives without asking anyone; ``produce`` can send with any of them.

>>> home_partition(b"ETTh1/OT", 4, "murmur2"), home_partition(b"ETTh1/OT", 4, "crc32")
(1, 3)
>>> murmur2(b"21")  # Kafka's own test vector (UtilsTest.testMurmur2)
-973932308
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

#: Partitioner name -> the producers that use it by default (for help texts and log lines).
PARTITIONERS: dict[str, str] = {
    "murmur2": "the Java client and kafka-python",
    "crc32": "librdkafka clients: confluent-kafka, kcat, confluent-kafka-go, node-rdkafka",
    "fnv1a": "Go's Sarama",
}
DEFAULT_PARTITIONER = "murmur2"

_MASK32 = 0xFFFFFFFF
_MURMUR_SEED = 0x9747B28C
_MURMUR_M = 0x5BD1E995
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 of ``data`` as a signed Java ``int`` (``org.apache.kafka.common.utils.Utils``)."""
    length = len(data)
    h = (_MURMUR_SEED ^ length) & _MASK32
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _MURMUR_M) & _MASK32
        k ^= k >> 24
        k = (k * _MURMUR_M) & _MASK32
        h = ((h * _MURMUR_M) & _MASK32) ^ k
    tail = data[whole:]
    if tail:  # the last 1-3 bytes, highest first
        for shift, byte in reversed(list(enumerate(tail))):
            h ^= byte << (8 * shift)
        h = (h * _MURMUR_M) & _MASK32
    h ^= h >> 13
    h = (h * _MURMUR_M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def fnv1a(data: bytes) -> int:
    """32-bit FNV-1a of ``data``, unsigned (Go's ``hash/fnv.New32a``)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK32
    return h


def _murmur2_partition(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _crc32_partition(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions


def _fnv1a_partition(key: bytes, partitions: int) -> int:
    # Sarama: int32(hash) % n, negated when negative (Go's remainder truncates towards zero), which is
    # |int32(hash)| % n; librdkafka's fnv1a takes the absolute value first and gets the same partitions.
    signed = fnv1a(key)
    if signed & 0x80000000:
        signed -= 1 << 32
    return abs(signed) % partitions


_BY_NAME: dict[str, Callable[[bytes, int], int]] = {
    "murmur2": _murmur2_partition,
    "crc32": _crc32_partition,
    "fnv1a": _fnv1a_partition,
}


def home_partition(key: bytes, partitions: int, partitioner: str = DEFAULT_PARTITIONER) -> int:
    """The partition a producer using ``partitioner`` sends ``key`` to, out of ``partitions``."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    try:
        hash_partition = _BY_NAME[partitioner]
    except KeyError:
        raise ValueError(f"unknown partitioner {partitioner!r}; one of {', '.join(PARTITIONERS)}") from None
    return hash_partition(key, partitions)


class HomePartitions:
    """Home partitions of series ids under one partitioner and partition count, memoised per series.

    >>> homes = HomePartitions(4, "murmur2")
    >>> homes("ETTh1/OT"), homes.describe()
    (1, 'murmur2 (the Java client and kafka-python), 4 partitions')
    """

    _MAX_CACHED = 200_000  # series ids; beyond it the cache starts over (ids of rejected series count too)

    def __init__(self, partitions: int, partitioner: str = DEFAULT_PARTITIONER) -> None:
        home_partition(b"", partitions, partitioner)  # validates both
        self.partitions = partitions
        self.partitioner = partitioner
        self._cache: dict[str, int] = {}

    def __call__(self, series_id: str) -> int:
        home = self._cache.get(series_id)
        if home is None:
            if len(self._cache) >= self._MAX_CACHED:
                self._cache.clear()
            home = self._cache[series_id] = home_partition(key_bytes(series_id), self.partitions,
                                                           self.partitioner)
        return home

    def describe(self) -> str:
        return f"{self.partitioner} ({PARTITIONERS[self.partitioner]}), {self.partitions} partitions"


def key_bytes(series_id: str) -> bytes:
    """A series id as a Kafka key: UTF-8; an id that UTF-8 cannot hold (a lone surrogate) keeps its code units
    (``surrogatepass``), so hashing and keying never raise on data."""
    try:
        return series_id.encode()
    except UnicodeEncodeError:
        return series_id.encode("utf-8", "surrogatepass")
