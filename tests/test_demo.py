"""`make demo` end to end: operator-created StatefulSets run as pods on the local node agent,
with their own ServiceAccount tokens, and every sample session pairs through the simulator."""

from __future__ import annotations

import os
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
    assert {row[4] for row in connected} == {"11"}  # device numbers above 10 are normal
    pods = [row for row in rows if len(row) > 2 and row[1].startswith("waso-sessions-")]
    assert {(row[0], row[2], row[3]) for row in pods} == {("acme", "1/1", "Running"), ("globex", "1/1", "Running")}
    assert "demo stopped" in result.stdout
