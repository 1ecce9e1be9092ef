"""Who may call the runtime's API, against the real API server (TokenReview, SubjectAccessReview, RBAC).

The caching and the messages are proven on a fake clock in test_auth_units; here real
ServiceAccount tokens from TokenRequest meet a runtime process: 401 without an accepted token,
403 without the permission, 202 with it, tenants kept apart, and the reviews a stream of sends
costs. The runtime's own access (the ClusterRole the operator binds) is checked to be minimal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kopf.testing import KopfRunner
from kubernetes import client

from tests import test_runtime
from tests.conftest import ControlPlane
from tests.operator_support import Tenants, api_token, create_quota, create_session
from tests.runtime_support import Process, Reply, http_json, start_runtime
from tests.support import wait_for
from tests.test_runtime import PHONE, World

simulator = test_runtime.simulator
operator = test_runtime.operator
world = test_runtime.world

MESSAGE = {"to": "+4915199999999", "text": "hello"}


def _reviews(world: World, runtime: Process, kind: str) -> float:
    reply = http_json("GET", f"{runtime.url}/metrics", token=world.metrics_token)
    assert reply.status == 200, reply.body
    prefix = f'waso_runtime_auth_reviews_total{{kind="{kind}"}} '
    return sum(float(line.split()[-1]) for line in str(reply.body).splitlines() if line.startswith(prefix))


@pytest.fixture
def connected(world: World) -> tuple[World, Process]:
    """acme's runtime with s1 connected, and a quota that lets a thousand messages through."""
    create_quota(world.api, world.namespace, messagesPerMinute=60000, maxSessions=5)
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    world.pair_by_qr(runtime)
    world.wait_state("Connected")
    return world, runtime


def _send(runtime: Process, token: str | None) -> Reply:
    return http_json("POST", f"{runtime.url}/v1/sessions/s1/messages", MESSAGE, token=token)


def test_no_token_401_no_permission_403_with_the_role_202(connected: tuple[World, Process]) -> None:
    world, runtime = connected
    anonymous = _send(runtime, None)
    assert anonymous.status == 401
    assert "Authorization: Bearer" in anonymous.body["error"]
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    forged = _send(runtime, "not-a-token")
    assert forged.status == 401
    assert "not accepted" in forged.body["error"]

    # A token for the API server's own audience is not one for waso.
    other_audience = api_token(world.api, world.namespace, "other", audience="https://kubernetes.default.svc")
    assert _send(runtime, other_audience).status == 401

    bare = api_token(world.api, world.namespace, "bare", rules=None)
    refused = _send(runtime, bare)
    assert refused.status == 403
    assert refused.body["error"] == (
        f"system:serviceaccount:{world.namespace}:bare may not create whatsappsessions/messages (waso.dev) "
        f"of s1 in namespace {world.namespace}"
    )
    qr_only = api_token(
        world.api, world.namespace, "qr-only",
        rules=[{"apiGroups": ["waso.dev"], "resources": ["whatsappsessions/qr"], "verbs": ["get"]}],
    )  # fmt: skip
    assert _send(runtime, qr_only).status == 403  # a Role for another subresource grants no sending

    sent = _send(runtime, world.token)
    assert sent.status == 202, sent.body
    assert http_json("GET", f"{runtime.url}/healthz").status == 200  # probes stay open
    assert http_json("GET", f"{runtime.url}/readyz").status == 200


def test_a_token_of_one_tenant_is_refused_by_another_tenants_runtime(
    connected: tuple[World, Process], tenants: Tenants
) -> None:
    world, runtime = connected
    other = tenants.namespace("globex")
    stranger = api_token(world.api, other, "app")  # every permission, in its own namespace
    refused = _send(runtime, stranger)
    assert refused.status == 403
    assert f"system:serviceaccount:{other}:app may not create" in refused.body["error"]


def test_a_thousand_sends_cost_one_token_review(connected: tuple[World, Process]) -> None:
    world, runtime = connected
    before = _reviews(world, runtime, "TokenReview")  # the metrics token is reviewed (and cached) here
    statuses = [_send(runtime, world.token).status for _ in range(1000)]
    assert statuses == [202] * 1000
    after = _reviews(world, runtime, "TokenReview")
    assert after - before <= 2, (before, after)


def test_metrics_need_the_permission_prometheus_is_given(connected: tuple[World, Process]) -> None:
    world, runtime = connected
    assert http_json("GET", f"{runtime.url}/metrics").status == 401
    refused = http_json("GET", f"{runtime.url}/metrics", token=world.token)  # an application, not a scraper
    assert refused.status == 403
    assert "may not get /metrics" in refused.body["error"]
    assert http_json("GET", f"{runtime.url}/metrics", token=world.metrics_token).status == 200


def test_the_runtimes_own_access_is_minimal(
    control_plane: ControlPlane, tenants: Tenants, simulator: Process, operator: KopfRunner, tmp_path: Path
) -> None:
    """The operator binds each tenant's runtime to reviews; nothing else cluster-wide, nothing in other tenants."""
    acme, globex = tenants.namespace("acme"), tenants.namespace("globex")
    runtime = start_runtime(control_plane.kubeconfig, acme, 0, tmp_path / "data", simulator.url, tmp_path)
    try:
        create_session(control_plane.api, acme, "s1", PHONE)
        authorization = client.AuthorizationV1Api(control_plane.api)
        user = f"system:serviceaccount:{acme}:waso-runtime"
        groups = ["system:serviceaccounts", f"system:serviceaccounts:{acme}", "system:authenticated"]

        def may(
            verb: str, resource: str, group: str = "", namespace: str | None = None, sub: str | None = None
        ) -> bool:
            attributes = client.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, namespace=namespace, subresource=sub
            )
            spec = client.V1SubjectAccessReviewSpec(user=user, groups=groups, resource_attributes=attributes)
            return bool(
                authorization.create_subject_access_review(client.V1SubjectAccessReview(spec=spec)).status.allowed
            )

        # The binding to reviews and the tenant's Role are two objects, applied one after the other.
        wait_for(lambda: may("create", "tokenreviews", "authentication.k8s.io")
                 and may("get", "whatsappsessions", "waso.dev", acme), timeout=60,
                 what="the operator to bind the runtime to reviews and to its Role")  # fmt: skip
        assert may("create", "subjectaccessreviews", "authorization.k8s.io")
        assert may("list", "webhooks", "waso.dev", acme)
        assert may("patch", "webhooks", "waso.dev", acme, "status")
        assert not may("get", "secrets", "", acme)  # signing keys: the tenant grants each by name
        assert not may("get", "whatsappsessions", "waso.dev", globex)  # another tenant
        assert not may("update", "whatsappsessions", "waso.dev", acme)  # specs are the tenant's
        assert not may("create", "localsubjectaccessreviews", "authorization.k8s.io", acme)
        assert not may("list", "secrets", "", acme)
        assert not may("create", "clusterrolebindings", "rbac.authorization.k8s.io")
        assert not may("create", "serviceaccounts", "", acme, "token")  # it cannot mint tokens for anyone
        assert not may("create", "whatsappsessions", "waso.dev", acme, "messages")  # nor send as the tenant
    finally:
        runtime.stop(kill=True)
