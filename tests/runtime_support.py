"""Helpers for runtime tests: real simulator and runtime processes, HTTP and SSE clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import http_ok, spawn_logged

from tests.support import free_port, wait_for


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


def http_json(
    method: str, url: str, body: Any = None, raw: bytes | None = None, *, token: str | None = None,
    content_type: str = "application/json",
) -> Reply:  # fmt: skip
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return Reply(response.status, dict(response.headers), _parsed(response.read()))
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers), _parsed(error.read()))


def _parsed(payload: bytes) -> Any:
    """JSON, or the text of anything else (metrics); None when empty."""
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace")


class SseStream:
    """A Server-Sent-Events client on a raw connection, so a test can also drop it abruptly."""

    def __init__(self, port: int, path: str, timeout: float = 30, *, token: str | None = None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        headers = {"Accept": "text/event-stream", **({"Authorization": f"Bearer {token}"} if token else {})}
        self.connection.request("GET", path, headers=headers)
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.comments = 0

    def next_event(self) -> tuple[str, dict[str, Any]] | None:
        """The next event, or None when the server closed the stream."""
        event, data = "message", ""
        while True:
            line = self.response.readline()
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text.startswith(":"):
                self.comments += 1
            elif text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: "):
                data += text[6:]
            elif text == "" and data:
                return event, json.loads(data)

    def until(self, wanted: str) -> dict[str, Any]:
        while (item := self.next_event()) is not None:
            if item[0] == wanted:
                return item[1]
        raise AssertionError(f"stream closed before a {wanted!r} event")

    def scan(self, simulator_url: str, phone: str, attempts: int = 5) -> dict[str, Any]:
        """Scan the QR code the stream offers with the simulator's phone, as a person does: a code that
        rotated between being drawn and being scanned (a busy machine) is refused, and the next one is scanned."""
        for _ in range(attempts):
            code = self.until("qr")["code"]
            scanned = http_json("POST", f"{simulator_url}/v1/phones/{phone}/scan", {"code": code})
            if scanned.status == 422 and "not the current one" in str(scanned.body):
                continue
            assert scanned.status == 200, scanned.body
            body: dict[str, Any] = scanned.body
            return body
        raise AssertionError(f"every one of {attempts} QR codes rotated before it was scanned")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.connection.sock is not None:
                self.connection.sock.close()
        self.connection.close()


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=30)


def spawn_waso(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return spawn_logged([sys.executable, "-m", "waso.cli.main", *args], log, tied=True, env={**os.environ, **env})


def _ready(process: Process, path: str) -> bool:
    if process.proc.poll() is not None:
        raise AssertionError(f"process exited with {process.proc.returncode}:\n{process.tail()}")
    return http_ok(process.url + path)


@contextlib.contextmanager
def simulator_process(log_dir: Path, *args: str) -> Iterator[Process]:
    port = free_port()
    log = log_dir / f"simulator-{port}.log"
    process = Process(spawn_waso(["simulator", "--port", str(port), *args], {}, log), port, log)
    try:
        wait_for(lambda: _ready(process, "/healthz"), timeout=30, what="the simulator")
        yield process
    finally:
        process.stop(kill=True)


def start_runtime(
    kubeconfig: Path, namespace: str, shard: int, data_dir: Path, simulator_url: str, log_dir: Path, **env: str
) -> Process:
    port = free_port()
    log = log_dir / f"runtime-{namespace}-{shard}-{port}.log"
    variables = {
        "KUBECONFIG": str(kubeconfig),
        "WASO_NAMESPACE": namespace,
        "WASO_SHARD": str(shard),
        "WASO_POD_NAME": f"waso-sessions-{shard}",
        "WASO_TRANSPORT": "simulator",
        "WASO_SIMULATOR_URL": simulator_url,
        "WASO_DATA_DIR": str(data_dir),
        "WASO_HTTP_HOST": "127.0.0.1",
        "WASO_HTTP_PORT": str(port),
        "WASO_LEASE_SECONDS": "3",
        "WASO_HEARTBEAT_SECONDS": "2",
        "WASO_QUOTA_REFRESH_SECONDS": "1",
        **env,
    }
    process = Process(spawn_waso(["runtime"], variables, log), port, log)
    wait_for(lambda: _ready(process, "/readyz"), timeout=60, what=f"runtime {namespace}/{shard} to be ready")
    return process
