"""Who may call the runtime's API: Kubernetes authentication and authorization, as kube-rbac-proxy does it.

A caller presents a bearer token the API server accepts (a ServiceAccount token from
TokenRequest for the audience ``waso``, or a token of any of the cluster's authenticators).
The runtime asks the API server who it is (TokenReview, with waso's audiences) and whether
that user may do what the request does (SubjectAccessReview) on a *virtual subresource* of
the session in the runtime's namespace:

======================================  ======  ==============================
request                                  verb    resource
======================================  ======  ==============================
``POST /v1/sessions/{name}/messages``    create  ``whatsappsessions/messages``
``GET /v1/sessions/{name}/messages``     list    ``whatsappsessions/messages``
``GET /v1/sessions/{name}/qr``           get     ``whatsappsessions/qr``
``POST /v1/sessions/{name}/pair-code``   create  ``whatsappsessions/pairingcode``
``GET /metrics``                         get     non-resource URL ``/metrics``
======================================  ======  ==============================

so tenants grant access with plain Roles (``resources: [whatsappsessions/messages]``) that GitOps
manages. Both answers are cached (bounded size, short TTL; a refusal shorter than a grant), so a
steady stream of sends costs no API round trip. 401 means the token was not accepted; 403 that
its user lacks the permission, named in the message.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import TTLCache

from waso.api.base import GROUP
from waso.api.session import WhatsAppSession
from waso.kube import ApiError

AUDIENCE = "waso"
"""The audience a token must be meant for (TokenRequest ``audiences: [waso]``)."""


class Reviewer(Protocol):
    """Posts a review object to the API server (``KubeClient.create``) and returns the answer."""

    def __call__(self, obj: dict[str, Any], manager: str) -> Awaitable[dict[str, Any]]: ...


@dataclass(frozen=True)
class Caller:
    username: str
    uid: str
    groups: tuple[str, ...]
    extra: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Permission:
    """What a request needs: a verb on a session's virtual subresource, or on a non-resource path."""

    verb: str
    subresource: str | None = None
    path: str | None = None

    def describe(self, namespace: str, name: str | None) -> str:
        if self.path is not None:
            return f"{self.verb} {self.path}"
        target = f"{WhatsAppSession.PLURAL}/{self.subresource}"
        return f"{self.verb} {target} ({GROUP}) of {name or '*'} in namespace {namespace}"


class Unauthenticated(Exception):
    """401: no token, or one the API server does not accept for waso."""


class Forbidden(Exception):
    """403: the caller is known but lacks the permission."""


class ReviewUnavailable(Exception):
    """The API server could not answer the review (503: retry)."""


class Authorizer:
    def __init__(
        self,
        review: Reviewer,
        namespace: str,
        audiences: tuple[str, ...] = (AUDIENCE,),
        *,
        ttl: float = 60.0,
        denied_ttl: float = 10.0,
        size: int = 4096,
        timer: Callable[[], float] = time.monotonic,
        on_review: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self.review = review
        self.namespace = namespace
        self.audiences = audiences
        self._callers: TTLCache[str, Caller] = TTLCache(size, ttl, timer)
        self._rejected: TTLCache[str, str] = TTLCache(size, denied_ttl, timer)
        self._allowed: TTLCache[tuple[Caller, Permission, str | None], bool] = TTLCache(size, ttl, timer)
        self._denied: TTLCache[tuple[Caller, Permission, str | None], str] = TTLCache(size, denied_ttl, timer)
        self._inflight: dict[object, asyncio.Future[Any]] = {}
        self.on_review = on_review

    async def check(self, authorization: str | None, permission: Permission, name: str | None = None) -> Caller:
        """The caller, if the token is accepted and allowed ``permission`` on session ``name``."""
        caller = await self.authenticate(authorization)
        key = (caller, permission, name)
        if key in self._allowed:
            return caller
        if key in self._denied:
            raise Forbidden(self._denied[key])
        answer: tuple[bool, str] = await self._once(key, lambda: self._access_review(caller, permission, name))
        allowed, reason = answer
        if allowed:
            self._allowed[key] = True
            return caller
        message = f"{caller.username} may not {permission.describe(self.namespace, name)}" + (
            f": {reason}" if reason else ""
        )
        self._denied[key] = message
        raise Forbidden(message)

    async def authenticate(self, authorization: str | None) -> Caller:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("an Authorization: Bearer <token> header is required (a token for audience waso)")
        digest = hashlib.sha256(token.encode()).hexdigest()  # tokens are never kept, only their digests
        if digest in self._callers:
            return self._callers[digest]
        if digest in self._rejected:
            raise Unauthenticated(self._rejected[digest])
        reviewed: tuple[Caller | None, str] = await self._once(digest, lambda: self._token_review(token))
        caller, problem = reviewed
        if caller is None:
            self._rejected[digest] = problem
            raise Unauthenticated(problem)
        self._callers[digest] = caller
        return caller

    async def _once(self, key: object, ask: Callable[[], Awaitable[Any]]) -> Any:
        """One review per key at a time: concurrent requests with the same question share its answer."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answer = await ask()
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            future.set_result(answer)
            return answer
        finally:
            self._inflight.pop(key, None)

    async def _token_review(self, token: str) -> tuple[Caller | None, str]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {},
            "spec": {"token": token, "audiences": list(self.audiences)},
        }
        self.on_review("TokenReview")
        status = (await self._post(body)).get("status") or {}
        if not status.get("authenticated"):
            error = status.get("error") or "the API server does not accept it"
            return None, f"the token was not accepted for audience {', '.join(self.audiences)}: {error}"
        user = status.get("user") or {}
        extra = tuple(sorted((k, tuple(v)) for k, v in (user.get("extra") or {}).items()))
        groups = tuple(user.get("groups") or ())
        return Caller(str(user.get("username", "")), str(user.get("uid", "")), groups, extra), ""

    async def _access_review(self, caller: Caller, permission: Permission, name: str | None) -> tuple[bool, str]:
        spec: dict[str, Any] = {
            "user": caller.username,
            "uid": caller.uid,
            "groups": list(caller.groups),
            "extra": {k: list(v) for k, v in caller.extra},
        }
        if permission.path is not None:
            spec["nonResourceAttributes"] = {"path": permission.path, "verb": permission.verb}
        else:
            spec["resourceAttributes"] = {
                "namespace": self.namespace,
                "verb": permission.verb,
                "group": GROUP,
                "resource": WhatsAppSession.PLURAL,
                "subresource": permission.subresource,
                **({"name": name} if name else {}),
            }
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {}, "spec": spec}
        self.on_review("SubjectAccessReview")
        status = (await self._post(body)).get("status") or {}
        return bool(status.get("allowed")) and not status.get("denied"), str(status.get("reason") or "")

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.review(body, "waso-runtime")
        except (ApiError, OSError) as error:
            raise ReviewUnavailable(f"the API server could not review the request: {error}") from error
