#!/usr/bin/env python3
"""`make demo`: a local cluster, the operator, two sample tenants, sessions paired through the simulator.

Everything runs on loopback and stops with Ctrl-C (or at once with --exit):
the control plane of hack/localcluster.py, the WhatsApp simulator in auto-pair mode,
the operator, and the node agent that runs the tenants' session pods as local
processes with their own ServiceAccount tokens.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config
from localcluster import LocalCluster, die_with_parent, free_port

from waso.api.base import GROUP, VERSION

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo", help="cluster data, logs and volumes")
    parser.add_argument("--exit", action="store_true", help="stop once every session is Ready (smoke test)")
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()

    cluster = LocalCluster(args.dir)
    cluster.stop()  # leftovers of an interrupted demo
    print(f"starting the control plane in {args.dir} ...", flush=True)
    cluster.start(tied=True)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        return run(cluster, args, processes)
    finally:
        for proc in reversed(processes):
            proc.send_signal(signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()
        print("demo stopped", flush=True)


def run(cluster: LocalCluster, args: argparse.Namespace, processes: list[subprocess.Popen[bytes]]) -> int:
    kubeconfig = str(cluster.kubeconfig)
    kubectl = [str(ROOT / "bin/kubectl"), f"--kubeconfig={kubeconfig}"]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(ROOT / "crds")], check=True, capture_output=True)
    subprocess.run([*kubectl, "wait", "--for=condition=Established", "-f", str(ROOT / "crds")], check=True,
                   capture_output=True)  # fmt: skip
    logs = args.dir / "logs"
    simulator_port = free_port()
    simulator_url = f"http://127.0.0.1:{simulator_port}"
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONPATH": str(ROOT / "hack")}

    def spawn(name: str, command: list[str], extra: dict[str, str] | None = None) -> None:
        with (logs / f"{name}.log").open("ab") as out:
            processes.append(subprocess.Popen(command, env={**env, **(extra or {})}, stdout=out,
                                              stderr=subprocess.STDOUT, preexec_fn=die_with_parent))  # fmt: skip

    waso = [sys.executable, "-m", "waso.cli.main"]
    spawn("simulator", [*waso, "simulator", "--port", str(simulator_port), "--auto-pair", "2", "--first-device", "11"])
    spawn("operator", [*waso, "operator"], {
        "WASO_TRANSPORT": "simulator", "WASO_SIMULATOR_URL": simulator_url, "WASO_METRICS_PORT": str(free_port()),
        "WASO_RUNTIME_IMAGE": "waso:dev",
    })  # fmt: skip
    spawn("nodeagent", [sys.executable, str(ROOT / "hack/nodeagent.py"), "--dir", str(args.dir)])
    print(f"simulator {simulator_url} (auto-pair), operator and node agent started; logs in {logs}", flush=True)

    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(ROOT / "docs/samples")], check=True)
    api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + args.timeout
    while True:
        items = cast(dict[str, Any], custom.list_cluster_custom_object(GROUP, VERSION, "whatsappsessions"))["items"]
        ready = [s for s in items if _ready(s)]
        if items and len(ready) == len(items):
            break
        if time.monotonic() > deadline:
            subprocess.run([*kubectl, "get", "was,tq,pods", "-A"], check=False)
            print(f"not every session became Ready within {args.timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(1)

    subprocess.run([*kubectl, "get", "was,tq", "-A"], check=True)
    subprocess.run([*kubectl, "get", "pods", "-A", "-o", "wide"], check=True)
    print("\nevery session is Ready: paired through the simulator, running in its tenant's session pod.")
    print(f"kubectl: bin/kubectl --kubeconfig {kubeconfig} get was -A", flush=True)
    if args.exit:
        return 0
    print("Ctrl-C stops the demo.", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    return 0


def _ready(session: dict[str, Any]) -> bool:
    conditions = session.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


if __name__ == "__main__":
    sys.exit(main())
