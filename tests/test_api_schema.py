"""The waso CRDs against the real API server: samples apply, bad input is refused by field path,
printer columns read status, and objects round-trip through the models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.conftest import ControlPlane
from tests.support import kubectl
from waso.api.base import GROUP, VERSION
from waso.api.quota import TenantQuota
from waso.api.session import WhatsAppSession

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "docs/samples").glob("*.yaml"))


def session(namespace: str, name: str = "s1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WhatsAppSession",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"phoneNumber": "+4915112345678", **spec},
    }


def quota(namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TenantQuota",
        "metadata": {"name": "default", "namespace": namespace},
        "spec": spec,
    }


def apply(control_plane: ControlPlane, manifest: dict[str, Any] | str, check: bool = True) -> str:
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    result = kubectl(
        control_plane.kubeconfig, "apply", "--server-side", "--validate=strict", "-f", "-", stdin=text, check=check
    )
    return result.stderr if result.returncode else ""


def test_samples_apply(crds: None, control_plane: ControlPlane, request: pytest.FixtureRequest) -> None:
    assert len(SAMPLES) >= 2
    for sample in SAMPLES:
        kubectl(control_plane.kubeconfig, "apply", "--server-side", "--validate=strict", "-f", str(sample))
    request.addfinalizer(
        lambda: kubectl(control_plane.kubeconfig, "delete", "--wait=false", "-f", str(ROOT / "docs/samples"))
    )
    listed = [
        name
        for namespace in ("acme", "globex")  # the samples' tenants; other tests' namespaces may still terminate
        for name in kubectl(control_plane.kubeconfig, "get", "was,tq", "-n", namespace, "-o", "name").stdout.split()
    ]
    assert len([n for n in listed if n.startswith("whatsappsession")]) == 5
    assert len([n for n in listed if n.startswith("tenantquota")]) == 2
    stored = yaml.safe_load(
        kubectl(control_plane.kubeconfig, "get", "tq", "-n", "globex", "default", "-o", "yaml").stdout
    )
    # Unset fields took the schema defaults.
    assert stored["spec"]["sessionsPerPod"] == 20
    assert stored["spec"]["podResources"]["limits"]["memory"] == "512Mi"


BAD_MANIFESTS: list[tuple[str, Any, str]] = [
    (
        "phone without plus",
        lambda ns: session(ns, phoneNumber="4915112345678"),
        r'spec\.phoneNumber: .*phoneNumber must be in E\.164 form .*, not "4915112345678"',
    ),
    (
        "phone with letters",
        lambda ns: session(ns, phoneNumber="+49151ABCDEF"),
        r'spec\.phoneNumber: .*phoneNumber must be in E\.164 form .*, not "\+49151ABCDEF"',
    ),
    ("phone too long", lambda ns: session(ns, phoneNumber="+1234567890123456"), r"spec\.phoneNumber"),
    ("phone with country code 0", lambda ns: session(ns, phoneNumber="+0123456789"), r"spec\.phoneNumber"),
    ("phone missing", lambda ns: {**session(ns), "spec": {"priority": 1}}, r"spec\.phoneNumber: Required value"),
    ("unknown pairing method", lambda ns: session(ns, pairing={"method": "SMS"}), r"spec\.pairing\.method"),
    ("negative priority", lambda ns: session(ns, priority=-1), r"spec\.priority"),
    ("absurd priority", lambda ns: session(ns, priority=5000), r"spec\.priority"),
    ("suspend as string", lambda ns: session(ns, suspend="yes"), r"spec\.suspend"),
    ("priority as string", lambda ns: session(ns, priority="high"), r"spec\.priority"),
    ("unknown spec field", lambda ns: session(ns, phone="+4915112345678"), r"\.spec\.phone\b"),
    ("empty device name", lambda ns: session(ns, deviceName=""), r"spec\.deviceName"),
    (
        "device name with padding",
        lambda ns: session(ns, deviceName=" x "),
        r'spec\.deviceName: .*deviceName must not begin or end with white space, not " x "',
    ),
    ("name too long", lambda ns: session(ns, name="s" * 64), r"metadata\.name"),
    ("negative maxSessions", lambda ns: quota(ns, maxSessions=-1), r"spec\.maxSessions"),
    ("absurd maxSessions", lambda ns: quota(ns, maxSessions=1_000_000), r"spec\.maxSessions"),
    ("zero messagesPerMinute", lambda ns: quota(ns, messagesPerMinute=0), r"spec\.messagesPerMinute"),
    ("zero sessionsPerPod", lambda ns: quota(ns, sessionsPerPod=0), r"spec\.sessionsPerPod"),
    ("maxSessions as text", lambda ns: quota(ns, maxSessions="ten"), r"spec\.maxSessions"),
    (
        "pairing streams above sessions",
        lambda ns: quota(ns, maxSessions=1, maxPairingStreams=3),
        r"spec\.maxPairingStreams: .*maxPairingStreams \(3\) cannot exceed maxSessions \(1\)",
    ),
    (
        "memory that is not a quantity",
        lambda ns: quota(ns, podResources={"limits": {"memory": "lots"}}),
        r'spec\.podResources\.limits\.memory: .*memory must be a Kubernetes quantity such as .*, not "lots"',
    ),
    (
        "cpu that is not a quantity, with a limit to compare with",
        lambda ns: quota(ns, podResources={"requests": {"cpu": "1.5.5"}, "limits": {"cpu": "2"}}),
        r'spec\.podResources\.requests\.cpu: .*cpu must be a Kubernetes quantity such as .*, not "1\.5\.5"',
    ),
    (
        "requests above limits",
        lambda ns: quota(ns, podResources={"requests": {"memory": "1Gi"}, "limits": {"memory": "512Mi"}}),
        r"spec\.podResources\.requests\.memory: .*requests\.memory \(1Gi\) must not exceed limits\.memory \(512Mi\)",
    ),
    ("unknown quota field", lambda ns: quota(ns, maxSesions=3), r"\.spec\.maxSesions\b"),
]


@pytest.mark.parametrize(("case", "manifest", "field_path"), BAD_MANIFESTS, ids=[c[0] for c in BAD_MANIFESTS])
def test_bad_manifest_is_rejected_naming_the_field(
    crds: None, control_plane: ControlPlane, namespace: str, case: str, manifest: Any, field_path: str
) -> None:
    error = apply(control_plane, manifest(namespace), check=False)
    assert error, f"{case}: the API server accepted it"
    assert re.search(field_path, error), f"{case}: {field_path!r} not in: {error}"
    # The API server's words for a failed pattern, and CEL's for quantity() on a non-quantity, quote a raw
    # regular expression: every such check is a CEL rule with a message for people instead.
    assert "should match" not in error, error
    assert "regular expression" not in error, error
    assert not kubectl(control_plane.kubeconfig, "get", "was,tq", "-n", namespace, "-o", "name").stdout.strip()


@pytest.mark.parametrize("max_sessions", [1, 0])
def test_a_quota_giving_only_max_sessions_is_accepted(
    crds: None, control_plane: ControlPlane, namespace: str, max_sessions: int
) -> None:
    """The defaults never break the CEL rules: maxPairingStreams is absent, not 2, and counts as min(2, maxSessions)."""
    apply(control_plane, quota(namespace, maxSessions=max_sessions))
    stored = client.CustomObjectsApi(control_plane.api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "tenantquotas", "default"
    )
    assert "maxPairingStreams" not in stored["spec"]
    assert stored["spec"]["sessionsPerPod"] == 20  # the other defaults still apply
    assert TenantQuota.model_validate(stored).spec.pairing_streams_limit == max_sessions


def test_phone_number_cannot_change_after_creation(crds: None, control_plane: ControlPlane, namespace: str) -> None:
    apply(control_plane, session(namespace, phoneNumber="+4915112345678"))
    apply(control_plane, session(namespace, phoneNumber="+4915112345678", priority=7))  # other changes are fine
    error = apply(control_plane, session(namespace, phoneNumber="+4915199999999"), check=False)
    assert re.search(
        r"spec\.phoneNumber: Invalid value: .*phoneNumber is immutable: it stays \+4915112345678, not \+4915199999999",
        error,
    ), error
    stored = kubectl(control_plane.kubeconfig, "get", "was", "s1", "-n", namespace, "-o", "jsonpath={.spec}").stdout
    assert '"phoneNumber":"+4915112345678"' in stored
    assert '"priority":7' in stored


def test_status_rejects_a_malformed_condition_reason(crds: None, control_plane: ControlPlane, namespace: str) -> None:
    apply(control_plane, session(namespace))
    custom = client.CustomObjectsApi(control_plane.api)
    bad = {"type": "Ready", "status": "True", "reason": "not camel case", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    with pytest.raises(client.exceptions.ApiException) as raised:
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "whatsappsessions", "s1", {"status": {"conditions": [bad]}}
        )
    assert raised.value.status == 422
    assert "status.conditions[0].reason" in (raised.value.body or "")


def _write_status(control_plane: ControlPlane, namespace: str, name: str, status: dict[str, Any], plural: str) -> None:
    client.CustomObjectsApi(control_plane.api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, plural, name, {"status": status}
    )


def _table(output: str) -> list[dict[str, str]]:
    lines = output.strip().splitlines()
    header = lines[0]
    found = list(re.finditer(r"\S+(?: \S+)*", header))  # kubectl parts columns by 3 spaces; LAST ERROR is one
    starts = [m.start() for m in found]
    names = [m.group() for m in found]
    return [
        {
            names[i]: line[start : (starts[i + 1] if i + 1 < len(starts) else None)].strip()
            for i, start in enumerate(starts)
        }
        for line in lines[1:]
    ]


def test_printer_columns_show_status(crds: None, control_plane: ControlPlane, namespace: str) -> None:
    apply(control_plane, session(namespace, phoneNumber="+4915112340001"))
    apply(control_plane, session(namespace, name="s2", phoneNumber="+4915112340002"))
    apply(control_plane, quota(namespace, maxSessions=5, messagesPerMinute=90))
    now = "2026-11-28T12:00:00Z"
    _write_status(
        control_plane,
        namespace,
        "s1",
        {
            "phase": "Connected",
            "shard": 2,
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "lastTransitionTime": now}],
            "runtime": {"state": "Connected", "jid": "4915112340001:53@s.whatsapp.net", "deviceId": 53},
        },
        "whatsappsessions",
    )
    _write_status(
        control_plane,
        namespace,
        "s2",
        {
            "phase": "Waiting",
            "observedGeneration": 1,
            "endpoint": "http://waso-sessions-0.waso-sessions:8080/v1/sessions/s2",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "QuotaExceeded", "lastTransitionTime": now},
                {"type": "Admitted", "status": "False", "reason": "QuotaExceeded", "lastTransitionTime": now},
            ],
            "runtime": {"state": "Disconnected", "lastError": "stream replaced"},
        },
        "whatsappsessions",
    )
    _write_status(
        control_plane, namespace, "default", {"used": {"sessions": 1}, "hard": {"sessions": 5}}, "tenantquotas"
    )

    sessions = _table(kubectl(control_plane.kubeconfig, "get", "was", "-n", namespace).stdout)
    assert sessions == [
        {
            "NAME": "s1",
            "PHONE": "+4915112340001",
            "PHASE": "Connected",
            "READY": "True",
            "REASON": "Ready",
            "SHARD": "2",
            "AGE": sessions[0]["AGE"],
        },
        {
            "NAME": "s2",
            "PHONE": "+4915112340002",
            "PHASE": "Waiting",
            "READY": "False",
            "REASON": "QuotaExceeded",  # why it waits, without -o yaml
            "SHARD": "",  # unset: blank
            "AGE": sessions[1]["AGE"],
        },
    ]
    wide = _table(kubectl(control_plane.kubeconfig, "get", "was", "-n", namespace, "-o", "wide").stdout)
    assert [(r["DEVICE"], r["ENDPOINT"], r["LAST ERROR"]) for r in wide] == [
        ("53", "", ""),
        ("", "http://waso-sessions-0.waso-sessions:8080/v1/sessions/s2", "stream replaced"),
    ]
    assert [r["REASON"] for r in wide] == ["Ready", "QuotaExceeded"]
    quotas = _table(kubectl(control_plane.kubeconfig, "get", "tq", "-A").stdout)
    row = next(r for r in quotas if r["NAMESPACE"] == namespace)
    assert (row["SESSIONS"], row["MAX"], row["MSGS/MIN"]) == ("1", "5", "90")


def test_objects_round_trip_through_the_models(crds: None, control_plane: ControlPlane, namespace: str) -> None:
    apply(control_plane, session(namespace, pairing={"method": "PhoneCode"}, deviceName="desk"))
    apply(control_plane, quota(namespace, maxSessions=3))
    _write_status(
        control_plane,
        namespace,
        "s1",
        {
            "phase": "Pairing",
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Admitted",
                    "status": "True",
                    "reason": "Admitted",
                    "message": "slot 1 of 35",
                    "observedGeneration": 1,
                    "lastTransitionTime": "2026-11-28T12:00:00Z",
                }
            ],
            "repairs": {"count": 1, "backups": [{"name": "b1", "takenAt": "2026-11-28T11:00:00Z"}]},
            "runtime": {"state": "AwaitingPairing", "qrExpiresAt": "2026-11-28T12:01:00Z", "lastError": "none"},
        },
        "whatsappsessions",
    )
    apply(control_plane, session(namespace, name="s2", phoneNumber="+4915112340002"))
    _write_status(
        control_plane,
        namespace,
        "s2",
        {
            "phase": "Banned",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "Banned", "lastTransitionTime": "2026-11-28T12:00:00Z"}
            ],
            "runtime": {"state": "Banned", "bannedUntil": "2026-11-29T12:00:00Z"},
        },
        "whatsappsessions",
    )
    custom = client.CustomObjectsApi(control_plane.api)
    objects = (
        (WhatsAppSession, "whatsappsessions", "s1"),
        (WhatsAppSession, "whatsappsessions", "s2"),
        (TenantQuota, "tenantquotas", "default"),
    )
    for model, plural, name in objects:
        stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        parsed = model.model_validate(stored)
        assert parsed.to_wire() == stored
