"""Unit tests of waso.api: generated CRDs are current, conditions behave like metav1.Condition + kstatus."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from gen_crds import CHART_CRDS, CRDS, REFERENCE, render, render_reference
from pydantic import ValidationError

from waso.api.conditions import (
    REASON_PATTERN,
    Condition,
    ConditionType,
    Reason,
    find_condition,
    set_condition,
    set_kstatus,
)
from waso.api.crd import SchemaError, _structural, build_crds
from waso.api.quota import TenantQuotaSpec
from waso.api.session import WhatsAppSessionSpec

T0 = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("directory", [CRDS, CHART_CRDS], ids=["crds", "chart"])
def test_crds_directory_is_current(directory: Path) -> None:
    wanted = build_crds()
    on_disk = {p.name: p.read_text() for p in Path(directory).glob("*.yaml")}
    assert set(on_disk) == set(wanted), f"{directory} has other files than the generator writes: run `make crds`"
    for name, crd in wanted.items():
        assert on_disk[name] == render(crd), f"{directory}/{name} is stale: run `make crds`"
    assert REFERENCE.read_text() == render_reference(wanted), "docs/api-reference.md is stale: run `make crds`"


def test_generator_refuses_keywords_the_api_server_would_not_take() -> None:
    with pytest.raises(SchemaError, match=r"spec\.x: keywords not supported.*exclusiveMinimum"):
        _structural({"type": "object", "properties": {"x": {"type": "integer", "exclusiveMinimum": 0}}}, {}, "spec")
    with pytest.raises(SchemaError, match="unions"):
        _structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {}, "spec.y")


def _rules(node: Any, path: str) -> Iterator[tuple[str, dict[str, str]]]:
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            yield path, rule
        for key, child in node.items():
            if key != "x-kubernetes-validations":
                yield from _rules(child, f"{path}.{key}")
    elif isinstance(node, list):
        for child in node:
            yield from _rules(child, path)


def test_every_cel_rule_has_a_message_expression_and_a_fallback_message() -> None:
    rules = [(f"{name}{path}", rule) for name, crd in build_crds().items() for path, rule in _rules(crd, "")]
    assert len(rules) >= 8
    for where, rule in rules:
        assert rule.get("message"), where
        assert rule.get("messageExpression"), where
        # string(int) + '...' is estimated without bound and the API server refuses the CRD: format() instead.
        assert "string(" not in rule["messageExpression"], where


def test_spec_schemas_use_no_json_schema_pattern() -> None:
    """A failed pattern is worded by the API server as the raw regular expression; spec fields use CEL rules."""
    for name, crd in build_crds().items():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert "pattern" not in repr(spec), name


def test_pairing_streams_default_never_exceeds_max_sessions() -> None:
    assert TenantQuotaSpec().pairing_streams_limit == 2
    assert TenantQuotaSpec(max_sessions=1).pairing_streams_limit == 1
    assert TenantQuotaSpec(max_sessions=0).pairing_streams_limit == 0
    assert TenantQuotaSpec(max_sessions=1, max_pairing_streams=0).pairing_streams_limit == 0
    assert TenantQuotaSpec(max_sessions=50, max_pairing_streams=7).pairing_streams_limit == 7
    assert "maxPairingStreams" not in TenantQuotaSpec(max_sessions=1).to_wire()
    assert (
        "maxPairingStreams"
        not in build_crds()["tenantquotas.waso.dev.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
            "properties"
        ]["spec"]["default"]
    )


def test_every_reason_matches_the_condition_reason_pattern() -> None:
    assert all(re.fullmatch(REASON_PATTERN, reason) for reason in Reason)
    assert all(re.fullmatch(r"[A-Z][A-Za-z]*", kind) for kind in ConditionType)


def test_model_validation_mirrors_the_schema() -> None:
    assert WhatsAppSessionSpec(phone_number="+4915112345678").pairing.method == "QR"
    with pytest.raises(ValidationError, match=r"phone_?[Nn]umber"):
        WhatsAppSessionSpec(phone_number="015112345678")
    with pytest.raises(ValidationError, match=r"device_?[Nn]ame"):  # the pattern moved to CEL in the CRD only
        WhatsAppSessionSpec(phone_number="+4915112345678", device_name=" x")
    with pytest.raises(ValidationError):
        TenantQuotaSpec(max_sessions=-1)
    assert TenantQuotaSpec().to_wire()["podResources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }


def test_set_condition_moves_transition_time_only_on_status_change() -> None:
    conditions = set_condition((), "Admitted", "False", "QuotaExceeded", "5 of 5", observed_generation=1, now=T0)
    later = T0 + timedelta(minutes=5)
    same_status = set_condition(
        conditions, "Admitted", "False", "CapacityExceeded", "35 of 35", observed_generation=2, now=later
    )
    condition = find_condition(same_status, "Admitted")
    assert condition is not None
    assert condition.last_transition_time == T0
    assert (condition.reason, condition.message, condition.observed_generation) == ("CapacityExceeded", "35 of 35", 2)

    flipped = set_condition(same_status, "Admitted", "True", "Admitted", "", observed_generation=2, now=later)
    condition = find_condition(flipped, "Admitted")
    assert condition is not None
    assert condition.last_transition_time == later
    assert len(flipped) == 1


def test_set_condition_keeps_other_conditions_in_place() -> None:
    conditions = set_condition((), "Admitted", "True", "Admitted", "", observed_generation=1, now=T0)
    conditions = set_condition(conditions, "Paired", "Unknown", "NoRuntimeReport", "", observed_generation=1, now=T0)
    conditions = set_condition(conditions, "Admitted", "False", "Suspended", "", observed_generation=2, now=T0)
    assert [c.type for c in conditions] == ["Admitted", "Paired"]


@pytest.mark.parametrize(
    ("progress", "ready", "present"),
    [("Ready", "True", set()), ("Reconciling", "False", {"Reconciling"}), ("Stalled", "False", {"Stalled"})],
)
def test_kstatus_never_reports_reconciling_and_stalled_together(progress: str, ready: str, present: set[str]) -> None:
    start = set_kstatus((), "Reconciling", "Progressing", "", observed_generation=1, now=T0)
    start = set_kstatus(start, "Stalled", "LoggedOut", "", observed_generation=1, now=T0)
    result = set_kstatus(start, progress, "Why", "", observed_generation=1, now=T0)  # type: ignore[arg-type]
    assert find_condition(result, "Ready") == Condition(
        type="Ready", status=ready, reason="Why", message="", observed_generation=1, last_transition_time=T0
    )
    assert {c.type for c in result} - {"Ready"} == present


def test_timestamps_are_utc_whole_seconds_with_z() -> None:
    local = datetime(2026, 11, 28, 13, 0, 0, 123456, tzinfo=UTC).astimezone()
    condition = Condition(type="Ready", status="True", reason="Ready", last_transition_time=local)
    assert condition.to_wire()["lastTransitionTime"] == "2026-11-28T13:00:00Z"
    with pytest.raises(ValidationError, match="time zone"):
        Condition(type="Ready", status="True", reason="Ready", last_transition_time=datetime(2026, 1, 1))
