"""The runtime's HTTP API: probes, metrics, QR stream (Server-Sent Events), pairing code, messages.

Every malformed request gets a 4xx with a JSON ``{"error": ...}`` that says what is
wrong (``json_errors`` also turns aiohttp's own 404, 405 and 413 into that shape); only
``application/json`` bodies are read (415 otherwise), so a cross-origin form cannot send.

The QR stream is Server-Sent Events through aiohttp-sse (framing, keep-alive pings, a send
timeout that aborts a client that stopped reading). What is ours: the caps (the pod's, and
the tenant's maxPairingStreams over all its shards, in ``streams``), the stream's timeout,
and noticing a client that left while nothing was being written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from pymongo.errors import PyMongoError

from waso.api.session import E164_PATTERN, RuntimeState
from waso.session_runtime import metrics
from waso.session_runtime.auth import Forbidden, Permission, ReviewUnavailable, Unauthenticated
from waso.session_runtime.lifecycle import qr_payload
from waso.session_runtime.ratelimit import RateLimiterUnavailable
from waso.session_runtime.runtime import Runtime
from waso.session_runtime.store import MAX_PAGE, BadCursor
from waso.session_runtime.streams import Refused, Slot, SlotsUnavailable
from waso.session_runtime.supervisor import SessionSupervisor
from waso.session_runtime.transport import TransportError

log = logging.getLogger("waso.runtime")
DISCONNECT_POLL_SECONDS = 0.25
"""How often a QR stream checks that its client is still connected (see ``_pairing_events``)."""
RUNTIME_KEY = web.AppKey("runtime", Runtime)


class SendMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(pattern=E164_PATTERN, description="recipient in E.164 form")
    text: str = Field(min_length=1, max_length=4096)


def _error(status: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json", headers=headers or None)


def _problems(error: ValidationError, whole: str) -> str:
    """pydantic's findings, one per field: 'limit: Input should be less than or equal to 500'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or whole}: {e['msg']}" for e in error.errors())


def _runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME_KEY]


def _session(request: web.Request) -> SessionSupervisor:
    name = request.match_info["name"]
    supervisor = _runtime(request).sessions.get(name)
    if supervisor is None:
        raise _error(web.HTTPNotFound, f"session {name!r} is not served by this runtime (wrong shard or not found)")
    return supervisor


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    if not runtime.synced.is_set():
        raise _error(web.HTTPServiceUnavailable, "sessions not listed yet")
    if not runtime.heartbeat_ok:
        raise _error(web.HTTPServiceUnavailable, "heartbeat lease not held")
    return web.Response(text="ok")


async def metrics_endpoint(request: web.Request) -> web.Response:
    states: dict[str, int] = {state.value: 0 for state in RuntimeState}
    for supervisor in _runtime(request).sessions.values():
        states[supervisor.state.value] += 1
    for state, count in states.items():
        metrics.SESSIONS.labels(state).set(count)
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _data(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


async def qr_stream(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    supervisor = _session(request)
    if supervisor.state == RuntimeState.CONNECTED:
        raise _error(web.HTTPConflict, "the session is already paired and connected")
    if not supervisor.wanted.is_set():
        raise _error(web.HTTPConflict, "the session is not running (not admitted or suspended)")
    slots = runtime.stream_slots
    tenant_cap = runtime.tenant_quota.pairing_streams_limit
    try:
        slot = await slots.acquire(runtime.namespace, tenant_cap)
    except Refused as refused:
        metrics.QR_REFUSED.labels(refused.cap).inc()
        message = (
            f"this pod already serves {refused.open} QR streams"
            if refused.cap == "pod"
            else f"the tenant already has {refused.open} of {refused.limit} QR streams open "
            "(TenantQuota maxPairingStreams)"
        )
        raise _error(web.HTTPTooManyRequests, message, **{"Retry-After": "10"}) from None
    except SlotsUnavailable as error:
        raise _error(
            web.HTTPServiceUnavailable, f"QR stream slots unavailable: {error}", **{"Retry-After": "5"}
        ) from None
    metrics.QR_STREAMS.inc()
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    supervisor.listeners.add(queue)
    stream = EventSourceResponse(sep="\n", ping_interval=runtime.config.keepalive_seconds)
    try:
        await stream.prepare(request)
        async with stream:  # ends the keep-alive pings on the way out
            await _pairing_events(request, stream, queue, supervisor, slot)
    except (ConnectionResetError, TimeoutError):
        pass  # the client went away, or stopped reading (aiohttp-sse aborted the connection)
    finally:
        supervisor.listeners.discard(queue)
        metrics.QR_STREAMS.dec()
        await asyncio.shield(slots.release(slot))  # also when cancelled: the slot is the point
    return stream


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pairing_events(
    request: web.Request,
    stream: EventSourceResponse,
    queue: asyncio.Queue[tuple[str, dict[str, Any]]],
    supervisor: SessionSupervisor,
    slot: Slot,
) -> None:
    """The session's state and QR code, then its events until paired, the timeout, or the client's leaving.

    aiohttp 3.14 has no public signal for a client that leaves while a handler waits
    (``Request.wait_for_disconnection`` came and went in 3.10), and its ``handler_cancellation``
    would cancel every handler of the runner mid-work (a send past the rate limit, a TokenReview
    that other requests share). So the stream looks at its connection itself, every
    ``DISCONNECT_POLL_SECONDS``, and frees its slot within that time of the client's leaving.
    """
    runtime = _runtime(request)
    slots = runtime.stream_slots
    timeout = runtime.config.qr_stream_timeout
    await stream.send(_data({"state": supervisor.state.value}), event="status")
    if supervisor.qr is not None:
        await stream.send(_data(qr_payload(supervisor.qr)), event="qr")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    refresh_at = loop.time() + slots.refresh_seconds
    while stream.is_connected() and not _client_gone(request):
        now = loop.time()
        if now >= deadline:
            await stream.send(_data({"after": timeout}), event="timeout")
            return
        if now >= refresh_at:
            if not await slots.refresh(slot, runtime.tenant_quota.pairing_streams_limit):
                await stream.send(_data({"error": "the stream lost its slot (maxPairingStreams)"}), event="error")
                return
            refresh_at = now + slots.refresh_seconds
        wake = min(deadline, refresh_at, now + DISCONNECT_POLL_SECONDS)
        try:
            event, data = await asyncio.wait_for(queue.get(), wake - now)
        except TimeoutError:
            continue
        await stream.send(_data(data), event=event)
        if event == "paired":
            return


async def pair_code(request: web.Request) -> web.Response:
    supervisor = _session(request)
    transport = supervisor.transport
    if supervisor.state not in (RuntimeState.AWAITING_PAIRING, RuntimeState.CONNECTING) or transport is None:
        raise _error(web.HTTPConflict, f"the session is not waiting for pairing (state {supervisor.state.value})")
    try:
        code = await transport.request_pair_code()
    except TransportError as error:
        raise _error(web.HTTPServiceUnavailable, f"no pairing code: {error}") from None
    return web.json_response({"code": code, "phoneNumber": supervisor.identity.phone_number})


async def send_message(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    supervisor = _session(request)
    if request.content_type != "application/json":
        # A cross-origin browser form may send text/plain without a preflight: only JSON is taken.
        raise _error(web.HTTPUnsupportedMediaType, f"Content-Type must be application/json, not {request.content_type}")
    try:
        payload = await request.json()
    except ValueError:
        raise _error(web.HTTPBadRequest, 'the body must be JSON: {"to": "+4915...", "text": "..."}') from None
    except RecursionError:
        raise _error(web.HTTPBadRequest, "the body is nested too deeply to be a message") from None
    except LookupError:  # an unknown charset= of the Content-Type
        raise _error(web.HTTPUnsupportedMediaType, f"unknown charset {request.charset!r}") from None
    try:
        message = SendMessage.model_validate(payload)
    except ValidationError as error:
        raise _error(web.HTTPUnprocessableEntity, _problems(error, "body")) from None
    transport = supervisor.transport
    if supervisor.state != RuntimeState.CONNECTED or transport is None:
        raise _error(web.HTTPConflict, f"the session is not connected (state {supervisor.state.value})")
    tenant = runtime.namespace
    try:
        decision = await runtime.limiter.acquire(tenant, runtime.tenant_quota.messages_per_minute)
    except RateLimiterUnavailable as error:
        raise _error(web.HTTPServiceUnavailable, f"rate limiter unavailable: {error}", **{"Retry-After": "5"}) from None
    if not decision.allowed:
        metrics.RATE_LIMITED.labels(tenant).inc()
        retry = max(1, math.ceil(decision.retry_after))
        raise _error(
            web.HTTPTooManyRequests,
            f"tenant {tenant} is over its {runtime.tenant_quota.messages_per_minute} messages per minute",
            **{"Retry-After": str(retry)},
        )
    try:
        message_id = await transport.send_text(message.to, message.text)
    except TransportError as error:
        raise _error(web.HTTPServiceUnavailable, f"not sent: {error}") from None
    await supervisor.touch()
    metrics.MESSAGES.labels(tenant).inc()
    return web.json_response({"id": message_id}, status=202)


class MessageQuery(BaseModel):
    """The query of GET /v1/sessions/{name}/messages."""

    model_config = ConfigDict(extra="forbid")

    chat: str | None = Field(default=None, min_length=1, max_length=128)
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, min_length=1, max_length=512)


async def list_messages(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    supervisor = _session(request)
    if runtime.store is None:
        raise _error(web.HTTPNotFound, "this runtime keeps no messages: the operator has no message store (mongoUrl)")
    try:
        query = MessageQuery.model_validate(dict(request.query))
    except ValidationError as error:
        raise _error(web.HTTPBadRequest, _problems(error, "query")) from None
    try:
        page = await runtime.store.page(
            supervisor.identity.name,
            chat=query.chat,
            since=query.since,
            until=query.until,
            cursor=query.cursor,
            limit=query.limit,
        )
    except BadCursor as error:
        raise _error(web.HTTPBadRequest, f"cursor: {error}") from None
    except PyMongoError as error:
        raise _error(
            web.HTTPServiceUnavailable, f"message store unavailable: {error}", **{"Retry-After": "5"}
        ) from None
    body: dict[str, Any] = {"items": page.items}
    if page.next is not None:
        body["next"] = page.next
    return web.json_response(body)


PERMISSIONS: dict[str, Permission] = {
    "metrics": Permission("get", path="/metrics"),
    "qr": Permission("get", "qr"),
    "pair-code": Permission("create", "pairingcode"),
    "send": Permission("create", "messages"),
    "list-messages": Permission("list", "messages"),
}
"""What each route needs (waso.session_runtime.auth); routes not named here (the probes) are open."""


@web.middleware
async def authorize(request: web.Request, handler: Any) -> web.StreamResponse:
    """401 without a token the API server accepts for waso, 403 without the route's permission."""
    permission = PERMISSIONS.get(request.match_info.route.name or "")
    if permission is not None:
        authorizer = _runtime(request).authorizer
        try:
            await authorizer.check(request.headers.get("Authorization"), permission, request.match_info.get("name"))
        except Unauthenticated as error:
            metrics.AUTH_REFUSED.labels("401").inc()
            raise _error(web.HTTPUnauthorized, str(error), **{"WWW-Authenticate": 'Bearer realm="waso"'}) from None
        except Forbidden as error:
            metrics.AUTH_REFUSED.labels("403").inc()
            raise _error(web.HTTPForbidden, str(error)) from None
        except ReviewUnavailable as error:
            raise _error(web.HTTPServiceUnavailable, str(error), **{"Retry-After": "5"}) from None
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn aiohttp's own plain-text errors (unknown route, wrong method, body too large), and any unexpected
    failure, into the one JSON error shape."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as error:
        if error.content_type == "application/json" or error.status < 400:
            raise
        message = error.reason or "error"
        if error.text and error.text != f"{error.status}: {error.reason}":
            message = f"{message}: {error.text}"  # what aiohttp adds, such as the size limit of a body
        headers = {k: v for k, v in error.headers.items() if k.lower() not in ("content-type", "content-length")}
        return web.json_response({"error": message}, status=error.status, headers=headers)  # Allow stays on a 405
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away: nobody to answer
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error; the runtime's log has the details"}, status=500)


def build_app(runtime: Runtime) -> web.Application:
    app = web.Application(client_max_size=64 * 1024, middlewares=[json_errors, authorize])
    app[RUNTIME_KEY] = runtime
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_endpoint, name="metrics"),
            web.get("/v1/sessions/{name}/qr", qr_stream, name="qr", allow_head=False),
            web.post("/v1/sessions/{name}/pair-code", pair_code, name="pair-code"),
            web.post("/v1/sessions/{name}/messages", send_message, name="send"),
            web.get("/v1/sessions/{name}/messages", list_messages, name="list-messages", allow_head=False),
        ]
    )
    return app
