"""``serve``/``produce`` configuration and message formats (no broker needed)."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

import tidecast.stream.serve
from tidecast.stream.batch import ForecastBatch
from tidecast.stream.cli import main
from tidecast.stream.kafka import client_settings, dead_letter_message, forecast_messages, header_dict
from tidecast.stream.serve import ServeConfig


@pytest.fixture
def captured(monkeypatch):
    """Run ``tidecast serve`` up to the point where it would start, and keep its configuration."""
    seen = {}

    def fake_run(config: ServeConfig) -> int:
        seen["config"] = config
        return 0

    monkeypatch.setattr(tidecast.stream.serve, "run_serve", fake_run)
    for name in ("TIDECAST_CONFIG", "TIDECAST_TOPIC", "TIDECAST_HORIZON", "TIDECAST_GROUP_ID", "TIDECAST_MODEL",
                 "TIDECAST_BOOTSTRAP_SERVERS", "TIDECAST_CHECKPOINT_INTERVAL", "TIDECAST_SASL_PLAIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return seen


def test_flag_beats_environment_beats_file_beats_default(captured, monkeypatch, tmp_path):
    config = tmp_path / "tidecast.toml"
    config.write_text("""
bootstrap_servers = "file:9092"
topic = "from-file"
group_id = "group-from-file"
horizon = 48
checkpoint-interval = 30
create_topics = false
[model_params.seasonal-naive]
period = 24
[kafka]
request_timeout_ms = 12345
""")
    monkeypatch.setenv("TIDECAST_CONFIG", str(config))
    monkeypatch.setenv("TIDECAST_TOPIC", "from-env")
    monkeypatch.setenv("TIDECAST_GROUP_ID", "group-from-env")
    monkeypatch.setenv("TIDECAST_HORIZON", "12")
    monkeypatch.setenv("TIDECAST_SASL_PLAIN_PASSWORD", "s3cret")
    monkeypatch.setenv("TIDECAST_SECURITY_PROTOCOL", "SASL_SSL")
    assert main(["serve", "--group-id", "group-from-flag", "--model", "seasonal-naive"]) == 0
    cfg = captured["config"]
    assert cfg.group_id == "group-from-flag"  # flag
    assert cfg.topic == "from-env" and cfg.engine.horizon == 12  # env over file
    assert cfg.bootstrap_servers == "file:9092" and cfg.checkpoint_interval == 30.0  # file
    assert cfg.create_topics is False and cfg.checkpoint_records == 10_000  # file bool; default
    assert cfg.engine.model_params == {"seasonal-naive": {"period": 24}}
    assert cfg.forecast_topic == "from-env-forecasts" and cfg.changelog_topic == "group-from-flag-from-env-changelog"
    assert cfg.kafka_extra == {"request_timeout_ms": 12345}
    assert cfg.sasl_plain_password == "s3cret"


def test_missing_required_settings_are_an_error_not_a_crash(captured, capsys):
    assert main(["serve", "--topic", "t"]) == 2
    assert "bootstrap_servers is required" in capsys.readouterr().err.replace("\n", " ")


def test_bad_environment_value_names_its_source(captured, monkeypatch, capsys):
    monkeypatch.setenv("TIDECAST_CHECKPOINT_INTERVAL", "soon")
    assert main(["serve", "--topic", "t", "--bootstrap-servers", "b:1"]) == 2
    assert "TIDECAST_CHECKPOINT_INTERVAL=soon (environment): not a number" in capsys.readouterr().err
    assert "config" not in captured


def test_client_settings_pass_security_and_the_kafka_table_to_the_clients_that_know_them():
    from kafka import KafkaConsumer, KafkaProducer

    cfg = ServeConfig({"bootstrap_servers": "a:1,b:2", "topic": "t", "security_protocol": "SASL_SSL",
                       "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u", "sasl_plain_password": "p"})
    extra = {"request_timeout_ms": 40000, "isolation_level": "read_committed"}
    consumer = client_settings(cfg.options, KafkaConsumer, extra, group_id="g")
    producer = client_settings(cfg.options, KafkaProducer, extra, acks="all")
    assert consumer["bootstrap_servers"] == ["a:1", "b:2"] and consumer["security_protocol"] == "SASL_SSL"
    assert consumer["sasl_plain_password"] == "p" and consumer["isolation_level"] == "read_committed"
    assert producer["sasl_mechanism"] == "SCRAM-SHA-512" and "isolation_level" not in producer
    assert "group_id" not in producer and producer["acks"] == "all"


def test_forecast_messages_hold_one_origin_each_with_all_steps():
    hour = 3_600_000_000_000
    batch = ForecastBatch(
        series_id=np.array(["a", "a", "b", "b"], dtype=object), issued_at_ns=np.array([0, 0, 0, 0]),
        model=np.array(["m"] * 4, dtype=object), h=np.array([1, 2, 1, 2]),
        target_ns=np.array([hour, 2 * hour, hour, 2 * hour]), mean=np.array([1.0, 2.0, 3.0, 4.0]),
        lower=np.array([0.5, -np.inf, 2.5, 3.5]), upper=np.array([1.5, np.inf, 3.5, 4.5]), alpha=0.1)
    messages = [(key, json.loads(value)) for key, value in forecast_messages(batch)]
    assert [key for key, _ in messages] == ["a", "b"]
    first = messages[0][1]
    assert first["issued_at"] == "1970-01-01T00:00:00Z" and first["h"] == [1, 2]
    assert first["target_timestamp"] == ["1970-01-01T01:00:00Z", "1970-01-01T02:00:00Z"]
    assert first["lower"] == [0.5, None] and first["upper"] == [1.5, None]  # unbounded side -> null
    assert first["mean"] == [1.0, 2.0] and first["alpha"] == 0.1 and first["schema_version"] == 2
    assert first["intervals"] == {"90": {"lower": [0.5, None], "upper": [1.5, None]}}  # the one level of alpha
    assert first["has_interval"] == [True, True]  # null at h=2: an unbounded side, not a missing interval


def test_forecast_messages_carry_every_level_and_the_first_in_lower_upper():
    batch = ForecastBatch(
        series_id=np.array(["a", "a"], dtype=object), issued_at_ns=np.array([0, 0]),
        model=np.array(["m"] * 2, dtype=object), h=np.array([1, 2]), target_ns=np.array([1, 2]) * 3_600_000_000_000,
        mean=np.array([1.0, 2.0]), lower=np.array([0.5, 1.0]), upper=np.array([1.5, 3.0]), alpha=0.2,
        levels=("80", "95"), lowers=np.array([[0.5, 0.0], [1.0, np.nan]]),
        uppers=np.array([[1.5, 2.0], [3.0, np.nan]]))
    (key, value), = forecast_messages(batch)
    message = json.loads(value)
    assert message["lower"] == [0.5, 1.0] and message["upper"] == [1.5, 3.0] and message["alpha"] == 0.2
    assert message["intervals"] == {"80": {"lower": [0.5, 1.0], "upper": [1.5, 3.0]},
                                    "95": {"lower": [0.0, None], "upper": [2.0, None]}}
    assert message["has_interval"] == [True, True]


def test_a_step_without_an_interval_yet_is_told_apart_from_an_unbounded_one():
    batch = ForecastBatch(
        series_id=np.array(["a", "a"], dtype=object), issued_at_ns=np.array([0, 0]),
        model=np.array(["m"] * 2, dtype=object), h=np.array([1, 2]), target_ns=np.array([1, 2]) * 3_600_000_000_000,
        mean=np.array([1.0, 2.0]), lower=np.array([-np.inf, np.nan]), upper=np.array([np.inf, np.nan]), alpha=0.1)
    (_, value), = forecast_messages(batch)
    message = json.loads(value)
    assert message["lower"] == [None, None] and message["upper"] == [None, None]
    assert message["has_interval"] == [True, False]


def test_dead_letter_keeps_the_raw_record_and_says_why_and_where():
    record = SimpleNamespace(topic="obs", partition=3, offset=42, timestamp=1700000000000, key=b"k",
                             value=b"x" * 100)
    letter = dead_letter_message(record, "oversized", "100 bytes > limit 10", max_bytes=10)
    headers = header_dict(letter.headers)
    assert letter.key == b"k" and letter.value == b"x" * 10
    assert headers["tidecast.reason"] == "oversized" and headers["tidecast.raw.size"] == "100"
    assert (headers["tidecast.source.topic"], headers["tidecast.source.partition"],
            headers["tidecast.source.offset"]) == ("obs", "3", "42")
    whole = dead_letter_message(record, "not_json", "", max_bytes=0)
    assert whole.value == record.value and "tidecast.raw.size" not in header_dict(whole.headers)
    # a 200 kB key beside a 900 kB value made the dead letter larger than a 1 MB topic takes: the broker refused
    # it and the member stopped, on every restart; the key is cut too, and says how long it was
    huge = SimpleNamespace(topic="obs", partition=0, offset=7, timestamp=0, key=b"k" * 200_000, value=b"v" * 900_000)
    cut = dead_letter_message(huge, "not_json", "", max_bytes=1_000_000)
    assert len(cut.key) == 1024 and header_dict(cut.headers)["tidecast.key.size"] == "200000"
    assert len(cut.key) + len(cut.value) + sum(len(k) + len(v) for k, v in cut.headers) < 1_000_000


SERVE = ["serve", "--bootstrap-servers", "b:1", "--topic", "obs"]


@pytest.mark.parametrize("args, env, toml, message", [
    (["--forecast-topic", "obs"], {}, "", "forecast_topic 'obs' is also the input topic"),
    (["--changelog-topic", "obs-dead-letters"], {}, "", "changelog_topic 'obs-dead-letters' is also the "
                                                         "dead_letter_topic"),
    ([], {"TIDECAST_FORECAST_TOPIC": ""}, "", "TIDECAST_FORECAST_TOPIC= (environment): must not be empty"),
    ([], {"TIDECAST_GROUP_ID": " "}, "", "must not be empty"),
    (["--ssl-cafile", "/nonexistent/ca.pem"], {}, "", "--ssl-cafile /nonexistent/ca.pem: no such file"),
    (["--fetch-max-wait-ms", "60000"], {}, "", "must be below the Kafka clients' request_timeout_ms (30000)"),
    ([], {}, '[kafka]\nrequest_timeout_ms = "60000"\n', "request_timeout_ms = '60000' in the [kafka] table: "
                                                      "kafka-python wants int"),
    ([], {}, "[kafka]\nrequest_timeout_ms = 50\n", "request_timeout_ms (50)"),
    (["--heartbeat-interval-ms", "50000"], {}, "", "must be below --session-timeout-ms (45000)"),
    ([], {}, '[kafka]\ngroup_instance_id = "m1"\n', "static group membership is not supported"),
    ([], {}, "[kafka]\nbatch_size = 65536\n", "tidecast sets it on its clients itself"),
    (["--freq", "200000d"], {}, "", "longer than a time step can be"),
    (["--calibrator", "dtaci", "--calibrator-param", "gammas=0.1"], {}, "", "expected a list of float"),
    (["--events", "x.jsonl"], {}, "", None),  # replay's flag, read as --events-topic: no abbreviations
])
def test_serve_settings_kafka_python_would_refuse_after_connecting_are_one_line_before(
        captured, monkeypatch, tmp_path, capsys, args, env, toml, message):
    """Found by the settings review (2026-12-04): each of these was accepted and then ended in a traceback once the
    clients were built (or in "the cluster is unreachable" for a missing CA file, retried for the whole outage
    budget), or did something else than asked (forecasts into the input topic; --events as --events-topic)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    extra = []
    if toml:
        (tmp_path / "t.toml").write_text(toml)
        extra = ["--config", str(tmp_path / "t.toml")]
    with pytest.raises(SystemExit) if message is None else contextlib.nullcontext():
        assert main([*SERVE, *args, *extra]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert (message or "unrecognized arguments: --events") in err
    assert "Traceback" not in err and "config" not in captured


def test_replay_refuses_a_sleep_too_long_to_take(tmp_path, capsys):
    assert main(["replay", "x.csv", "--linger", "1e300", "--dead-letter", str(tmp_path / "d.jsonl")]) == 2
    assert "linger" in capsys.readouterr().err


def test_a_flag_or_the_environment_that_replaces_the_files_choice_drops_the_files_parameters_for_it(
        captured, monkeypatch, tmp_path, capsys):
    """Found by the settings review (2026-12-04): README's example file has [model_params.seasonal-naive]; with
    TIDECAST_MODEL=holt-winters serve refused to start ("model parameters for 'seasonal-naive', which is no
    lane"), blaming --model-param, so the higher-precedence source lost. The same for a file's calibrator and drift
    parameters under --calibrator / --drift-detector. Parameters of lanes still there, and typos, stay."""
    config = tmp_path / "tidecast.toml"
    config.write_text('model = ["seasonal-naive", "hw=holt-winters"]\ncalibrator = "aci"\n'
                      '[model_params.seasonal-naive]\nperiod = 24\n[model_params.hw]\nalpha = 0.3\n'
                      '[calibrator_params]\ngamma = 0.01\n[drift_params]\nh = 20\n')
    monkeypatch.setenv("TIDECAST_MODEL", "hw=holt-winters")
    assert main([*SERVE, "--config", str(config), "--calibrator", "conformal-pid", "--drift-detector", "none"]) == 0
    engine = captured["config"].engine
    assert engine.model_params == {"hw": {"alpha": 0.3}} and engine.calibrator_params == {}
    assert engine.drift_params == {}
    captured.clear()
    config.write_text('model = ["seasonal-naive"]\n[model_params.seasonl-naive]\nperiod = 24\n')  # a typo
    assert main([*SERVE, "--config", str(config), "--model", "seasonal-naive"]) == 2
    assert "seasonl-naive" in capsys.readouterr().err and "config" not in captured
    # an alias kept for another model: the old model's parameters went to the new one (period, silently)
    config.write_text('model = ["a=seasonal-naive", "b=holt-winters"]\n[model_params.a]\nperiod = 24\n'
                      '[model_params.b]\nalpha = 0.3\n')
    assert main([*SERVE, "--config", str(config), "--model", "a=holt-winters,b=holt-winters"]) == 0
    assert captured["config"].engine.model_params == {"b": {"alpha": 0.3}}


def test_produce_to_an_unreachable_cluster_is_one_error_line(monkeypatch, tmp_path, capsys):
    """Found by the operations review (2026-12-04): a typo'd --bootstrap-servers ended, after kafka-python's 30 s,
    in its KafkaTimeoutError traceback (exit 1). Its bootstrap wait is cut to 1 s here."""
    from conftest import free_port
    from kafka import KafkaProducer

    monkeypatch.setitem(KafkaProducer.DEFAULT_CONFIG, "bootstrap_timeout_ms", 1000)
    path = tmp_path / "small.csv"
    path.write_text("ds,y\n2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,2\n")
    address = f"127.0.0.1:{free_port()}"
    assert main(["produce", str(path), "--bootstrap-servers", address, "--topic", "t"]) == 2
    assert f"cannot reach the Kafka cluster at {address}" in capsys.readouterr().err.replace("\n", " ")


def test_produce_without_topic_metadata_is_one_error_line(monkeypatch, tmp_path, capsys):
    """Found by the settings review (2026-12-04): with api_version in the [kafka] table the producer skips its
    connection probe, and the topic's metadata timed out after it (60 s; 1 s here), outside the connection check:
    a traceback."""
    from conftest import free_port
    from kafka import KafkaProducer

    monkeypatch.setitem(KafkaProducer.DEFAULT_CONFIG, "max_block_ms", 1000)
    path = tmp_path / "small.csv"
    path.write_text("ds,y\n2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,2\n")
    config = tmp_path / "tidecast.toml"
    config.write_text('[kafka]\napi_version = "2.0"\n')
    address = f"127.0.0.1:{free_port()}"
    assert main(["produce", str(path), "--config", str(config), "--bootstrap-servers", address, "--topic", "t"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no metadata for topic 't'" in " ".join(err.split())


@pytest.mark.parametrize(("args", "says"), [
    (["--ssl-cafile", __file__], "ssl_cafile set, but the security protocol is PLAINTEXT"),
    (["--sasl-mechanism", "PLAIN", "--sasl-plain-username", "u", "--security-protocol", "SSL"],
     "sasl_mechanism, sasl_plain_username set, but the security protocol is SSL"),
])
def test_tls_or_sasl_settings_under_a_protocol_that_ignores_them_are_refused(captured, capsys, args, says):
    """Found by the settings review (2026-12-04): README's mTLS flags without --security-protocol were accepted and
    kafka-python's default PLAINTEXT ignored them without a word."""
    for command in (["serve", "--topic", "t"], ["produce", __file__, "--topic", "t"]):
        assert main([*command, "--bootstrap-servers", "b:1", *args]) == 2
        assert says in " ".join(capsys.readouterr().err.split())
    fixed = [a for a in args if a not in ("--security-protocol", "SSL")]
    assert main(["serve", "--topic", "t", "--bootstrap-servers", "b:1", "--security-protocol", "SASL_SSL", *fixed]) == 0
