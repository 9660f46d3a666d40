"""A real Prometheus server scrapes a running ``tidecast serve``; promtool lints the exposition."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.prometheus]

EXPECTED = (
    "tidecast_observations_total", "tidecast_forecasts_total", "tidecast_dead_letters_total",
    "tidecast_consumer_lag", "tidecast_consumer_records_per_second", "tidecast_checkpoint_seconds_bucket",
    "tidecast_rebalances_total", "tidecast_state_restored_series_total",
    "tidecast_last_checkpoint_timestamp_seconds", "tidecast_checkpoint_deadline_seconds",
    "tidecast_drift_alarms_total", "tidecast_series_drifting",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, **params: str) -> dict | None:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def test_prometheus_scrapes_serve_and_promtool_accepts_the_exposition(
        kafka, unique, serve, tmp_path, as_messages, prometheus_bin, promtool_bin, waiter):
    topic = unique("prom")
    kafka.create_topic(topic, 2)
    # four days of four series; prom/0 jumps by 100 on the fourth day: a drift alarm
    kafka.send(topic, as_messages([(f"prom/{s}", f"2023-01-{1 + h // 24:02d}T{h % 24:02d}:00:00Z",
                                    float(h + s + (100 if s == 0 and h >= 72 else 0)))
                                   for h in range(96) for s in range(4)]))
    proc = serve(topic, unique("g"), tmp_path / "state", "--checkpoint-interval", "0.5",
                 "--model-param", "seasonal-naive.period=24")
    proc.wait_value("tidecast_observations_total", lambda v: v == 384, 60)
    proc.wait_value("tidecast_checkpoint_seconds_count", lambda v: v > 0, 10)

    lint = subprocess.run([promtool_bin, "check", "metrics"], input=proc.metrics_text().encode(),
                          capture_output=True, timeout=30)
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()

    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tidecast\n"
                      f"    static_configs:\n      - targets: ['127.0.0.1:{proc.metrics_port}']\n")
    with (tmp_path / "prometheus.log").open("wb") as log:
        args = [f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}"]
        server = subprocess.Popen([prometheus_bin, *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        def scraped() -> set[str] | None:
            answer = _api(port, "/api/v1/series", **{"match[]": '{__name__=~"tidecast_.*"}'})
            names = {s["__name__"] for s in answer["data"]} if answer and answer.get("status") == "success" else set()
            return names if set(EXPECTED) <= names else None

        waiter(scraped, 30, "Prometheus to have scraped every tidecast series")
        lag = _api(port, "/api/v1/query", query="tidecast_consumer_lag")["data"]["result"]
        assert sorted(r["metric"]["partition"] for r in lag) == ["0", "1"]
        observed = _api(port, "/api/v1/query", query="tidecast_observations_total")["data"]["result"]
        assert float(observed[0]["value"][1]) == 384
        alarms = _api(port, "/api/v1/query", query="tidecast_drift_alarms_total")["data"]["result"]
        assert [(r["metric"]["model"], r["metric"]["detector"]) for r in alarms] == [("seasonal-naive", "cusum")]
        assert float(alarms[0]["value"][1]) >= 1
        drifting = _api(port, "/api/v1/query", query="tidecast_series_drifting")["data"]["result"]
        assert float(drifting[0]["value"][1]) >= 1
        up = _api(port, "/api/v1/query", query='up{job="tidecast"}')["data"]["result"]
        assert up[0]["value"][1] == "1"
    finally:
        server.terminate()
        server.wait(15)
    assert proc.terminate()[0] == 0
    events = [json.loads(m.value) for m in kafka.read_all(f"{topic}-events", min_count=1)]
    assert any(e["series_id"] == "prom/0" and e["detected_at"] >= "2023-01-04T00:00:00Z" for e in events)
