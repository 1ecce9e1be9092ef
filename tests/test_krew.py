"""kubectl-waso as krew installs it: the manifest and archive `make krew` builds (hack/krew.py), installed by the
real krew into a krew root of this test, then run by kubectl as a plugin against the test cluster."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import ControlPlane
from tests.support import BIN

ROOT = Path(__file__).resolve().parent.parent
BUILT = ROOT / "dist/krew"


def test_krew_installs_kubectl_waso_from_its_manifest_and_kubectl_runs_it(
    control_plane: ControlPlane, crds: None, tmp_path: Path
) -> None:
    manifest = BUILT / "waso.yaml"
    assert manifest.exists(), "dist/krew/waso.yaml is missing: run `make krew`"
    plugin = yaml.safe_load(manifest.read_text())
    (platform,) = plugin["spec"]["platforms"]
    archive = BUILT / Path(platform["uri"]).name
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == platform["sha256"]
    python = shutil.which("python3.11") or shutil.which("python3")
    assert python is not None
    krew_root = tmp_path / "krew"
    # Only krew's bin, kubectl and the system: not the .venv, whose kubectl-waso would answer instead.
    env = {
        "PATH": f"{krew_root / 'bin'}:{BIN}:{Path(python).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "KREW_ROOT": str(krew_root),
        "KREW_NO_UPGRADE_CHECK": "1",
        "PEX_ROOT": str(tmp_path / "pex"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=300, check=False)

    installed = run(str(BIN / "krew"), "install", f"--manifest={manifest}", f"--archive={archive}")
    assert installed.returncode == 0, installed.stderr
    assert "Installed plugin: waso" in installed.stderr
    listed = run(str(BIN / "kubectl"), "plugin", "list")
    assert f"{krew_root}/bin/kubectl-waso" in listed.stdout, listed.stdout + listed.stderr

    missing = run(str(BIN / "kubectl"), "waso", "status", "--kubeconfig", str(tmp_path / "nowhere"))
    assert missing.returncode == 3, missing.stderr
    assert (
        missing.stderr
        == f"kubectl waso status: no kubeconfig at {tmp_path / 'nowhere'}: set KUBECONFIG or pass --kubeconfig\n"
    )
    status = run(
        str(BIN / "kubectl"), "waso", "status", "-A", "-o", "json", "--kubeconfig", str(control_plane.kubeconfig)
    )
    assert status.returncode == 0, status.stderr
    assert "capacity" in status.stdout

    # krew's other commands want a plugin index cloned with git; offline, an empty local one stands in.
    subprocess.run(["git", "init", "-q", str(krew_root / "index/default")], check=True)
    removed = run(str(BIN / "krew"), "uninstall", "waso")
    assert removed.returncode == 0, removed.stderr
    assert not (krew_root / "bin/kubectl-waso").exists()
    assert os.listdir(krew_root / "store") == []
