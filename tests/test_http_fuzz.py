"""The runtime's HTTP API against careless and hostile clients.

A property-based fuzz (hypothesis) sends 2,000 requests to a real Runtime in this process (its
API on aiohttp's TestServer), which serves a real tenant's sessions from the real API server
and a simulator process: one session waiting for pairing, one connected. Whatever the method,
path, headers and body, the answer is never a 5xx, and every 4xx is ``{"error": "..."}``. The
bad requests named in issue 12 are checked one by one. Then, with runtime processes as in
production: a QR stream's slot is free again as soon as its client leaves (not at the next
keep-alive), and a tenant's maxPairingStreams holds across two shards that share a Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import string
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import config as kube_config
from yarl import URL

from tests import test_runtime
from tests.conftest import RedisServer
from tests.operator_support import create_quota, get
from tests.runtime_support import SseStream, http_json
from tests.support import wait_for
from tests.test_runtime import PHONE, World
from waso.kube import KubeClient
from waso.session_runtime.config import RuntimeConfig
from waso.session_runtime.http import build_app
from waso.session_runtime.runtime import Runtime

simulator = test_runtime.simulator
operator = test_runtime.operator
world = test_runtime.world

T = TypeVar("T")
PHONE2 = "+4915112345602"
EXAMPLES = 2000
MEANT_EXAMPLES = 1200
"""Of the examples, those aimed at the API's endpoints; the rest go anywhere."""


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


class Served:
    """A Runtime and its HTTP API on an event loop of their own (a thread), so that a synchronous
    hypothesis test can call them; the API listens on a loopback port like a pod's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="served-runtime", daemon=True)
        self.thread.start()
        self.client: TestClient[Any, Any] | None = None

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.client is not None
        assert self.client.port is not None
        return self.client.port

    def call(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None, *, no_content_type: bool = False
    ) -> Answer:
        async def request() -> Answer:
            assert self.client is not None
            async with self.client.request(
                method, URL(path, encoded=True), headers=headers, data=body,
                skip_auto_headers=["Content-Type"] if no_content_type else (),
                allow_redirects=False, timeout=aiohttp.ClientTimeout(total=30),
            ) as response:  # fmt: skip
                if response.content_type == "text/event-stream":
                    return Answer(response.status, response.content_type, b"")  # a QR stream: hung up at once
                return Answer(response.status, response.content_type, await response.read())

        return self.run(request())

    def stop(self) -> None:
        """Stops the loop but leaves it open: the kube client's watch threads (blocked on their HTTP
        streams for up to 40 s) still hand it their last line; it is closed when collected."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@contextlib.contextmanager
def served_runtime(world: World, **settings: Any) -> Iterator[Served]:
    served = Served()
    runtime: Runtime | None = None
    kube: KubeClient | None = None

    async def start() -> None:
        nonlocal runtime, kube
        config = RuntimeConfig.model_validate(
            {
                "namespace": world.namespace, "pod_name": "waso-sessions-0", "shard": 0, "transport": "simulator",
                "simulator_url": world.simulator.url, "data_dir": world.tmp / "in-process", "lease_seconds": 3,
                "heartbeat_seconds": 2, "quota_refresh_seconds": 1, **settings,
            }
        )  # fmt: skip
        kube = KubeClient(kube_config.new_client_from_config(config_file=str(world.kubeconfig)), threads=8)
        runtime = Runtime(config, kube)
        await runtime.start()
        served.client = TestClient(TestServer(build_app(runtime), host="127.0.0.1"))
        await served.client.start_server()

    async def stop() -> None:
        if served.client is not None:
            await served.client.close()
        if runtime is not None:
            await runtime.stop()
        if kube is not None:
            kube.close()

    try:
        served.run(start())
        yield served
    finally:
        with contextlib.suppress(Exception):
            served.run(stop())
        served.stop()


@pytest.fixture
def api(world: World) -> Iterator[tuple[World, Served]]:
    """The in-process runtime of world's tenant: s1 waiting for pairing, s2 paired and connected.

    The tenant's message limit is low, so that the fuzz's sends reach it (429) whatever mix of requests the
    fixed seed draws."""
    create_quota(world.api, world.namespace, maxSessions=5, messagesPerMinute=20)
    world.session("s1", PHONE)
    world.session("s2", PHONE2)
    with served_runtime(world) as served:
        wait_for(lambda: served.call("GET", "/readyz", {}, None).status == 200, timeout=60, what="readyz")
        world.wait_state("AwaitingPairing", "s1")
        world.wait_state("AwaitingPairing", "s2")
        stream = SseStream(served.port, "/v1/sessions/s2/qr", token=world.token)
        assert stream.status == 200
        code = stream.until("qr")["code"]
        scanned = http_json("POST", f"{world.simulator.url}/v1/phones/{quote(PHONE2)}/scan", {"code": code})
        assert scanned.status == 200, scanned.body
        assert stream.until("paired") == {"jid": scanned.body["jid"]}
        stream.close()
        world.wait_state("Connected", "s2")
        yield world, served


def _assert_error_shape(answer: Answer) -> str:
    assert answer.content_type == "application/json", answer
    body = json.loads(answer.body)
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str), body
    assert body["error"], body
    return body["error"]


def test_named_bad_requests_get_a_json_4xx(api: tuple[World, Served]) -> None:
    world, served = api
    auth = {"Authorization": f"Bearer {world.token}"}
    json_type = {**auth, "Content-Type": "application/json"}
    message = json.dumps({"to": "+4915199999999", "text": "hi"}).encode()
    cases: list[tuple[Answer, int, str]] = [
        (served.call("POST", "/v1/sessions/s2/messages", {**auth, "Content-Type": "text/plain"}, message), 415,
         "Content-Type must be application/json, not text/plain"),
        (served.call("POST", "/v1/sessions/s2/messages", auth, message, no_content_type=True), 415,
         "must be application/json"),
        (served.call("POST", "/v1/sessions/s2/messages", {**auth, "Content-Type": "application/json; charset=bogus"},
                     message), 415, "unknown charset 'bogus'"),
        (served.call("POST", "/v1/sessions/s2/messages", json_type, b"[" * 50_000), 400, "nested too deeply"),
        (served.call("POST", "/v1/sessions/s2/messages", json_type, b"[" * 30_000 + b"]" * 30_000), 400,
         "nested too deeply"),
        (served.call("POST", "/v1/sessions/s2/messages", json_type, b"x" * (64 * 1024 + 1)), 413,
         "Request Entity Too Large: Maximum request body size 65536 exceeded"),
        (served.call("GET", "/v1/sessions/s1/nothing", auth, None), 404, "Not Found"),
        (served.call("GET", "/nowhere", {}, None), 404, "Not Found"),
        (served.call("DELETE", "/v1/sessions/s2/messages", auth, None), 405, "Method Not Allowed"),
        (served.call("HEAD", "/v1/sessions/s1/qr", auth, None), 405, ""),
        (served.call("POST", "/v1/sessions/s2/messages", json_type, b'{"to": "+4915199999999", "text": 3}'), 422,
         "text: Input should be a valid string"),
    ]  # fmt: skip
    for answer, status, text in cases:
        assert answer.status == status, answer
        if answer.body or status != 405:  # a HEAD answer has no body
            assert text in _assert_error_shape(answer), answer
    wrong_method = served.call("PUT", "/v1/sessions/s2/messages", auth, None)
    assert wrong_method.status == 405
    sent = served.call("POST", "/v1/sessions/s2/messages", json_type, message)
    assert sent.status == 202, sent  # the connected session sends: the cases above were refused for what they are


TOKEN_CHARS = string.ascii_letters + string.digits + "-._~+/="
HEADER_CHARS = "".join(c for c in string.printable if c not in "\r\n\x0b\x0c")
ROUTES = [
    "/healthz", "/readyz", "/metrics", "/v1/sessions/{}/qr", "/v1/sessions/{}/pair-code",
    "/v1/sessions/{}/messages", "/v1/sessions/{}", "/v1/sessions/{}/messages/{}", "/v1/{}", "/{}",
]  # fmt: skip
ENDPOINTS = [
    ("POST", "/v1/sessions/{}/messages"), ("POST", "/v1/sessions/{}/messages"), ("POST", "/v1/sessions/{}/messages"),
    ("GET", "/v1/sessions/{}/qr"), ("POST", "/v1/sessions/{}/pair-code"), ("GET", "/metrics"), ("GET", "/readyz"),
]  # fmt: skip
JSON_TYPES = [
    "application/json; charset=utf-8", "application/json; charset=latin-1", "application/json; charset=utf-16",
    "application/json; charset=bogus", "APPLICATION/JSON", "application/json;", "application/json; charset=",
    "application/json; charset=\"utf-8\"", "application/json; boundary=x; charset=ascii",
]  # fmt: skip
ODD_NAMES = ["..", "%2e%2e", "%00", "s1%2Fqr", "s1;x=1", "~!$&'()*+,;=:@", "%ZZ", "%C3%A9", "%FF%FE", "a" * 300]


Request = tuple[str, str, dict[str, str], bytes | None]


def _requests(token: str, metrics_token: str) -> tuple[st.SearchStrategy[Request], st.SearchStrategy[Request]]:
    names = st.sampled_from(["s1", "s2", "s2", "ghost", *ODD_NAMES]) | st.text(min_size=1, max_size=30).map(
        lambda text: quote(text, safe="")
    )
    paths = st.builds(
        lambda route, name, query: route.replace("{}", name) + query,
        st.sampled_from(ROUTES),
        names,
        st.sampled_from(["", "", "?", "?a=1&a=2", "?to=%00&text=x", "?%ZZ"]),
    )
    methods = st.sampled_from(["GET", "POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    authorization = st.sampled_from(
        [f"Bearer {token}"] * 8
        + [f"Bearer {metrics_token}", f"bearer {token}", f"Bearer  {token}", f"Basic {token}", "Bearer", "Bearer ", ""]
    ) | st.text(TOKEN_CHARS, min_size=1, max_size=2000).map("Bearer {}".format)
    content_types = st.sampled_from(
        [*JSON_TYPES, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "*/*", ""]
    ) | st.text(HEADER_CHARS, max_size=60)
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50)
    documents = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
        max_leaves=20,
    )  # fmt: skip
    messages = st.fixed_dictionaries(
        {
            "to": st.sampled_from(["+4915199999999"] * 4 + ["+491519999999", "0151", ""]),
            "text": st.text(max_size=60) | st.text(min_size=4090, max_size=4100),
        },
        optional={"cc": documents},
    )
    wrong_types = st.fixed_dictionaries({"to": documents, "text": documents})
    messages_bodies = messages.map(lambda d: json.dumps(d).encode())
    valid_messages = st.fixed_dictionaries(
        {"to": st.just("+4915199999999"), "text": st.text(min_size=1, max_size=60)}
    ).map(lambda d: json.dumps(d).encode())
    depth = st.integers(1, 60_000)
    bodies = st.one_of(
        st.none(),
        st.binary(max_size=200),
        documents.map(lambda d: json.dumps(d).encode()),
        messages_bodies,
        wrong_types.map(lambda d: json.dumps(d).encode()),
        depth.map(lambda n: b"[" * n),
        depth.map(lambda n: b"[" * n + b"]" * n),
        depth.map(lambda n: b'{"to":' * n + b"1" + b"}" * n),
        st.builds(lambda chunk, n: chunk * n, st.binary(min_size=1, max_size=8), st.integers(8_000, 20_000)),
        st.builds(
            lambda n: json.dumps({"to": "+4915199999999", "text": "x" * n}).encode(), st.integers(60_000, 70_000)
        ),
    )

    def request(method: str, path: str, auth: str | None, content_type: str | None, body: bytes | None) -> Request:
        headers = {"Authorization": auth} if auth is not None else {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        return method, path, headers, body

    # Requests meant for the API's endpoints, as a careless or hostile client sends them...
    endpoints = st.sampled_from(
        [("POST", f"/v1/sessions/{name}/messages") for name in ("s1", "s2", "s2", "s2", "s2", "ghost")]
        + [("GET", f"/v1/sessions/{name}/qr") for name in ("s1", "s2", "ghost")]
        + [("POST", f"/v1/sessions/{name}/pair-code") for name in ("s1", "s2", "ghost")]
        + [("GET", "/metrics"), ("GET", "/readyz"), ("GET", "/healthz")]
    )
    meant = st.builds(
        lambda endpoint, auth, content_type, body: request(endpoint[0], endpoint[1], auth, content_type, body),
        endpoints,
        st.sampled_from([f"Bearer {token}"] * 8 + [f"Bearer {metrics_token}", f"Bearer {token[:-2]}", None]),
        st.sampled_from(["application/json"] * 10 + JSON_TYPES + [None, "text/plain"]),
        st.sampled_from([valid_messages] * 4 + [messages_bodies] * 2 + [bodies] * 4).flatmap(lambda kind: kind),
    )
    # ... and anything, anywhere.
    anywhere = st.builds(request, methods, paths, st.none() | authorization, st.none() | content_types, bodies)
    return meant, anywhere


def test_no_request_gets_a_5xx_and_every_4xx_is_a_json_error(api: tuple[World, Served]) -> None:
    world, served = api
    meant, anywhere = _requests(world.token, world.metrics_token)
    statuses: Counter[int] = Counter()

    def check(request: Request) -> None:
        method, path, headers, body = request
        answer = served.call(method, path, headers, body, no_content_type="Content-Type" not in headers)
        statuses[answer.status] += 1
        assert answer.status < 500, (request[:3], answer)
        if answer.status >= 400 and method != "HEAD":
            _assert_error_shape(answer)

    for strategy, examples in ((meant, MEANT_EXAMPLES), (anywhere, EXAMPLES - MEANT_EXAMPLES)):
        settings(
            max_examples=examples, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )(given(strategy)(check))()  # fmt: skip
    assert sum(statuses.values()) >= EXAMPLES, statuses
    # Every layer was reached: authentication, authorization, routing, body limits, parsing, validation,
    # the session's state, the tenant's rate limit, and sending.
    assert {200, 202, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429} <= set(statuses), statuses


def _open(port: int, token: str, name: str = "s1") -> SseStream:
    return SseStream(port, f"/v1/sessions/{name}/qr", token=token)


def _accepted(port: int, token: str, name: str = "s1") -> SseStream | None:
    stream = _open(port, token, name)
    if stream.status == 200:
        return stream
    stream.close()
    return None


@pytest.mark.simulator_args("--qr-interval", "60")
def test_a_qr_streams_slot_is_free_again_as_soon_as_its_client_leaves(world: World) -> None:
    """Keep-alives and new QR codes a minute apart: nothing is written to the stream, so only noticing
    the closed connection can free its slot within seconds."""
    create_quota(world.api, world.namespace, maxPairingStreams=2, maxSessions=5)  # also the runtime's default
    runtime = world.runtime(WASO_KEEPALIVE_SECONDS="60")
    world.session()
    world.wait_state("AwaitingPairing")
    first, second = _open(runtime.port, world.token), _open(runtime.port, world.token)
    assert (first.status, second.status) == (200, 200)
    assert first.until("status") == second.until("status") == {"state": "AwaitingPairing"}
    refused = http_json("GET", f"{runtime.url}/v1/sessions/s1/qr", token=world.token)
    assert refused.status == 429
    assert "2 of 2 QR streams open (TenantQuota maxPairingStreams)" in refused.body["error"]

    first.close()  # the client goes away without a word
    third = wait_for(lambda: _accepted(runtime.port, world.token), timeout=5, what="the left client's slot")
    assert third.until("status") == {"state": "AwaitingPairing"}
    assert http_json("GET", f"{runtime.url}/v1/sessions/s1/qr", token=world.token).status == 429
    metrics = http_json("GET", f"{runtime.url}/metrics", token=world.metrics_token).body
    assert "waso_runtime_qr_streams 2.0" in metrics
    second.close()
    third.close()


@pytest.mark.simulator_args("--qr-interval", "60")
def test_the_tenants_stream_cap_holds_across_shards_through_redis(world: World, redis_server: RedisServer) -> None:
    create_quota(world.api, world.namespace, maxPairingStreams=2, maxSessions=5, sessionsPerPod=1)
    shards = [
        world.runtime(i, f"data{i}", WASO_REDIS_URL=redis_server.url, WASO_KEEPALIVE_SECONDS="60") for i in (0, 1)
    ]
    world.session("s1", PHONE)
    world.session("s2", PHONE2)
    world.wait_state("AwaitingPairing", "s1")
    world.wait_state("AwaitingPairing", "s2")
    assert [get(world.api, world.namespace, name)["status"]["shard"] for name in ("s1", "s2")] == [0, 1]

    on_shard0 = _open(shards[0].port, world.token, "s1")
    on_shard1 = _open(shards[1].port, world.token, "s2")
    assert (on_shard0.status, on_shard1.status) == (200, 200)
    for port, name in ((shards[0].port, "s1"), (shards[1].port, "s2")):
        refused = http_json("GET", f"http://127.0.0.1:{port}/v1/sessions/{name}/qr", token=world.token)
        assert refused.status == 429, refused
        assert "the tenant already has 2 of 2 QR streams open" in refused.body["error"]
    store = redis.Redis.from_url(redis_server.url)
    try:
        members = sorted(m.decode() for m in store.zrange(f"waso:qrstreams:{world.namespace}", 0, -1))
        assert [m.split("/")[0] for m in members] == ["waso-sessions-0", "waso-sessions-1"]
    finally:
        store.close()

    on_shard0.close()  # a slot freed on one shard is free for the other
    taken = wait_for(lambda: _accepted(shards[1].port, world.token, "s2"), timeout=5, what="shard 0's freed slot")
    assert http_json("GET", f"{shards[0].url}/v1/sessions/s1/qr", token=world.token).status == 429
    taken.close()
    on_shard1.close()
