"""Fixtures: one real control plane with a real node per test run, a namespace per test, a Redis server, a
MongoDB-wire server (FerretDB).

Nothing here skips. A missing binary or server is a failure that names the command
that installs it, because a skipped integration test reads as a passing one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config
from localcluster import LocalCluster
from processes import ClusterError, die_with_parent

from tests.operator_support import Tenants
from tests.support import BIN, free_port, kubectl, wait_for, which_or_fail


@dataclass(frozen=True)
class ControlPlane:
    kubeconfig: Path
    api: client.ApiClient
    cluster: LocalCluster | None
    """The local cluster and its node; None with WASO_TEST_KUBECONFIG."""

    def local(self) -> LocalCluster:
        if self.cluster is None:
            raise AssertionError("this test needs the local node (hack/localnode.py): unset WASO_TEST_KUBECONFIG")
        return self.cluster


@pytest.fixture(autouse=True)
def own_leader_lease(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Each test's operators elect their leader on a Lease of their own: an operator a test killed leaves its
    lease behind, and the next test's operator must not wait for it to run out."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]
    monkeypatch.setenv("WASO_LEADER_ELECTION__LEASE_NAME", f"waso-operator-{digest}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The local control plane, or the cluster named by WASO_TEST_KUBECONFIG."""
    existing = os.environ.get("WASO_TEST_KUBECONFIG")
    cluster: LocalCluster | None = None
    if existing:
        kubeconfig = Path(existing)
    else:
        cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
        try:
            cluster.start(tied=True)
        except ClusterError as error:
            pytest.fail(f"cannot start the local control plane: {error}", pytrace=False)
        kubeconfig = cluster.kubeconfig
    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield ControlPlane(kubeconfig, api, cluster)
    finally:
        api.close()
        if cluster is not None:
            cluster.stop()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    base = request.node.name.lower().replace("_", "-")
    name = "".join(c for c in base if c.isalnum() or c == "-")[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    core = client.CoreV1Api(control_plane.api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"waso.dev/test": "true"})))
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


@dataclass(frozen=True)
class RedisServer:
    url: str
    port: int


@contextlib.contextmanager
def redis_process(host: str, port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Debian's redis-server on ``host:port``, answering, and killed on the way out."""
    binary = which_or_fail("redis-server", "apt-get install redis-server (done by .ci/run)")
    proc = subprocess.Popen(
        [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir),
         "--protected-mode", "yes" if host == "127.0.0.1" else "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )  # fmt: skip
    import redis

    ping = redis.Redis(host=host, port=port, socket_connect_timeout=0.5)

    def answers() -> bool:
        try:
            return bool(ping.ping())
        except redis.ConnectionError:
            if proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {proc.returncode}") from None
            return False

    try:
        wait_for(answers, timeout=15, what=f"redis-server on {host}:{port}")
        yield proc
    finally:
        ping.close()
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Debian's redis-server on a free loopback port, killed with the test run."""
    port = free_port()
    with redis_process("127.0.0.1", port, tmp_path_factory.mktemp("redis")):
        yield RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port)


@dataclass(frozen=True)
class MongoServer:
    url: str
    port: int


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    """FerretDB on SQLite (bin/ferretdb) on a free loopback port, killed with the test run.

    FerretDB 1.24 is no full MongoDB: no TTL indexes, transactions, change streams or $lookup, only
    $sum and $count in $group, and find_one_and_update/update_one are not atomic across connections.
    """
    binary = BIN / "ferretdb"
    if not binary.exists():
        raise AssertionError(f"{binary} is missing: run `make tools`")
    port = free_port()
    workdir = tmp_path_factory.mktemp("mongo")
    (workdir / "data").mkdir()
    proc = subprocess.Popen(
        [
            str(binary),
            "--handler=sqlite",
            f"--sqlite-url=file:{workdir / 'data'}/",
            f"--listen-addr=127.0.0.1:{port}",
            f"--state-dir={workdir}",
            "--debug-addr=-",
            "--telemetry=disable",
            "--log-level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    import pymongo
    import pymongo.errors

    url = f"mongodb://127.0.0.1:{port}/"
    ping: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(url, serverSelectionTimeoutMS=500)

    def answers() -> bool:
        try:
            return bool(ping.admin.command("ping").get("ok"))
        except pymongo.errors.PyMongoError:
            if proc.poll() is not None:
                raise AssertionError(f"ferretdb exited with {proc.returncode}") from None
            return False

    try:
        wait_for(answers, timeout=15, what=f"ferretdb on port {port}")
        yield MongoServer(url=url, port=port)
    finally:
        ping.close()
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane) -> None:
    """The generated CRDs from crds/, installed and Established."""
    crd_dir = Path(__file__).resolve().parent.parent / "crds"
    kubectl(control_plane.kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(crd_dir))
    kubectl(control_plane.kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(crd_dir))


@pytest.fixture
def tenants(control_plane: ControlPlane, crds: None) -> Iterator[Tenants]:
    """Tenant namespaces under a prefix of their own, matched by an operator's namespace pattern."""
    found = Tenants(control_plane.api)
    try:
        yield found
    finally:
        found.cleanup()
