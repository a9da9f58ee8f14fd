"""The Grafana dashboard and the Prometheus alert rules of deploy/, statically: they read only
metrics the bridge exports, every query follows the dashboard's variables, the PrometheusRule
object carries the rule file's groups unchanged, the promtool unit tests make every alert fire
and stay quiet, and every alert is documented. (A real Prometheus runs them all in
tests/integration/test_prometheus.py.)"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from app.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/callbridge.json"
RULES = ROOT / "deploy/prometheus/callbridge-alerts.yml"
RULE_TESTS = ROOT / "deploy/prometheus/callbridge-alerts.test.yml"
PROMETHEUS_RULE = ROOT / "deploy/prometheus/callbridge-prometheusrule.yaml"
ALERTS_README = ROOT / "deploy/prometheus/README.md"

METRIC = re.compile(r"\b(?:callbridge|process)_[a-z0-9_]+")
SELECTOR = re.compile(r"\b((?:callbridge|process)_[a-z0-9_]+)(\{[^}]*\})?")
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
GRID_COLUMNS = 24


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def exported_names() -> set[str]:
    """Every sample name /metrics can carry: each family's (from its TYPE line), with the
    _bucket, _count and _sum of histograms."""
    names = set()
    for line in Metrics().exposition().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= (
                {name, *(f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))}
                if kind == "histogram"
                else {name}
            )
    return names


def test_dashboard_and_alerts_read_only_metrics_the_bridge_exports() -> None:
    exported = exported_names()
    used = {name for expr in [*exprs(), *(a["expr"] for a in alerts())] for name in METRIC.findall(expr)}
    assert used - exported == set(), "not exported by app/observability/metrics.py"
    # what the issue asks the dashboard to show
    for name in (
        "callbridge_active_calls",
        "callbridge_max_calls",
        "callbridge_calls_total",
        "callbridge_fallbacks_total",
        "callbridge_response_latency_seconds_bucket",
        "callbridge_agent_latency_seconds_bucket",
        "callbridge_barge_in_clear_seconds_bucket",
        "callbridge_streams_rejected_total",
        "callbridge_webhook_requests_total",
        "callbridge_agent_errors_total",
        "callbridge_agent_warnings_total",
        "callbridge_operator_actions_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert any(name in expr for expr in exprs()), f"no panel shows {name}"


def test_every_dashboard_query_follows_the_job_and_instance_variables() -> None:
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    for expr in exprs():
        assert set(VARIABLE.findall(expr)) <= {"job", "instance", "__rate_interval"}, expr
        for name, matchers in SELECTOR.findall(expr):
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, f"{name} in {expr}"


def test_dashboard_panels_are_well_formed_and_do_not_overlap() -> None:
    board = dashboard()
    assert board["uid"] == "callbridge" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for cell in itertools.product(range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])):
            assert cell not in cells, f"{panel['title']!r} overlaps {cells[cell]!r}"
            cells[cell] = panel["title"]
    for panel in panels():
        assert panel["type"] in {"timeseries", "stat"} and panel["title"] and panel["description"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() and t["datasource"] == panel["datasource"] for t in panel["targets"])


def test_prometheusrule_object_carries_the_rule_file_unchanged() -> None:
    (rule,) = [doc for doc in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if doc]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_target_down_names_the_job_the_servicemonitor_gives() -> None:
    """The Prometheus Operator names the job of a ServiceMonitor's targets after the Service
    (unless the ServiceMonitor sets jobLabel)."""
    monitor = yaml.safe_load((ROOT / "deploy/k8s/overlays/production/servicemonitor.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy/k8s/base/service.yaml").read_text())
    assert "jobLabel" not in monitor["spec"]
    (down,) = [a for a in alerts() if a["alert"] == "CallbridgeTargetDown"]
    assert down["expr"] == f'up{{job="{service["metadata"]["name"]}"}} == 0'


def test_rule_unit_tests_make_every_alert_fire_and_stay_quiet() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), "never seen firing"
    assert names - quiet == set(), "never seen not firing"
    assert (fired | quiet) - names == set(), "tests of alerts that do not exist"


def test_every_alert_is_labelled_and_documented() -> None:
    readme = ALERTS_README.read_text()
    headings = set(re.findall(r"^### (\w+)$", readme, flags=re.MULTILINE))
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert set(alert["annotations"]) == {"summary", "description", "runbook"}, name
        assert alert["annotations"]["runbook"] == f"deploy/prometheus/README.md#{name.lower()}"
        assert name in headings, f"deploy/prometheus/README.md has no section for {name}"
        section = readme.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        for part in ("**Means**", "**Bound**", "**Do**"):
            assert part in section, f"{name}: no {part} in its README section"
