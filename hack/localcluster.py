#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback, without Docker.

Starts etcd, kube-apiserver (RBAC, PodSecurity, ServiceAccount token signing,
certificates generated here), kube-controller-manager and kube-scheduler from
the binaries that ``hack/build-tools.sh`` builds into ``bin/``, writes an
admin kubeconfig, and (unless ``node=False``) one real node in namespaces of its
own (``hack/localnode.py``): kubelet, containerd, runc, CNI, kube-proxy, CoreDNS.
With a node, the API server listens on the machine's end of the node's veth pair
(``10.250.N.1``) instead of 127.0.0.1, so that the node and its pods reach it.

Two ways to own the processes:

* ``up`` / ``down`` (``make cluster-up`` / ``make cluster-down``): the processes
  outlive the command; their PIDs are kept in ``<dir>/state.json``.
* :meth:`LocalCluster.start` with ``tied=True`` (the pytest fixture): every
  process receives SIGKILL from the kernel when its caller dies, so a crashed
  test run leaves nothing behind.

Only the standard library and the ``openssl`` command are used, so this runs
before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import localnode
from processes import (
    ClusterError,
    free_port,
    http_ok,
    processes_using,
    spawn_logged,
    terminate,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"
DEFAULT_DIR = ROOT / ".cluster"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
BUILD_HINT = "run `make tools` (hack/build-tools.sh) to build it"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE_BINARIES = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "coredns", "pause.oci.tar")
PAUSE_IMAGE_ENV = "PAUSE_VERSION"


def binary(name: str) -> Path:
    """A file `make tools` builds into bin/ (executables, and the pause image's archive)."""
    path = BIN / name
    if not os.access(path, os.R_OK if name.endswith(".tar") else os.X_OK):
        raise ClusterError(f"{path} is missing: {BUILD_HINT}")
    return path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def generate_pki(pki: Path, addresses: tuple[str, ...] = ()) -> None:
    """CA, serving and client certificates (the node's too), and the ServiceAccount key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=waso-local-ca",
        cwd=pki,
    )
    serving_san = (
        f"DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:{SERVICE_IP}"
        + "".join(f",IP:{address}" for address in addresses)
    )
    certs = {
        "apiserver": ("/CN=kube-apiserver", f"subjectAltName={serving_san}\nextendedKeyUsage=serverAuth\n"),
        "admin": ("/O=system:masters/CN=waso-admin", "extendedKeyUsage=clientAuth\n"),
        "controller-manager": ("/CN=system:kube-controller-manager", "extendedKeyUsage=clientAuth\n"),
        "scheduler": ("/CN=system:kube-scheduler", "extendedKeyUsage=clientAuth\n"),
        "apiserver-kubelet-client": ("/CN=kube-apiserver-kubelet-client", "extendedKeyUsage=clientAuth\n"),
        "kubelet": (f"/O=system:nodes/CN=system:node:{localnode.NODE_NAME}", "extendedKeyUsage=clientAuth\n"),
        "kube-proxy": ("/CN=system:kube-proxy", "extendedKeyUsage=clientAuth\n"),
        "coredns": ("/CN=waso-local:coredns", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, extensions) in certs.items():
        (pki / f"{name}.ext").write_text(extensions)
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=pki,
        )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    # JSON is valid YAML, and kubeconfig loaders accept it.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "waso-local", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pki / f"{user}.crt"), "client-key": str(pki / f"{user}.key")},
            }
        ],
        "contexts": [{"name": "waso-local", "context": {"cluster": "waso-local", "user": user}}],
        "current-context": "waso-local",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")


@dataclass
class ClusterState:
    directory: str
    server: str
    kubeconfig: str
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    node_network: int | None = None
    """The node's index (addresses 10.250.N.1/2, pods 10.251.N.0/24), or None without a node."""


class LocalCluster:
    """One control plane in one directory."""

    def __init__(self, directory: Path = DEFAULT_DIR, *, node: bool = True) -> None:
        self.directory = directory.resolve()
        self.with_node = node
        self.state_file = self.directory / "state.json"
        self.pki = self.directory / "pki"
        self.logs = self.directory / "logs"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.state: ClusterState | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def node_dir(self) -> Path:
        return self.directory / "node"

    def load_image(self, archive: Path) -> None:
        """Import an OCI archive into the node's containerd (as `kind load image-archive` does)."""
        if not archive.exists():
            raise ClusterError(f"{archive} is missing: run `make image`")
        init = self.state.pids.get("node-init") if self.state else None
        if init is None:
            raise ClusterError("the cluster has no node to load the image into")
        localnode.import_image(binary("ctr"), archive.resolve(), init)

    def start(self, *, tied: bool, timeout: float = 120.0) -> ClusterState:
        if self.state_file.exists():
            raise ClusterError(f"{self.state_file} exists: a cluster may be running; stop it first (make cluster-down)")
        for name in (*COMPONENTS, *(NODE_BINARIES if self.with_node else ())):
            binary(name)
        terminate(list(processes_using(self.directory)))  # left over by a crashed `up`
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.logs.mkdir(parents=True)
        network = localnode.NodeNetwork.allocate() if self.with_node else None
        address = network.host_ip if network else "127.0.0.1"
        generate_pki(self.pki, (address,))
        ports = {
            name: free_port() for name in ("etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler")
        }
        server = f"https://{address}:{ports['apiserver']}"
        write_kubeconfig(self.kubeconfig, server, self.pki, "admin")
        for user in ("controller-manager", "scheduler", "kubelet", "kube-proxy", "coredns"):
            write_kubeconfig(self.directory / f"{user}.kubeconfig", server, self.pki, user)
        self.state = ClusterState(str(self.directory), server, str(self.kubeconfig), ports)
        try:
            if network:
                self._start_node(network, tied)
            self._spawn("etcd", self._etcd_args(ports), tied)
            wait_until(
                lambda: http_ok(f"http://127.0.0.1:{ports['etcd-client']}/health"),
                timeout,
                "etcd health",
                self._log_tail("etcd"),
            )
            self._spawn("kube-apiserver", self._apiserver_args(ports), tied)
            wait_until(
                lambda: self._api_ok("/readyz"), timeout, "kube-apiserver /readyz", self._log_tail("kube-apiserver")
            )
            self._spawn("kube-controller-manager", self._controller_manager_args(ports), tied)
            self._spawn("kube-scheduler", self._scheduler_args(ports), tied)
            wait_until(
                lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
                timeout,
                "the default ServiceAccount (kube-controller-manager)",
                self._log_tail("kube-controller-manager"),
            )
            if network:
                self._apply(localnode.bootstrap_manifests(network))
                wait_until(self._node_ready, timeout, f"node {localnode.NODE_NAME} Ready", self._node_diagnosis)
        except BaseException:
            self.stop()
            raise
        self.state_file.write_text(json.dumps(asdict(self.state), indent=2) + "\n")
        self.state_file.with_suffix(".partial").unlink(missing_ok=True)
        return self.state

    def stop(self) -> None:
        state = asdict(self.state) if self.state else {}
        for recorded in (self.state_file, self.state_file.with_suffix(".partial")):
            if not state.get("pids") and recorded.exists():
                state = json.loads(recorded.read_text())
        pids: dict[str, int] = state.get("pids", {})
        # The control plane first: the API server listens on the node's veth, which goes with the node.
        # Then the node's first process stops kubelet and containerd, kills every pod and removes its cgroups.
        # The API server stops listening at once but may then linger on connections that never drain; etcd's
        # data is thrown away with the cluster, so a short grace loses nothing.
        terminate([pids[name] for name in COMPONENTS if name in pids and name != "etcd"], grace=3)
        terminate([pids[name] for name in ("etcd",) if name in pids])  # the API server needs it to the end
        terminate([pids[name] for name in ("node-init", "node") if name in pids], grace=60)
        if state.get("node_network") is not None:
            localnode.host_teardown(localnode.NodeNetwork(state["node_network"]))
        for proc in self.processes.values():
            with contextlib.suppress(ChildProcessError):
                proc.wait(timeout=0)
        terminate(list(processes_using(self.directory)))
        self.state_file.unlink(missing_ok=True)
        self.state_file.with_suffix(".partial").unlink(missing_ok=True)
        shutil.rmtree(self.directory / "etcd", ignore_errors=True)
        shutil.rmtree(self.node_dir, ignore_errors=True)  # volumes and images; logs stay in logs/
        self.processes.clear()

    def _start_node(self, network: localnode.NodeNetwork, tied: bool) -> None:
        """The node's namespaces and first process; it starts kubelet once the machine has wired its network."""
        assert self.state is not None
        self.state.node_network = network.index
        self.node_dir.mkdir(parents=True)
        plan = localnode.NodePlan(
            directory=str(self.node_dir),
            bin=str(BIN),
            network=network.index,
            kubeconfig=str(self.directory / "kubelet.kubeconfig"),
            admin_kubeconfig=str(self.kubeconfig),
            proxy_kubeconfig=str(self.directory / "kube-proxy.kubeconfig"),
            dns_kubeconfig=str(self.directory / "coredns.kubeconfig"),
            ca=str(self.pki / "ca.crt"),
            images=[str(binary("pause.oci.tar"))],
            pause_image=pause_image(),
        )
        plan_file = self.node_dir / "plan.json"
        plan_file.write_text(json.dumps(asdict(plan), indent=2))
        init = [sys.executable, str(Path(localnode.__file__).resolve()), "init", str(plan_file)]
        namespaces = ["--net", "--mount", "--pid", "--fork", "--mount-proc", "--propagation=private"]
        unshare = ["unshare", *namespaces, "--kill-child=SIGTERM", "--", *init]
        # Tied, unshare dies with its caller (it blocks SIGTERM while it waits), and --kill-child hands the node's
        # first process a SIGTERM, on which it cleans up (cgroups, kernel settings) before the namespace ends.
        self._spawn("node", unshare, tied)
        pid = self.state.pids["node"]
        localnode.wait_for_namespace(pid)
        localnode.host_setup(pid, network)
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            self.state.pids["node-init"] = int(children[0])

    def _apply(self, objects: list[dict[str, object]]) -> None:
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
        result = subprocess.run(
            [str(binary("kubectl")), f"--kubeconfig={self.kubeconfig}", "apply", "--server-side", "-f", "-"],
            input=manifest, capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise ClusterError(f"kubectl apply of the node's cluster objects failed: {result.stderr.strip()}")

    def _node_ready(self) -> bool:
        failed = self.node_dir / "failed"
        if failed.exists():
            raise ClusterError(f"the node failed: {failed.read_text().strip()}\n{self._node_diagnosis()}")
        result = subprocess.run(
            [str(binary("kubectl")), f"--kubeconfig={self.kubeconfig}", "get", "node", localnode.NODE_NAME,
             "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}"],
            capture_output=True, text=True,
        )  # fmt: skip
        return result.stdout.strip() == "True"

    def _node_diagnosis(self) -> str:
        return "\n".join(self._log_tail(name)() for name in ("node", "containerd", "kubelet"))

    def _spawn(self, name: str, args: list[str], tied: bool) -> None:
        assert self.state is not None
        command = args if name == "node" else [str(binary(name)), *args]
        proc = spawn_logged(command, self.logs / f"{name}.log", tied=tied, cwd=self.directory)
        self.processes[name] = proc
        self.state.pids[name] = proc.pid
        # Written as soon as there is something to clean up.
        self.state_file.with_suffix(".partial").write_text(json.dumps(asdict(self.state)))

    def _log_tail(self, name: str) -> Callable[[], str]:
        def tail() -> str:
            path = self.logs / f"{name}.log"
            lines = path.read_text(errors="replace").splitlines()[-25:] if path.exists() else []
            proc = self.processes.get(name)
            status = f"exited with {proc.returncode}" if proc and proc.poll() is not None else "running"
            return f"{name} ({status}), last log lines from {path}:\n" + "\n".join(lines)

        return tail

    def _api_ok(self, path: str) -> bool:
        assert self.state is not None
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return http_ok(self.state.server + path, context)

    def _etcd_args(self, ports: dict[str, int]) -> list[str]:
        client = f"http://127.0.0.1:{ports['etcd-client']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        return [
            "--name=waso",
            f"--data-dir={self.directory / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=waso={peer}",
            "--unsafe-no-fsync",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]

    def _apiserver_args(self, ports: dict[str, int]) -> list[str]:
        pki = self.pki
        assert self.state is not None
        network = self.state.node_network
        address = localnode.NodeNetwork(network).host_ip if network is not None else "127.0.0.1"
        # Without a node the Service "kubernetes" would point at 127.0.0.1, which Endpoints validation refuses.
        reconciler = "--endpoint-reconciler-type=lease" if network is not None else "--endpoint-reconciler-type=none"
        return [
            f"--etcd-servers=http://127.0.0.1:{ports['etcd-client']}",
            f"--bind-address={address}",
            f"--advertise-address={address}",
            reconciler,
            "--kubelet-preferred-address-types=InternalIP",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=false",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_args(self, ports: dict[str, int]) -> list[str]:
        kubeconfig = str(self.directory / "controller-manager.kubeconfig")
        pki = self.pki
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller-manager']}",
            f"--cert-dir={self.directory / 'controller-manager-certs'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
            "--v=1",
        ]

    def _scheduler_args(self, ports: dict[str, int]) -> list[str]:
        kubeconfig = str(self.directory / "scheduler.kubeconfig")
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            f"--cert-dir={self.directory / 'scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]


def pause_image() -> str:
    """The sandbox image that `make tools` builds (hack/versions.env pins its tag)."""
    versions = (ROOT / "hack/versions.env").read_text().splitlines()
    tag = next((line.split("=", 1)[1] for line in versions if line.startswith(f"{PAUSE_IMAGE_ENV}=")), "")
    if not tag:
        raise ClusterError(f"hack/versions.env has no {PAUSE_IMAGE_ENV}")
    return f"localhost/waso-pause:{tag}"


CONTEXT = "waso-local"


def _user_kubeconfig() -> Path:
    return Path(os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or Path.home() / ".kube" / "config")


def _kubectl_config(*args: str) -> None:
    subprocess.run([str(binary("kubectl")), "config", f"--kubeconfig={_user_kubeconfig()}", *args],
                   check=False, capture_output=True)  # fmt: skip


def register_context(cluster: LocalCluster, server: str) -> None:
    """Add the cluster as context waso-local of the user's kubeconfig and make it current, as kind does."""
    _user_kubeconfig().parent.mkdir(parents=True, exist_ok=True)
    pki = cluster.pki
    _kubectl_config("set-cluster", CONTEXT, f"--server={server}", f"--certificate-authority={pki / 'ca.crt'}")
    _kubectl_config("set-credentials", CONTEXT, f"--client-certificate={pki / 'admin.crt'}",
                    f"--client-key={pki / 'admin.key'}")  # fmt: skip
    _kubectl_config("set-context", CONTEXT, f"--cluster={CONTEXT}", f"--user={CONTEXT}")
    _kubectl_config("use-context", CONTEXT)


def unregister_context() -> None:
    if not os.access(BIN / "kubectl", os.X_OK):
        return
    current = subprocess.run([str(BIN / "kubectl"), "config", f"--kubeconfig={_user_kubeconfig()}", "current-context"],
                             capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    if current == CONTEXT:
        _kubectl_config("unset", "current-context")
    for args in (("delete-context", CONTEXT), ("delete-cluster", CONTEXT), ("delete-user", CONTEXT)):
        _kubectl_config(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "env"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="data, logs and kubeconfig (default: .cluster)")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    try:
        if args.command == "up":
            state = cluster.start(tied=False)
            register_context(cluster, state.server)
            print(f"control plane ready at {state.server}; kubectl context {CONTEXT} in {_user_kubeconfig()}")
            print(f"or: export KUBECONFIG={state.kubeconfig}")
        elif args.command == "down":
            cluster.stop()
            unregister_context()
            print("control plane stopped")
        else:
            print(f"export KUBECONFIG={cluster.kubeconfig}")
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
