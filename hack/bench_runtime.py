#!/usr/bin/env python3
"""`make bench-runtime`: memory per session and message throughput of the session runtime.

On a fresh local control plane with the operator and the simulator, in one run:
1. the runtime's RSS with 0, 1, 10 and 50 connected simulator sessions (marginal MiB per session);
2. the RSS of one process holding 1 and then 50 real neonize clients, each on its own store
   (created, not connected: WhatsApp is out of reach);
3. messages per second through the runtime's send API to the simulator, against the floor:
   the same messages sent straight to the simulator over its WebSocket by a bare client.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
from kubernetes import client, config
from localcluster import LocalCluster, die_with_parent, free_port, http_ok, wait_until

from waso.api.base import GROUP, VERSION

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "bench"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "waso.cli.main", *args],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what, lambda: "see the logs in the bench directory")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="waso-bench-runtime-") as tmp_name:
        tmp = Path(tmp_name)
        cluster = LocalCluster(tmp / "cluster")
        cluster.start(tied=True)
        try:
            return run(cluster.kubeconfig, tmp)
        finally:
            cluster.stop()


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
            while created < target:
                custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "whatsappsessions", {
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "WhatsAppSession", "metadata": {"name": f"s{created}"},
                    "spec": {"phoneNumber": f"+49151{created:08d}"},
                })  # fmt: skip
                created += 1
            wait(functools.partial(at_least_connected, custom, target), 120, f"{target} connected sessions")
            time.sleep(2)  # let allocations settle
            memory[target] = rss_mib(runtime.pid)
        sent, seconds = asyncio.run(send_through_runtime(rt_url, 3000))
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


def at_least_connected(custom: client.CustomObjectsApi, wanted: int) -> bool:
    return connected(custom) >= wanted


def connected(custom: client.CustomObjectsApi) -> int:
    items = cast(dict[str, Any], custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "whatsappsessions"))
    return sum(1 for o in items["items"] if o.get("status", {}).get("runtime", {}).get("state") == "Connected")


async def send_through_runtime(url: str, count: int, concurrency: int = 16) -> tuple[int, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    accepted = 0

    async with aiohttp.ClientSession() as http:

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


if __name__ == "__main__":
    sys.exit(main())
