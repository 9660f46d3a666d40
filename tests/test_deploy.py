"""Static checks of deploy/: Prometheus config and alert rules (with promtool), the Grafana dashboard, docker
compose, Kubernetes manifests and the Dockerfile. Fast and offline: nothing is built, started or pulled.

Every metric an alert or a dashboard panel queries must exist in :class:`tidecast.monitors.metrics.Metrics`, so a
renamed metric breaks this test instead of silently emptying a panel or muting an alert.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from tidecast.monitors.metrics import Metrics
from tidecast.stream.config import ServeSettings

try:
    import yaml
except ImportError:  # pragma: no cover - the test extra should provide it
    yaml = None

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"
DASHBOARD = GRAFANA / "dashboards" / "tidecast.json"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

METRICS_PORT = 9108
STATE_DIR = "/var/lib/tidecast"
# Labels Prometheus or the scrape config add, plus the histogram bucket label.
TARGET_LABELS = {"job", "instance", "pod", "namespace", "le"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
_METRIC_RE = re.compile(r"\btidecast_[a-zA-Z0-9_]+")
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


# ------------------------------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    if yaml is None:
        pytest.fail("PyYAML is not installed: add 'pyyaml' to the test extra in pyproject.toml")
    return yaml.safe_load(path.read_text())


def load_yaml_all(text: str) -> list[Any]:
    if yaml is None:
        pytest.fail("PyYAML is not installed: add 'pyyaml' to the test extra in pyproject.toml")
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


@pytest.fixture(scope="module")
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:  # a real dependency of the suite (make services installs it): fail, never skip
        pytest.fail("promtool not found: install Debian's 'prometheus' package (make services)")
    return exe


def run_promtool(promtool: str, *args: str) -> str:
    proc = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


@pytest.fixture(scope="module")
def known() -> tuple[set[str], set[str], set[str]]:
    """(queryable series names, metric family names, label names) of tidecast's Metrics registry."""
    metrics = Metrics()
    series: set[str] = set()
    families: set[str] = set()
    for family in metrics.registry.collect():
        families.add(family.name)
        series.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    families |= {name for name in series if name.endswith("_total")}
    labels = set(TARGET_LABELS)
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels.update(value._labelnames)
    return series, families, labels


def metric_names(text: str) -> set[str]:
    return set(_METRIC_RE.findall(text))


def label_names(expr: str) -> set[str]:
    names = {m.group(1) for m in _MATCHER_RE.finditer(expr)}
    for group in _GROUPING_RE.findall(expr):
        names.update(part.strip() for part in group.split(",") if part.strip())
    return names


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROM / "alerts.yml")["groups"] for rule in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    return {path.name: load_yaml_all(path.read_text()) for path in sorted(K8S.glob("*.yaml"))}


def k8s_kind(kind: str) -> dict[str, Any]:
    found = [doc for docs in k8s_docs().values() for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a continuation line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def docker_context() -> list[str]:
    """The repository's files that deploy/Dockerfile.dockerignore lets into the build context: the last pattern that
    matches a path or a folder above it decides (``!`` lets it in), as BuildKit reads the file."""
    patterns = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()

    def let_in(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/")
            bodies = [body, body[3:]] if body.startswith("**/") else [body]
            if any(fnmatch.fnmatchcase(p, b) for p in prefixes for b in bodies):
                verdict = negated
        return verdict

    return [f for f in files if let_in(f)]


# ---------------------------------------------------------------------------------------------- prometheus


def test_promtool_check_config(promtool: str) -> None:
    out = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert "1 rule files found" in out  # the config really loads alerts.yml


def test_promtool_check_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", "alerts.yml")


def test_promtool_unit_tests(promtool: str) -> None:
    out = run_promtool(promtool, "test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out


def test_prometheus_scrapes_tidecast_job_on_metrics_port() -> None:
    config = load_yaml(PROM / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "tidecast" in jobs, "TidecastDown selects up{job=\"tidecast\"}"
    assert config["rule_files"] == ["alerts.yml"]
    sd = jobs["tidecast"]["dns_sd_configs"][0]
    assert sd["names"] == ["tidecast"] and sd["port"] == METRICS_PORT


def test_alert_rules_are_operator_ready() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert len(rules) >= 8
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Tidecast[A-Z][A-Za-z]+", name), name
        assert duration_seconds(rule["for"]) > 0, f"{name}: needs a for: duration"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert len(annotations["description"]) > 150, f"{name}: description should say what to check"
        assert "Check" in annotations["description"], f"{name}: description should say what to check"


def test_every_alert_is_in_the_deploy_readme_table() -> None:
    table = {m.group(1) for m in re.finditer(r"^\| `(Tidecast\w+)` \|", (DEPLOY / "README.md").read_text(), re.M)}
    assert {rule["alert"] for rule in alert_rules()} == table


def test_every_metric_the_code_registers_is_documented_in_the_readme() -> None:
    """An operator reads the README's metric tables to build dashboards: no metric may be missing from them."""
    readme = (ROOT / "README.md").read_text()
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert re.search(rf"`{name}(\{{[^`]*\}})?`", readme), f"{name} ({family.type}) is not in README's metric tables"


def test_required_alerts_and_thresholds() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    coverage = rules["TidecastCoverageBelowTarget"]
    assert "tidecast_interval_target_coverage_ratio - 0.05" in coverage["expr"]  # relative to the configured target
    assert "0.85" not in coverage["expr"]
    assert duration_seconds(coverage["for"]) == 30 * 60
    by_metric = {metric: [n for n, r in rules.items() if metric in r["expr"]] for metric in (
        "tidecast_consumer_lag", "tidecast_dead_letters_total", "tidecast_observations_total",
        "tidecast_last_checkpoint_timestamp_seconds", "tidecast_processing_seconds_bucket",
        "tidecast_rebalances_total", "tidecast_series_drifting")}
    assert all(by_metric.values()), f"an operator alert is missing: {by_metric}"
    assert "time()" in rules["TidecastCheckpointStale"]["expr"]
    assert "histogram_quantile(0.99" in rules["TidecastSlowProcessing"]["expr"]
    no_obs = rules["TidecastNoObservations"]["expr"]
    assert "tidecast_observations_total" in no_obs and "tidecast_consumer_lag" in no_obs


def test_poison_pill_and_outage_alerts_and_panels() -> None:
    """serve's refusals and outages each page or ticket someone, and the dashboard shows them."""
    rules = {rule["alert"]: rule for rule in alert_rules()}
    wanted = {"TidecastWrongPartition": 'tidecast_dead_letters_total{reason="wrong_partition"}',
              "TidecastProcessingErrors": "tidecast_processing_errors_total",
              "TidecastBrokerUnreachable": "tidecast_broker_up",
              "TidecastOffsetReset": "tidecast_consumer_offset_resets_total",
              "TidecastStateSkipped": "tidecast_state_skipped_total"}
    for name, metric in wanted.items():
        assert metric in rules[name]["expr"], name
    assert rules["TidecastProcessingErrors"]["labels"]["severity"] == "critical"  # always a bug
    assert "--partitioner" in rules["TidecastWrongPartition"]["annotations"]["description"]
    dashboard = json.loads(DASHBOARD.read_text())
    queried = " ".join(t["expr"] for p in dashboard_panels(dashboard["panels"]) for t in p.get("targets", []))
    for metric in ('reason="wrong_partition"', 'reason="processing_error"', "tidecast_processing_errors_total",
                   "tidecast_broker_up", "tidecast_consumer_offset_resets_total", "tidecast_state_skipped_total"):
        assert metric in queried, f"no dashboard panel queries {metric}"


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    tests = load_yaml(PROM / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts without a firing test case"
    assert names - quiet == set(), "alerts without a non-firing test case"
    assert (firing | quiet) - names == set(), "tests for alerts that do not exist"


def test_alerts_use_only_known_metrics_and_labels(known: tuple[set[str], set[str], set[str]]) -> None:
    series, families, labels = known
    for rule in alert_rules():
        expr = rule["expr"]
        used = metric_names(expr)
        assert used or 'job="tidecast"' in expr, f"{rule['alert']}: queries nothing of tidecast's"
        assert used <= series, f"{rule['alert']}: unknown metrics {sorted(used - series)}"
        assert label_names(expr) <= labels, f"{rule['alert']}: unknown labels {sorted(label_names(expr) - labels)}"
        for text in rule["annotations"].values():
            mentioned = metric_names(text)
            assert mentioned <= series | families, f"{rule['alert']}: mentions {sorted(mentioned - series - families)}"


def test_prometheusrule_is_a_copy_of_alerts_yml() -> None:
    rule = k8s_kind("PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(PROM / "alerts.yml")["groups"], (
        "deploy/k8s/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml; regenerate it (see its header)")


# ------------------------------------------------------------------------------------------------- grafana


def test_dashboard_panels_query_known_metrics(known: tuple[set[str], set[str], set[str]]) -> None:
    series, _, labels = known
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard_panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in dashboard_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    queried: set[str] = set()
    for panel in panels:
        assert panel["title"] and {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = metric_names(target["expr"])
            assert used, f"panel {panel['title']!r}: query uses no tidecast metric"
            assert used <= series, f"panel {panel['title']!r}: unknown metrics {sorted(used - series)}"
            assert label_names(target["expr"]) <= labels, f"panel {panel['title']!r}: unknown labels"
            queried |= used
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used = metric_names(variable["definition"])
            assert used and used <= series, f"variable {variable['name']}: {sorted(used - series)}"
    needed = {
        "tidecast_observations_total", "tidecast_forecasts_total", "tidecast_interval_coverage_ratio",
        "tidecast_interval_width", "tidecast_dead_letters_total", "tidecast_consumer_lag",
        "tidecast_last_checkpoint_timestamp_seconds", "tidecast_processing_seconds_bucket",
        "tidecast_rebalances_total", "tidecast_consumer_records_per_second", "tidecast_checkpoint_seconds_bucket",
        "tidecast_series_drifting", "tidecast_drift_alarms_total", "tidecast_bootstrap_spread_ratio",
    }
    assert needed <= queried, f"dashboard lacks panels for {sorted(needed - queried)}"


def test_every_dashboard_query_follows_the_instance_variable() -> None:
    """A panel that ignores ``$instance`` shows the whole fleet while the operator looks at one member."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert any(v["name"] == "instance" for v in dashboard["templating"]["list"])
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            for metric, selector in re.findall(r"(tidecast_\w+)(\{[^}]*\})?", target["expr"]):
                assert 'instance=~"$instance"' in selector, f"panel {panel['title']!r}: {metric} ignores $instance"


def test_dashboard_panels_do_not_overlap() -> None:
    """Overlapping panels are pushed down by Grafana, breaking the side-by-side layout."""
    panels = list(dashboard_panels(json.loads(DASHBOARD.read_text())["panels"]))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"panels {other!r} and {panel['title']!r} overlap at {(x, y)}"


def test_grafana_provisioning_matches_dashboard_and_compose() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    (prometheus,) = [ds for ds in datasources if ds["type"] == "prometheus"]
    dashboard = json.loads(DASHBOARD.read_text())
    (ds_var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == prometheus["uid"]
    assert prometheus["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "tidecast.yml")["providers"]
    mounts = dict(volume.split(":")[:2] for volume in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# ------------------------------------------------------------------------------------------------- compose


def test_compose_stack() -> None:
    services = compose()["services"]
    assert {"kafka", "kafka-init", "tidecast", "produce", "prometheus", "grafana"} <= services.keys()
    assert not any("zookeeper" in name or "zookeeper" in str(s.get("image", "")) for name, s in services.items())
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"] and "broker" in kafka_env["KAFKA_PROCESS_ROLES"]
    assert services["kafka"]["image"].startswith(("apache/kafka:", "bitnami/kafka:"))

    tidecast = services["tidecast"]
    env = tidecast["environment"]
    assert tidecast["deploy"]["replicas"] >= 2
    assert duration_seconds(tidecast["stop_grace_period"]) >= 15
    assert "container_name" not in tidecast and "ports" not in tidecast, "replicas would collide"
    assert int(env["TIDECAST_METRICS_PORT"]) == METRICS_PORT and env["TIDECAST_STATE_DIR"] == STATE_DIR
    assert (DEPLOY / tidecast["build"]["context"] / tidecast["build"]["dockerfile"]).resolve() == DOCKERFILE
    check = tidecast["healthcheck"]["test"]  # liveness from the loops' heartbeats, not /metrics
    assert check[:2] == ["CMD", "python"] and f"127.0.0.1:{METRICS_PORT}/healthz" in check[-1]
    compile(check[-1], "healthcheck", "exec")

    init = "\n".join(services["kafka-init"]["command"])
    creates = {m.group(1): m.group(0) for m in re.finditer(r"--create .*?--topic (\S+).*", init)}
    # every topic serve reads or writes (any *_topic setting, the events topic included) is named and created
    topics = ["topic", *(f.name for f in dataclasses.fields(ServeSettings) if f.name.endswith("_topic"))]
    assert {"forecast_topic", "events_topic", "dead_letter_topic", "changelog_topic"} <= set(topics)
    for key in (f"TIDECAST_{name.upper()}" for name in topics):
        assert key in env, f"compose leaves {key} to its default, which kafka-init does not create"
        assert env[key] in creates, f"kafka-init does not create {env[key]}"
    changelog = creates[env["TIDECAST_CHANGELOG_TOPIC"]]
    assert "cleanup.policy=compact" in changelog
    partitions = {topic: int(re.search(r"--partitions (\d+)", line).group(1)) for topic, line in creates.items()}
    assert partitions[env["TIDECAST_CHANGELOG_TOPIC"]] == partitions[env["TIDECAST_TOPIC"]]
    assert tidecast["deploy"]["replicas"] <= partitions[env["TIDECAST_TOPIC"]], "replicas beyond partitions idle"

    produce = services["produce"]["command"]
    assert produce[0] == "produce" and produce[produce.index("--topic") + 1] == env["TIDECAST_TOPIC"]
    assert services["produce"]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"

    mounts = dict(volume.split(":")[:2] for volume in services["prometheus"]["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{service} mounts missing {source}"


def serve_setting_names() -> tuple[set[str], set[str]]:
    """The environment variables and the TOML keys `tidecast serve` reads (``--config`` is TIDECAST_CONFIG)."""
    from tidecast.stream.cli import COMMANDS
    from tidecast.stream.settings import env_names_of, keys_of

    return env_names_of(COMMANDS["serve"]), keys_of(COMMANDS["serve"])


def resolve_serve(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str]) -> Any:
    """The ServeConfig `tidecast <argv>` would run with under ``env`` (run_serve is replaced, nothing connects)."""
    import tidecast.stream.serve
    from tidecast.stream.cli import main

    for name in [n for n in os.environ if n.startswith("TIDECAST_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    captured: list[Any] = []
    monkeypatch.setattr(tidecast.stream.serve, "run_serve", lambda config: captured.append(config) or 0)
    assert main(argv) == 0, f"tidecast {' '.join(argv)} rejected its settings"
    (config,) = captured
    return config


def resolve_produce(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> Any:
    """The ProduceOptions `tidecast <argv>` would run with (run_produce is replaced, nothing connects)."""
    import tidecast.stream.produce
    from tidecast.stream.cli import main

    for name in [n for n in os.environ if n.startswith("TIDECAST_")]:
        monkeypatch.delenv(name)
    captured: list[Any] = []
    summary = {"sent": 0, "handed": 0, "interrupted": False, "topic": "", "elapsed_seconds": 0.0,
               "messages_per_second": None, "skipped_rows": 0}
    monkeypatch.setattr(tidecast.stream.produce, "run_produce", lambda options: captured.append(options) or summary)
    assert main(argv) == 0, f"tidecast {' '.join(argv)} rejected its settings"
    (options,) = captured
    return options


def test_deploy_settings_are_serve_options() -> None:
    """Every TIDECAST_* variable and tidecast.toml key used in deploy/ is a setting of `tidecast serve`."""
    env_names, file_keys = serve_setting_names()
    used_env: dict[str, str] = {}
    for path in [COMPOSE, *K8S.glob("*.yaml")]:
        for name in re.findall(r"\bTIDECAST_[A-Z0-9_]+", path.read_text()):
            used_env[name] = path.name
    used_keys = set(tomllib.loads((K8S / "tidecast.toml").read_text()))
    unknown = {name: where for name, where in used_env.items() if name not in env_names}
    assert not unknown, f"not settings of tidecast serve: {unknown}"
    assert not used_keys - file_keys - {"kafka"}, f"not settings of tidecast serve: {used_keys - file_keys}"
    used = {name.removeprefix("TIDECAST_").lower() for name in used_env} | used_keys
    assert {"bootstrap_servers", "topic", "changelog_topic", "state_dir", "metrics_port"} <= used


def test_compose_commands_run_with_tidecast_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    env = {k: str(v) for k, v in services["tidecast"]["environment"].items()}
    config = resolve_serve(monkeypatch, list(services["tidecast"]["command"]), env)
    assert config.topic == env["TIDECAST_TOPIC"] and config.changelog_topic == env["TIDECAST_CHANGELOG_TOPIC"]
    assert config.metrics_port == METRICS_PORT and str(config.state_dir) == STATE_DIR
    assert config.engine.models == env["TIDECAST_MODEL"].split(",")

    produce = resolve_produce(monkeypatch, list(services["produce"]["command"]))
    assert produce.rate > 0 and produce.topic == env["TIDECAST_TOPIC"]
    copies = [args.split() for op, args in dockerfile_instructions() if op == "COPY" and "--from" not in args]
    shipped = {f"{c[-1].rstrip('/')}/{Path(src).name}" for c in copies for src in c[:-1]}
    assert str(produce.spec.path) in shipped, "the produce sample is not in the image"


# ---------------------------------------------------------------------------------------------- kubernetes


def test_k8s_manifests_parse_and_kustomization_is_complete() -> None:
    docs = k8s_docs()
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources = set(kustomization["resources"])
    for name in resources:
        assert (K8S / name).is_file(), f"kustomization lists missing {name}"
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (K8S / file.split("=")[-1]).is_file()
    not_listed = set(docs) - resources - {"kustomization.yaml", "secret.example.yaml"}
    assert not not_listed, f"manifests missing from kustomization.yaml: {sorted(not_listed)}"
    kinds = set()
    for name, manifests in docs.items():
        assert manifests, f"{name} is empty"
        for doc in manifests:
            assert doc.get("apiVersion") and doc.get("kind"), name
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], name
            kinds.add(doc["kind"])
    assert {"Namespace", "StatefulSet", "Service", "PodDisruptionBudget", "PrometheusRule", "PodMonitor",
            "Secret"} <= kinds
    secret = k8s_kind("Secret")
    assert "secret.example.yaml" not in resources
    assert all(value == "CHANGE-ME" for key, value in secret["stringData"].items() if "PASSWORD" in key)


def test_k8s_statefulset(monkeypatch: pytest.MonkeyPatch) -> None:
    sts = k8s_kind("StatefulSet")
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= spec["replicas"] <= 4, "replicas are consumers: at most the input topic's partitions"
    assert pod["terminationGracePeriodSeconds"] >= 15, "SIGTERM checkpoints and exits within 10 s"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["affinity"]["podAntiAffinity"]
    (container,) = pod["containers"]
    assert container["args"][0] == "serve"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == METRICS_PORT
    paths = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in paths.items():  # /metrics answers even while the worker is stuck
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("metrics", METRICS_PORT), probe
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = spec["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == STATE_DIR

    config = tomllib.loads((K8S / "tidecast.toml").read_text())
    env_names = {e["name"] for e in container["env"]}
    shadowed = {key for key in config if f"TIDECAST_{key.upper()}" in env_names}
    assert not shadowed, f"the pods' environment overrides {sorted(shadowed)} of tidecast.toml: edits do nothing"
    config_mount = mounts[next(v["name"] for v in pod["volumes"] if "configMap" in v)]
    assert container["args"][container["args"].index("--config") + 1] == f"{config_mount}/tidecast.toml"

    env = {e["name"]: e.get("value", "tidecast-0") for e in container["env"]}  # fieldRef: the pod name
    argv = [str(K8S / "tidecast.toml") if a.endswith("/tidecast.toml") else a for a in container["args"]]
    resolved = resolve_serve(monkeypatch, argv, env)
    assert resolved.metrics_port == METRICS_PORT and str(resolved.state_dir) == STATE_DIR
    assert resolved.client_id == "tidecast-0" and resolved.bootstrap_servers == config["bootstrap_servers"]
    assert resolved.engine.models == config["model"] and resolved.changelog_topic == config["changelog_topic"]

    service = k8s_kind("Service")
    assert service["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = k8s_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = k8s_kind("PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_build() -> None:
    proc = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    built = load_yaml_all(proc.stdout)
    assert all(doc["metadata"].get("namespace") == "tidecast" for doc in built if doc["kind"] != "Namespace")
    assert {doc["kind"] for doc in built} >= {"StatefulSet", "ConfigMap", "Service"}


# ---------------------------------------------------------------------------------------------- dockerfile


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    text = "\n".join(f"{op} {args}" for op, args in instructions)
    assert re.search(r"python:3\.11-slim", text), "base image must be slim Python 3.11"
    runs = [(i, args) for i, (op, args) in enumerate(instructions) if op == "RUN"]
    torch = [i for i, args in runs if re.search(r"pip install .*\btorch==2\.13\.0\b", args)]
    project = [i for i, args in runs if re.search(r"pip install (?:[^&]* )?\.(?:\s|$)", args)]
    assert torch and project, "installs torch==2.13.0 and the project"
    assert torch[0] < project[0], "torch must be installed before the project"
    assert "download.pytorch.org/whl/cpu" in instructions[torch[0]][1]

    users = [args.split(":")[0].strip() for op, args in instructions if op == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"
    args_defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    uid = args_defaults.get(users[-1].strip("${}"), users[-1])
    assert uid.isdigit() and int(uid) > 0
    assert int(uid) == k8s_kind("StatefulSet")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]

    last = {op: args for op, args in instructions}
    assert json.loads(last["ENTRYPOINT"]) == ["tidecast"]
    assert json.loads(last["CMD"]) == ["serve"]
    assert str(METRICS_PORT) in last["EXPOSE"].split()
    healthcheck = json.loads(last["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert healthcheck[0] == "python" and "/healthz" in healthcheck[-1]
    compile(healthcheck[-1], "HEALTHCHECK", "exec")
    assert STATE_DIR in last["VOLUME"]
    for op, args in instructions:
        if op == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} missing from the repository"


def test_the_image_build_stage_installs_every_package_pyproject_maps(tmp_path: Path) -> None:
    """The build stage's `pip install .` sees only what its COPY lines take from the context the dockerignore lets
    through. Lay out exactly that and build the wheel from it: every package of pyproject's mapping must be in it
    (the image once left out tidecast/, the public API's folder, and `pip install .` failed in `docker build`)."""
    context = docker_context()
    instructions = dockerfile_instructions()
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    src = tmp_path / "src"
    for op, args in instructions[stages[0] : stages[1]]:
        if op != "COPY" or "--from" in args:
            continue
        *sources, dest = args.split()
        for source in sources:
            taken = [f for f in context if f == source or f.startswith(source.rstrip("/") + "/")]
            assert taken, f"COPY {source}: nothing of it is in the build context (deploy/Dockerfile.dockerignore)"
            for f in taken:
                if f == source:
                    target = src / dest / Path(f).name if dest.endswith("/") else src / dest
                else:
                    target = src / dest / Path(f).relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / f, target)
    for op, args in instructions[stages[1] :]:  # the runtime stage's own COPYs come from the context too
        if op == "COPY" and "--from" not in args:
            assert set(args.split()[:-1]) <= set(context), f"COPY {args}: not in the build context"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("tidecast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} missing from the image's wheel"
    assert "tidecast/stream/data/nyc_taxi.csv" in names  # the bundled sample, package data
