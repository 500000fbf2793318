"""deploy/grafana/ and deploy/prometheus/: every metric the dashboard and the alerts name
exists in a running gateway's /metrics, the alerts carry the case study's thresholds,
and promtool accepts the files when it is there (`make promtool`)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ROOT, Upstream, login
from .ops_fixtures import AdminFactory

DASHBOARD = ROOT / "deploy/grafana/dashboards/session-gateway.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
# Series Prometheus makes itself, not the gateway.
PROMETHEUS_OWN = {"up"}
NAME = re.compile(r"\b(gateway_[a-z0-9_]+|up)\b(?!\s*\()")


def panel_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def dashboard_exprs() -> list[str]:
    """The panels' PromQL and the template variables' queries (Grafana's label_values)."""
    doc = json.loads(DASHBOARD.read_text())
    variables = [
        v["query"]["query"] for v in doc["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    return panel_exprs() + variables


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def names_in(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in NAME.findall(e)}


def exposed(text: str) -> set[str]:
    """Every name /metrics shows: sample names and metric families (a labelled family
    without a child yet has its HELP and TYPE lines only)."""
    found: set[str] = set()
    for fam in text_string_to_metric_families(text):
        found.add(fam.name)
        if fam.type == "counter":
            found.add(fam.name + "_total")
        found.update(s.name for s in fam.samples)
    return found


def test_the_files_name_metrics() -> None:
    dash, alerts = names_in(dashboard_exprs()), names_in([r["expr"] for r in alert_rules()])
    assert len(dash) >= 20 and len(alerts) >= 10
    # What the issue asks the dashboard to show.
    for name in (
        "gateway_requests_total",
        "gateway_request_seconds_bucket",
        "gateway_redis_keys",
        "gateway_redis_seconds_bucket",
        "gateway_redis_errors_total",
        "gateway_activity_pending",
        "gateway_session_lookups_total",
    ):
        assert name in dash, name


def test_alerts_carry_the_case_study_thresholds() -> None:
    by_name = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules()}
    assert by_name["GatewayErrorRateHigh"].endswith("> 0.001")  # < 0.1 %
    assert "histogram_quantile(0.95," in by_name["GatewayLatencyP95High"]
    assert by_name["GatewayLatencyP95High"].endswith("> 0.005")  # p95 < 5 ms
    assert by_name["GatewayRedisMemoryHigh"].endswith("> 0.8")  # > 80 %
    assert by_name["GatewayRedisPoolUsageHigh"].endswith("> 0.9")  # > 90 %
    assert by_name["GatewayCpuHigh"].endswith("> 0.85")  # > 85 %
    for r in alert_rules():
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]


async def test_every_named_metric_exists_in_a_running_gateway(
    make_gateway: Any, make_admin: AdminFactory, upstream: Upstream
) -> None:
    gw = await make_gateway(
        plugins=["cart"], admin={"population_interval": 0.05}, logging={"access_log": False}
    )
    admin = await make_admin(gw)
    await login(gw, upstream, "1")
    for path in ("/a", "/b", "/static/c"):
        assert (await gw.get(path)).status == 200
    await asyncio.sleep(0.3)  # an activity flush and a key count
    text = await (await admin.get("/metrics")).text()
    have = exposed(text)
    wanted = names_in(dashboard_exprs()) | names_in([r["expr"] for r in alert_rules()])
    missing = sorted(wanted - have - PROMETHEUS_OWN)
    assert not missing, f"named by deploy/ but not in /metrics: {missing}"


def _promtool() -> str | None:
    local = ROOT / ".venv/bin/promtool"
    return shutil.which("promtool") or (str(local) if local.exists() else None)


@pytest.mark.skipif(
    _promtool() is None,
    reason="promtool not installed (`make promtool` extracts it from Debian's prometheus "
    "package without installing the server)",
)
@pytest.mark.parametrize(
    "what,path", [("rules", ALERTS), ("config", PROMETHEUS), ("rules", DASHBOARD)]
)
def test_promtool_accepts(what: str, path: Path, tmp_path: Path) -> None:
    promtool = _promtool()
    assert promtool is not None
    target = path
    if path == PROMETHEUS:
        # The config names the rules by their path in the container.
        cfg = yaml.safe_load(path.read_text())
        cfg["rule_files"] = [str(ALERTS)]
        target = tmp_path / "prometheus.yml"
        target.write_text(yaml.safe_dump(cfg))
    elif path == DASHBOARD:
        # The panels' queries, parsed by Prometheus's own parser as recording rules.
        rules = [
            {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(panel_exprs())
        ]
        target = tmp_path / "dashboard-queries.yml"
        target.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", what, str(target)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
