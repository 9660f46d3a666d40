"""Settings declared once (typed dataclass fields -> flags, TIDECAST_* variables, TOML keys), lane aliases and
``tidecast --version``. No broker: ``serve`` and ``produce`` stop where they would connect."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import tidecast
import tidecast.stream.produce
import tidecast.stream.serve
from tidecast.monitors.metrics import Metrics
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.cli import COMMANDS, build_parser, main, reference
from tidecast.stream.config import EngineConfig, ServeConfig
from tidecast.stream.engine import Engine
from tidecast.stream.records import REASONS
from tidecast.stream.settings import SettingsError, SettingsFile, resolve, settings_of
from tidecast.stream.state import config_fingerprint

README = Path(__file__).resolve().parents[1] / "README.md"
REQUIRED = {"bootstrap_servers": "b:9092", "topic": "obs"}  # serve and produce need both
SECRET = "s3cret-Value-42"
HOUR = 3_600_000_000_000


@pytest.fixture
def clean_env(monkeypatch):
    """No TIDECAST_* variable of the machine leaks into a test."""
    import os

    for name in [n for n in os.environ if n.startswith("TIDECAST_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def captured(clean_env):
    """``serve`` and ``produce`` up to the point where they would connect: the config they would run with."""
    seen: dict[str, Any] = {}
    summary = {"sent": 0, "handed": 0, "interrupted": False, "topic": "", "elapsed_seconds": 0.0,
               "messages_per_second": None, "skipped_rows": 0}
    clean_env.setattr(tidecast.stream.serve, "run_serve", lambda config: seen.setdefault("serve", config) and 0)
    clean_env.setattr(tidecast.stream.produce, "run_produce",
                      lambda options: seen.setdefault("produce", options) and summary)
    return seen


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def hourly_csv(tmp_path: Path, n: int = 400) -> Path:
    """One series with a 24-step cycle and a little noise."""
    t = np.arange(n)
    y = 10 + 3 * np.sin(2 * np.pi * t / 24) + 0.1 * np.random.default_rng(0).normal(size=n)
    frame = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=n, freq="h"), "load": y})
    path = tmp_path / "hourly.csv"
    frame.to_csv(path, index=False)
    return path


def replay_summary(tmp_path: Path, *args: str) -> dict:
    summary = tmp_path / "summary.json"
    assert main(["replay", *args, "--summary-json", str(summary), "--no-progress",
                 "--dead-letter", str(tmp_path / "dead.jsonl")]) == 0
    return json.loads(summary.read_text())


# -- one declaration, three sources ----------------------------------------------------------------------------
def _sample(s) -> tuple[Any, Any, str | list[str]]:
    """A value unlike the default: (expected attribute, TOML value, command-line/environment text)."""
    special = {
        "freq": ("15min", "15min", "15min"),
        "models": (["sn=seasonal-naive", "holt-winters"], ["sn=seasonal-naive", "holt-winters"],
                   "sn=seasonal-naive,holt-winters"),
        "model_params": ({"seasonal-naive": {"period": 12}}, {"seasonal-naive": {"period": 12}},
                         "seasonal-naive.period=12"),
        "calibrator_params": ({"lr": 0.5}, {"lr": 0.5}, "lr=0.5"),
        "calibrator": ("aci", "aci", "aci"),
        "levels": ([80.0, 95.0], [80, 95], "80,95"),
        "drift_params": ({"h": 20.0}, {"h": 20.0}, "h=20"),
        "bootstrap_params": ({"threshold": 6.0}, {"threshold": 6.0}, "threshold=6"),
        "retrain_params": ({"min_fresh": 12}, {"min_fresh": 12}, "min_fresh=12"),
        **{key: (__file__, __file__, __file__)  # files that must exist
           for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile")},
    }
    if s.field in special:
        return special[s.field]
    if s.meta.choices:
        choice = next(c for c in s.meta.choices if c != s.default)
        return choice, choice, choice
    if s.type is bool:
        value = not s.default if s.default is not None else True
        return value, value, "true" if value else "false"
    if s.type is int:
        return 7, 7, "7"
    if s.type is float:
        return 0.5, 0.5, "0.5"
    if s.type is Path:
        return Path("/tmp/sample"), "/tmp/sample", "/tmp/sample"
    if s.type is str:
        return "sample", "sample", "sample"
    if s.type == list[str]:
        return ["a", "b"], ["a", "b"], "a,b"
    raise AssertionError(f"no sample for {s.field}: {s.type}")


def _argv(s, text: str) -> list[str]:
    if s.meta.positional:
        return [text]
    if s.type is bool:
        return [s.flag if text == "true" else f"--no-{s.flag[2:]}"]
    return [s.flag, text]


CASES = [(command, cls, s) for command, classes in COMMANDS.items() for cls in classes for s in settings_of(cls)]


@pytest.mark.parametrize("source", ["flag", "env", "file"])
@pytest.mark.parametrize(("command", "cls", "s"), CASES,
                         ids=[f"{command}-{s.name}" for command, _cls, s in CASES])
def test_every_setting_reads_the_same_from_a_flag_the_environment_and_the_file(command, cls, s, source):
    expected, toml_value, text = _sample(s)
    required = {k: v for k, v in REQUIRED.items() if any(x.field == k for x in settings_of(cls))}
    if s.field.startswith(("ssl_", "sasl_")):  # refused under PLAINTEXT, which uses neither
        required["security_protocol"] = "SASL_SSL"
    parser = build_parser()
    argv, env, file = [command], {}, {}
    if source == "flag":
        for name, value in required.items():
            argv += ["--" + name.replace("_", "-"), value]
        argv += _argv(s, text)
    elif source == "env":
        env = {f"TIDECAST_{k.upper()}": v for k, v in required.items()} | {s.env: text}
    else:
        file = required | {s.key: toml_value}
    resolved = resolve(cls, parser.parse_args(argv), env, SettingsFile(file))
    assert getattr(resolved, s.field) == expected
    assert expected != s.default


def test_engine_settings_are_the_same_declaration_in_replay_and_serve():
    parser = build_parser()
    for command in ("replay", "serve"):
        args = parser.parse_args([command, "--horizon", "6", "--model", "a=seasonal-naive", "--torch-threads", "2"])
        engine = resolve(EngineConfig, args, {})
        assert (engine.horizon, engine.models, engine.torch_threads) == (6, ["a=seasonal-naive"], 2)
    assert EngineConfig in COMMANDS["replay"] and EngineConfig in COMMANDS["serve"]


def test_resolved_configs_are_frozen(captured):
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t"]) == 0
    cfg = captured["serve"]
    for obj, name in ((cfg, "engine"), (cfg.engine, "horizon"), (cfg.settings, "topic")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)


def test_replay_takes_a_config_file_and_the_environment(tmp_path, clean_env):
    data = hourly_csv(tmp_path)
    config = write(tmp_path / "tidecast.toml", f"""
path = "{data}"
horizon = 12
model = ["seasonal-naive"]
[model_params.seasonal-naive]
period = 24
""")
    summary = replay_summary(tmp_path, "--config", str(config))
    assert summary["config"]["horizon"] == 12
    assert summary["config"]["model_params"] == {"seasonal-naive": {"period": 24}}
    assert summary["n_observations"] == 400
    clean_env.setenv("TIDECAST_HORIZON", "6")
    assert replay_summary(tmp_path, "--config", str(config))["config"]["horizon"] == 6  # environment over file


def test_model_parameters_merge_across_sources(captured, tmp_path, clean_env):
    config = write(tmp_path / "t.toml", "[model_params.seasonal-naive]\nmax_period = 100\nperiod = 12\n")
    clean_env.setenv("TIDECAST_MODEL_PARAM", "seasonal-naive.detect_after=300 seasonal-naive.period=48")
    assert main(["serve", "--config", str(config), "--bootstrap-servers", "b:1", "--topic", "t",
                 "--model-param", "seasonal-naive.period=24"]) == 0
    assert captured["serve"].engine.model_params == {
        "seasonal-naive": {"max_period": 100, "detect_after": 300, "period": 24}}  # file < environment < flag


def test_model_parameters_from_the_environment_are_whitespace_separated(captured, clean_env):
    clean_env.setenv("TIDECAST_MODEL_PARAM", "seasonal-naive.detect_after=300 seasonal-naive.period=48")
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t"]) == 0
    assert captured["serve"].engine.model_params == {"seasonal-naive": {"detect_after": 300, "period": 48}}


def test_the_environment_replacing_a_different_file_value_is_a_warning(captured, caplog, tmp_path, clean_env):
    """The image sets TIDECAST_METRICS_PORT and TIDECAST_STATE_DIR: a mounted file's port lost to them silently."""
    config = write(tmp_path / "t.toml", 'metrics_port = 9400\nstate_dir = "/data/tidecast"\n'
                   'sasl_plain_password = "pw-a"\n'
                   'security_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "PLAIN"\nsasl_plain_username = "u"\n')
    clean_env.setenv("TIDECAST_METRICS_PORT", "9108")
    clean_env.setenv("TIDECAST_STATE_DIR", "/data/tidecast")  # the same value: nothing to say
    clean_env.setenv("TIDECAST_SASL_PLAIN_PASSWORD", "pw-b")
    with caplog.at_level(logging.WARNING, logger="tidecast.stream.settings"):
        assert main(["serve", "--config", str(config), "--bootstrap-servers", "b:1", "--topic", "t"]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("TIDECAST_METRICS_PORT=9108 (environment) replaces metrics_port = 9400" in m for m in said)
    assert not any("STATE_DIR" in m for m in said)
    assert any("TIDECAST_SASL_PLAIN_PASSWORD" in m for m in said)
    assert not any("pw-" in m for m in said)  # secrets stay hidden
    assert captured["serve"].settings.metrics_port == 9108


# -- unknown and invalid settings -------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["serve", "produce", "replay"])
def test_an_unknown_file_key_is_an_error_naming_the_closest_valid_one(captured, tmp_path, capsys, command):
    config = write(tmp_path / "t.toml", 'bootstrap_server = "b:9092"\ntopic = "obs"\n')
    argv = [command, "--config", str(config)] + (["x.csv"] if command == "produce" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bootstrap_server'" in err and "did you mean 'bootstrap_servers'?" in err
    assert not captured


@pytest.mark.parametrize("command", ["serve", "produce", "replay"])  # one file serves all: replay accepted it
def test_an_unknown_kafka_table_key_is_an_error_naming_the_closest_valid_one(captured, tmp_path, capsys, command):
    config = write(tmp_path / "t.toml", 'bootstrap_servers = "b:9092"\ntopic = "obs"\n'
                                        '[kafka]\n"max.poll.records" = 50\nrequest_timeout_ms = 40000\n')
    assert main([command, "--config", str(config)] + (["x.csv"] if command != "serve" else [])) == 2
    err = capsys.readouterr().err
    assert "unknown key 'max.poll.records' in the [kafka] table" in err and "did you mean 'max_poll_records'?" in err
    assert not captured


def test_the_kafka_table_takes_any_kafka_python_client_setting(captured, tmp_path):
    config = write(tmp_path / "t.toml", 'bootstrap_servers = "b:9092"\ntopic = "obs"\n'
                                        '[kafka]\nrequest_timeout_ms = 40000\nfetch_min_bytes = 10\n')
    assert main(["serve", "--config", str(config)]) == 0
    assert captured["serve"].kafka_extra == {"request_timeout_ms": 40000, "fetch_min_bytes": 10}
    with pytest.raises(SettingsError, match="did you mean 'request_timeout_ms'"):
        ServeConfig(REQUIRED, kafka_extra={"request_timeout": 1})


@pytest.mark.parametrize(("table", "says"), [
    # a tidecast setting in [kafka] went to the client after the flag's and the environment's value
    ('bootstrap_servers = "table:9092"', "set it as bootstrap_servers at the top of the file, --bootstrap-servers"),
    ('security_protocol = "PLAINTEXT"', "TIDECAST_SECURITY_PROTOCOL"),
    ('client_id = "x"', "--client-id"),
    ("max_poll_records = 7", "--max-poll-records"),
    ('group_id = "g"', "--group-id"),
    # kafka-python keys tidecast fixes on its clients: a value there was dropped without a word
    ("acks = 1", "tidecast sets it on its clients itself: every send waits for all in-sync replicas"),
    ("enable_auto_commit = true", "at-least-once"),
])
def test_the_kafka_table_refuses_what_tidecast_sets_itself(captured, tmp_path, capsys, table, says):
    config = write(tmp_path / "t.toml", f'bootstrap_servers = "b:9092"\ntopic = "obs"\n[kafka]\n{table}\n')
    assert main(["serve", "--config", str(config), "--bootstrap-servers", "flag:9092"]) == 2
    assert says in capsys.readouterr().err
    assert not captured


def test_one_file_serves_every_command(captured, tmp_path):
    """The deployment's file holds serve and engine keys; produce reads its own and accepts the others."""
    config = write(tmp_path / "t.toml", 'bootstrap_servers = "b:9092"\ntopic = "obs"\ngroup_id = "g"\n'
                                        'model = ["seasonal-naive"]\nhorizon = 12\nstate_dir = "/tmp/x"\n')
    assert main(["produce", "history.csv", "--config", str(config), "--rate", "10"]) == 0
    options = captured["produce"]
    assert (options.bootstrap_servers, options.topic, options.rate) == ("b:9092", "obs", 10.0)
    assert options.spec.path == Path("history.csv")


def test_unknown_tidecast_environment_variables_are_a_warning(captured, caplog, clean_env):
    clean_env.setenv("TIDECAST_METRICS_SERVICE_HOST", "10.0.0.7")  # what Kubernetes injects for a service
    clean_env.setenv("TIDECAST_HORIZN", "12")
    with caplog.at_level(logging.WARNING, logger="tidecast.stream.settings"):
        assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t"]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "TIDECAST_METRICS_SERVICE_HOST" in warning and "TIDECAST_HORIZN (did you mean TIDECAST_HORIZON?)" in warning
    assert "10.0.0.7" not in warning
    assert captured["serve"].engine.horizon == 24  # the misspelt variable did nothing


@pytest.mark.parametrize(("argv", "env", "file", "says"), [
    (["--log-level", "LOUD"], {}, "", "--log-level LOUD: not one of DEBUG, INFO"),
    ([], {"TIDECAST_LOG_LEVEL": "LOUD"}, "", "TIDECAST_LOG_LEVEL=LOUD (environment): not one of"),
    ([], {}, 'log_level = "LOUD"', "log_level = LOUD in "),
    (["--max-poll-records", "many"], {}, "", "--max-poll-records many: not a whole number"),
    ([], {}, "checkpoint_interval = -1", "checkpoint_interval = -1 in "),
    (["--horizon", "0"], {}, "", "--horizon 0: must be at least 1"),
    ([], {"TIDECAST_ALPHA": "1.5"}, "", "TIDECAST_ALPHA=1.5 (environment): must be in (0, 1)"),
    ([], {}, "create_topics = 3", "create_topics = 3 in "),
    # inf passed ">= 0" and ended in an OverflowError where a timeout becomes milliseconds
    (["--broker-outage-budget", "inf"], {}, "", "--broker-outage-budget inf: must be a finite number"),
    (["--torch-threads", "99999999999"], {}, "", "--torch-threads 99999999999: must be at most 1024"),
    # an unknown model named the flag whatever its source
    ([], {"TIDECAST_MODEL": "seasonl-naive"}, "", "TIDECAST_MODEL=seasonl-naive (environment): "),
    ([], {}, 'model = ["seasonl-naive"]', "model = seasonl-naive in "),
    # an empty path was the working directory, blamed on the flag
    ([], {"TIDECAST_STATE_DIR": ""}, "", "TIDECAST_STATE_DIR= (environment): an empty path"),
])
def test_invalid_values_are_errors_naming_the_setting_and_where_it_came_from(captured, tmp_path, capsys, clean_env,
                                                                              argv, env, file, says):
    for name, value in env.items():
        clean_env.setenv(name, value)
    config = write(tmp_path / "t.toml", file + "\n")
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--config", str(config), *argv]) == 2
    assert says in capsys.readouterr().err
    assert not captured


@pytest.mark.parametrize(("env", "says"), [
    ({"TIDECAST_TOPIC": ""}, "topic is required (--topic"),  # was accepted: topics named -forecasts, -events
    ({"TIDECAST_TOPIC": "  "}, "topic is required (--topic"),
    ({"TIDECAST_BOOTSTRAP_SERVERS": ""}, "TIDECAST_BOOTSTRAP_SERVERS= (environment): names no server"),  # a traceback
    ({"TIDECAST_BOOTSTRAP_SERVERS": " , "}, "names no server"),
    ({"TIDECAST_ALLOWED_SERIES": ""}, "names no series"),  # was: every series dead-lettered as unknown
    ({"TIDECAST_FREQ": ""}, "TIDECAST_FREQ= (environment): not a time step"),  # was: "must be positive"
])
def test_an_empty_required_setting_or_series_list_is_refused(captured, capsys, monkeypatch, env, says):
    monkeypatch.setenv("TIDECAST_BOOTSTRAP_SERVERS", "b:9092")
    monkeypatch.setenv("TIDECAST_TOPIC", "obs")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 2
    assert says in capsys.readouterr().err
    assert not captured


def test_a_config_file_that_cannot_be_used_is_one_clear_line(captured, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TIDECAST_CONFIG", "")  # read the directory '.' ("[Errno 21] Is a directory")
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t"]) == 2
    assert "error: the config file's path is empty (--config, TIDECAST_CONFIG)" in capsys.readouterr().err
    monkeypatch.delenv("TIDECAST_CONFIG")
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--config", str(tmp_path / "no.toml")]) == 2
    assert f"config file {tmp_path / 'no.toml'}: No such file or directory" in capsys.readouterr().err
    twice = write(tmp_path / "t.toml", "max-gap = 3\nmax_gap = 4\n")  # one of the two won without a word
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--config", str(twice)]) == 2
    assert "a key is given twice, with '-' and with '_' (max-gap)" in capsys.readouterr().err
    table = write(tmp_path / "table.toml", "[horizon]\na = 1\n")  # was "int() argument must be a string, ..."
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--config", str(table)]) == 2
    err = capsys.readouterr().err
    assert 'horizon = {"a": 1} in ' in err and "expected a whole number, got a table" in err
    bad = write(tmp_path / "bad.toml", "horizon = [\n")
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert not captured


def test_serve_refuses_a_series_state_larger_than_a_changelog_record(captured, capsys):
    """Blocks never split a series: at H = 1000 two lanes' state (~20 MB a series) failed the first checkpoint
    against the default 16 MiB --max-request-size, and serve exited at every restart."""
    lanes = ["--horizon", "1000", "--model", "a=seasonal-naive", "--model", "b=seasonal-naive"]
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", *lanes]) == 2
    err = capsys.readouterr().err
    assert "one series' state takes" in err and "horizon 1000, 2 lane(s)" in err
    assert "raise --max-request-size to at least" in err and not captured
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", *lanes, "--max-request-size", "33554432"]) == 0
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--horizon", "1000"]) == 0  # one lane fits


def test_missing_required_settings_say_how_to_set_them(captured, capsys):
    assert main(["produce", "x.csv", "--bootstrap-servers", "b:1"]) == 2
    assert "topic is required (--topic, TIDECAST_TOPIC or topic in the config file)" in capsys.readouterr().err
    assert main(["produce", "--bootstrap-servers", "b:1", "--topic", "t"]) == 2
    assert "PATH is required" in capsys.readouterr().err


def test_a_mapping_of_settings_is_checked_like_a_file():
    with pytest.raises(SettingsError, match="unknown setting 'topc'; did you mean 'topic'"):
        ServeConfig({"bootstrap_servers": "b:1", "topc": "t"})
    with pytest.raises(SettingsError, match="checkpoint_records"):
        ServeConfig(REQUIRED | {"checkpoint_records": "often"})


def test_secrets_are_never_printed(captured, tmp_path, capsys, caplog, clean_env):
    from kafka import KafkaConsumer

    from tidecast.stream.kafka import client_settings

    clean_env.setenv("TIDECAST_SASL_PLAIN_PASSWORD", SECRET)
    clean_env.setenv("TIDECAST_SSL_PASSWORD", SECRET)
    clean_env.setenv("TIDECAST_SECURITY_PROTOCOL", "SASL_SSL")
    with caplog.at_level(logging.DEBUG):
        assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--sasl-plain-username", "u"]) == 0
    cfg = captured["serve"]
    assert client_settings(cfg.options, KafkaConsumer)["sasl_plain_password"] == SECRET  # the client gets it
    for text in (repr(cfg), str(cfg), repr(cfg.settings), repr(cfg.options), caplog.text):
        assert SECRET not in text
    assert "<hidden>" in repr(cfg.options)

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert SECRET not in capsys.readouterr().out
    clean_env.delenv("TIDECAST_SASL_PLAIN_PASSWORD")
    config = write(tmp_path / "t.toml", f'sasl_plain_password = ["{SECRET}"]\n')  # a value that fails to parse
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sasl_plain_password = <hidden>" in err and SECRET not in err


def test_produce_takes_rate_or_speed_not_both(captured, capsys, tmp_path):
    assert main(["produce", "x.csv", "--bootstrap-servers", "b:1", "--topic", "t", "--rate", "5", "--speed", "2"]) == 2
    assert "give --rate or --speed, not both" in capsys.readouterr().err
    config = write(tmp_path / "t.toml", "rate = 200\n")  # another source's pace: the flag overrides it
    assert main(["produce", "x.csv", "--bootstrap-servers", "b:1", "--topic", "t", "--config", str(config),
                 "--speed", "2"]) == 0
    assert (captured["produce"].rate, captured["produce"].speed) == (None, 2.0)


# -- lanes and aliases ------------------------------------------------------------------------------------------
def test_lane_aliases_name_records_metric_labels_state_and_the_fingerprint():
    cfg = EngineConfig(horizon=2, freq="1h", models=["sn4=seasonal-naive", "sn2=seasonal-naive"],
                       model_params={"sn4": {"period": 4}, "sn2": {"period": 2}})
    metrics = Metrics(reasons=REASONS)
    engine = Engine.from_config(cfg, metrics)
    n = 40
    values = np.tile([1.0, 5.0, 2.0, 8.0], n // 4)
    result = engine.process(ObservationBatch(np.array(["s"] * n, dtype=object), np.arange(n) * HOUR, values))
    frame = result.forecasts.to_frame()
    assert set(frame["model"]) == {"sn4", "sn2"}
    last = frame[frame["issued_at"] == frame["issued_at"].max()].set_index(["model", "h"])["mean"]
    assert [last[("sn4", 1)], last[("sn4", 2)]] == [1.0, 5.0]  # the period-4 lane repeats the cycle
    assert [last[("sn2", 1)], last[("sn2", 2)]] == [2.0, 8.0]  # the period-2 lane repeats the last two
    sample = metrics.registry.get_sample_value
    for alias in ("sn4", "sn2"):
        assert sample("tidecast_forecasts_total", {"model": alias}) == (frame["model"] == alias).sum() > 0
    _meta, arrays = engine.export_series(["s"])
    assert {key.split("/")[0] for key in arrays} == {"engine", "sn4", "sn2"}
    fingerprint = config_fingerprint(cfg.to_dict())
    assert fingerprint["models"] == ["sn4=seasonal-naive", "sn2=seasonal-naive"]
    assert fingerprint["model_params"] == {"sn4": {"period": 4}, "sn2": {"period": 2}}
    renamed = EngineConfig(horizon=2, freq="1h", models=["a=seasonal-naive", "sn2=seasonal-naive"],
                           model_params={"a": {"period": 4}, "sn2": {"period": 2}})
    assert config_fingerprint(renamed.to_dict()) != fingerprint
    bare = EngineConfig(models=["seasonal-naive=seasonal-naive"])
    assert bare.models == ["seasonal-naive"] and bare.lanes == [("seasonal-naive", "seasonal-naive")]


def test_replay_compares_two_configurations_of_one_model_by_alias(tmp_path, clean_env):
    data, out = hourly_csv(tmp_path), tmp_path / "forecasts.csv"
    summary = replay_summary(tmp_path, str(data), "--horizon", "3", "--out", str(out),
                             "--model", "sn24=seasonal-naive", "--model", "sn12=seasonal-naive,holt-winters",
                             "--model-param", "sn24.period=24", "--model-param", "sn12.period=12",
                             "--model-param", "holt-winters.period=24", "--model-param", "holt-winters.warmup=48")
    assert list(summary["models"]) == ["sn24", "sn12", "holt-winters"]
    assert set(pd.read_csv(out)["model"]) == {"sn24", "sn12", "holt-winters"}
    assert summary["models"]["sn24"]["mae"] < summary["models"]["sn12"]["mae"]  # the true cycle is 24


@pytest.mark.parametrize("models", [["seasonal-naive", "seasonal-naive"], ["a=seasonal-naive,a=holt-winters"]])
def test_two_lanes_with_one_alias_are_an_error(captured, capsys, models):
    argv = ["serve", "--bootstrap-servers", "b:1", "--topic", "t"]
    for spec in models:
        argv += ["--model", spec]
    assert main(argv) == 2
    assert "two lanes are named" in capsys.readouterr().err
    assert not captured


@pytest.mark.parametrize(("param", "says"), [
    ("sn48.period=48", "model parameters for 'sn48', which is no lane; the lanes are: sn24 (seasonal-naive)"),
    ("sn24.bogus=1", "sn24.bogus: seasonal-naive has no parameter 'bogus'; valid: period, max_period, detect_after"),
    ("sn24.period=abc", "model parameter sn24.period = 'abc': expected int or None (null in JSON and "
                        "--model-param; leave the key out in TOML)"),
    ("sn24.period=2.5", "model parameter sn24.period = 2.5"),
    ("sn24period=2", "'sn24period=2' is not NAME.KEY=VALUE"),
])
def test_bad_model_parameters_fail_before_any_work(tmp_path, capsys, clean_env, param, says):
    out, dead = tmp_path / "out.csv", tmp_path / "dead.jsonl"
    assert main(["replay", str(hourly_csv(tmp_path)), "--model", "sn24=seasonal-naive", "--model-param", param,
                 "--out", str(out), "--dead-letter", str(dead), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert says in err and "--model-param" in err
    if "=" in param and "." in param.split("=")[0]:  # the three places it may have come from are named
        assert "TIDECAST_MODEL_PARAM" in err
    assert not out.exists() and not dead.exists()


def test_bad_calibrator_parameters_fail_before_any_work(captured, capsys):
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--calibrator", "aci",
                 "--calibrator-param", "gama=0.01"]) == 2
    assert "calibrator parameter gama: aci has no parameter 'gama'; valid: gamma" in capsys.readouterr().err
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", "--calibrator", "aci",
                 "--calibrator-param", "gamma=0.01"]) == 0
    assert captured["serve"].engine.calibrator_params == {"gamma": 0.01}


@pytest.mark.parametrize(("args", "says"), [
    (["--calibrator-param", "lr=-1"], "lr = -1.0: a finite learning rate > 0 (from --calibrator-param or "
                                      "[calibrator_params])"),
    (["--drift-param", "k=-1"], "k = -1.0: a number in [0, inf) (from --drift-param or [drift_params])"),
    (["--model", "cyclenet", "--model-param", "cyclenet.lookback=0"],
     "lane 'cyclenet' (cyclenet): lookback = 0: a whole number >= 2 (from --model-param"),
    (["--model", "cyclenet", "--model-param", "cyclenet.bootstrap=4", "--bootstrap-param", "threshold=0"],
     "threshold = 0.0: a number > 0 (from --bootstrap-param or [bootstrap_params])"),
    # with no lane running replicas too (it passed until a file turned replicas on)
    (["--bootstrap-param", "slack=-1"], "slack = -1.0: a number in [0, inf) (from --bootstrap-param"),
    (["--retrain-param", 'triggers="cusum"'], "triggers = 'cusum': a list of detector names"),
    (["--retrain-param", "cooldown_steps=4"], "retrain parameter cooldown_steps: no such parameter; valid: "),
])
def test_values_a_part_refuses_fail_serve_before_it_connects(captured, capsys, args, says):
    """``serve`` builds its engine only once it has joined the group: the settings check builds the parts once
    beforehand, so a misconfigured deployment exits with the reason instead of crash-looping after it connects."""
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t", *args]) == 2
    assert says in capsys.readouterr().err
    assert not captured  # never got as far as connecting


def test_unknown_models_and_odd_aliases_are_errors():
    with pytest.raises(SettingsError, match="unknown model 'nope'"):
        EngineConfig(models=["x=nope"])
    with pytest.raises(SettingsError, match="lane alias 'a/b'"):  # '/' separates state keys
        EngineConfig(models=["a/b=seasonal-naive"])


# -- version and reference --------------------------------------------------------------------------------------
def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"tidecast {tidecast.__version__}\n"


def test_readme_configuration_reference_matches_the_declarations():
    text = README.read_text()
    begin, end = "<!-- settings-reference: begin -->\n", "<!-- settings-reference: end -->"
    documented = text[text.index(begin) + len(begin):text.index(end)]
    assert documented == reference(), (
        "README's configuration reference is stale; regenerate it with "
        ".venv/bin/python -c \"from tidecast.stream.cli import reference; print(reference())\"")


@pytest.mark.parametrize(("argv", "says"), [
    (["--rate", "inf"], "--rate inf: must be a finite positive number"),  # OverflowError in the pacing
    (["--linger", "inf"], "--linger inf: must be a finite number"),  # OverflowError in time.sleep, after the run
    (["--config", ""], "the config file's path is empty"),  # was "config file .: Is a directory"
])
def test_replay_refuses_unusable_values_before_any_work(tmp_path, capsys, clean_env, argv, says):
    assert main(["replay", str(hourly_csv(tmp_path)), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys, clean_env):
    config = tmp_path / "notepad.toml"
    config.write_bytes('horizon = 12\n'.encode("utf-16"))
    assert main(["replay", str(hourly_csv(tmp_path)), "--config", str(config)]) == 2
    assert f"{config}: not valid TOML: not UTF-8 text" in capsys.readouterr().err


def test_a_contradicting_alpha_and_level_are_both_named(captured, capsys, clean_env):
    clean_env.setenv("TIDECAST_ALPHA", "0.2")
    clean_env.setenv("TIDECAST_LEVEL", "90")
    assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t"]) == 2
    err = capsys.readouterr().err
    assert "alpha 0.2 is the one-level shorthand of level 80" in err and "TIDECAST_ALPHA" in err


def test_a_misspelt_port_variable_is_a_typo_unless_it_holds_a_service_url(captured, caplog, clean_env):
    clean_env.setenv("TIDECAST_METRIC_PORT", "9400")
    clean_env.setenv("TIDECAST_CACHE_PORT", "tcp://10.0.0.11:6379")  # Kubernetes' link to a service tidecast-cache
    with caplog.at_level(logging.WARNING, logger="tidecast.stream.settings"):
        assert main(["serve", "--bootstrap-servers", "b:1", "--topic", "t"]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "TIDECAST_METRIC_PORT (did you mean TIDECAST_METRICS_PORT?)" in warning
    assert "TIDECAST_CACHE_PORT (a Kubernetes service link?)" in warning


def test_lingering_names_the_port_metrics_are_served_on(tmp_path, capsys, clean_env):
    assert main(["replay", str(hourly_csv(tmp_path, 120)), "--no-progress", "--metrics-port", "0",
                 "--metrics-address", "127.0.0.1", "--linger", "0.1", "--horizon", "4"]) == 0
    out = capsys.readouterr().out
    first = out.split("metrics on ", 1)[1].split()[0]
    assert first.endswith(":" + first.rsplit(":", 1)[1]) and ":0/" not in first
    assert f"serving /metrics on {first} for" in out


@pytest.mark.parametrize(("args", "says"), [
    (["--columns", ""], "--columns : names no channel"),  # read as "every channel"
    (["--name", ""], "--name : must not be empty"),  # read as "the file stem"
    (["--model-param", "seasonal-naive.period=24", "--model-param", "seasonal-naive.period=48"],
     "model parameter seasonal-naive.period is given twice: 24 and 48"),  # the last one won without a word
    (["--calibrator-param", "lr=0.1", "--calibrator-param", "lr=0.2"], "calibrator parameter lr is given twice"),
])
def test_values_that_would_be_read_as_something_else_are_refused(tmp_path, capsys, args, says):
    """Found by the settings review (2026-12-04)."""
    data = hourly_csv(tmp_path)
    assert main(["replay", str(data), *args, "--no-progress", "--dead-letter", str(tmp_path / "d.jsonl")]) == 2
    assert says in " ".join(capsys.readouterr().err.split())
