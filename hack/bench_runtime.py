#!/usr/bin/env python3
"""`make bench-runtime`: memory per session and message throughput of the session runtime.

On a fresh local control plane with the operator and the simulator, in one run:
1. the runtime's RSS with 0, 1, 10 and 50 connected simulator sessions (marginal MiB per session);
2. the RSS of one process holding 1 and then 50 real neonize clients, each on its own store
   (created, not connected: WhatsApp is out of reach);
3. messages per second through the runtime's send API to the simulator, against the floor:
   the same messages sent straight to the simulator over its WebSocket by a bare client;
4. on the cluster's real node, waso as it ships (the image of `make image`, the chart installed
   by Helm with the simulator in auto-pair mode): the session pod's memory with 0, 10 and 50
   connected sessions as its cgroup sees it (working set and RSS from kubelet's Summary API, what
   metrics-server and `kubectl top` use) next to the process RSS the runtime reports on /metrics,
   and the image's size as an archive and in the node's containerd;
5. the Redis rate limiter (Debian's redis-server): decision latency p50/p99 and decisions per second
   of RedisRateLimiter.acquire, against the floor: raw EVALSHA of the same script by the same client
   library, same concurrency, same run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from localcluster import BIN, LocalCluster
from localnode import CONTAINERD_SOCKET, NODE_NAME
from processes import ClusterError, free_port, http_ok, spawn_logged, wait_until

from waso.api.base import GROUP, VERSION
from waso.operator.resources import NAME as STATEFULSET
from waso.operator.status import RUNTIME_PORT

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "bench"
IMAGE_ARCHIVE = BIN / "waso-image.tar"
IMAGE_REF = "docker.io/library/waso:dev"  # what containerd names the archive's image (hack/build-image.sh)
RELEASE_NAMESPACE = "waso-system"
TENANT = "bench-node"  # the chart's operator watches bench-* only: the host operator's "bench" is not its own
SESSION_POD = f"{STATEFULSET}-0"
IDLE_POD = "waso-bench-idle"
IDLE_SHARD = 999  # a shard that no session is placed on: its runtime serves none
MIB = 1024 * 1024
SETTLED_SAMPLES, SETTLED_MIB, MAX_SAMPLES = 3, 1.0, 8


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return spawn_logged([sys.executable, "-m", "waso.cli.main", *args], log, tied=True, env={**os.environ, **env})


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what, lambda: "see the logs in the bench directory")


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to."""


def main() -> int:
    if not IMAGE_ARCHIVE.exists():  # checked before minutes of other measurements
        print(f"error: {IMAGE_ARCHIVE} is missing: run `make image`", file=sys.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="waso-bench-runtime-") as tmp_name:
        tmp = Path(tmp_name)
        cluster = LocalCluster(tmp / "cluster")
        try:
            limiter_bench(tmp)
            cluster.start(tied=True)
            run(cluster.kubeconfig, tmp)
            run_on_node(cluster)
        except (ClusterError, BenchError, ApiException) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            cluster.stop()
    print(f"bench-runtime took {time.monotonic() - started:.0f} s")
    return 0


LIMITER_DECISIONS, LIMITER_CONCURRENCY, LIMITER_TENANTS = 20_000, 16, 100


def limiter_bench(tmp: Path) -> None:
    """The shared token bucket: what a decision costs over what Redis itself costs for the same script."""
    import redis.asyncio as aioredis

    from waso.session_runtime.ratelimit import RedisRateLimiter

    port = free_port()
    server = spawn_logged(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        tmp / "redis.log",
        tied=True,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: _redis_answers(port), 15, "redis-server", lambda: (tmp / "redis.log").read_text())

        async def measure() -> tuple[list[float], float, list[float], float]:
            limiter = RedisRateLimiter(url, fail_open=False)
            raw: Any = aioredis.from_url(url)
            try:
                await limiter.acquire("warm-up", 60000)
                sha = limiter.script.sha

                async def through_limiter(i: int) -> None:
                    decision = await limiter.acquire(f"t{i % LIMITER_TENANTS}", 60000)
                    assert decision.allowed

                async def raw_evalsha(i: int) -> None:
                    await raw.evalsha(sha, 1, f"waso:ratelimit:r{i % LIMITER_TENANTS}", 60000)

                floor = await _timed(raw_evalsha)
                measured = await _timed(through_limiter)
                return measured[0], measured[1], floor[0], floor[1]
            finally:
                await limiter.close()
                await raw.aclose()

        latencies, seconds, floor_latencies, floor_seconds = asyncio.run(measure())
    finally:
        server.kill()
        server.wait()
    rate, floor_rate = LIMITER_DECISIONS / seconds, LIMITER_DECISIONS / floor_seconds
    print(f"rate limiter (Redis), {LIMITER_DECISIONS} decisions, {LIMITER_CONCURRENCY} at once, "
          f"{LIMITER_TENANTS} tenants:")  # fmt: skip
    print(f"  RedisRateLimiter.acquire: p50 {_ms(latencies, 50):.2f} ms, p99 {_ms(latencies, 99):.2f} ms, "
          f"{rate:.0f}/s")  # fmt: skip
    print(f"  floor, raw EVALSHA:       p50 {_ms(floor_latencies, 50):.2f} ms, p99 {_ms(floor_latencies, 99):.2f} ms, "
          f"{floor_rate:.0f}/s")  # fmt: skip
    print(f"  ratio limiter/floor throughput: {rate / floor_rate:.2f}")


async def _timed(call: Callable[[int], Any]) -> tuple[list[float], float]:
    """Per-call latencies and the wall time of LIMITER_DECISIONS calls, LIMITER_CONCURRENCY at a time."""
    latencies: list[float] = []
    counter = iter(range(LIMITER_DECISIONS))

    async def worker() -> None:
        for i in counter:
            began = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - began)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(LIMITER_CONCURRENCY)))
    return latencies, time.perf_counter() - started


def _ms(values: list[float], percentile: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * percentile // 100)] * 1000


def _redis_answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5).ping())
    except redis.ConnectionError:
        return False


def run(kubeconfig: Path, tmp: Path) -> int:
    kubectl = str(ROOT / "bin/kubectl")
    for args in (["apply", "--server-side", "-f", str(ROOT / "crds")],
                 ["wait", "--for=condition=Established", "-f", str(ROOT / "crds")],
                 ["create", "namespace", NAMESPACE]):  # fmt: skip
        subprocess.run([kubectl, f"--kubeconfig={kubeconfig}", *args], check=True, capture_output=True)
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "tenantquotas", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TenantQuota", "metadata": {"name": "default"},
        "spec": {"maxSessions": 60, "sessionsPerPod": 60, "messagesPerMinute": 60000},
    })  # fmt: skip

    sim_port, rt_port = free_port(), free_port()
    simulator = spawn(["simulator", "--port", str(sim_port), "--auto-pair", "0.1"], {}, tmp / "simulator.log")
    sim_url = f"http://127.0.0.1:{sim_port}"
    wait(lambda: http_ok(sim_url + "/healthz"), 30, "the simulator")
    common = {"KUBECONFIG": str(kubeconfig), "WASO_TRANSPORT": "simulator", "WASO_SIMULATOR_URL": sim_url}
    operator_env = {**common, "WASO_METRICS_PORT": "0", "WASO_MAX_SESSIONS": "100"}
    operator = spawn(["operator", "-n", NAMESPACE], operator_env, tmp / "operator.log")
    runtime = spawn(["runtime"], {
        **common, "WASO_NAMESPACE": NAMESPACE, "WASO_SHARD": "0", "WASO_POD_NAME": "waso-sessions-0",
        "WASO_DATA_DIR": str(tmp / "data"), "WASO_HTTP_HOST": "127.0.0.1", "WASO_HTTP_PORT": str(rt_port),
        "WASO_QUOTA_REFRESH_SECONDS": "1",
    }, tmp / "runtime.log")  # fmt: skip
    rt_url = f"http://127.0.0.1:{rt_port}"
    try:
        wait(lambda: http_ok(rt_url + "/readyz"), 60, "the runtime")
        time.sleep(2)
        memory = {0: rss_mib(runtime.pid)}
        created = 0
        for target in (1, 10, 50):
            created = add_sessions(custom, NAMESPACE, created, target)
            wait(functools.partial(at_least_connected, custom, target), 120, f"{target} connected sessions")
            time.sleep(2)  # let allocations settle
            memory[target] = rss_mib(runtime.pid)
        token = bench_token(api, NAMESPACE, send=True)
        sent, seconds = asyncio.run(send_through_runtime(rt_url, 3000, token))
        floor_sent, floor_seconds = asyncio.run(send_direct(sim_url, 3000))
    finally:
        for proc in (runtime, operator, simulator):
            proc.kill()
            proc.wait()
    neonize = neonize_memory(tmp / "neonize")

    marginal = (memory[50] - memory[10]) / 40
    print("runtime RSS with simulator sessions: " + ", ".join(f"{n}: {mib:.1f} MiB" for n, mib in memory.items()))
    print(f"marginal memory per simulator session: {marginal:.2f} MiB (10 -> 50 sessions)")
    print(f"neonize clients on their own stores, one process: none: {neonize['base']:.1f} MiB, "
          f"1: {neonize['one']:.1f} MiB, "
          f"50: {neonize['fifty']:.1f} MiB; "
          f"marginal {(neonize['fifty'] - neonize['one']) / 49:.2f} MiB per client")  # fmt: skip
    rate, floor_rate = sent / seconds, floor_sent / floor_seconds
    print(f"messages through the runtime API: {sent} in {seconds:.2f} s = {rate:.0f}/s")
    print(
        f"floor, straight to the simulator over its WebSocket: {floor_sent} in {floor_seconds:.2f} s "
        f"= {floor_rate:.0f}/s"
    )
    print(f"ratio runtime/floor throughput: {rate / floor_rate:.2f}")
    return 0


def add_sessions(custom: client.CustomObjectsApi, namespace: str, created: int, target: int, phones: int = 0) -> int:
    """Sessions s<created> .. s<target-1> in ``namespace``, phone numbers from ``phones`` on; returns ``target``."""
    for index in range(created, target):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "whatsappsessions", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "WhatsAppSession", "metadata": {"name": f"s{index}"},
            "spec": {"phoneNumber": f"+49151{phones + index:08d}"},
        })  # fmt: skip
    return target


def at_least_connected(custom: client.CustomObjectsApi, wanted: int, namespace: str = NAMESPACE) -> bool:
    return connected(custom, namespace) >= wanted


def connected(custom: client.CustomObjectsApi, namespace: str = NAMESPACE) -> int:
    items = cast(dict[str, Any], custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "whatsappsessions"))
    return sum(1 for o in items["items"] if o.get("status", {}).get("runtime", {}).get("state") == "Connected")


async def send_through_runtime(url: str, count: int, token: str, concurrency: int = 16) -> tuple[int, float]:
    """Sends as an application does, authenticated (a TokenReview and a SubjectAccessReview, then cached)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    accepted = 0

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:

        async def worker() -> None:
            nonlocal accepted
            while not queue.empty():
                i = queue.get_nowait()
                body = {"to": "+4915199999999", "text": f"message {i}"}
                async with http.post(f"{url}/v1/sessions/s{i % 50}/messages", json=body) as response:
                    accepted += response.status == 202

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return accepted, time.monotonic() - started


async def send_direct(url: str, count: int) -> tuple[int, float]:
    """The floor: a bare client on the simulator's WebSocket protocol, one socket, pipelined sends."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/v1/socket") as ws:
        await ws.send_json({"type": "hello", "phone": "+4915100099999", "credentials": None})
        while (frame := json.loads((await ws.receive()).data))["type"] != "connected":
            pass
        started = time.monotonic()
        acked = 0
        window = 16
        in_flight = 0
        for i in range(count):
            await ws.send_json({"type": "send", "ref": f"m{i}", "to": "+4915199999999", "text": f"message {i}"})
            in_flight += 1
            while in_flight >= window:
                frame = json.loads((await ws.receive()).data)
                if frame["type"] == "ack":
                    acked += 1
                    in_flight -= 1
        while in_flight:
            frame = json.loads((await ws.receive()).data)
            if frame["type"] == "ack":
                acked += 1
                in_flight -= 1
        return acked, time.monotonic() - started


NEONIZE_SCRIPT = """
import json, sys
from pathlib import Path
from neonize.aioze.client import ClientFactory, NewAClient

def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024

root = Path(sys.argv[1])
clients = []
def create(i):
    store = root / f's{i}' / 'whatsmeow.db'
    store.parent.mkdir(parents=True)
    ClientFactory.get_all_devices_from_db(str(store))  # the Go side opens the store and creates its schema
    clients.append(NewAClient(str(store), uuid=f'bench/s{i}'))

base = rss()
create(0)
one = rss()
for i in range(1, 50):
    create(i)
print(json.dumps({'base': base, 'one': one, 'fifty': rss()}))
"""


def neonize_memory(root: Path) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", NEONIZE_SCRIPT, str(root)], capture_output=True, text=True,
                            check=True, timeout=300)  # fmt: skip
    return cast(dict[str, float], json.loads(result.stdout.strip().splitlines()[-1]))


# --- 4. the session pod on the real node --------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One pod's memory in MiB: its cgroup as kubelet reports it, and the process's own RSS."""

    working_set: float
    cgroup_rss: float
    process_rss: float
    sessions: int  # on the runtime, by its /metrics


@dataclass(frozen=True)
class ImageSize:
    archive: float
    content: float  # containerd's content store: the compressed layers
    unpacked: float  # the snapshots containers start from


def run_on_node(cluster: LocalCluster) -> None:
    kubeconfig = cluster.kubeconfig
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)

    def diagnose() -> str:
        return node_diagnosis(kubeconfig)

    # The host operator's StatefulSet in NAMESPACE would start a second runtime from the image once it is loaded.
    kubectl(kubeconfig, "delete", "statefulsets", "--all", "-n", NAMESPACE)
    wait_until(lambda: not core.list_namespaced_pod(NAMESPACE).items, 90, f"the pods of {NAMESPACE} gone", diagnose)
    cluster.load_image(IMAGE_ARCHIVE)
    image = image_size(cluster)
    helm_install(kubeconfig)
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=TENANT, labels=restricted)))
    custom.create_namespaced_custom_object(GROUP, VERSION, TENANT, "tenantquotas", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TenantQuota", "metadata": {"name": "default"},
        "spec": {"maxSessions": 60, "sessionsPerPod": 60, "maxPairingStreams": 10, "podResources": {
            "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"},
        }},
    })  # fmt: skip

    metrics_token = bench_token(api, TENANT, metrics=True)
    memory: dict[int, tuple[Reading, bool]] = {}
    created = 0
    for target in (10, 50):
        created = add_sessions(custom, TENANT, created, target, phones=1000)  # phone numbers are unique cluster-wide
        wait_until(functools.partial(at_least_connected, custom, target, TENANT), 60 + 6 * target,
                   f"{target} connected sessions in {TENANT}", diagnose)  # fmt: skip
        pods = {SESSION_POD: target}
        if target == 10:
            # A tenant without sessions has no session pod: 0 is the runtime of the same pod template on a shard
            # without sessions, measured beside the real one.
            kubectl(kubeconfig, "create", "-n", TENANT, "-f", "-", stdin=json.dumps(idle_pod(client.AppsV1Api(api))))
            wait_until(lambda: pod_ready(core, IDLE_POD), 120, f"pod {IDLE_POD} Ready", diagnose)
            pods[IDLE_POD] = 0
        sampler = MemorySampler(core, {name: pod_ip(core, name) for name in pods}, metrics_token)
        wait_until(sampler.done, 30 + 20 * MAX_SAMPLES, f"settled memory readings of {', '.join(pods)}", diagnose)
        for name, sessions in pods.items():
            reading, settled = sampler.result(name)
            if reading.sessions != sessions:
                raise BenchError(f"{name} reports {reading.sessions} sessions on /metrics, expected {sessions}")
            memory[sessions] = (reading, settled)
        if target == 10:
            core.delete_namespaced_pod(IDLE_POD, TENANT, grace_period_seconds=0)
            wait_until(lambda: not pod_exists(core, IDLE_POD), 60, f"pod {IDLE_POD} gone", diagnose)

    print("session pod on the real node (kubelet Summary API; process RSS from the runtime's /metrics):")
    print("sessions | working set MiB | cgroup RSS MiB | process RSS MiB")
    for sessions, (reading, settled) in sorted(memory.items()):
        note = "" if settled else f"  (still moving after {MAX_SAMPLES} kubelet samples: the last one)"
        print(f"{sessions:>8} | {reading.working_set:>15.1f} | {reading.cgroup_rss:>14.1f} | "
              f"{reading.process_rss:>15.1f}{note}")  # fmt: skip
    print("  (0: a pod of the session StatefulSet's template on a shard without sessions, beside the 10)")
    low, high = memory[10][0], memory[50][0]
    print(f"marginal MiB per session (10 -> 50): working set {(high.working_set - low.working_set) / 40:.2f}, "
          f"cgroup RSS {(high.cgroup_rss - low.cgroup_rss) / 40:.2f}, "
          f"process RSS {(high.process_rss - low.process_rss) / 40:.2f}")  # fmt: skip
    print(f"image: {IMAGE_ARCHIVE.relative_to(ROOT)} {image.archive:.1f} MiB; in the node's containerd "
          f"{image.content:.1f} MiB of content (compressed layers), {image.unpacked:.1f} MiB unpacked")  # fmt: skip


class MemorySampler:
    """Readings of the runtime container of some pods, one per new kubelet sample, until they settle.

    kubelet's stats are samples taken every few seconds: a reading counts only when its sample is newer
    than the last one and than the sampler. Settled: the last SETTLED_SAMPLES working sets of every pod
    lie within SETTLED_MIB; otherwise the bench goes on after MAX_SAMPLES with the last reading.
    """

    def __init__(self, core: client.CoreV1Api, pods: dict[str, str], token: str) -> None:
        self.token = token
        self.core, self.pods = core, pods
        self.readings: dict[str, list[Reading]] = {name: [] for name in pods}
        self.last_sample = dict.fromkeys(pods, datetime.now().astimezone())
        self.next_fetch = 0.0

    def done(self) -> bool:
        if time.monotonic() < self.next_fetch:
            return False
        self.next_fetch = time.monotonic() + 1
        try:
            containers = runtime_container_stats(self.core)
        except ApiException:
            return False  # kubelet or the API server busy: the next round
        for name, ip in self.pods.items():
            memory = containers.get(name, {})
            if "workingSetBytes" not in memory or "time" not in memory:
                continue
            sampled = datetime.fromisoformat(memory["time"])
            if sampled <= self.last_sample[name]:
                continue
            try:
                process_rss, sessions = runtime_metrics(ip, self.token)
            except (urllib.error.URLError, OSError):
                continue  # a busy machine: the next sample
            self.last_sample[name] = sampled
            self.readings[name].append(
                Reading(memory["workingSetBytes"] / MIB, memory.get("rssBytes", 0) / MIB, process_rss, sessions)
            )
        return all(len(r) >= MAX_SAMPLES or self._settled(r) for r in self.readings.values())

    def result(self, name: str) -> tuple[Reading, bool]:
        readings = self.readings[name]
        return readings[-1], self._settled(readings)

    @staticmethod
    def _settled(readings: list[Reading]) -> bool:
        last = [r.working_set for r in readings[-SETTLED_SAMPLES:]]
        return len(last) == SETTLED_SAMPLES and max(last) - min(last) <= SETTLED_MIB


def runtime_container_stats(core: client.CoreV1Api) -> dict[str, dict[str, Any]]:
    """Memory of the container "runtime" per pod of the tenant, from kubelet's Summary API through the API server."""
    response: Any = core.connect_get_node_proxy_with_path(NODE_NAME, "stats/summary", _preload_content=False)
    summary = json.loads(response.data)
    return {
        pod["podRef"]["name"]: container.get("memory", {})
        for pod in summary.get("pods", [])
        if pod["podRef"]["namespace"] == TENANT
        for container in pod.get("containers", [])
        if container["name"] == "runtime"
    }


def bench_token(api: client.ApiClient, namespace: str, *, send: bool = False, metrics: bool = False) -> str:
    """A ServiceAccount token for audience waso that may send (a Role) or read /metrics (a ClusterRole)."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    name = "bench-metrics" if metrics else "bench-app"
    core.create_namespaced_service_account(namespace, cast(Any, {"metadata": {"name": name}}))
    subjects = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    if send:
        rules = [{"apiGroups": [GROUP], "resources": ["whatsappsessions/messages"], "verbs": ["create"]}]
        rbac.create_namespaced_role(namespace, cast(Any, {"metadata": {"name": name}, "rules": rules}))
        role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        binding: Any = {"metadata": {"name": name}, "roleRef": role_ref, "subjects": subjects}
        rbac.create_namespaced_role_binding(namespace, binding)
    if metrics:
        cluster_name = f"{namespace}-{name}"
        rules = [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
        rbac.create_cluster_role(cast(Any, {"metadata": {"name": cluster_name}, "rules": rules}))
        role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name}
        cluster_binding: Any = {"metadata": {"name": cluster_name}, "roleRef": role_ref, "subjects": subjects}
        rbac.create_cluster_role_binding(cluster_binding)
    request: Any = {"spec": {"audiences": ["waso"], "expirationSeconds": 7200}}
    token: str = core.create_namespaced_service_account_token(name, namespace, request).status.token  # type: ignore[union-attr,assignment]
    time.sleep(2)  # RBAC's authorizer cache catches up before the first (otherwise cached) refusal
    return token


def runtime_metrics(pod_ip: str, token: str) -> tuple[float, int]:
    """The runtime's own RSS (MiB) and its sessions in any state, from its Prometheus /metrics."""
    request = urllib.request.Request(
        f"http://{pod_ip}:{RUNTIME_PORT}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    rss, sessions = None, 0.0
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            rss = float(line.split()[1]) / MIB
        elif line.startswith("waso_runtime_sessions{"):
            sessions += float(line.split()[-1])
    if rss is None:
        raise BenchError(f"the runtime at {pod_ip} reports no process_resident_memory_bytes")
    return rss, int(sessions)


def idle_pod(apps: client.AppsV1Api) -> dict[str, Any]:
    """A bare pod of the session StatefulSet's template, without its labels (neither the StatefulSet, its
    Service nor the operator count it) and on a shard without sessions; an emptyDir for its volume claim."""
    response: Any = apps.read_namespaced_stateful_set(STATEFULSET, TENANT, _preload_content=False)
    statefulset = json.loads(response.data)
    spec: dict[str, Any] = statefulset["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "runtime")
    container["env"] = [e for e in container["env"] if e["name"] != "WASO_SHARD"]
    container["env"].append({"name": "WASO_SHARD", "value": str(IDLE_SHARD)})
    spec["volumes"] = [*spec.get("volumes", []), {"name": "data", "emptyDir": {}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": IDLE_POD}, "spec": spec}


def pod_ready(core: client.CoreV1Api, name: str) -> bool:
    status = core.read_namespaced_pod(name, TENANT).status
    statuses = (status.container_statuses if status else None) or []
    return bool(statuses) and all(s.ready for s in statuses)


def pod_exists(core: client.CoreV1Api, name: str) -> bool:
    return any(p.metadata and p.metadata.name == name for p in core.list_namespaced_pod(TENANT).items)


def pod_ip(core: client.CoreV1Api, name: str) -> str:
    status = core.read_namespaced_pod(name, TENANT).status
    ip = status.pod_ip if status else None
    if not ip:
        raise BenchError(f"pod {TENANT}/{name} has no IP")
    return str(ip)


def helm_install(kubeconfig: Path) -> None:
    """The chart as it ships: operator and simulator (auto-pair) as Pods, the operator watching bench-* only."""
    values = [
        "--set", "namespaces={bench-*}",
        "--set", "simulator.enabled=true",
        "--set", "simulator.autoPair=true",
        "--set", "simulator.autoPairSeconds=1",
        "--set", "image.pullPolicy=Never",
        "--set", "config.maxSessions=100",  # the global default (35) would hold back the last sessions
    ]  # fmt: skip
    command = [str(BIN / "helm"), f"--kubeconfig={kubeconfig}", "-n", RELEASE_NAMESPACE, "install", "waso",
               str(ROOT / "charts/waso"), "--create-namespace", *values, "--wait", "--timeout", "4m"]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"helm install did not finish within 300 s\n{node_diagnosis(kubeconfig)}") from error
    if result.returncode != 0:
        raise BenchError(f"helm install failed: {result.stderr.strip()}\n{node_diagnosis(kubeconfig)}")


def image_size(cluster: LocalCluster) -> ImageSize:
    """The archive, and what the node's containerd holds of its image (`ctr images ls` and `ctr images usage`)."""
    init = cluster.state.pids.get("node-init") if cluster.state else None
    if init is None:
        raise BenchError("the cluster has no node")
    ctr = ["nsenter", f"--target={init}", "--mount", "--", str(BIN / "ctr"), f"--address={CONTAINERD_SOCKET}",
           "-n", "k8s.io", "images"]  # fmt: skip
    listed = sizes_in(run_text([*ctr, "ls", f"name=={IMAGE_REF}"]))
    snapshots = sizes_in(run_text([*ctr, "usage", IMAGE_REF]))
    if len(listed) != 1 or not snapshots:
        raise BenchError(f"containerd on the node does not list {IMAGE_REF} once with its snapshots")
    return ImageSize(IMAGE_ARCHIVE.stat().st_size / MIB, listed[0], sum(snapshots))


UNITS = {"B": 1, "KiB": 1024, "MiB": MIB, "GiB": 1024 * MIB, "TiB": 1024 * 1024 * MIB}


def sizes_in(table: str) -> list[float]:
    """The size column (e.g. "97.3 MiB") of each row of a ctr table, in MiB."""
    sizes = []
    for row in table.splitlines()[1:]:
        if found := re.search(r"\s(\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB)\s", f" {row} "):
            sizes.append(float(found[1]) * UNITS[found[2]] / MIB)
    return sizes


def run_text(command: list[str], stdin: str | None = None) -> str:
    try:
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{' '.join(command)} did not finish within 60 s") from error
    if result.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    return run_text([str(BIN / "kubectl"), f"--kubeconfig={kubeconfig}", *args], stdin)


def node_diagnosis(kubeconfig: Path) -> str:
    """What runs, the tenant's sessions and events, and the session pod's last log lines."""
    parts = []
    for args in (["get", "pods", "-A", "-o", "wide"], ["get", "was", "-n", TENANT],
                 ["get", "events", "-n", TENANT, "--sort-by=.lastTimestamp"],
                 ["logs", "-n", TENANT, SESSION_POD, "--tail=20"]):  # fmt: skip
        try:
            parts.append(f"$ kubectl {' '.join(args)}\n{kubectl(kubeconfig, *args).strip()}")
        except BenchError as error:
            parts.append(str(error))
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
