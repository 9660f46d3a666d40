"""Forecasts sent from a child process (``--output-process``): the same messages as the in-process sink, delivery
failures and a dead child surface in the member, forecasts no message can hold are set aside before the hand-over."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tidecast.stream.batch import ForecastBatch
from tidecast.stream.kafka import KafkaForecastSink, OutputError, UnsendableForecasts
from tidecast.stream.output_process import ProcessForecastSink, decode_batch, encode_batch

HOUR = 3_600_000_000_000


class Count:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


def forecasts(series: tuple[str, ...] = ("a", "b", "c"), horizon: int = 3, levels: bool = True,
              origins: int = 2) -> ForecastBatch:
    """``origins`` forecasts of ``horizon`` steps per series, with no-interval (NaN) and unbounded (inf) steps."""
    rng = np.random.default_rng(3)
    rows = [(sid, o, h) for o in range(origins) for sid in series for h in range(1, horizon + 1)]
    n = len(rows)
    mean = rng.normal(size=n) * 10
    lower, upper = mean - 1.0, mean + 1.0
    lower[1], upper[1] = np.nan, np.nan
    lower[2], upper[2] = -np.inf, np.inf
    many = {}
    if levels:
        many = {"levels": ("80", "95"), "lowers": np.stack([lower, lower - 2], 1),
                "uppers": np.stack([upper, upper + 2], 1)}
    return ForecastBatch(np.array([r[0] for r in rows], object), np.array([r[1] * HOUR for r in rows]),
                         np.array(["seasonal-naive"] * n, object), np.array([r[2] for r in rows]),
                         np.array([(r[1] + r[2]) * HOUR for r in rows]), mean, lower, upper, 0.2, **many)


@pytest.mark.parametrize("levels", [False, True])
def test_a_batch_crosses_the_pipe_unchanged(levels):
    batch = forecasts(levels=levels)
    back, partitions = decode_batch(encode_batch(batch, [0, 1, 2, 0, 1, 2]))
    assert partitions == [0, 1, 2, 0, 1, 2]
    for name in ("series_id", "issued_at_ns", "model", "h", "target_ns", "mean", "lower", "upper"):
        np.testing.assert_array_equal(getattr(back, name), getattr(batch, name), err_msg=name)
    assert back.alpha == batch.alpha and back.levels == batch.levels
    for got, want in zip(back.bounds(), batch.bounds(), strict=True):
        np.testing.assert_array_equal(got, want)
    empty, _ = decode_batch(encode_batch(ForecastBatch.empty(0.1), None))
    assert len(empty) == 0


def test_bounds_that_are_not_the_first_level_s_and_levels_without_names_cross_unchanged():
    base = forecasts(levels=False)
    lowers, uppers = np.stack([base.lower - 5, base.lower], 1), np.stack([base.upper + 5, base.upper], 1)
    odd = ForecastBatch(base.series_id, base.issued_at_ns, base.model, base.h, base.target_ns, base.mean, base.lower,
                        base.upper, base.alpha, (), lowers, uppers)  # lower/upper are not lowers[:, 0]; no names
    back, _ = decode_batch(encode_batch(odd, None))
    for name in ("lower", "upper", "lowers", "uppers"):
        np.testing.assert_array_equal(getattr(back, name), getattr(odd, name), err_msg=name)


def messages(kafka, topic: str, n: int) -> list[tuple[int, bytes, bytes]]:
    return sorted((r.partition, r.key, r.value) for r in kafka.read_all(topic, min_count=n))


@pytest.mark.kafka
@pytest.mark.parametrize("output_format", ["json", "compact"])
def test_the_child_sends_what_the_in_process_sink_sends(kafka, unique, output_format):
    here, there = unique("out-here"), unique("out-there")
    for topic in (here, there):
        kafka.create_topic(topic, 3)
    # d: no home, so the partitioner decides: by its key in JSON; a compact message has no key and lands on a
    # partition of the producer's choosing, so there d gets a home too
    home = {"a": 0, "b": 2, "c": 1, **({"d": 0} if output_format == "compact" else {})}.get
    batches = [forecasts(), forecasts(("c", "d"), levels=True, origins=1)]
    # compact: the child compresses with zstd, the in-process sink not at all (the setting reaches the child)
    in_process = KafkaForecastSink(kafka.producer, here, Count(), 30.0, home, output_format=output_format,
                                   compression="none")
    child = ProcessForecastSink({"bootstrap_servers": [kafka.bootstrap]}, there, Count(), 30.0, home,
                                output_format=output_format, compression="zstd")
    try:
        for batch in batches:
            in_process.write(batch)
            child.write(batch)
        in_process.flush()
        child.flush()
    finally:
        child.close()
    assert child.proc.returncode == 0
    want = messages(kafka, here, 1)
    got = messages(kafka, there, len(want))
    assert len(want) == (6 + 2 if output_format == "json" else 3 + 2)  # compact: one per partition and batch
    if output_format == "json":
        assert got == want  # byte for byte, on the same partitions
    else:  # an Arrow stream's bytes may differ in padding: compare what it holds
        from tidecast.stream.kafka import read_forecasts

        assert [(p, k) for p, k, _ in got] == [(p, k) for p, k, _ in want]
        zstd_frame = b"\x28\xb5\x2f\xfd"  # the magic number every zstd frame starts with
        assert all(zstd_frame in v for _, _, v in got) and not any(zstd_frame in v for _, _, v in want)
        def held(messages: list[tuple[int, bytes, bytes]]) -> list[tuple]:  # sorted by content, not by bytes
            return sorted((p, tuple(b.series_id.tolist()), tuple(b.mean.tolist()))
                          for p, _, v in messages for b in [read_forecasts([v])])

        assert held(got) == held(want)


@pytest.mark.kafka
def test_forecasts_no_message_can_hold_are_set_aside_and_the_others_sent(kafka, unique):
    topic = unique("out-bad")
    kafka.create_topic(topic, 1)
    batch = forecasts(("a", "nan", "\ud800"), levels=False, origins=1)
    batch.mean[3] = np.nan  # the series "nan"'s first step
    child = ProcessForecastSink({"bootstrap_servers": [kafka.bootstrap]}, topic, Count(), 30.0)
    try:
        with pytest.raises(UnsendableForecasts) as err:
            child.write(batch)
        child.flush()
    finally:
        child.close()
    assert set(err.value.series) == {"nan", "\ud800"} and err.value.origins == {"nan": {0}, "\ud800": {0}}
    assert [r.key for r in kafka.read_all(topic, min_count=1)] == [b"a"]


@pytest.mark.kafka
def test_a_refused_message_is_an_output_error_at_the_next_flush(kafka, unique):
    topic = unique("out-refused")
    kafka.create_topic(topic, 1)
    errors = Count()
    child = ProcessForecastSink({"bootstrap_servers": [kafka.bootstrap], "max_request_size": 200}, topic, errors,
                               30.0)
    try:
        child.write(forecasts(levels=False))  # every message is larger than the producer may send
        with pytest.raises(OutputError, match="refused"):
            child.flush()
    finally:
        child.close()


@pytest.mark.kafka
def test_a_dead_child_is_an_output_error_not_a_hang(kafka, unique):
    child = ProcessForecastSink({"bootstrap_servers": [kafka.bootstrap]}, unique("out-dead"), Count(), 30.0)
    child.proc.kill()
    child.proc.wait()
    with pytest.raises(OutputError, match="exited"):
        for _ in range(1000):  # the pipe takes a few batches before it says the reader is gone
            child.write(forecasts(levels=True, origins=20))
        child.flush()
    child.close()


@pytest.mark.kafka
def test_with_two_children_each_series_keeps_its_order_and_nothing_is_lost(kafka, unique):
    import json

    topic = unique("out-two")
    kafka.create_topic(topic, 2)
    series = tuple(f"s{i}" for i in range(12))
    sink = ProcessForecastSink({"bootstrap_servers": [kafka.bootstrap]}, topic, Count(), 30.0, processes=2)
    try:
        for round_ in range(4):  # each batch: two origins per series, later rounds later origins
            batch = forecasts(series, levels=False, origins=2)
            batch.issued_at_ns += round_ * 2 * HOUR
            sink.write(batch)
        sink.flush()
    finally:
        sink.close()
    assert all(child.proc.returncode == 0 for child in sink.children) and len(sink.children) == 2
    records = sorted(kafka.read_all(topic, min_count=12 * 8), key=lambda r: (r.partition, r.offset))
    issued: dict[str, list[str]] = {}
    for r in records:
        msg = json.loads(r.value)
        issued.setdefault(msg["series_id"], []).append(msg["issued_at"])
    assert set(issued) == set(series)
    assert all(len(v) == 8 and v == sorted(v) and len(set(v)) == 8 for v in issued.values())


def test_the_engine_s_forecast_starts_are_those_the_columns_give():
    from tidecast.stream.batch import ObservationBatch
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine
    from tidecast.stream.kafka import forecast_starts
    from tidecast.stream.records import Observation, from_ns

    engine = Engine.from_config(EngineConfig(
        horizon=6, models=["sn=seasonal-naive", "sn3=seasonal-naive"], freq="1h",
        model_params={"sn": {"period": 4}, "sn3": {"period": 3}}))
    rng = np.random.default_rng(0)
    batches = []
    for call in range(40):  # two lanes, three rounds per call, series joining late
        obs = [Observation(f"s{k}", from_ns((3 * call + j) * HOUR), float(rng.normal() + k))
               for j in range(3) for k in range(4) if call >= 5 * k]
        result = engine.process(ObservationBatch.from_observations(obs))
        if len(result.forecasts):
            batches.append(result.forecasts)
    assert len(batches) > 20 and any(len(set(b.model.tolist())) == 2 for b in batches)
    for batch in batches:
        given = forecast_starts(batch)
        assert batch.starts is not None
        batch.starts = None
        np.testing.assert_array_equal(given, forecast_starts(batch))


def test_an_output_child_imports_the_installed_package_not_the_working_directory(tmp_path, monkeypatch):
    """Packaging review (2026-12-05): ``python -m`` put the working directory first on the child's path, so serve
    started from a source checkout (a ``tidecast/`` folder) or beside a ``kafka.py`` ran that code, and its output
    children died at once: no forecast could be sent."""
    from tidecast.stream.output_process import _Child

    (tmp_path / "tidecast").mkdir()
    (tmp_path / "tidecast" / "__init__.py").write_text("")  # a checkout's namespace folder: no tidecast.stream
    (tmp_path / "kafka.py").write_text("raise SystemExit(7)\n")
    monkeypatch.chdir(tmp_path)
    child = _Child(None)
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # still serving: it died with exit 1 within a second
            child.proc.wait(timeout=4)
    finally:
        child.proc.kill()
        child.proc.wait()
