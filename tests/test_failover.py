"""Two operator replicas with leader election on a Lease, against the real API server.

The standby watches with its indexes filled but neither decides nor writes; when the leader is
killed with SIGKILL it takes over after the lease runs out and decides from the whole cluster.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.conftest import ControlPlane
from tests.operator_support import (
    Tenants,
    admitted,
    condition,
    create_many,
    create_session,
    get,
    list_sessions,
    observed_peak,
    operator_process,
)
from tests.support import wait_for
from tests.test_operator import phone

LEASE_SECONDS = 3
KILLS = 20
CAP = 35


class Replicas:
    """Operator processes named operator-0, operator-1, ...; the Lease says which one leads."""

    def __init__(self, control_plane: ControlPlane, tenants: Tenants, log: Path, stack: contextlib.ExitStack) -> None:
        self.control_plane, self.tenants, self.log, self.stack = control_plane, tenants, log, stack
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.lease_name = ""
        self.started = 0

    def start(self, env: dict[str, str]) -> None:
        name = f"operator-{self.started}"
        self.started += 1
        self.lease_name = env["WASO_LEADER_ELECTION__LEASE_NAME"]
        process = operator_process(
            self.control_plane.kubeconfig, self.tenants.pattern, {**env, "POD_NAME": name}, self.log
        )
        self.processes[name] = self.stack.enter_context(process)

    def leader(self) -> str | None:
        """The live replica holding the Lease, if any."""
        try:
            lease = client.CoordinationV1Api(self.control_plane.api).read_namespaced_lease(self.lease_name, "default")
        except client.ApiException:
            return None
        holder = (lease.spec.holder_identity or "").split("/")[0]
        process = self.processes.get(holder)
        return holder if process is not None and process.poll() is None else None

    def leader_other_than(self, previous: str) -> str | None:
        leader = self.leader()
        return leader if leader != previous else None


def decided(api: client.ApiClient, namespace: str, name: str) -> bool:
    return admitted(get(api, namespace, name)) is not None


def test_exactly_the_cap_is_admitted_across_twenty_leader_kills(
    control_plane: ControlPlane, tenants: Tenants, tmp_path: Path
) -> None:
    api = control_plane.api
    namespaces = [tenants.namespace(f"t{i}") for i in range(4)]
    env = {
        "WASO_MAX_SESSIONS": str(CAP),
        "WASO_DEFAULT_QUOTA__MAX_SESSIONS": "100",
        "WASO_RUNTIME_IMAGE": "waso:test",
        "WASO_IMAGE_PULL_POLICY": "Never",
        "WASO_LEADER_ELECTION__LEASE_SECONDS": str(LEASE_SECONDS),
        "WASO_LEADER_ELECTION__LEASE_NAME": f"waso-operator-{tenants.prefix}",
    }
    log = tmp_path / "operators.log"
    specs = [(namespaces[i % 4], f"s{i}", phone(i)) for i in range(200)]
    with contextlib.ExitStack() as stack, observed_peak(api, tenants.prefix, (namespaces[0], "s0")) as peak:
        replicas = Replicas(control_plane, tenants, log, stack)
        replicas.start(env)
        replicas.start(env)
        creator = threading.Thread(target=create_many, args=(api, specs))
        creator.start()
        for kill in range(KILLS):
            leader = wait_for(replicas.leader, timeout=60, what=f"a leader before kill {kill + 1}")
            # The leader decides: a session created now gets its answer from it.
            probe = f"probe-{kill}"
            create_session(api, namespaces[0], probe, phone(1000 + kill))
            wait_for(partial(decided, api, namespaces[0], probe), timeout=60, what=f"{probe} decided by {leader}")
            replicas.processes[leader].kill()
            replicas.start(env)  # the Deployment's replacement: there are always two
            successor = wait_for(partial(replicas.leader_other_than, leader), timeout=60,
                                 what=f"a new leader after kill {kill + 1}")  # fmt: skip
            assert successor != leader
        creator.join()

        def all_decided() -> list[dict[str, Any]] | None:
            sessions = [s for ns in namespaces for s in list_sessions(api, ns)]
            decided = len(sessions) == 200 + KILLS and all(admitted(s) is not None for s in sessions)
            return sessions if decided else None

        sessions = wait_for(all_decided, timeout=120, what="a decision for every session")
    assert sum(1 for s in sessions if admitted(s)) == CAP, log.read_text()[-3000:]
    refusals = {(condition(s, "Admitted") or {}).get("reason") for s in sessions if not admitted(s)}
    assert refusals == {"CapacityExceeded"}
    assert peak["admitted"] == CAP
