"""Shared building blocks of the waso API models.

The pydantic models in ``waso.api`` are the single source of the CRD schemas
(``waso.api.crd`` turns them into ``crds/``), so every constraint written here is
enforced twice: by the API server at ``kubectl apply`` time and by pydantic when
the operator or runtime builds an object. This package does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "waso.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class ApiModel(BaseModel):
    """Base of every spec and status model: immutable, camelCase on the wire, no unknown fields."""

    model_config = ConfigDict(
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optional fields omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a time zone")
    return value.astimezone(UTC).replace(microsecond=0)


def format_timestamp(value: datetime) -> str:
    """RFC 3339 with second precision and a ``Z``, as metav1.Time is written."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Timestamp = Annotated[
    datetime,
    AfterValidator(_as_utc),
    PlainSerializer(format_timestamp, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A metav1.Time: UTC, whole seconds, serialized as ``2006-01-02T15:04:05Z``."""


def cel_string(text: str) -> str:
    """``text`` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _naming_the_value(message: str) -> str:
    """A messageExpression: ``message``, then the string value refused."""
    return cel_string(f'{message}, not "') + " + self + " + cel_string('"')


QUANTITY_EXAMPLES = "500m, 2 or 256Mi"


def quantity_field(name: str | None = None) -> Any:
    """The constraints of a quantity field: at most 64 characters, and a CEL ``isQuantity`` rule whose message
    names the field (when given) and the value.

    The rule text stays ``isQuantity(self)``: the chart's values schema turns exactly that into a pattern.
    """
    subject = f"{name} must" if name else "must"
    message = f"{subject} be a Kubernetes quantity such as {QUANTITY_EXAMPLES}"
    expression = _naming_the_value(message)
    return Field(
        max_length=64,
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "isQuantity(self)", "message": message, "messageExpression": expression}
            ]
        },
    )


Quantity = Annotated[str, quantity_field()]
"""A resource quantity (``500m``, ``256Mi``); the API server checks the syntax."""


def pattern_as_rule(pattern: str, message: str, *more_rules: dict[str, str]) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` that moves a string field's ``pattern`` into a CEL rule.

    The API server words a failed ``pattern`` as the raw regular expression; the rule's ``messageExpression``
    is ``message`` followed by the value given. pydantic still checks ``pattern`` itself. The field must
    have a ``maxLength``, which bounds the rule's cost. ``more_rules`` are the field's other CEL rules.
    """
    rule = {
        "rule": f"self.matches({cel_string(pattern)})",
        "message": message,
        "messageExpression": _naming_the_value(message),
    }

    def edit(schema: dict[str, Any]) -> None:
        if schema.pop("pattern", None) != pattern or "maxLength" not in schema:
            raise ValueError(f"pattern_as_rule({pattern!r}) needs that pattern and a maxLength: {schema}")
        schema["x-kubernetes-validations"] = [rule, *more_rules]

    return edit


class ObjectMeta(BaseModel):
    """The subset of metav1.ObjectMeta that waso reads; every other field is kept as it came."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, alias_generator=to_camel, extra="allow")

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: Timestamp | None = None
    deletion_timestamp: Timestamp | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    finalizers: list[str] | None = None

    def label(self, key: str) -> str | None:
        return (self.labels or {}).get(key)
