"""The ops files parse, and every metric they name exists in the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from mesh.llm import LLMMetrics
from mesh.patterns.delegation.specialist import StepMetrics
from mesh.resilience.breaker import BreakerMetrics
from mesh.resilience.fallback import FallbackMetrics
from mesh.runtime.metrics import MeshMetrics

OPS = Path(__file__).resolve().parents[2] / "ops"
METRIC = re.compile(r"\bmesh_[a-z_]+\b")


def known_metrics() -> set[str]:
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry)
    for part in (BreakerMetrics, FallbackMetrics, LLMMetrics, StepMetrics):
        metrics.part(part)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "gauge": ("",)}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def exprs_of_alerts() -> list[str]:
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def exprs_of_dashboard() -> list[str]:
    dashboard = json.loads((OPS / "grafana" / "mesh.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_prometheus_config_scrapes_every_agent_service_of_the_compose_file() -> None:
    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    compose = yaml.safe_load((OPS.parent / "docker-compose.yml").read_text())
    agents = {name for name, svc in compose["services"].items()
              if "mesh" in svc.get("command", []) and "run" in svc.get("command", [])}
    targets = {t.split(":")[0] for job in config["scrape_configs"]
               for static in job["static_configs"] for t in static["targets"]}
    assert agents and targets == agents
    assert config["rule_files"] == ["alerts.yml"]


def test_every_metric_named_in_alerts_and_dashboard_exists() -> None:
    known = known_metrics()
    exprs = exprs_of_alerts() + exprs_of_dashboard()
    named = {name for expr in exprs for name in METRIC.findall(expr)}
    assert named, "no metric found: the expressions were not read"
    assert named <= known, f"unknown metrics: {sorted(named - known)}"


def test_alerts_cover_lag_breaker_dead_letters_error_rate_and_fallbacks() -> None:
    names = [rule["alert"] for group in yaml.safe_load((OPS / "alerts.yml").read_text())
             ["groups"] for rule in group["rules"]]
    assert names == ["MeshConsumerLagGrowing", "MeshAgentHeld", "MeshDeadLettersArriving",
                     "MeshErrorRateHigh", "MeshBreakerOpen", "MeshFallbackRateHigh"]
