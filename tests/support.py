"""Helpers shared by the tests: bounded waiting, free ports, tied child processes."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from kubernetes.client.exceptions import ApiException
from localcluster import BIN
from processes import free_port

T = TypeVar("T")

__all__ = ["BIN", "api_message", "free_port", "kubectl", "wait_for", "which_or_fail"]


REPO = Path(__file__).resolve().parent.parent


def run_waso(
    *args: str, kubeconfig: Path | None = None, cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The `waso` command as a user runs it (a process of its own), with its output and exit code."""
    env = {**os.environ, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {})}
    return subprocess.run(
        [sys.executable, "-m", "waso.cli.main", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def wait_for(probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail with the last value seen after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


async def wait_for_async(
    probe: Callable[[], Awaitable[bool] | bool], *, within: float, what: str, interval: float = 0.05
) -> None:
    """``wait_for`` inside an event loop: the loop keeps running (the probe may await, or watch another thread)."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the real kubectl built into bin/ against ``kubeconfig``."""
    binary = BIN / "kubectl"
    if not binary.exists():
        raise AssertionError(f"{binary} is missing: run `make tools`")
    result = subprocess.run(
        [str(binary), f"--kubeconfig={kubeconfig}", *args], input=stdin, capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def which_or_fail(name: str, install_hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"`{name}` is not installed: {install_hint}")
    return path


def api_message(error: ApiException) -> str:
    """The human-readable message of a Status returned by the API server."""
    return str(json.loads(error.body or "{}").get("message", error.body))
