"""The Helm chart's values, as models: the source of ``charts/waso/values.yaml`` and ``values.schema.json``.

Every operator setting is reachable from the chart in exactly one place. Most are keys of
``config``, spelt as the operator's file spells them (camelCase of the ``OperatorConfig``
field), and the chart renders ``config`` into the operator's ConfigMap unchanged, so there is
no mapping to keep in step. The few settings the chart owns elsewhere are listed in
``CHART_OWNED``: the session pods run the chart's own image, and the metrics port also
shapes the Deployment and its Service.

The JSON Schema of ``config`` is ``OperatorConfig``'s own, so Helm refuses at install what
the operator would refuse at start: a wrong type, an unknown transport, a negative number.
Cross-field rules that JSON Schema cannot state (a TenantQuota's CEL rules) are still checked
where they always are. ``hack/gen_chart.py`` (run by ``make crds``) writes the files; a test
fails when they are stale. This module does no I/O.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from waso.operator.config import OperatorConfig

CHART_OWNED: dict[str, tuple[str, ...]] = {
    "runtime_image": ("image.repository", "image.tag"),  # the session pods run the chart's image
    "image_pull_policy": ("image.pullPolicy",),
    "metrics_port": ("metrics.port",),
}
"""Operator settings that the chart derives from other values, with the values they come from."""

SIMULATOR_OWNED = ("transport", "simulator_url")
"""Settings that ``simulator.enabled`` decides: transport ``simulator`` and, unless
``config.simulatorUrl`` is set, the URL of the in-cluster simulator Service."""

QUANTITY_PATTERN = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
"""A Kubernetes quantity: what the CRDs' ``isQuantity`` CEL rule accepts, as a JSON Schema pattern."""

Port = Annotated[int, Field(ge=1, le=65535)]
Namespace = Annotated[str, Field(max_length=63, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")]
"""A namespace name, or empty for the release namespace."""


class _Values(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, use_attribute_docstrings=True
    )


class Image(_Values):
    """One image for the operator, the session pods and the simulator, with other arguments."""

    repository: str = Field(default="waso", min_length=1)
    """Image repository."""
    tag: str = Field(default="dev", min_length=1)
    """Image tag."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Pull policy of every pod of the chart and of the session pods."""


class Resources(_Values):
    """A container's resources."""

    requests: dict[str, str | int | float] | None = None
    limits: dict[str, str | int | float] | None = None


class Metrics(_Values):
    port: int = Field(default=9090, ge=0, le=65535)
    """Prometheus metrics port of the operator and its Service `waso-operator-metrics`; 0 disables both."""


class Simulator(_Values):
    """The WhatsApp simulator (docs/simulator.md): a sandbox for staging and demos, never real WhatsApp."""

    enabled: bool = False
    """Run it in the release namespace and point the session pods at it (transport simulator)."""
    auto_pair: bool = False
    """Scan every QR code by itself after autoPairSeconds (demos); off: a test or a person scans through its API."""
    auto_pair_seconds: float = Field(default=2.0, gt=0, le=3600)
    """Delay of the automatic scan."""
    qr_interval_seconds: float = Field(default=20.0, gt=0, le=3600)
    """Seconds before a QR code rotates."""
    first_device: int = Field(default=1, ge=1, le=1000)
    """First device number of each account (real WhatsApp hands out numbers above 10 too)."""
    port: Port = 8090
    """Port of the simulator and of its Service `<release>-simulator`."""
    resources: Resources = Resources(requests={"cpu": "50m", "memory": "64Mi"}, limits={"memory": "256Mi"})
    """Resources of the simulator container."""


class PrometheusRule(_Values):
    """waso's alerts (charts/waso/monitoring/alerts.yaml) as a PrometheusRule of the Prometheus Operator."""

    enabled: bool = False
    """Install it (the cluster needs the PrometheusRule CRD, monitoring.coreos.com/v1)."""
    labels: dict[str, str] = {}
    """Labels of the PrometheusRule, for the ruleSelector of the Prometheus that should load it (e.g. release:
    kube-prometheus-stack)."""
    namespace: Namespace = ""
    """Its namespace; empty: the release namespace."""
    runbook_base_url: str = ""
    """Prefix of each alert's runbook_url (docs/monitoring.md#<alert>), e.g. the web address of this repository's
    tree; empty: the path alone."""


class Dashboard(_Values):
    """The Grafana dashboard (charts/waso/monitoring/dashboard.json) as a ConfigMap for Grafana's dashboard sidecar."""

    enabled: bool = False
    """Install it."""
    labels: dict[str, str] = {"grafana_dashboard": "1"}
    """Labels of the ConfigMap: the label the sidecar looks for."""
    annotations: dict[str, str] = {}
    """Annotations of the ConfigMap (e.g. grafana_folder: waso, where the sidecar reads folders from one)."""
    namespace: Namespace = ""
    """Its namespace; empty: the release namespace (the sidecar may watch only Grafana's own)."""


class Monitoring(_Values):
    """Alerts and a dashboard for a Prometheus that scrapes the operator and the session pods (docs/monitoring.md)."""

    prometheus_rule: PrometheusRule = PrometheusRule()
    dashboard: Dashboard = Dashboard()


class ChartValues(_Values):
    """The values of charts/waso."""

    image: Image = Image()
    replicas: int = Field(default=1, ge=0, le=5)
    """Operator replicas: one leads (a Lease) and decides, the others stand by with their indexes filled and
    take over within config.leaderElection.leaseSeconds. Two or more get a PodDisruptionBudget. Without
    leader election, only 1."""
    namespaces: list[Annotated[str, Field(min_length=1)]] = []
    """Watch only these namespaces (glob patterns); empty: the whole cluster."""
    config: dict[str, Any] = {}
    """Operator configuration (docs/operator.md), rendered into the operator's ConfigMap as it is."""
    metrics: Metrics = Metrics()
    resources: Resources = Resources(requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"})
    """Resources of the operator container."""
    simulator: Simulator = Simulator()
    monitoring: Monitoring = Monitoring()


def config_fields() -> dict[str, str]:
    """The operator settings that are keys of ``config``: field name → key."""
    return {name: to_camel(name) for name in OperatorConfig.model_fields if name not in CHART_OWNED}


def config_schema() -> dict[str, Any]:
    """The JSON Schema of ``config``: ``OperatorConfig``'s by the file's keys, without the chart-owned settings."""
    raw = OperatorConfig.model_json_schema(by_alias=True)
    defs = raw.get("$defs", {})
    keys = config_fields()
    properties = {keys[name]: _plain(node, defs) for name, node in raw["properties"].items() if name in keys}
    return {
        "type": "object",
        "description": "Operator configuration (docs/operator.md); a setting left out takes the operator's default.",
        "properties": properties,
        "additionalProperties": False,
    }


def values_schema() -> dict[str, Any]:
    """The JSON Schema of the chart's values (``charts/waso/values.schema.json``)."""
    raw = ChartValues.model_json_schema(by_alias=True)
    schema = _plain(raw, raw.get("$defs", {}))
    schema["properties"]["config"] = config_schema()
    return {"$schema": "http://json-schema.org/draft-07/schema#", **schema}


def _plain(node: Any, defs: dict[str, Any]) -> Any:
    """``$ref`` inlined, titles and Kubernetes extensions dropped; ``isQuantity`` becomes a pattern."""
    if isinstance(node, list):
        return [_plain(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or key.startswith("x-kubernetes-"):
            continue
        # "default" and "properties" hold data and names, not schemas: only their values are walked.
        if key == "default":
            result[key] = _without_none(value)
        elif key == "properties":
            result[key] = {name: _plain(sub, defs) for name, sub in value.items()}
        else:
            result[key] = _plain(value, defs)
    if any(rule.get("rule") == "isQuantity(self)" for rule in node.get("x-kubernetes-validations", [])):
        result["pattern"] = QUANTITY_PATTERN
    return result


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value
