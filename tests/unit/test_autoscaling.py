"""The production HPA scales on the calls each pod carries: the gauge the code exports, scraped
with the labels the prometheus-adapter rule relies on, under the name the adapter serves, with a
target below the point where a pod refuses calls. The adapter's Helm values are no kustomize
manifest (bin/check-deploy does not see them), so they are checked here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ROOT / "deploy/k8s/overlays/production"
ADAPTER_VALUES = ROOT / "deploy/k8s/prometheus-adapter/values.yaml"
# the target labels the Prometheus Operator gives every series scraped through a ServiceMonitor
SERVICEMONITOR_TARGET_LABELS = {"instance", "job", "namespace", "service", "pod", "container", "endpoint"}
HPA_TOLERANCE = 0.1  # the controller's default: no scaling while within 10% of the target


def load(path: Path) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert len(docs) == 1, path
    doc: dict[str, Any] = docs[0]
    return doc


def adapter_rule() -> dict[str, Any]:
    values = load(ADAPTER_VALUES)
    rules = values["rules"]["custom"]
    assert len(rules) == 1
    rule: dict[str, Any] = rules[0]
    return rule


def series_name(series_query: str) -> str:
    """The metric a `seriesQuery` selects: `name{...}` or `{__name__="name",...}`."""
    match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", series_query) or re.search(
        r'__name__="([a-zA-Z_:][a-zA-Z0-9_:]*)"', series_query
    )
    assert match, f"seriesQuery selects no single metric: {series_query}"
    return match.group(1)


def exposed_name(rule: dict[str, Any], series: str) -> str:
    """The name the adapter serves `series` under: `name.matches` (default `.*`) must match it,
    and `name.as` expands its groups ($1, ${1}; default $0, or $1 with one group)."""
    naming = rule.get("name", {})
    match = re.search(naming.get("matches", ".*"), series)
    assert match, f"name.matches does not match {series}"
    template = naming.get("as", "$1" if match.re.groups == 1 else "$0")
    return re.sub(r"\$\{?(\d+)\}?", lambda g: match.group(int(g.group(1))) or "", template)


def hpa() -> dict[str, Any]:
    doc = load(PRODUCTION / "hpa.yaml")
    assert doc["apiVersion"] == "autoscaling/v2" and doc["kind"] == "HorizontalPodAutoscaler"
    return doc


def production_max_calls() -> int:
    kustomization = load(PRODUCTION / "kustomization.yaml")
    literals = dict(lit.split("=", 1) for gen in kustomization["configMapGenerator"] for lit in gen["literals"])
    default: int = Settings.model_fields["max_calls"].default
    return int(literals.get("MAX_CALLS", default))


def test_hpa_scales_on_active_calls_first_and_on_cpu_only_as_a_backstop() -> None:
    spec = hpa()["spec"]
    deployment = load(ROOT / "deploy/k8s/base/deployment.yaml")["metadata"]["name"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment}
    calls, cpu = spec["metrics"]
    assert calls["type"] == "Pods"
    assert calls["pods"]["metric"]["name"] == exposed_name(adapter_rule(), series_name(adapter_rule()["seriesQuery"]))
    assert calls["pods"]["target"]["type"] == "AverageValue"
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"]["type"] == "Utilization"
    # high: a full pod (MAX_CALLS) uses about a quarter of its request, see hpa.yaml
    assert cpu["resource"]["target"]["averageUtilization"] >= 70


def test_calls_target_leaves_headroom_below_max_calls() -> None:
    spec = hpa()["spec"]
    target = spec["metrics"][0]["pods"]["target"]["averageValue"]
    assert re.fullmatch(r"\d+", str(target)), f"a whole number of calls, not {target!r}"
    max_calls = production_max_calls()
    # the HPA acts only past the tolerance; by then a pod must still have room for the calls that
    # arrive while new pods start: at least a quarter of MAX_CALLS
    assert 0 < int(target) * (1 + HPA_TOLERANCE) <= 0.75 * max_calls
    pdb = load(PRODUCTION / "pdb.yaml")
    assert spec["minReplicas"] > pdb["spec"]["minAvailable"]  # a node drain can always evict a pod
    assert spec["maxReplicas"] > spec["minReplicas"]


def test_scale_down_drains_one_pod_at_a_time_and_scale_up_is_immediate() -> None:
    behavior = hpa()["spec"]["behavior"]
    pod = load(ROOT / "deploy/k8s/base/deployment.yaml")["spec"]["template"]["spec"]
    down = behavior["scaleDown"]
    assert down.get("selectPolicy") != "Disabled"
    assert down["stabilizationWindowSeconds"] >= pod["terminationGracePeriodSeconds"]
    assert down["policies"], "without policies the HPA may remove every surplus pod at once"
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1
        assert policy["periodSeconds"] >= pod["terminationGracePeriodSeconds"]
    up = behavior["scaleUp"]
    assert up["stabilizationWindowSeconds"] == 0
    assert all(policy["periodSeconds"] <= 60 for policy in up["policies"])


def test_adapter_rule_serves_the_per_pod_gauge_the_code_exports() -> None:
    rule = adapter_rule()
    name = series_name(rule["seriesQuery"])
    metrics = Metrics()
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert name in families, f"{name} is not exported at /metrics"
    family = families[name]
    assert family.type == "gauge"
    # one unlabelled value per pod: `namespace` and `pod` can only be the scrape target's
    assert [sample.labels for sample in family.samples] == [{}]
    # with workers: the sum over the live ones, still one value per pod (not one per process)
    modes = {m._name: m._multiprocess_mode for m in vars(metrics).values() if isinstance(m, Gauge)}
    assert modes[name] == "livesum"
    overrides = rule["resources"]["overrides"]
    assert {label: o["resource"] for label, o in overrides.items()} == {"namespace": "namespace", "pod": "pod"}
    for label in overrides:
        assert f'{label}!=""' in rule["seriesQuery"]
    query = rule["metricsQuery"]
    for field in ("<<.Series>>", "<<.LabelMatchers>>"):
        assert field in query
    assert re.search(r"\bby \(<<\.GroupBy>>\)", query), "one value per requested pod"


def test_servicemonitor_scrapes_the_bridge_with_the_labels_the_adapter_maps() -> None:
    monitor = load(PRODUCTION / "servicemonitor.yaml")
    service = load(ROOT / "deploy/k8s/base/service.yaml")
    base = load(ROOT / "deploy/k8s/base/kustomization.yaml")
    labels = service["metadata"].get("labels", {})
    for entry in base["labels"]:  # kustomize puts these on the Service
        labels |= entry["pairs"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "namespaceSelector" not in monitor["spec"]  # the Service's own namespace, as the HPA's
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        for relabel in endpoint.get("relabelings", []) + endpoint.get("metricRelabelings", []):
            assert relabel.get("action", "replace") not in {"labeldrop", "labelkeep", "labelmap"}
            assert relabel.get("targetLabel") not in {"namespace", "pod"}
    assert set(adapter_rule()["resources"]["overrides"]) <= SERVICEMONITOR_TARGET_LABELS


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ('callbridge_active_calls{namespace!="",pod!=""}', "callbridge_active_calls"),
        ('{__name__="callbridge_active_calls",pod!=""}', "callbridge_active_calls"),
    ],
)
def test_series_name_reads_both_selector_forms(query: str, expected: str) -> None:
    assert series_name(query) == expected


def test_exposed_name_follows_the_adapter_naming_rules() -> None:
    assert exposed_name({}, "callbridge_active_calls") == "callbridge_active_calls"
    assert exposed_name({"name": {"matches": "^callbridge_(.*)$"}}, "callbridge_active_calls") == "active_calls"
    rule = {"name": {"matches": "^(callbridge)_(.*)$", "as": "${2}_per_pod"}}
    assert exposed_name(rule, "callbridge_active_calls") == "active_calls_per_pod"
