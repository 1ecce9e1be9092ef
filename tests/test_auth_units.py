"""The runtime's authorizer (waso.session_runtime.auth) over a scripted API server: what it asks, what it caches.

The real TokenReview and SubjectAccessReview are exercised against the real API server in
tests/test_auth.py; here the API server's answers are scripted to prove the caching and the
messages on a fake clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from waso.kube import ApiError
from waso.session_runtime.auth import Authorizer, Forbidden, Permission, ReviewUnavailable, Unauthenticated

SEND = Permission("create", "messages")
METRICS = Permission("get", path="/metrics")


class ApiServer:
    """Answers reviews: tokens it knows, and the (user, verb, subresource) it allows."""

    def __init__(self) -> None:
        self.users = {"good": "system:serviceaccount:acme:app"}
        self.allowed = {("system:serviceaccount:acme:app", "create", "messages")}
        self.asked: list[dict[str, Any]] = []
        self.failing = False
        self.now = 0.0

    async def __call__(self, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        await asyncio.sleep(0)  # an API round trip yields, so concurrent requests overlap
        self.asked.append(obj)
        if self.failing:
            raise ApiError(500, "InternalError", "etcd is slow")
        spec = obj["spec"]
        if obj["kind"] == "TokenReview":
            user = self.users.get(spec["token"])
            if user is None:
                return {"status": {"authenticated": False, "error": "invalid bearer token"}}
            return {"status": {"authenticated": True, "user": {"username": user, "uid": "u1", "groups": ["g"]}}}
        attributes = spec.get("resourceAttributes") or spec.get("nonResourceAttributes")
        key = (spec["user"], attributes["verb"], attributes.get("subresource") or attributes.get("path"))
        return {"status": {"allowed": key in self.allowed}}

    def count(self, kind: str) -> int:
        return sum(1 for obj in self.asked if obj["kind"] == kind)


@pytest.fixture
def server() -> ApiServer:
    return ApiServer()


@pytest.fixture
def authorizer(server: ApiServer) -> Authorizer:
    return Authorizer(server, "acme", timer=lambda: server.now)


async def test_a_request_without_a_bearer_token_is_unauthenticated(authorizer: Authorizer, server: ApiServer) -> None:
    for header in (None, "", "Bearer ", "Basic Z29vZDp4"):
        with pytest.raises(Unauthenticated, match="Authorization: Bearer"):
            await authorizer.check(header, SEND, "s1")
    assert server.asked == []


async def test_an_unknown_token_is_refused_and_the_refusal_is_cached_briefly(
    authorizer: Authorizer, server: ApiServer
) -> None:
    with pytest.raises(Unauthenticated, match="invalid bearer token"):
        await authorizer.check("Bearer forged", SEND, "s1")
    with pytest.raises(Unauthenticated):
        await authorizer.check("Bearer forged", SEND, "s1")
    assert server.count("TokenReview") == 1
    server.now += 11  # the refusal is kept 10 s: a token just made valid works soon after
    server.users["forged"] = "alice"
    with pytest.raises(Forbidden):
        await authorizer.check("Bearer forged", SEND, "s1")


async def test_a_steady_stream_costs_one_review_of_each_kind(authorizer: Authorizer, server: ApiServer) -> None:
    for _ in range(1000):
        caller = await authorizer.check("Bearer good", SEND, "s1")
    assert caller.username == "system:serviceaccount:acme:app"
    assert (server.count("TokenReview"), server.count("SubjectAccessReview")) == (1, 1)
    review = server.asked[0]["spec"]
    assert review == {"token": "good", "audiences": ["waso"]}
    access = server.asked[1]["spec"]
    assert access["resourceAttributes"] == {
        "namespace": "acme", "verb": "create", "group": "waso.dev", "resource": "whatsappsessions",
        "subresource": "messages", "name": "s1",
    }  # fmt: skip
    assert (access["user"], access["uid"], access["groups"]) == ("system:serviceaccount:acme:app", "u1", ["g"])
    server.now += 61  # answers expire: permissions taken away take effect within a minute
    await authorizer.check("Bearer good", SEND, "s1")
    assert (server.count("TokenReview"), server.count("SubjectAccessReview")) == (2, 2)


async def test_concurrent_requests_share_one_review(authorizer: Authorizer, server: ApiServer) -> None:
    await asyncio.gather(*(authorizer.check("Bearer good", SEND, "s1") for _ in range(50)))
    assert (server.count("TokenReview"), server.count("SubjectAccessReview")) == (1, 1)


async def test_a_missing_permission_is_forbidden_and_named(authorizer: Authorizer, server: ApiServer) -> None:
    with pytest.raises(Forbidden) as refused:
        await authorizer.check("Bearer good", Permission("get", "qr"), "s1")
    assert str(refused.value) == (
        "system:serviceaccount:acme:app may not get whatsappsessions/qr (waso.dev) of s1 in namespace acme"
    )
    with pytest.raises(Forbidden, match="may not get /metrics"):
        await authorizer.check("Bearer good", METRICS)
    assert server.asked[-1]["spec"]["nonResourceAttributes"] == {"path": "/metrics", "verb": "get"}


async def test_an_api_server_that_cannot_answer_is_not_a_refusal(authorizer: Authorizer, server: ApiServer) -> None:
    server.failing = True
    with pytest.raises(ReviewUnavailable, match="etcd is slow"):
        await authorizer.check("Bearer good", SEND, "s1")
    server.failing = False
    await authorizer.check("Bearer good", SEND, "s1")  # nothing was cached from the failure
