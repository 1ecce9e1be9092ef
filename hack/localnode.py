#!/usr/bin/env python3
"""A real Kubernetes node beside the local control plane: kubelet, containerd, runc, CNI, kube-proxy, CoreDNS.

The node lives in namespaces of its own, so that nothing it does reaches the machine:

* ``unshare --net --mount --pid --fork``: its own network (kubelet's and kube-proxy's
  iptables rules, the CNI bridge and every pod stay inside), its own mounts (per-node
  directories are bind-mounted over ``/run``, ``/var/log`` and ``/var/lib/cni``, which
  kubelet and containerd hardcode) and its own PID namespace, whose first process is
  :func:`init` below. When it exits the kernel kills every process of the node,
  containerd's shims and the containers included, and the namespaces vanish.
* A veth pair joins the machine and the node: ``10.250.N.1`` on the machine (the API
  server listens there), ``10.250.N.2`` in the node (its InternalIP), and the node's pod
  network ``10.251.N.0/24`` is routed through it, so tests reach pod IPs directly.
* kubelet places pods under a cgroup root of its own (``/waso-node-N``), which the
  teardown removes; the kernel settings kubelet changes (``vm.overcommit_memory``,
  ``kernel.panic``, ``kernel.panic_on_oops``) are recorded before the first node starts
  and restored when the last one stops.

Only the standard library, ``ip``, ``unshare``, ``nsenter`` and ``iptables`` are used.
PersistentVolumeClaims of the default StorageClass ``waso-local`` are served by a small
provisioner thread of :func:`init` (``local`` volumes under the node's directory),
the role that rancher's local-path-provisioner plays in kind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import ClusterError, run_checked, spawn_logged, terminate, wait_until

NODE_NAME = "waso-node"
CLUSTER_DOMAIN = "cluster.local"
STORAGE_CLASS = "waso-local"
DNS_SERVICE_IP = "10.96.0.10"  # the kube-dns Service, in front of CoreDNS on the node
PROVISIONER = "waso.dev/local-node"
KERNEL_SETTINGS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
REGISTRY = Path("/tmp/waso-local-nodes")  # shared by every node on this machine: the kernel settings to restore
CGROUP_FS = Path("/sys/fs/cgroup")
PROC_SYS = Path("/proc/sys")
# Inside the node's mount namespace, per-node directories cover the paths kubelet and containerd use, so both
# run with their usual paths: short ones, which matters for unix sockets (108 bytes at most).
NODE_MOUNTS = (
    ("/run", "run"),
    ("/var/log", "log"),
    ("/var/lib/cni", "cni/state"),
    ("/var/lib/kubelet", "kubelet"),
    ("/var/lib/containerd", "containerd"),
)
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"


class NodeError(ClusterError):
    """The node could not be started."""


@dataclass(frozen=True)
class NodeNetwork:
    """Addresses of one node, unique on this machine."""

    index: int

    @property
    def host_ip(self) -> str:
        return f"10.250.{self.index}.1"

    @property
    def node_ip(self) -> str:
        return f"10.250.{self.index}.2"

    @property
    def pod_cidr(self) -> str:
        return f"10.251.{self.index}.0/24"

    @property
    def host_link(self) -> str:
        return f"waso{self.index}h"

    @property
    def cgroup_root(self) -> str:
        return f"/waso-node-{self.index}"

    @classmethod
    def allocate(cls) -> NodeNetwork:
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        for index in range(1, 250):
            if f" 10.250.{index}." not in used and not (CGROUP_FS / "memory" / f"waso-node-{index}").exists():
                return cls(index)
        raise NodeError("no free 10.250.N.0/30 network for a node")


@dataclass(frozen=True)
class NodePlan:
    """Everything :func:`init` needs, written as JSON by the machine side."""

    directory: str
    bin: str
    network: int
    kubeconfig: str  # the kubelet's (system:node:waso-node)
    admin_kubeconfig: str
    proxy_kubeconfig: str
    dns_kubeconfig: str
    ca: str
    images: list[str]  # OCI archives to import into containerd before kubelet starts
    pause_image: str

    @property
    def net(self) -> NodeNetwork:
        return NodeNetwork(self.network)

    def admin_kubeconfig_data(self) -> dict[str, Any]:
        return dict(json.loads(Path(self.admin_kubeconfig).read_text()))


# --- the machine side ---------------------------------------------------------------------------


def host_setup(pid: int, network: NodeNetwork) -> None:
    """Join the node's network namespace (the one of ``pid``) to the machine with a veth pair."""
    inside = f"/proc/{pid}/ns/net"
    peer = f"waso{network.index}n"
    run_checked("ip", "link", "add", network.host_link, "type", "veth", "peer", "name", peer)
    run_checked("ip", "link", "set", peer, "netns", str(pid))
    run_checked("ip", "addr", "add", f"{network.host_ip}/30", "dev", network.host_link)
    run_checked("ip", "link", "set", network.host_link, "up")
    node = ("nsenter", f"--net={inside}")
    run_checked(*node, "ip", "link", "set", peer, "name", "eth0")
    run_checked(*node, "ip", "addr", "add", f"{network.node_ip}/30", "dev", "eth0")
    run_checked(*node, "ip", "link", "set", "eth0", "up")
    run_checked(*node, "ip", "link", "set", "lo", "up")
    run_checked(*node, "ip", "route", "add", "default", "via", network.host_ip)
    run_checked("ip", "route", "add", network.pod_cidr, "via", network.node_ip)


def host_teardown(network: NodeNetwork) -> None:
    """Remove what a node that died without its own teardown leaves on the machine."""
    with contextlib.suppress(subprocess.CalledProcessError):
        run_checked("ip", "link", "del", network.host_link)  # the node's end and the route go with it
    remove_cgroups(network.cgroup_root)
    release_kernel_settings(network.index)


def wait_for_namespace(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` (unshare) has left the machine's network namespace."""
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/ns/net").st_ino != own:
                return
        time.sleep(0.02)
    raise NodeError(f"unshare (pid {pid}) did not create the node's namespaces within {timeout:.0f}s")


def bootstrap_manifests(network: NodeNetwork) -> list[dict[str, Any]]:
    """Cluster objects a node needs: kubelet API access for the API server, CoreDNS's RBAC, the StorageClass."""

    def binding(name: str, role: str, user: str) -> dict[str, Any]:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }

    return [
        binding("waso-local:apiserver-kubelet", "system:kubelet-api-admin", "kube-apiserver-kubelet-client"),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "waso-local:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        binding("waso-local:coredns", "waso-local:coredns", "waso-local:coredns"),
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
        },
        {  # the cluster DNS runs on the node itself; pods find it through this Service like anywhere else
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {
                "clusterIP": DNS_SERVICE_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-node",
                "namespace": "kube-system",
                "labels": {"kubernetes.io/service-name": "kube-dns", "endpointslice.kubernetes.io/managed-by": "waso"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [network.node_ip], "conditions": {"ready": True}}],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        },
    ]


# --- inside the node ----------------------------------------------------------------------------


def init(plan_file: Path) -> int:
    """PID 1 of the node: mounts, then containerd, kubelet, kube-proxy, CoreDNS, the volume provisioner."""
    plan = NodePlan(**json.loads(plan_file.read_text()))
    node_dir = Path(plan.directory)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    children: dict[str, subprocess.Popen[bytes]] = {}
    status = 0
    try:
        create_cgroup_root(plan.net.cgroup_root)
        join_own_cgroup(plan.net.cgroup_root)  # live from now on: a node stopping meanwhile leaves the settings
        record_kernel_settings(plan.network)
        _wait_for_link(stop)
        _mount_private_dirs(node_dir)
        _write_sysctl("net/ipv4/ip_forward", "1")
        _write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
        configs = _write_configs(plan)
        env = {**os.environ, "PATH": f"{plan.bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        binaries = Path(plan.bin)
        logs = node_dir.parent / "logs"

        def start(name: str, *command: str | Path) -> None:
            children[name] = spawn_logged([str(part) for part in command], logs / f"{name}.log", tied=False, env=env)

        def components_running(when: str) -> None:
            for name, child in children.items():
                if child.poll() is not None:
                    raise NodeError(f"{name} exited with {child.returncode} {when}; see its log")

        def containerd_ready() -> bool:
            if stop.is_set():
                raise NodeError("stopped")
            components_running("before its socket appeared")
            return Path(CONTAINERD_SOCKET).exists()

        start("containerd", binaries / "containerd", "--config", configs["containerd"])
        wait_until(containerd_ready, 60, "containerd's socket", lambda: "see logs/containerd.log")
        for archive in plan.images:
            import_image(binaries / "ctr", Path(archive))
        start("kubelet", *_kubelet_args(plan, configs))
        start("kube-proxy", binaries / "kube-proxy", f"--config={configs['kube-proxy']}")
        start("coredns", binaries / "coredns", "-conf", configs["coredns"])
        provisioner = threading.Thread(target=provision_volumes, args=(plan, stop), daemon=True)
        provisioner.start()
        while not stop.wait(0.5):
            _reap()
            components_running("while the node ran")
    except BaseException as error:  # PID 1 always cleans up
        (node_dir / "failed").write_text(f"{error!r}\n")
        _say(f"failed: {error!r}")
        status = 1
    finally:
        stopping = time.monotonic()
        terminate([child.pid for child in reversed(children.values())], grace=10)
        _say(f"node components stopped in {time.monotonic() - stopping:.1f}s")
        _kill_everything()
        _say(f"every process of the node gone after {time.monotonic() - stopping:.1f}s")
        with contextlib.suppress(OSError):
            join_own_cgroup(plan.net.cgroup_root, leave=True)
        remove_cgroups(plan.net.cgroup_root)
        release_kernel_settings(plan.network)
        _say(f"cgroups removed and kernel settings released after {time.monotonic() - stopping:.1f}s")
    return status


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} node: {message}", file=sys.stderr, flush=True)


def import_image(ctr: Path, archive: Path, init_pid: int | None = None) -> None:
    """Load an OCI archive into the node's containerd, where kubelet looks for images (namespace k8s.io).

    From the machine, ``init_pid`` names the node's first process: ctr runs in its mount namespace,
    where containerd's socket is.
    """
    enter = ["nsenter", f"--target={init_pid}", "--mount", "--"] if init_pid is not None else []
    run_checked(*enter, str(ctr), f"--address={CONTAINERD_SOCKET}", "-n", "k8s.io", "images", "import", str(archive))


def _wait_for_link(stop: threading.Event) -> None:
    def connected() -> bool:
        if stop.is_set():
            raise NodeError("stopped")
        route = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True).stdout
        return bool(route.strip())

    wait_until(connected, 30, "the machine to connect the node's network", lambda: "see logs/node.log", 0.05)


def _mount_private_dirs(node_dir: Path) -> None:
    for target, name in NODE_MOUNTS:
        source = node_dir / name
        source.mkdir(parents=True, exist_ok=True)
        Path(target).mkdir(parents=True, exist_ok=True)
        run_checked("mount", "--bind", str(source), target)


def _write_configs(plan: NodePlan) -> dict[str, str]:
    node_dir = Path(plan.directory)
    net = plan.net
    files: dict[str, str] = {}

    def write(name: str, text: str) -> None:
        path = node_dir / "config" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files[name.split(".")[0]] = str(path)

    runc = shutil.which("runc") or "/usr/sbin/runc"
    write(
        "containerd.toml",
        f"""version = 4
root = "/var/lib/containerd"
state = "/run/containerd"

[plugins.'io.containerd.server.v1.grpc']
  address = "{CONTAINERD_SOCKET}"

[plugins.'io.containerd.server.v1.ttrpc']
  address = "{CONTAINERD_SOCKET}.ttrpc"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{plan.pause_image}"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  enable_selinux = false

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "{node_dir}/config/net.d"

[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "runc"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  SystemdCgroup = false
  Root = "/run/runc"

[plugins.'io.containerd.nri.v1.nri']
  disable = true
""",
    )
    cni = {
        "cniVersion": "1.0.0",
        "name": "waso",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": net.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": f"{node_dir}/cni/ipam",
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    write("net.d/10-waso.conflist", json.dumps(cni, indent=2))
    write("resolv.conf", f"nameserver {DNS_SERVICE_IP}\n")
    kubelet = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": plan.ca},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": net.cgroup_root,
        "failCgroupV1": False,
        "failSwapOn": False,
        "enforceNodeAllocatable": ["pods"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": files["resolv"],
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
    }
    write("kubelet.json", json.dumps(kubelet, indent=2))
    proxy = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": plan.proxy_kubeconfig},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": net.pod_cidr,
        # nf_conntrack_max and the timeouts are machine-wide: leave them alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "metricsBindAddress": "127.0.0.1:10249",
        "healthzBindAddress": "127.0.0.1:10256",
    }
    write("kube-proxy.json", json.dumps(proxy, indent=2))
    write(
        "coredns.Corefile",
        f""".:53 {{
    bind {net.node_ip}
    errors
    health 127.0.0.1:8180
    ready 127.0.0.1:8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {plan.dns_kubeconfig} waso-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loadbalance
}}
""",
    )
    files["containerd"] = str(node_dir / "config/containerd.toml")
    files["kube-proxy"] = str(node_dir / "config/kube-proxy.json")
    files["coredns"] = str(node_dir / "config/coredns.Corefile")
    return files


def _kubelet_args(plan: NodePlan, configs: dict[str, str]) -> list[str]:
    return [
        f"{plan.bin}/kubelet",
        f"--config={configs['kubelet']}",
        f"--kubeconfig={plan.kubeconfig}",
        f"--node-ip={plan.net.node_ip}",
        f"--hostname-override={NODE_NAME}",
        "--v=1",
    ]


def provision_volumes(plan: NodePlan, stop: threading.Event) -> None:
    """Serve claims of StorageClass waso-local with ``local`` volumes; delete released ones with their data."""
    api = ApiClient(plan.admin_kubeconfig_data())
    volumes = Path(plan.directory) / "volumes"
    volumes.mkdir(parents=True, exist_ok=True)
    while not stop.wait(0.5):
        try:
            claims = api.get("/api/v1/persistentvolumeclaims")["items"]
            for claim in claims:
                spec, meta = claim["spec"], claim["metadata"]
                if (
                    spec.get("storageClassName") == STORAGE_CLASS
                    and not spec.get("volumeName")
                    and meta.get("annotations", {}).get("volume.kubernetes.io/selected-node") == NODE_NAME
                    and not meta.get("deletionTimestamp")
                ):
                    _provision(api, volumes, claim)
            for volume in api.get(f"/api/v1/persistentvolumes?labelSelector=waso.dev/local-volume%3D{NODE_NAME}")[
                "items"
            ]:
                if volume.get("status", {}).get("phase") in ("Released", "Failed"):
                    shutil.rmtree(volume["spec"]["local"]["path"], ignore_errors=True)
                    api.request("DELETE", f"/api/v1/persistentvolumes/{volume['metadata']['name']}")
        except (urllib.error.URLError, OSError, KeyError) as error:
            print(f"provisioner: {error}", file=sys.stderr, flush=True)


def _provision(api: ApiClient, volumes: Path, claim: dict[str, Any]) -> None:
    meta = claim["metadata"]
    name = f"pvc-{meta['uid']}"
    path = volumes / name
    path.mkdir(mode=0o755, exist_ok=True)
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "labels": {"waso.dev/local-volume": NODE_NAME},
            "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
        },
        "spec": {
            "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
            "accessModes": claim["spec"]["accessModes"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "local": {"path": str(path)},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                            ]
                        }
                    ]
                }
            },
        },
    }
    api.request("POST", "/api/v1/persistentvolumes", volume, ok=(201, 409))


class ApiClient:
    """The few API calls the provisioner makes, with the admin's client certificate."""

    def __init__(self, kubeconfig: dict[str, Any]) -> None:
        cluster = kubeconfig["clusters"][0]["cluster"]
        user = kubeconfig["users"][0]["user"]
        self.server = cluster["server"]
        self.context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        self.context.load_cert_chain(user["client-certificate"], user["client-key"])

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, ok: tuple[int, ...] = (200, 201, 202)
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
                return dict(json.loads(response.read() or b"{}"))
        except urllib.error.HTTPError as error:
            if error.code in ok or (error.code == 404 and method == "DELETE"):
                return {}
            raise


# --- cgroups and kernel settings (both sides) ---------------------------------------------------


def create_cgroup_root(root: str) -> None:
    """kubelet requires its cgroup root to exist in every hierarchy."""
    for hierarchy in _hierarchies():
        path = hierarchy / root.lstrip("/")
        path.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":  # a new cpuset is empty until told which CPUs and memory nodes it has
            for name in ("cpuset.cpus", "cpuset.mems"):
                (path / name).write_text((hierarchy / name).read_text())


def remove_cgroups(root: str) -> None:
    for hierarchy in _hierarchies():
        top = hierarchy / root.lstrip("/")
        if not top.exists():
            continue
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir_when_empty(directory)
        _rmdir_when_empty(top)


def _rmdir_when_empty(path: Path, timeout: float = 10.0) -> None:
    """A cgroup can be removed once its last task has exited, which the kernel notes a moment after the kill."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                print(f"cannot remove cgroup {path}", file=sys.stderr)
                return
            time.sleep(0.05)


def _hierarchies() -> list[Path]:
    if not CGROUP_FS.is_dir():
        return []
    return sorted(p for p in CGROUP_FS.iterdir() if p.is_dir() and (p / "cgroup.procs").exists())


@contextlib.contextmanager
def _kernel_settings_lock() -> Iterator[Path]:
    """Record and release are check-then-act across nodes starting and stopping at once."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with (REGISTRY / "kernel.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield REGISTRY / "kernel.json"


def record_kernel_settings(index: int) -> None:
    """Remember the machine's values, once: the first node records them, the last one restores them.

    The node is live (in its cgroup) before it records, so a node stopping at the same time
    sees it and leaves the settings alone. A record left by a node that died unreleased is
    kept: it holds the machine's values, and the live values may be that node's.
    """
    with _kernel_settings_lock() as saved:
        if not saved.exists():
            values = {name: (PROC_SYS / name).read_text().strip() for name in KERNEL_SETTINGS}
            saved.write_text(json.dumps(values))


def release_kernel_settings(index: int) -> None:
    """The last node to stop restores the machine's values."""
    with _kernel_settings_lock() as saved:
        if _other_live_nodes(index) or not saved.exists():
            return
        for name, value in json.loads(saved.read_text()).items():
            with contextlib.suppress(OSError):
                (PROC_SYS / name).write_text(value)
        saved.unlink(missing_ok=True)


def join_own_cgroup(root: str, leave: bool = False) -> None:
    """The node's first process (and so kubelet, containerd and the rest) in the node's pids cgroup, or out again.

    This is how any node on the machine, whatever PID namespace it looks from, tells a live node from
    the remains of one: a live node has processes under its cgroup root.
    """
    hierarchy = CGROUP_FS / "pids"
    target = hierarchy if leave else hierarchy / root.lstrip("/")
    (target / "cgroup.procs").write_text(str(os.getpid()))


def _other_live_nodes(index: int) -> list[Path]:
    return [
        root
        for root in (CGROUP_FS / "pids").glob("waso-node-*")
        if root.name != f"waso-node-{index}" and any(procs.read_text().strip() for procs in root.rglob("cgroup.procs"))
    ]


# --- small helpers ------------------------------------------------------------------------------


def _write_sysctl(name: str, value: str) -> None:
    (PROC_SYS / name).write_text(value)


def _reap() -> None:
    """PID 1 adopts every orphan of the node (containerd's shims re-parent here): collect the dead."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _kill_everything() -> None:
    """Every other process of the node's PID namespace: shims, containers, stragglers."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-1, 0)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "init":
        print(f"usage: {sys.argv[0]} init PLAN.json (started by localcluster.py inside the node's namespaces)")
        sys.exit(2)
    sys.exit(init(Path(sys.argv[2])))
