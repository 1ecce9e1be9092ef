"""CustomResourceDefinitions generated from the pydantic models.

pydantic's JSON Schema is close to a Kubernetes structural schema; this module
closes the gap: ``$ref`` inlined, ``Optional`` unwrapped (absent means unset),
``additionalProperties: false`` dropped (the API server prunes or, with strict field
validation, rejects unknown fields), ``null`` removed from defaults, and the
``x-kubernetes-*`` extensions kept. Any JSON Schema keyword the API server would not
accept raises, so a model change cannot silently produce a CRD that misbehaves.
``make crds`` writes the result to ``crds/``; a test fails when those files are stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from waso.api.base import GROUP, VERSION, ApiModel
from waso.api.quota import TenantQuota, TenantQuotaSpec, TenantQuotaStatus
from waso.api.session import WhatsAppSession, WhatsAppSessionSpec, WhatsAppSessionStatus
from waso.api.webhook import Webhook, WebhookSpec, WebhookStatus

_ALLOWED_KEYWORDS = {
    "type", "format", "description", "default", "enum", "pattern", "minLength", "maxLength",
    "minimum", "maximum", "minItems", "maxItems", "maxProperties", "items", "properties", "required",
    "additionalProperties", "x-kubernetes-validations", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
}  # fmt: skip
_DROPPED_KEYWORDS = {"title"}


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str
    json_path: str
    description: str
    priority: int = 0

    def to_wire(self) -> dict[str, Any]:
        column: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "jsonPath": self.json_path,
            "description": self.description,
        }
        if self.priority:
            column["priority"] = self.priority
        return column


@dataclass(frozen=True)
class ResourceDefinition:
    model: type[ApiModel]
    spec: type[ApiModel]
    status: type[ApiModel]
    plural: str
    singular: str
    kind: str
    short_names: tuple[str, ...]
    categories: tuple[str, ...]
    columns: tuple[PrinterColumn, ...]
    max_name_length: int | None = None
    selectable_fields: tuple[str, ...] = ()
    """JSON paths that field selectors may filter on (``status.shard=2``)."""

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation")

SESSION = ResourceDefinition(
    model=WhatsAppSession,
    spec=WhatsAppSessionSpec,
    status=WhatsAppSessionStatus,
    plural=WhatsAppSession.PLURAL,
    singular="whatsappsession",
    kind=WhatsAppSession.KIND,
    short_names=("was",),
    categories=("waso",),
    columns=(
        PrinterColumn("Phone", "string", ".spec.phoneNumber", "Phone number (E.164)"),
        PrinterColumn("Phase", "string", ".status.phase", "Display phase; conditions are the contract"),
        PrinterColumn("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', "Ready condition"),
        PrinterColumn(
            "Reason", "string", '.status.conditions[?(@.type=="Ready")].reason', "Why the session is or is not ready"
        ),
        PrinterColumn("Shard", "integer", ".status.shard", "Session pod index serving this session"),
        AGE,
        # -o wide
        PrinterColumn("Device", "integer", ".status.runtime.deviceId", "Device number of the live JID", 1),
        PrinterColumn("Endpoint", "string", ".status.endpoint", "The runtime's HTTP base URL for this session", 1),
        PrinterColumn("Last Error", "string", ".status.runtime.lastError", "The last error the transport reported", 1),
    ),
    # The name is used as a label value and in Lease names.
    max_name_length=63,
    # A runtime watches the sessions of its shard by field selector (no label to write besides the status).
    selectable_fields=(".status.shard", ".status.phase"),
)

QUOTA = ResourceDefinition(
    model=TenantQuota,
    spec=TenantQuotaSpec,
    status=TenantQuotaStatus,
    plural=TenantQuota.PLURAL,
    singular="tenantquota",
    kind=TenantQuota.KIND,
    short_names=("tq",),
    categories=("waso",),
    columns=(
        PrinterColumn("Sessions", "integer", ".status.used.sessions", "Admitted sessions"),
        PrinterColumn("Max", "integer", ".status.hard.sessions", "Session limit in force"),
        PrinterColumn("Msgs/min", "integer", ".spec.messagesPerMinute", "Messages per minute"),
        PrinterColumn("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', "Ready condition", 1),
        AGE,
    ),
)

WEBHOOK = ResourceDefinition(
    model=Webhook,
    spec=WebhookSpec,
    status=WebhookStatus,
    plural=Webhook.PLURAL,
    singular="webhook",
    kind=Webhook.KIND,
    short_names=("wawh",),
    categories=("waso",),
    columns=(
        PrinterColumn("URL", "string", ".spec.url", "The endpoint"),
        PrinterColumn("Suspended", "boolean", ".spec.suspend", "Deliveries stopped"),
        AGE,
        PrinterColumn("Types", "string", ".spec.eventTypes", "Event types sent", 1),
    ),
)

DEFINITIONS = (SESSION, QUOTA, WEBHOOK)


class SchemaError(ValueError):
    """A model produced a schema the API server would not accept."""


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Turn one pydantic JSON Schema node into a structural schema node."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description and default win
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise SchemaError(f"{path}: unions are not supported ({branches})")
        node = {**_structural(branches[0], defs, path), **node}
    if "allOf" in node:
        (only,) = node.pop("allOf")
        node = {**_structural(only, defs, path), **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for keyword in _DROPPED_KEYWORDS:
        node.pop(keyword, None)
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if "default" in node:
        if node["default"] is None or node["default"] == []:
            del node["default"]
        else:
            node["default"] = _strip_nulls(node["default"])
    if "description" in node:
        node["description"] = " ".join(node["description"].split())
    unknown = set(node) - _ALLOWED_KEYWORDS
    if unknown:
        raise SchemaError(f"{path}: keywords not supported in a CRD schema: {sorted(unknown)}")
    if "properties" in node:
        node["properties"] = {
            name: _structural(child, defs, f"{path}.{name}") for name, child in node["properties"].items()
        }
        node["type"] = "object"
        if not node.get("required"):
            node.pop("required", None)
    if "items" in node:
        node["items"] = _structural(node["items"], defs, f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"], defs, f"{path}.*")
    if "type" not in node:
        raise SchemaError(f"{path}: no type")
    return _ordered(node)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Keys in reading order: what it is, what it means, then the rules, then the children."""
    first = [k for k in ("type", "description", "default", "format", "enum") if k in node]
    last = [k for k in ("required", "properties", "items", "additionalProperties") if k in node]
    middle = sorted(set(node) - set(first) - set(last))
    return {k: node[k] for k in first + middle + last}


def model_schema(model: type[BaseModel], path: str) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return _structural(schema, defs, path)


def build_crd(definition: ResourceDefinition) -> dict[str, Any]:
    spec = model_schema(definition.spec, "spec")
    status = model_schema(definition.status, "status")
    root: dict[str, Any] = {
        "type": "object",
        "description": (definition.model.__doc__ or "").strip(),
        "properties": {
            "apiVersion": {"type": "string", "description": "waso.dev/v1alpha1"},
            "kind": {"type": "string", "description": definition.kind},
            "metadata": {"type": "object"},  # only name and generateName may be constrained
            "spec": spec,
            "status": status,
        },
    }
    if spec.get("required"):
        root["required"] = ["spec"]
    else:
        # Every field has a default, so spec may be left out. The default must be complete:
        # the API server checks the spec's CEL rules against it without applying nested defaults.
        root["properties"]["spec"] = _ordered({**spec, "default": definition.spec().to_wire()})
    if definition.max_name_length:
        root["properties"]["metadata"] = {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": definition.max_name_length}},
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": definition.name, "labels": {"app.kubernetes.io/part-of": "waso"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": definition.plural,
                "singular": definition.singular,
                "kind": definition.kind,
                "listKind": f"{definition.kind}List",
                "shortNames": list(definition.short_names),
                "categories": list(definition.categories),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.to_wire() for c in definition.columns],
                    **(
                        {"selectableFields": [{"jsonPath": path} for path in definition.selectable_fields]}
                        if definition.selectable_fields
                        else {}
                    ),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def build_crds() -> dict[str, dict[str, Any]]:
    """File name in crds/ → CRD object."""
    return {f"{d.name}.yaml": build_crd(d) for d in DEFINITIONS}
