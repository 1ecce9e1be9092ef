"""The runtime's HTTP API: probes, metrics, QR stream (Server-Sent Events), pairing code, messages.

Every malformed request gets a 4xx with a JSON ``{"error": ...}`` that says what is
wrong. SSE is written by hand (a dozen lines) rather than through aiohttp-sse, because
the stream needs its own caps, keep-alive and timeout handling anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from waso.api.session import E164_PATTERN, RuntimeState
from waso.session_runtime import metrics
from waso.session_runtime.auth import Forbidden, Permission, ReviewUnavailable, Unauthenticated
from waso.session_runtime.lifecycle import qr_payload
from waso.session_runtime.ratelimit import RateLimiterUnavailable
from waso.session_runtime.runtime import Runtime
from waso.session_runtime.supervisor import SessionSupervisor
from waso.session_runtime.transport import TransportError

log = logging.getLogger("waso.runtime")
RUNTIME_KEY = web.AppKey("runtime", Runtime)
STREAMS_KEY = web.AppKey("qr_streams", dict)


class SendMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(pattern=E164_PATTERN, description="recipient in E.164 form")
    text: str = Field(min_length=1, max_length=4096)


def _error(status: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json", headers=headers or None)


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


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def qr_stream(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    supervisor = _session(request)
    if supervisor.state == RuntimeState.CONNECTED:
        raise _error(web.HTTPConflict, "the session is already paired and connected")
    if not supervisor.wanted.is_set():
        raise _error(web.HTTPConflict, "the session is not running (not admitted or suspended)")
    streams: dict[str, int] = request.app[STREAMS_KEY]
    tenant_cap = runtime.tenant_quota.pairing_streams_limit
    if streams["pod"] >= runtime.config.max_qr_streams:
        metrics.QR_REFUSED.labels("pod").inc()
        raise _error(
            web.HTTPTooManyRequests, f"this pod already serves {streams['pod']} QR streams", **{"Retry-After": "10"}
        )
    if streams["tenant"] >= tenant_cap:
        metrics.QR_REFUSED.labels("tenant").inc()
        raise _error(
            web.HTTPTooManyRequests,
            f"the tenant already has {streams['tenant']} of {tenant_cap} QR streams open "
            "(TenantQuota maxPairingStreams)",
            **{"Retry-After": "10"},
        )
    streams["pod"] += 1
    streams["tenant"] += 1
    metrics.QR_STREAMS.inc()
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    supervisor.listeners.add(queue)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    try:
        await response.prepare(request)
        await response.write(_sse("status", {"state": supervisor.state.value}))
        if supervisor.qr is not None:
            await response.write(_sse("qr", qr_payload(supervisor.qr)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + runtime.config.qr_stream_timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                await response.write(_sse("timeout", {"after": runtime.config.qr_stream_timeout}))
                break
            try:
                event, data = await asyncio.wait_for(queue.get(), min(remaining, runtime.config.keepalive_seconds))
            except TimeoutError:
                await response.write(b": ping\n\n")
                continue
            await response.write(_sse(event, data))
            if event == "paired":
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client went away: its slot is freed below
    finally:
        supervisor.listeners.discard(queue)
        streams["pod"] -= 1
        streams["tenant"] -= 1
        metrics.QR_STREAMS.dec()
    return response


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
    try:
        message = SendMessage.model_validate(payload)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        raise _error(web.HTTPUnprocessableEntity, problems) from None
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


PERMISSIONS: dict[str, Permission] = {
    "metrics": Permission("get", path="/metrics"),
    "qr": Permission("get", "qr"),
    "pair-code": Permission("create", "pairingcode"),
    "send": Permission("create", "messages"),
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
        return web.json_response({"error": error.reason or error.text or "error"}, status=error.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away: nobody to answer
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error; the runtime's log has the details"}, status=500)


def build_app(runtime: Runtime) -> web.Application:
    app = web.Application(client_max_size=64 * 1024, middlewares=[json_errors, authorize])
    app[RUNTIME_KEY] = runtime
    app[STREAMS_KEY] = {"pod": 0, "tenant": 0}
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_endpoint, name="metrics"),
            web.get("/v1/sessions/{name}/qr", qr_stream, name="qr"),
            web.post("/v1/sessions/{name}/pair-code", pair_code, name="pair-code"),
            web.post("/v1/sessions/{name}/messages", send_message, name="send"),
        ]
    )
    return app
