#!/usr/bin/env python3
"""`make bench-operator`: 1000 sessions in 100 tenant namespaces on a fresh local control plane.

Prints the time the operator needs until every session has its admission decision
and shard, the operator's peak RSS, and, measured in the same run on the same API
server, the floor: the time a plain client needs for the same number of status writes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config
from localcluster import LocalCluster
from processes import die_with_parent

from waso.api.base import GROUP, VERSION

PLURAL = "whatsappsessions"
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--threads", type=int, default=16, help="client threads for creates and the floor")
    args = parser.parse_args()
    per_tenant = args.sessions // args.tenants

    with tempfile.TemporaryDirectory(prefix="waso-bench-") as tmp:
        # The operator against the API server: a node would run (or fail to pull) a pod for each of the
        # 100 tenants and take the CPU the measurement is about.
        cluster = LocalCluster(Path(tmp) / "cluster", node=False)
        cluster.start(tied=True)
        try:
            return run(cluster.kubeconfig, args.sessions, args.tenants, per_tenant, args.threads, Path(tmp))
        finally:
            cluster.stop()


def run(kubeconfig: Path, total: int, tenants: int, per_tenant: int, threads: int, tmp: Path) -> int:
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    api.configuration.connection_pool_maxsize = threads
    subprocess.run(
        [str(ROOT / "bin/kubectl"), f"--kubeconfig={kubeconfig}", "apply", "--server-side", "-f", str(ROOT / "crds")],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [str(ROOT / "bin/kubectl"), f"--kubeconfig={kubeconfig}", "wait", "--for=condition=Established",
         "-f", str(ROOT / "crds")],
        check=True, capture_output=True,
    )  # fmt: skip
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    namespaces = [f"bench-{i:03d}" for i in range(tenants)]
    for ns in [*namespaces, "floor"]:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    pool = ThreadPoolExecutor(threads)

    def session(ns: str, name: str, phone: int) -> object:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WhatsAppSession",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"phoneNumber": f"+49151{phone:08d}"},
        }
        return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    started = time.monotonic()
    specs = [(ns, f"s{j}", i * per_tenant + j) for i, ns in enumerate(namespaces) for j in range(per_tenant)]
    list(pool.map(lambda s: session(*s), specs))
    create_seconds = time.monotonic() - started

    # The floor: the same number of status writes by a plain client, on objects of the same kind.
    floor_specs = [("floor", f"f{i}", 90_000_000 + i) for i in range(total)]
    list(pool.map(lambda s: session(*s), floor_specs))
    status = {"status": {"phase": "Pending", "observedGeneration": 1, "shard": 0}}
    started = time.monotonic()
    list(pool.map(lambda s: custom.patch_namespaced_custom_object_status(GROUP, VERSION, "floor", PLURAL, s[1], status),
                  floor_specs))  # fmt: skip
    floor_seconds = time.monotonic() - started
    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, "floor", PLURAL)
    while cast(dict[str, Any], custom.list_namespaced_custom_object(GROUP, VERSION, "floor", PLURAL))["items"]:
        time.sleep(0.2)

    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "WASO_MAX_SESSIONS": str(total),
        "WASO_DEFAULT_QUOTA__MAX_SESSIONS": str(per_tenant),
        "WASO_METRICS_PORT": "0",
        "WASO_RUNTIME_IMAGE": "waso:bench",
    }
    log = (tmp / "operator.log").open("wb")
    # WASO_BENCH_WRAP prefixes the operator's command, e.g. with `py-spy record -o ... --duration 14 --`.
    wrapper = os.environ.get("WASO_BENCH_WRAP", "").split()

    def start_operator(name: str, wrap: list[str]) -> subprocess.Popen[bytes]:
        out = log if name == "operator-0" else (tmp / f"{name}.log").open("wb")
        return subprocess.Popen(
            [*wrap, sys.executable, "-m", "waso.cli.main", "operator", "-v"],  # cluster-wide: one watch per kind
            env={**env, "POD_NAME": name}, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip

    started = time.monotonic()
    operator = start_operator("operator-0", wrapper)
    decided = 0
    try:
        while time.monotonic() - started < 600:
            items = cast(dict[str, Any], custom.list_cluster_custom_object(GROUP, VERSION, PLURAL))["items"]
            decided = sum(1 for o in items if _decided_and_placed(o))
            if decided == total:
                break
            if operator.poll() is not None:
                raise SystemExit(f"operator exited with {operator.returncode}; see {log.name}")
            time.sleep(0.25)
        operator_seconds = time.monotonic() - started
        peak_rss_mib = _peak_rss_kib(operator.pid) / 1024
        operator_cpu = _cpu_seconds(operator.pid)
        failovers = measure_failovers(custom, operator, start_operator, tmp) if decided == total else []
    finally:
        operator.kill()
        operator.wait()
        if os.environ.get("WASO_BENCH_KEEP_LOG"):
            subprocess.run(["cp", log.name, os.environ["WASO_BENCH_KEEP_LOG"]], check=False)
    if decided != total:
        print(f"only {decided} of {total} sessions decided within 600 s", file=sys.stderr)
        return 1

    print(f"sessions: {total} in {tenants} namespaces (created in {create_seconds:.1f} s by {threads} client threads)")
    print(f"operator: every session admitted and placed in {operator_seconds:.1f} s from operator start "
          f"({total / operator_seconds:.0f} sessions/s)")  # fmt: skip
    print(f"operator peak RSS: {peak_rss_mib:.1f} MiB; operator CPU time {operator_cpu:.1f} s")
    print(f"floor: {total} status writes by a plain client in {floor_seconds:.1f} s ({total / floor_seconds:.0f}/s)")
    print(f"ratio operator/floor: {operator_seconds / floor_seconds:.2f}")
    print(
        f"failover with {total} sessions: kill -9 of the leader → the standby's first decision in "
        + ", ".join(f"{s:.1f} s" for s in failovers)
        + f" (lease {LEASE_SECONDS} s; best {min(failovers):.1f} s)"
    )
    return 0


LEASE_SECONDS = 10
"""The default of leaderElection.leaseSeconds."""
INDEXES_FILLED = "indexes filled"
"""What waso.operator.controller logs once kopf has listed everything (standby or not)."""


def measure_failovers(
    custom: client.CustomObjectsApi,
    leader: subprocess.Popen[bytes],
    start: Callable[[str, list[str]], subprocess.Popen[bytes]],
    tmp: Path,
    rounds: int = 3,
) -> list[float]:
    """Kill the leader while a standby with filled indexes waits; time until a new session is decided."""
    measured = []
    for round_ in range(rounds):
        name = f"operator-{round_ + 1}"
        standby = start(name, [])
        log = tmp / f"{name}.log"
        while INDEXES_FILLED not in log.read_text(errors="replace"):  # kopf fills indexes before any handler runs
            if standby.poll() is not None:
                raise SystemExit(f"standby exited with {standby.returncode}; see {log}")
            time.sleep(0.2)
        leader.kill()
        leader.wait()
        killed = time.monotonic()
        probe = f"failover-{round_}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "WhatsAppSession",
            "metadata": {"name": probe, "namespace": "bench-000"}, "spec": {"phoneNumber": f"+4915299{round_:06d}"},
        }  # fmt: skip
        custom.create_namespaced_custom_object(GROUP, VERSION, "bench-000", PLURAL, body)
        while time.monotonic() - killed < 120:
            obj = cast(dict[str, Any], custom.get_namespaced_custom_object(GROUP, VERSION, "bench-000", PLURAL, probe))
            if any(c["type"] == "Admitted" for c in obj.get("status", {}).get("conditions", [])):
                break
            time.sleep(0.1)
        measured.append(time.monotonic() - killed)
        leader = standby
    leader.kill()
    leader.wait()
    return measured


def _decided_and_placed(obj: dict[str, Any]) -> bool:
    status = obj.get("status", {})
    admitted = next((c for c in status.get("conditions", []) if c["type"] == "Admitted"), None)
    return admitted is not None and (admitted["status"] != "True" or status.get("shard") is not None)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
