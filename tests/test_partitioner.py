"""Home partitions under the three producer hash functions, checked against published reference values.

The test broker cannot talk to librdkafka clients (its ApiVersions v3 answer underflows in librdkafka 2.x), so each
hash's partition arithmetic is checked against the values its own project publishes in its tests:

* murmur2: Apache Kafka, ``clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java``
  (``testMurmur2``: hashes), and kafka-python, ``test/test_partitioner.py``
  (``test_murmur2_java_compatibility``: partitions out of 1000, "compare with output from Kafka's
  org.apache.kafka.clients.producer.Partitioner").
* crc32: librdkafka, ``tests/0048-partitioner.c`` (``do_test_partitioners``, partitioner "consistent": CRC-32
  values taken with the ``crc32`` command), and Sarama, ``partitioner_test.go``
  (``TestConsistentCRCHashPartitioner``: partitions out of 100, compatible with librdkafka's consistent).
* fnv1a: librdkafka, ``src/rdfnv1a.c`` (``unittest_fnv1a``: Sarama-compatible hashes "acquired via
  play.golang.org") and ``tests/0048-partitioner.c`` (partitioner "fnv1a"), and Sarama, ``partitioner_test.go``
  (``TestHashPartitionerMinInt32``: a key whose hash is int32's minimum must still give a partition in range).
"""

from __future__ import annotations

import random

import pytest

from tidecast.stream.partitioner import PARTITIONERS, HomePartitions, fnv1a, home_partition, key_bytes, murmur2

# Apache Kafka UtilsTest.testMurmur2: key -> Utils.murmur2 (a signed Java int).
KAFKA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}
# kafka-python test_murmur2_java_compatibility: key -> partition out of 1000 (from Kafka's Java partitioner).
KAFKA_PYTHON_PARTITIONS_OF_1000 = {b"": 681, b"a": 524, b"ab": 434, b"abc": 107, b"123456789": 566, b"\x00 ": 742}
# librdkafka tests/0048-partitioner.c: keys and the hashes each partitioner's expected partition is taken modulo
# (17 partitions there, 7 in quick mode).
LIBRDKAFKA_KEYS = (b"", b"23456", b"this is another string with more length to it perhaps", b"hejsan")
LIBRDKAFKA_CONSISTENT = (0x0, 0xB1B451D7, 0xB0150DF7, 0xD077037E)
LIBRDKAFKA_FNV1A = (0x7EE3623B, 0x27E6F469, 0x155E3E5F, 0x17B1E27A)
# librdkafka src/rdfnv1a.c unittest_fnv1a: key -> |int32(FNV-1a)| (Sarama's NewHashPartitioner before the modulo).
LIBRDKAFKA_FNV1A_UNITTEST = {
    b"kafka": 0xD33C4E1,
    b"giberish123456789": 0x77A58295,
    b"1234": 0x23BDD03,
    b"234": 0x2DEA3CD2,
    b"34": 0x740FA83E,
    b"4": 0x310CA263,
    b"PreAmbleWillBeRemoved,ThePrePartThatIs": 0x65CBD69C,
    b"reAmbleWillBeRemoved,ThePrePartThatIs": 0x6E49C79A,
    b"eAmbleWillBeRemoved,ThePrePartThatIs": 0x69EED356,
    b"AmbleWillBeRemoved,ThePrePartThatIs": 0x6ABCC023,
    b"": 0x7EE3623B,
}
# Sarama partitioner_test.go TestConsistentCRCHashPartitioner: key -> partition out of 100.
SARAMA_CRC32_PARTITIONS_OF_100 = {
    b"abc123def456": 57,
    b"SheetJS": 26,  # CRC-32 2647669026: the unsigned modulo gives 26 (the signed one would give 70)
    b"9e8c7f4cf45857cfff7645d6": 24,
    b"3900446192ff85a5f67da10c": 75,
    b"0f4407b7a67d6d27de372198": 50,
}
SARAMA_MIN_INT32_KEY = b"1468509572224"  # FNV-1a 2147483648, int32's minimum once read as signed


@pytest.mark.parametrize(("key", "expected"), KAFKA_MURMUR2.items())
def test_murmur2_matches_kafkas_utils_test(key, expected):
    assert murmur2(key) == expected


@pytest.mark.parametrize(("key", "expected"), KAFKA_PYTHON_PARTITIONS_OF_1000.items())
def test_murmur2_partition_matches_the_java_partitioner(key, expected):
    assert home_partition(key, 1000, "murmur2") == expected


@pytest.mark.parametrize("partitions", [7, 17])
def test_crc32_partition_matches_librdkafka_consistent(partitions):
    got = [home_partition(key, partitions, "crc32") for key in LIBRDKAFKA_KEYS]
    assert got == [h % partitions for h in LIBRDKAFKA_CONSISTENT]


@pytest.mark.parametrize(("key", "expected"), SARAMA_CRC32_PARTITIONS_OF_100.items())
def test_crc32_partition_matches_saramas_consistent_crc_partitioner(key, expected):
    assert home_partition(key, 100, "crc32") == expected


@pytest.mark.parametrize(("key", "expected"), LIBRDKAFKA_FNV1A_UNITTEST.items())
def test_fnv1a_matches_librdkafkas_sarama_compatible_hash(key, expected):
    signed = fnv1a(key) - (1 << 32) if fnv1a(key) >= 1 << 31 else fnv1a(key)
    assert abs(signed) == expected


@pytest.mark.parametrize("partitions", [7, 17])
def test_fnv1a_partition_matches_librdkafka_fnv1a(partitions):
    got = [home_partition(key, partitions, "fnv1a") for key in LIBRDKAFKA_KEYS]
    assert got == [h % partitions for h in LIBRDKAFKA_FNV1A]


def test_fnv1a_partition_of_int32_min_hash_is_in_range_like_sarama():
    assert fnv1a(SARAMA_MIN_INT32_KEY) == 1 << 31
    # Sarama: int32(h) % 50 = -48 (Go truncates), negated; librdkafka: |h| overflows to 2^31, % 50 = 48 as well.
    assert home_partition(SARAMA_MIN_INT32_KEY, 50, "fnv1a") == 48


def test_murmur2_agrees_with_the_kafka_python_client_on_random_keys():
    """serve's test producers are kafka-python: its default partitioner must put keys where serve expects them."""
    from kafka.partitioner.default import murmur2 as client_murmur2

    rng = random.Random(10)
    for _ in range(2000):
        key = rng.randbytes(rng.randrange(0, 40))
        partitions = rng.randrange(1, 64)
        assert home_partition(key, partitions, "murmur2") == (client_murmur2(key) & 0x7FFFFFFF) % partitions


def test_the_partitioners_disagree_so_the_setting_matters():
    keys = [f"ETTh1/{c}".encode() for c in ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")]
    placements = {name: [home_partition(k, 4, name) for k in keys] for name in PARTITIONERS}
    assert len({tuple(p) for p in placements.values()}) == 3


def test_home_partitions_memoise_and_refuse_bad_arguments():
    homes = HomePartitions(8, "crc32")
    assert homes("a") == home_partition(b"a", 8, "crc32") == homes("a")
    assert "librdkafka" in homes.describe() and "8 partitions" in homes.describe()
    with pytest.raises(ValueError, match="unknown partitioner 'md5'"):
        HomePartitions(4, "md5")
    with pytest.raises(ValueError, match="at least one partition"):
        home_partition(b"a", 0)


def test_key_bytes_never_raises_on_a_lone_surrogate():
    assert key_bytes("ETTh1/OT") == b"ETTh1/OT"
    assert key_bytes("\ud800") == b"\xed\xa0\x80"
