"""``tidecast produce`` against a real broker: pacing, stops and a cluster that goes away mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tidecast.stream.cli import main

pytestmark = pytest.mark.kafka


def hourly(path: Path, hours: int, series: int = 1) -> Path:
    times = pd.date_range("2024-01-01", periods=hours, freq="h")
    frame = pd.DataFrame({"ds": times, **{f"s{i}": np.arange(hours, dtype=float) for i in range(series)}})
    frame.to_csv(path, index=False)
    return path


def test_speed_sends_each_observation_at_its_own_event_time(kafka, unique, tmp_path, monkeypatch):
    """--speed paced after each send with the time of the message just sent: the next hour went out at once,
    one event-time step early."""
    from kafka import KafkaProducer

    sent_at: list[float] = []
    send = KafkaProducer.send

    def timed(self, *args, **kwargs):
        sent_at.append(time.perf_counter())
        return send(self, *args, **kwargs)

    monkeypatch.setattr(KafkaProducer, "send", timed)
    data = hourly(tmp_path / "h.csv", 4)
    assert main(["produce", str(data), "--bootstrap-servers", kafka.bootstrap, "--topic", unique("speed"),
                 "--partitions", "1", "--speed", "18000"]) == 0  # an hour in 0.2 s
    gaps = np.diff(sent_at)
    assert len(sent_at) == 4 and (gaps > 0.15).all(), gaps


def test_sigterm_sends_what_was_handed_over_and_says_how_much(kafka, unique, tmp_path):
    """SIGTERM killed produce with the messages in the producer's buffer unsent (3,780 sends, 3,750 in the topic);
    Ctrl-C printed a traceback."""
    topic = unique("stop")
    data = hourly(tmp_path / "h.csv", 20_000)
    proc = subprocess.Popen([sys.executable, "-m", "tidecast.stream.cli", "produce", str(data), "--bootstrap-servers",
                             kafka.bootstrap, "--topic", topic, "--partitions", "2", "--rate", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # start-up (imports, metadata), then about a thousand messages a half second
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: sent" in err and "Traceback" not in err
    sent = int(err.split("interrupted: sent ")[1].split()[0].replace(",", ""))
    assert 0 < sent < 20_000
    assert len(kafka.read_all(topic, min_count=sent)) == sent


def test_a_message_the_cluster_does_not_acknowledge_stops_produce_with_one_line(kafka, unique, tmp_path, monkeypatch,
                                                                              capsys):
    """A broker killed mid-run: produce went on sending for two minutes (kafka-python's delivery timeout), then
    exited 1 with a RuntimeError traceback. Now the first message it loses stops it, with one error line."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaTimeoutError

    send, calls = KafkaProducer.send, []

    class Lost:
        def add_callback(self, callback):
            return self

        def add_errback(self, errback):
            errback(KafkaTimeoutError("Expiring 1 record(s): 120000 ms has passed since batch creation"))
            return self

    def flaky(self, *args, **kwargs):
        calls.append(1)
        return Lost() if len(calls) == 100 else send(self, *args, **kwargs)

    monkeypatch.setattr(KafkaProducer, "send", flaky)
    data = hourly(tmp_path / "h.csv", 1000)
    assert main(["produce", str(data), "--bootstrap-servers", kafka.bootstrap, "--topic", unique("lost"),
                 "--partitions", "1"]) == 2
    err = capsys.readouterr().err
    assert "1 of 100 messages handed to the producer were not acknowledged" in err and "99 were" in err
    assert len(calls) == 100  # it stopped there


def test_a_message_send_itself_refuses_is_counted_apart(kafka, unique, tmp_path, monkeypatch, capsys):
    """send() raising (its buffer full while the cluster is gone) was counted as one of the handed messages: "1 of
    0 messages handed ... were not acknowledged; -1 were"."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaTimeoutError

    send, calls = KafkaProducer.send, []

    def full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KafkaTimeoutError("Failed to allocate memory within the configured max blocking time")
        return send(self, *args, **kwargs)

    monkeypatch.setattr(KafkaProducer, "send", full)
    assert main(["produce", str(hourly(tmp_path / "h.csv", 10)), "--bootstrap-servers", kafka.bootstrap, "--topic",
                 unique("full"), "--partitions", "1"]) == 2
    assert "2 messages handed to the producer; the next was refused" in capsys.readouterr().err


def test_a_second_stop_while_closing_counts_only_what_was_acknowledged(kafka, unique, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C while the producer waits to close loses what is still buffered, yet the line said "sent N"
    of every handed message, and "send the rest" from there skipped the lost ones."""
    import kafka as kafka_python

    class Pending:  # never acknowledged
        def add_callback(self, callback):
            return self

        def add_errback(self, errback):
            return self

    class Stopped(kafka_python.KafkaProducer):
        def send(self, *args, **kwargs):
            return Pending()

        def flush(self, *args, **kwargs):  # the first stop (close flushes too: then nothing to flush)
            if not getattr(self, "flushed", False):
                self.flushed = True
                raise KeyboardInterrupt

        def close(self, *args, **kwargs):  # the second, while it waits: the buffer is dropped
            super().close(timeout=0)
            if not getattr(self, "stopped", False):  # once: __del__ closes it again
                self.stopped = True
                raise KeyboardInterrupt

    monkeypatch.setattr(kafka_python, "KafkaProducer", Stopped)
    assert main(["produce", str(hourly(tmp_path / "h.csv", 10)), "--bootstrap-servers", kafka.bootstrap, "--topic",
                 unique("second"), "--partitions", "1"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: sent 0 observations" in err and "10 more handed over, not acknowledged" in err
