"""`make demo` end to end: waso installed by Helm on the local node, operator-created StatefulSets
run as pods, every sample session pairs through the in-cluster simulator, and nothing is left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_pairs_every_sample_session_in_its_tenants_pod(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack/demo.py"), "--exit", "--dir", str(tmp_path / "demo"), "--timeout", "180"],
        capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHONPATH": str(ROOT / "hack")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every session is Ready" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()]
    sessions = [row for row in rows if row[:1] in (["acme"], ["globex"]) and "whatsappsession.waso.dev/" in row[1]]
    assert len(sessions) == 5
    connected = [row for row in sessions if row[3] == "Connected"]
    assert len(connected) == 4
    # -o wide: NAMESPACE NAME PHONE PHASE READY REASON SHARD AGE DEVICE ...
    assert {row[8] for row in connected} == {"11"}  # device numbers above 10 are normal
    pods = {
        (row[0], row[1].split("-")[0], row[2], row[3]) for row in rows if len(row) > 3 and row[1].startswith("pod/")
    }
    assert pods == {
        ("acme", "pod/waso", "1/1", "Running"),  # the session pod of each tenant
        ("globex", "pod/waso", "1/1", "Running"),
        ("waso-system", "pod/waso", "1/1", "Running"),  # the operator and the simulator
    }
    assert sum(1 for row in rows if row[:1] == ["waso-system"] and row[1].startswith("pod/")) == 2
    assert "demo stopped" in result.stdout
    # Stopped, the demo leaves no process of its cluster and no cgroup of its node.
    marker = str(tmp_path / "demo").encode()
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).find(marker) >= 0]
    pods_network = re.search(r"pods 10\.251\.(\d+)\.0/24", result.stdout)
    assert pods_network is not None
    assert not list(Path("/sys/fs/cgroup").glob(f"*/waso-node-{pods_network[1]}"))


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""
