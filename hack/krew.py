"""The kubectl plugin for krew: kubectl-waso as one executable, its archive and its manifest.

kubectl-waso is a PEX (waso and every dependency, from the image's wheelhouse in dist/, so the
wheels are the image's), run by CPython 3.11. The archive holds it and the README; the manifest is
.krew.yaml rendered with the archive's SHA-256, so `kubectl krew install --manifest=... --archive=...`
installs exactly this build (tests/test_krew.py does), and a release publishes the same two files.

    python hack/krew.py [--homepage URL]   # dist/krew/kubectl-waso_v<version>_linux_amd64.tar.gz, dist/krew/waso.yaml

Nothing is rebuilt when the wheelhouse and the template are unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = (ROOT / "dist/wheels", ROOT / "dist/waso")
TEMPLATE = ROOT / ".krew.yaml"
OUT = ROOT / "dist/krew"
DEFAULT_HOMEPAGE = "https://github.com/waso-dev/waso"
ADD_URI_AND_SHA = re.compile(r'^(?P<indent> *)\{\{ addURIAndSha "(?P<url>[^"]+)" \.TagName \}\}$', re.MULTILINE)


def version() -> str:
    return "v" + str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def inputs_digest(homepage: str) -> str:
    """What the build depends on: the wheels (names and contents), the template and the homepage."""
    digest = hashlib.sha256(TEMPLATE.read_bytes() + (ROOT / "README.md").read_bytes() + homepage.encode())
    for wheel in sorted(w for directory in WHEELS for w in directory.glob("*.whl")):
        digest.update(wheel.name.encode() + hashlib.sha256(wheel.read_bytes()).digest())
    return digest.hexdigest()


def render(template: str, tag: str, homepage: str, sha256: str) -> str:
    def uri_and_sha(found: re.Match[str]) -> str:
        url = found["url"].replace("{{ .TagName }}", tag).replace("{{ .Homepage }}", homepage)
        return f"{found['indent']}uri: {url}\n{found['indent']}sha256: {sha256}"

    text = ADD_URI_AND_SHA.sub(uri_and_sha, template)
    text = text.replace("{{ .TagName }}", tag).replace("{{ .Homepage }}", homepage)
    leftover = re.search(r"\{\{.*?\}\}", text)
    if leftover:
        raise SystemExit(f"[krew] .krew.yaml: unknown template expression {leftover.group()}")
    return text


def archive(executable: Path, target: Path) -> None:
    """A reproducible tar.gz: fixed owner and times, so the same build has the same SHA-256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path, name, mode in ((executable, "kubectl-waso", 0o755), (ROOT / "README.md", "README.md", 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = path.stat().st_size, mode, 0
            with path.open("rb") as data:
                tar.addfile(info, data)
    target.write_bytes(buffer.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--homepage", default=DEFAULT_HOMEPAGE, help="where releases are published")
    args = parser.parse_args()
    if not any((ROOT / "dist/waso").glob("waso-*.whl")):
        raise SystemExit("[krew] no wheelhouse in dist/: run `make image` first (it builds the wheels)")
    tag = version()
    target = OUT / f"kubectl-waso_{tag}_linux_amd64.tar.gz"
    stamp = OUT / ".inputs"
    wanted = inputs_digest(args.homepage)
    if target.exists() and (OUT / "waso.yaml").exists() and stamp.exists() and stamp.read_text() == wanted:
        print(f"[krew] {target.relative_to(ROOT)}: up to date", file=sys.stderr)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    executable = OUT / "kubectl-waso"
    subprocess.run(
        [sys.executable, "-m", "pex", "--no-pypi", *(f"--find-links={d}" for d in WHEELS), "waso",
         "--console-script", "kubectl-waso", "--interpreter-constraint", "CPython==3.11.*",
         "--python-shebang", "/usr/bin/env python3", "--venv", "prepend", "--output-file", str(executable)],
        check=True,
    )  # fmt: skip
    archive(executable, target)
    sha256 = hashlib.sha256(target.read_bytes()).hexdigest()
    (OUT / "waso.yaml").write_text(render(TEMPLATE.read_text(), tag, args.homepage, sha256))
    stamp.write_text(wanted)
    size = target.stat().st_size / 2**20
    print(
        f"[krew] {target.relative_to(ROOT)} ({size:.0f} MiB, sha256 {sha256}) and dist/krew/waso.yaml", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
