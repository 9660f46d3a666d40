"""The health server on its own: /healthz from heartbeats, /readyz from the restore state, /metrics beside them."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tidecast.monitors.metrics import Metrics
from tidecast.stream.health import HealthServer, Heartbeat, Readiness


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def parts() -> Iterator[tuple[HealthServer, Clock, dict[str, Heartbeat], Readiness, Metrics]]:
    clock = Clock()
    beats = {"worker": Heartbeat(clock), "poll": Heartbeat(clock)}
    readiness, metrics = Readiness(), Metrics()
    server = HealthServer("127.0.0.1", 0, metrics.registry, beats, readiness, limit_seconds=60.0).start()
    yield server, clock, beats, readiness, metrics
    server.stop()


def test_healthz_fails_with_the_age_of_a_stale_heartbeat_while_metrics_still_answer(parts):
    server, clock, beats, _, metrics = parts
    metrics.observations.inc(7)
    status, body = get(server.port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"

    clock.now += 61.5
    beats["poll"].tick()  # the poll loop goes on; the worker is stuck
    status, body = get(server.port, "/healthz")
    answer = json.loads(body)
    assert status == 503 and answer["stale"] == ["worker"]
    assert answer["heartbeat_age_seconds"] == {"worker": 61.5, "poll": 0.0} and answer["limit_seconds"] == 60.0
    status, text = get(server.port, "/metrics")
    assert status == 200 and "tidecast_observations_total 7.0" in text

    beats["worker"].tick()
    assert get(server.port, "/healthz")[0] == 200
    assert get(server.port, "/nothing-here")[0] == 404


def test_readyz_waits_for_the_start_and_then_for_every_assigned_partition(parts):
    server, _, _, readiness, _ = parts
    assert get(server.port, "/readyz") == (503, json.dumps({"status": "starting"}))
    readiness.mark_started()
    assert get(server.port, "/readyz")[0] == 200  # no partitions yet: nothing to wait for
    readiness.begin_restore({1, 0})
    assert get(server.port, "/readyz") == (503, json.dumps({"status": "restoring", "restoring": [0, 1]}))
    readiness.end_restore(0)
    assert json.loads(get(server.port, "/readyz")[1])["restoring"] == [1]
    readiness.end_restore(1)
    assert get(server.port, "/readyz") == (200, json.dumps({"status": "ready"}))


def test_a_metrics_port_in_use_is_one_error_line_and_exit_2(tmp_path):
    """A mistake in the environment at start-up is said in one line, like a bad option, not as a traceback."""
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "tidecast.stream.cli", "serve", "--bootstrap-servers",
                              "127.0.0.1:1", "--topic", "t", "--metrics-port", str(port), "--metrics-address",
                              "127.0.0.1", "--broker-outage-budget", "2", "--state-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "serve could not start:" in out.stderr and "Address already in use" in out.stderr
    assert "Traceback" not in out.stderr


def test_healthz_stays_ok_while_serve_waits_for_the_broker_at_start(tmp_path):
    """A startup outage is waited out like a later one: restarting the container would not help, so /healthz
    answers 200 (the worker, not started yet, has nothing to be stuck on; it was reported stale after the
    liveness timeout, and Docker's HEALTHCHECK marked the container unhealthy)."""
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        broker = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refused
        proc = subprocess.Popen([sys.executable, "-m", "tidecast.stream.cli", "serve", "--bootstrap-servers",
                                 broker, "--topic", "t", "--metrics-port", str(port), "--metrics-address",
                                 "127.0.0.1", "--liveness-timeout", "8", "--broker-outage-budget", "60",
                                 "--state-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            answers = []
            deadline = time.monotonic() + 45
            while len(answers) < 10 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(2)
                try:
                    answers.append(get(port, "/healthz"))
                except OSError:  # the health server not up yet
                    continue
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert len(answers) == 10, answers
            # the last answers come well past the liveness timeout of 8 s (retries tick every 5 s at most)
            assert all(status == 200 for status, _ in answers), answers
            assert json.loads(answers[-1][1])["status"] == "ok"
            assert get(port, "/readyz")[0] == 503  # not ready: it owns no partitions
        finally:
            proc.terminate()
            proc.wait(timeout=30)


class OnePartitionConsumer:
    """Partition 0 of topic "obs": log end 5,000, position 1,000 (the committed offset), pausable."""

    def __init__(self) -> None:
        from kafka import TopicPartition

        self.tp = TopicPartition("obs", 0)
        self._paused: set = set()

    def assignment(self) -> set:
        return {self.tp}

    def paused(self) -> set:
        return set(self._paused)

    def pause(self, *tps) -> None:
        self._paused |= set(tps)

    def resume(self, *tps) -> None:
        self._paused -= set(tps)

    def position(self, tp, timeout_ms=None) -> int:
        return 1000

    def highwater(self, tp) -> int:
        return 5000


class LogEndProbe:
    def want(self, positions: dict) -> None:
        pass

    def highwater(self, partition: int) -> int:
        return 5000


def test_the_lag_gauge_covers_a_partition_while_it_restores():
    """A partition restoring its state is paused while records pile up: its lag gauge was removed for the whole
    restore, so TidecastNoObservations and the lag panels could not see a restore that never ends."""
    import queue
    from types import SimpleNamespace

    from tidecast.stream.fetcher import Fetcher

    metrics, readiness, consumer = Metrics(), Readiness(), OnePartitionConsumer()
    readiness.mark_started()
    cfg = SimpleNamespace(topic="obs", max_queued_records=20_000, auto_offset_reset="earliest")
    fetcher = Fetcher(cfg, consumer, SimpleNamespace(processed=0, dequeued=0), queue.Queue(), {}, readiness,
                      LogEndProbe(), metrics)

    def lag() -> float | None:
        fetcher._gauges_at = 0.0  # the gauges refresh at most every 0.25 s
        fetcher._update_gauges()
        return metrics.registry.get_sample_value("tidecast_consumer_lag", {"partition": "0"})

    assert lag() == 4000
    consumer.pause(consumer.tp)
    readiness.begin_restore({0})  # what the assignment does
    assert lag() == 4000 and metrics.registry.get_sample_value("tidecast_consumer_paused_partitions") == 1
