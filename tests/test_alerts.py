"""The chart's alerts and dashboard (charts/waso/monitoring, docs/monitoring.md), checked with promtool.

`promtool check rules` and `promtool test rules` (every alert fires where it should and stays quiet where
it should not), the rendered PrometheusRule holds exactly the rules of the source file, every dashboard
expression parses as PromQL, every waso metric they name exists, and docs/monitoring.md lists every
metric waso exports and has a runbook section for every alert.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from tests.support import BIN, free_port
from waso import kube
from waso.api.quota import TenantQuotaSpec
from waso.operator import metrics as operator_metrics
from waso.operator import resources
from waso.operator.config import OperatorConfig
from waso.session_runtime import metrics as runtime_metrics
from waso.session_runtime.ratelimit import RateLimiterUnavailable, RedisRateLimiter
from waso.session_runtime.streams import RedisTenantStreams, SlotsUnavailable

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts/waso"
MONITORING = CHART / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts_test.yaml"
DASHBOARD = MONITORING / "dashboard.json"
DOC = ROOT / "docs/monitoring.md"

GLOBAL_ALERTS = {"WasoOperatorDown", "WasoCapacityNearCap", "WasoCapacityExhausted"}
"""Alerts about the whole cluster; every other one names its tenant."""

EXTERNAL_METRICS = {
    # kube-state-metrics
    "kube_pod_container_status_last_terminated_reason",
    "kube_pod_container_status_restarts_total",
    "kube_pod_container_resource_limits",
    # the kubelet's cAdvisor
    "container_memory_working_set_bytes",
}
"""Series the rules and the dashboard read from other exporters."""

DASHBOARD_TOPICS = [
    "Sessions by phase",
    "Memory per session pod",
    "Device numbers",
    "Health failures by reason",
    "Messages in and out",
    "Rate-limit refusals",
    "QR streams",
    "Event backlog",
]
"""What the dashboard must show (issue 14): each a panel title, or the start of one."""


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    binary = BIN / "promtool"
    if not binary.exists():
        raise AssertionError(f"{binary} is missing: run `make tools`")
    return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def helm_template(*args: str) -> list[dict[str, Any]]:
    binary = BIN / "helm"
    if not binary.exists():
        raise AssertionError(f"{binary} is missing: run `make tools`")
    result = subprocess.run(
        [str(binary), "template", "waso", str(CHART), "--namespace", "waso-system", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def source_rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return rules


def alerts() -> list[dict[str, Any]]:
    return [rule for group in source_rules()["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables as a Prometheus rule would have them."""
    return expr.replace("$__rate_interval", "5m").replace("$tenant", ".+")


def exported_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric the operator and the runtime define (their API client's included): name → (type, label names)."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for module in (operator_metrics, runtime_metrics, kube):
        for value in vars(module).values():
            if not isinstance(value, MetricWrapperBase):
                continue
            described = value.describe()[0]
            name = described.name + ("_total" if described.type == "counter" else "")
            found[name] = (described.type, tuple(value._labelnames))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (waso's own, recorded ones, and other exporters')."""
    return set(re.findall(r"\b((?:waso[_:]|kube_|container_)[a-z_:]+)", expr))


def doc_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The metrics table of docs/monitoring.md: name → (type, label names)."""
    rows = re.findall(r"^\| `(waso_[a-z_]+)` \| (\w+) \| ([^|]*) \|", DOC.read_text(), flags=re.MULTILINE)
    return {name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# -- the rules ----------------------------------------------------------------------------------


def test_promtool_is_the_pinned_version() -> None:
    pinned = re.search(r"^PROMTOOL_VERSION=v0\.3(\d\d)\.(\d+)$", (ROOT / "hack/versions.env").read_text(), re.M)
    assert pinned is not None, "hack/versions.env pins no PROMTOOL_VERSION"
    release = f"3.{int(pinned[1])}.{pinned[2]}"
    result = promtool("--version")
    assert result.returncode == 0, result.stderr
    assert f"promtool, version {release} " in result.stdout, f"{result.stdout}: run `make tools`"


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts()) + 1} rules found" in result.stdout, result.stdout


def test_every_alert_passes_its_promtool_tests_positive_and_negative() -> None:
    result = promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    positive: set[str] = set()
    negative: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (positive if check["exp_alerts"] else negative).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - positive == set(), "alerts never tested firing"
    assert names - negative == set(), "alerts never tested staying quiet"


def test_each_alert_has_a_severity_its_tenant_and_a_runbook() -> None:
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", DOC.read_text(), flags=re.MULTILINE)}
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["runbook_url"] == f"docs/monitoring.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/monitoring.md has no section {name}"
        if name not in GLOBAL_ALERTS:
            assert "{{ $labels.tenant }}" in annotations["summary"], name


def test_rules_select_the_session_pods_the_operator_makes() -> None:
    """The kube-state-metrics and cAdvisor selectors name the session pods' StatefulSet and container."""
    statefulset = resources.statefulset("acme", TenantQuotaSpec(), OperatorConfig(), 1)
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    selector = f'container="{container["name"]}", pod=~"{statefulset["metadata"]["name"]}-[0-9]+"'
    text = ALERTS.read_text()
    assert text.count(selector) == 3
    assert len(re.findall(r'pod=~"', text)) == 3
    pod_queries = [expr for _, expr in dashboard_targets() if "pod=~" in expr]
    assert pod_queries
    for expr in pod_queries:
        assert selector in expr, expr


def test_rules_and_dashboard_name_only_metrics_that_exist() -> None:
    known = set(exported_metrics()) | EXTERNAL_METRICS
    known |= {f"{name}_bucket" for name, (kind, _) in exported_metrics().items() if kind == "histogram"}
    known |= {rule["record"] for group in source_rules()["groups"] for rule in group["rules"] if "record" in rule}
    used = {name for rule in alerts() for name in metric_names(rule["expr"])}
    used |= {name for _, expr in dashboard_targets() for name in metric_names(expr)}
    assert used - known == set(), "misspelt or removed metrics"


def test_chart_renders_exactly_the_source_rules() -> None:
    assert not [
        d
        for d in helm_template()
        if d["kind"] in ("PrometheusRule", "ConfigMap") and d["metadata"]["name"] in ("waso-alerts", "waso-dashboard")
    ], "both are off by default"
    base = "https://git.example/waso/blob/main/"
    docs = helm_template(
        "--set", "monitoring.prometheusRule.enabled=true",
        "--set", "monitoring.prometheusRule.labels.release=kube-prometheus-stack",
        "--set", f"monitoring.prometheusRule.runbookBaseUrl={base}",
    )  # fmt: skip
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "waso-system"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "waso"
    expected = source_rules()
    for group in expected["groups"]:
        for each in group["rules"]:
            if "alert" in each:
                each["annotations"]["runbook_url"] = base + each["annotations"]["runbook_url"]
    assert rule["spec"] == expected

    # Without a base the runbook is the path in this repository; another namespace when asked.
    docs = helm_template(
        "--set", "monitoring.prometheusRule.enabled=true", "--set", "monitoring.prometheusRule.namespace=monitoring"
    )  # fmt: skip
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == source_rules()
    assert rule["metadata"]["namespace"] == "monitoring"


# -- the dashboard ------------------------------------------------------------------------------


def test_chart_renders_the_dashboard_for_grafanas_sidecar() -> None:
    docs = helm_template(
        "--set", "monitoring.dashboard.enabled=true", "--set", "monitoring.dashboard.annotations.grafana_folder=waso"
    )  # fmt: skip
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "waso-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "waso"}
    assert json.loads(config_map["data"]["waso.json"]) == dashboard()


def test_dashboard_has_a_panel_per_topic_for_the_chosen_tenants() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    tenant = variables["tenant"]
    assert tenant["definition"] == "label_values(waso_sessions, tenant)"
    assert tenant["multi"]
    assert tenant["includeAll"]
    titles = [p["title"] for p in board["panels"] if p["type"] != "row"]
    for topic in DASHBOARD_TOPICS:
        assert any(title.startswith(topic) or topic in title for title in titles), f"no panel for {topic}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    per_tenant = [expr for title, expr in dashboard_targets() if "$tenant" in expr]
    assert len(per_tenant) >= len(dashboard_targets()) - 5, "panels below the cluster row follow the tenant variable"


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """Written as recording rules, so `promtool check rules` parses each one."""
    targets = dashboard_targets()
    rules = [{"record": f"dashboard:panel_{i}", "expr": as_promql(expr)} for i, (_, expr) in enumerate(targets)]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(targets)} rules found" in result.stdout

    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "x", "expr": "sum by (a (b)"}]}]}))
    assert promtool("check", "rules", str(broken), cwd=tmp_path).returncode != 0, "promtool must refuse a typo"


# -- the documentation --------------------------------------------------------------------------


def test_doc_lists_every_metric_with_its_type_and_labels() -> None:
    assert doc_metrics() == exported_metrics()


def test_readme_links_the_monitoring_guide() -> None:
    assert "(docs/monitoring.md)" in (ROOT / "README.md").read_text()


# -- the Redis counter behind WasoRedisUnreachable ----------------------------------------------


def redis_errors(tenant: str, use: str) -> float:
    value = REGISTRY.get_sample_value("waso_runtime_redis_errors_total", {"tenant": tenant, "use": use})
    return value or 0.0


async def test_unreachable_redis_is_counted_per_tenant_and_use() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: connection refused at once
    limiter = RedisRateLimiter(url, fail_open=True)
    before = redis_errors("acme-redis", "ratelimit")
    assert (await limiter.acquire("acme-redis", 60)).allowed, "failing open lets the message through"
    assert redis_errors("acme-redis", "ratelimit") == before + 1
    await limiter.close()

    closed = RedisRateLimiter(url, fail_open=False)
    with pytest.raises(RateLimiterUnavailable):
        await closed.acquire("acme-redis", 60)
    assert redis_errors("acme-redis", "ratelimit") == before + 2
    await closed.close()

    streams = RedisTenantStreams(url)
    before = redis_errors("acme-redis", "qrstreams")
    with pytest.raises(SlotsUnavailable):
        await streams.hold("acme-redis", "pod-0/a", 2)
    with pytest.raises(SlotsUnavailable):
        await streams.release("acme-redis", "pod-0/a")
    assert redis_errors("acme-redis", "qrstreams") == before + 2
    await streams.close()
