"""The deployment files agree with the code: every variable they set is one the service
reads, the probes hit real routes, and the grace period covers the drain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.config import Settings, resolve
from app.server import create_app

ROOT = Path(__file__).resolve().parents[2]
KNOWN = {name.upper() for name in Settings.model_fields} | {"FORWARDED_ALLOW_IPS"}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_variable_set_by_deploy_files_is_read_by_the_service() -> None:
    names: set[str] = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        key = line.removeprefix("# ").split("=", 1)[0]
        if "=" in line and key.isupper() and " " not in key:  # settings, and commented-out ones
            names.add(key)
    names -= {"COMPOSE_PROFILES"}
    for kustomization in ("deploy/k8s/base/kustomization.yaml", "deploy/k8s/overlays/production/kustomization.yaml"):
        kustomize = yaml.safe_load((ROOT / kustomization).read_text())
        names |= {lit.split("=", 1)[0] for gen in kustomize["configMapGenerator"] for lit in gen["literals"]}
    names |= set(load_all(ROOT / "deploy/k8s/secret.example.yaml")[0]["stringData"])
    deployment = load_all(ROOT / "deploy/k8s/base/deployment.yaml")[0]
    names |= {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    for compose in (ROOT / "docker-compose.yml", ROOT / "deploy/vm/docker-compose.yml"):
        for service in yaml.safe_load(compose.read_text())["services"].values():
            if service.get("image", "").startswith("callbridge"):
                names |= set(service.get("environment", {}))
    assert names - KNOWN == set()
    assert {"DEEPGRAM_API_KEY", "TWILIO_AUTH_TOKEN", "PUBLIC_URL", "STREAM_TOKEN_SECRET"} <= names


def test_probes_hit_real_routes_and_grace_covers_drain() -> None:
    app = create_app(resolve(Settings(_env_file=None)))  # type: ignore[call-arg]
    routes = {getattr(route, "path", "") for route in app.routes}
    pod = load_all(ROOT / "deploy/k8s/base/deployment.yaml")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    kustomize = yaml.safe_load((ROOT / "deploy/k8s/base/kustomization.yaml").read_text())
    literals = dict(lit.split("=", 1) for gen in kustomize["configMapGenerator"] for lit in gen["literals"])
    drain = float(literals["DRAIN_TIMEOUT_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= drain + pre_stop + 10
    assert "/healthz" in (ROOT / "Dockerfile").read_text()
    for path in ("/metrics", "/twilio/voice", "/twilio/media", "/twilio/status"):
        assert path in routes


def test_public_entry_points_expose_twilio_routes_and_healthz_only() -> None:
    ingress = load_all(ROOT / "deploy/k8s/overlays/production/ingress.yaml")[0]
    paths = {p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {"/twilio", "/healthz"}  # `twilio check` GETs PUBLIC_URL/healthz; /metrics stays inside
    caddy = (ROOT / "deploy/vm/Caddyfile").read_text()
    assert "@public path /twilio/* /healthz" in caddy and "/metrics" not in caddy.split("@public", 1)[1].split("\n")[0]
