#!/usr/bin/env python3
"""`make demo`: a local cluster with a real node, waso installed by Helm, sample tenants paired through the simulator.

The control plane and the node of hack/localcluster.py (kubelet, containerd, kube-proxy,
CoreDNS in namespaces of their own), waso's image loaded into the node, the chart
installed with `helm install` (the operator runs as a Pod, the simulator too, in
auto-pair mode), the two sample tenants of docs/samples/ applied. It waits until every
session is Ready, prints what runs and how to reach a runtime, and stops everything
with Ctrl-C (or at once with --exit).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import localnode
from localcluster import BIN, LocalCluster, register_context, unregister_context

ROOT = Path(__file__).resolve().parent.parent
IMAGE_ARCHIVE = BIN / "waso-image.tar"
RELEASE, RELEASE_NAMESPACE = "waso", "waso-system"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".demo", help="cluster data and logs")
    parser.add_argument("--exit", action="store_true", help="stop once every session is Ready (smoke test)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    cluster = LocalCluster(args.dir)
    cluster.stop()  # leftovers of an interrupted demo
    started = time.monotonic()
    print(f"starting the control plane and its node in {args.dir} ...", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        state = cluster.start(tied=True)
        network = localnode.NodeNetwork(state.node_network or 0)
        print(f"API server {state.server}; node {localnode.NODE_NAME} at {network.node_ip}, pods {network.pod_cidr}")
        if not args.exit:
            register_context(cluster, state.server)
        return run(cluster, args, started, stop)
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.stop()
        if not args.exit:
            unregister_context()
        print("demo stopped", flush=True)


def run(cluster: LocalCluster, args: argparse.Namespace, started: float, stop: dict[str, bool]) -> int:
    kubectl = [str(BIN / "kubectl"), f"--kubeconfig={cluster.kubeconfig}"]
    print(
        f"node Ready after {time.monotonic() - started:.0f} s; loading the image {IMAGE_ARCHIVE.name} ...", flush=True
    )
    cluster.load_image(IMAGE_ARCHIVE)
    helm = [str(BIN / "helm"), f"--kubeconfig={cluster.kubeconfig}"]
    values = [
        "--set",
        "simulator.enabled=true",
        "--set",
        "simulator.autoPair=true",
        "--set",
        "simulator.firstDevice=11",
    ]
    print("helm install waso (operator and simulator) ...", flush=True)
    subprocess.run(
        [*helm, "install", RELEASE, str(ROOT / "charts/waso"), "-n", RELEASE_NAMESPACE, "--create-namespace",
         *values, "--wait", "--timeout", "5m"],
        check=True,
    )  # fmt: skip
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(ROOT / "docs/samples")], check=True)
    deadline = time.monotonic() + args.timeout
    while not all_ready(kubectl):
        if time.monotonic() > deadline or stop["now"]:
            subprocess.run([*kubectl, "get", "tq,was,pods", "-A"], check=False)
            print(f"not every session became Ready within {args.timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(1)

    ready_pods = [*kubectl, "wait", "--for=condition=Ready", "pods", "-A", "-l", "app.kubernetes.io/name=waso-sessions"]
    subprocess.run([*ready_pods, f"--timeout={max(1, deadline - time.monotonic()):.0f}s"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*kubectl, "get", "tq,was,pods", "-A", "-o", "wide"], check=True)
    print(f"\nevery session is Ready ({time.monotonic() - started:.0f} s after start): paired through the simulator,")
    print("running in its tenant's session pod on a real kubelet node.\n")
    if args.exit:
        return 0
    print("Try:")
    print(f"  export KUBECONFIG={cluster.kubeconfig}   # or the kubectl context waso-local")
    print("  bin/kubectl get was -A -o wide")
    print("  bin/kubectl -n acme logs waso-sessions-0")
    print("  bin/kubectl -n acme port-forward pod/waso-sessions-0 8080:8080 &")
    print("  TOKEN=$(bin/kubectl -n acme create token app --audience waso)   # the sample's application")
    print("  curl -s -XPOST localhost:8080/v1/sessions/support/messages -H 'Content-Type: application/json' \\")
    print('       -H "Authorization: Bearer $TOKEN" -d \'{"to": "+4915100000000", "text": "hello"}\'')
    print("Ctrl-C stops the demo and everything it started.", flush=True)
    while not stop["now"]:
        time.sleep(1)
    return 0


def all_ready(kubectl: list[str]) -> bool:
    listed = subprocess.run([*kubectl, "get", "was", "-A", "-o", "json"], capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        return False
    items = json.loads(listed.stdout)["items"]
    return bool(items) and all(
        any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("status", {}).get("conditions", []))
        for s in items
    )


if __name__ == "__main__":
    sys.exit(main())
