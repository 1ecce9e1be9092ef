#!/usr/bin/env python3
"""A minimal node agent for the local control plane: pods as local processes.

No container runtime runs on these machines, so this agent stands in for a kubelet
on one Node for the pods that waso itself creates (image ``waso:*``):

* registers the Node and keeps its Lease and Ready condition fresh;
* provisions a hostPath PersistentVolume for each pending claim (a tiny provisioner);
* runs each pod bound to the Node as ``python -m waso.cli.main <args>``, with the pod's
  environment (fieldRefs resolved), a kubeconfig holding a token of the pod's own
  ServiceAccount (so RBAC applies as in a cluster), its volumes as directories, and a
  free loopback port for its HTTP server;
* reports pod status (Running, Ready from the readiness probe) and honours deletion
  with SIGTERM and the grace period.

It is deliberately small: no images, no cgroups, no probes other than readiness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from localcluster import DEFAULT_DIR, die_with_parent, free_port

log = logging.getLogger("nodeagent")
NODE = "waso-local"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restarts: int = 0
    deleting: bool = False
    started: str = field(default_factory=now)


class NodeAgent:
    def __init__(self, api: client.ApiClient, workdir: Path, server: str, ca_file: str) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.workdir = workdir
        self.server = server
        self.ca_file = ca_file
        self.pods: dict[str, LocalPod] = {}
        self.stopping = threading.Event()

    # -- node -----------------------------------------------------------------------------

    def register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}},
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(body)
        self.heartbeat()

    def heartbeat(self) -> None:
        status = {
            "status": {
                "capacity": {"cpu": "2", "memory": "24Gi", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": "24Gi", "pods": "110"},
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "waso node agent is running",
                        "lastHeartbeatTime": now(),
                        "lastTransitionTime": now(),
                    }
                ],
                "nodeInfo": {
                    "kubeletVersion": "waso-nodeagent",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "process://local",
                    "kernelVersion": os.uname().release,
                    "osImage": "local",
                    "kubeProxyVersion": "",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }
        self.core.patch_node_status(NODE, status)
        lease = client.CoordinationV1Api(self.api)
        spec = {"holderIdentity": NODE, "leaseDurationSeconds": 40, "renewTime": datetime.now(UTC).isoformat()}
        try:
            lease.patch_namespaced_lease(NODE, "kube-node-lease", {"spec": spec})
        except ApiException as error:
            if error.status != 404:
                raise
            lease.create_namespaced_lease("kube-node-lease", {"metadata": {"name": NODE}, "spec": spec})

    # -- volumes --------------------------------------------------------------------------

    def provision(self) -> None:
        for claim in self.core.list_persistent_volume_claim_for_all_namespaces().items:
            if claim.spec.volume_name or claim.status.phase != "Pending":
                continue
            name = f"local-{claim.metadata.uid}"
            path = self.workdir / "volumes" / f"{claim.metadata.namespace}-{claim.metadata.name}"
            path.mkdir(parents=True, exist_ok=True)
            body = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": name},
                "spec": {
                    "capacity": {"storage": claim.spec.resources.requests["storage"]},
                    "accessModes": claim.spec.access_modes,
                    "hostPath": {"path": str(path)},
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "claimRef": {
                        "namespace": claim.metadata.namespace,
                        "name": claim.metadata.name,
                        "uid": claim.metadata.uid,
                    },
                },
            }
            with contextlib.suppress(ApiException):
                self.core.create_persistent_volume(body)
                log.info("provisioned %s for %s/%s", path, claim.metadata.namespace, claim.metadata.name)

    def volume_dir(self, pod: client.V1Pod, volume_name: str) -> Path:
        for volume in pod.spec.volumes or []:
            if volume.name != volume_name:
                continue
            if volume.persistent_volume_claim is not None:
                claim = self.core.read_namespaced_persistent_volume_claim(
                    volume.persistent_volume_claim.claim_name, pod.metadata.namespace
                )
                return Path(self.core.read_persistent_volume(claim.spec.volume_name).spec.host_path.path)
        path = self.workdir / "pods" / pod.metadata.uid / volume_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- pods -----------------------------------------------------------------------------

    def kubeconfig_for(self, pod: client.V1Pod) -> Path:
        account = pod.spec.service_account_name or "default"
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[],
                expiration_seconds=86400,
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        )
        token = self.core.create_namespaced_service_account_token(account, pod.metadata.namespace, request).status.token
        path = self.workdir / "pods" / pod.metadata.uid / "kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "pod",
                    "clusters": [
                        {"name": "local", "cluster": {"server": self.server, "certificate-authority": self.ca_file}}
                    ],
                    "users": [{"name": account, "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "pod",
                            "context": {"cluster": "local", "user": account, "namespace": pod.metadata.namespace},
                        }
                    ],
                }
            )
        )
        return path

    def environment(self, pod: client.V1Pod, container: client.V1Container, port: int) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)}
        for variable in container.env or []:
            if variable.value is not None:
                env[variable.name] = variable.value
            elif variable.value_from is not None and variable.value_from.field_ref is not None:
                env[variable.name] = self._field(pod, variable.value_from.field_ref.field_path)
        for mount in container.volume_mounts or []:
            if mount.mount_path == env.get("WASO_DATA_DIR"):
                env["WASO_DATA_DIR"] = str(self.volume_dir(pod, mount.name))
        env.update(
            {"WASO_HTTP_HOST": "127.0.0.1", "WASO_HTTP_PORT": str(port), "KUBECONFIG": str(self.kubeconfig_for(pod))}
        )
        return env

    @staticmethod
    def _field(pod: client.V1Pod, path: str) -> str:
        if path == "metadata.namespace":
            return str(pod.metadata.namespace)
        if path == "metadata.name":
            return str(pod.metadata.name)
        if path.startswith("metadata.labels['"):
            return str((pod.metadata.labels or {}).get(path[len("metadata.labels['") : -2], ""))
        return ""

    def start(self, pod: client.V1Pod) -> None:
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        local = self.pods.get(key)
        if local is not None and local.uid != pod.metadata.uid:
            self.stop(key, grace=0)
            local = None
        if local is None:
            local = LocalPod(pod.metadata.namespace, pod.metadata.name, pod.metadata.uid, free_port())
            self.pods[key] = local
        if local.proc is not None and local.proc.poll() is None:
            return
        container = pod.spec.containers[0]
        if not container.image.startswith("waso"):
            log.warning("%s: image %s is not a waso image; not run", key, container.image)
            return
        if local.proc is not None:
            local.restarts += 1
        logfile = self.workdir / "logs" / f"{pod.metadata.namespace}_{pod.metadata.name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("ab") as out:
            local.proc = subprocess.Popen(
                [sys.executable, "-m", "waso.cli.main", *(container.args or [])],
                env=self.environment(pod, container, local.port),
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        local.started = now()
        log.info("%s: started pid %d on 127.0.0.1:%d (log %s)", key, local.proc.pid, local.port, logfile)

    def stop(self, key: str, grace: float) -> None:
        local = self.pods.pop(key, None)
        if local is None or local.proc is None:
            return
        local.proc.send_signal(signal.SIGTERM)
        try:
            local.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            local.proc.kill()
            local.proc.wait()

    def report(self, key: str) -> None:
        local = self.pods.get(key)
        if local is None:
            return
        running = local.proc is not None and local.proc.poll() is None
        ready = running and _ok(f"http://127.0.0.1:{local.port}/readyz")
        state = {"running": {"startedAt": local.started}} if running else {"waiting": {"reason": "CrashLoopBackOff"}}
        status = {
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "hostIP": "127.0.0.1",
                "startTime": local.started,
                "conditions": [
                    {
                        "type": t,
                        "status": "True" if ready or t == "PodScheduled" else "False",
                        "lastTransitionTime": now(),
                    }
                    for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": [
                    {
                        "name": "runtime",
                        "ready": ready,
                        "restartCount": local.restarts,
                        "image": "waso",
                        "imageID": "",
                        "state": state,
                    }
                ],
            }
        }
        if ready == local.ready and running:
            return
        local.ready = ready
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(local.name, local.namespace, status)

    def sync(self) -> None:
        pods = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}").items
        seen = set()
        for pod in pods:
            key = f"{pod.metadata.namespace}/{pod.metadata.name}"
            seen.add(key)
            if pod.metadata.deletion_timestamp is not None:
                self.stop(key, grace=float(pod.metadata.deletion_grace_period_seconds or 30))
                with contextlib.suppress(ApiException):
                    self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
                continue
            self.start(pod)
            self.report(key)
        for key in set(self.pods) - seen:
            self.stop(key, grace=30)

    def run(self) -> None:
        self.register()
        last_beat = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() - last_beat > 10:
                    self.heartbeat()
                    last_beat = time.monotonic()
                self.provision()
                self.sync()
            except Exception:
                log.exception("sync failed")
            self.stopping.wait(1)
        for key in list(self.pods):
            self.stop(key, grace=30)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the cluster directory of hack/localcluster.py")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s nodeagent %(message)s")
    kubeconfig = args.dir / "kubeconfig"
    api = config.new_client_from_config(config_file=str(kubeconfig))
    agent = NodeAgent(api, args.dir / "node", api.configuration.host, str(args.dir / "pki" / "ca.crt"))
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
