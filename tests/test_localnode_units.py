"""The kernel settings kubelet changes go back to the machine's values when the last node stops.

Nodes are simulated by their pids cgroups (a node is live while processes are in its cgroup),
and /proc/sys by a directory: the record and release rules are what is under test.
"""

from __future__ import annotations

import threading
from pathlib import Path

import localnode
import pytest

ORIGINAL = {"vm/overcommit_memory": "0", "kernel/panic": "1", "kernel/panic_on_oops": "0"}
KUBELET = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    proc_sys = tmp_path / "proc-sys"
    for name, value in ORIGINAL.items():
        (proc_sys / name).parent.mkdir(parents=True, exist_ok=True)
        (proc_sys / name).write_text(value + "\n")
    monkeypatch.setattr(localnode, "PROC_SYS", proc_sys)
    monkeypatch.setattr(localnode, "REGISTRY", tmp_path / "registry")
    monkeypatch.setattr(localnode, "CGROUP_FS", tmp_path / "cgroup")
    return tmp_path


def settings(machine: Path) -> dict[str, str]:
    return {name: (machine / "proc-sys" / name).read_text().strip() for name in ORIGINAL}


def kubelet_changes(machine: Path) -> None:
    for name, value in KUBELET.items():
        (machine / "proc-sys" / name).write_text(value)


def live(machine: Path, index: int, alive: bool = True) -> None:
    procs = machine / "cgroup" / "pids" / f"waso-node-{index}" / "cgroup.procs"
    procs.parent.mkdir(parents=True, exist_ok=True)
    procs.write_text("4242\n" if alive else "")


def start(machine: Path, index: int) -> None:
    live(machine, index)  # joins its cgroup first, then records
    localnode.record_kernel_settings(index)


def stop(machine: Path, index: int) -> None:
    live(machine, index, alive=False)
    localnode.release_kernel_settings(index)


@pytest.mark.parametrize("last", [1, 2])
def test_overlapping_nodes_restore_the_machine_values_whichever_stops_last(machine: Path, last: int) -> None:
    start(machine, 1)
    kubelet_changes(machine)
    start(machine, 2)  # records nothing new: the values it sees are node 1's
    first = 2 if last == 1 else 1
    stop(machine, first)
    assert settings(machine) == KUBELET  # the other node still runs
    stop(machine, last)
    assert settings(machine) == ORIGINAL
    assert not (machine / "registry" / "kernel.json").exists()


def test_a_node_starting_while_the_last_one_stops_is_counted(machine: Path) -> None:
    """The race that left kubelet's values behind: a starting node was not live yet when it recorded."""
    start(machine, 1)
    kubelet_changes(machine)
    live(machine, 2)  # node 2 has joined its cgroup ...
    stop(machine, 1)  # ... so node 1 leaves the settings to it
    assert settings(machine) == KUBELET
    localnode.record_kernel_settings(2)
    stop(machine, 2)
    assert settings(machine) == ORIGINAL


def test_a_record_left_by_a_dead_node_is_kept_and_restored(machine: Path) -> None:
    start(machine, 1)
    kubelet_changes(machine)
    live(machine, 1, alive=False)  # killed without releasing
    start(machine, 2)  # must not take kubelet's values for the machine's
    stop(machine, 2)
    assert settings(machine) == ORIGINAL


def test_concurrent_starts_and_stops_end_with_the_machine_values(machine: Path) -> None:
    start(machine, 0)
    kubelet_changes(machine)
    threads = [threading.Thread(target=start, args=(machine, i)) for i in range(1, 6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stoppers = [threading.Thread(target=stop, args=(machine, i)) for i in range(6)]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    # Each stopper leaves its cgroup before it takes the lock, so the last to take it sees none live.
    assert settings(machine) == ORIGINAL
    assert not (machine / "registry" / "kernel.json").exists()
