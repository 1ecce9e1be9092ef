"""`kubectl waso pair NS/NAME`: the session's QR code in the terminal, redrawn as it rotates, until paired.

The runtime serving the session is reached through the API server: a port-forward to its
session pod (the pod of ``status.shard``), or ``--url`` where the runtime is reachable
directly (an Ingress, a local process). The runtime checks its callers with TokenReview for
the audience ``waso``, which a person's kubeconfig credentials are not: the command asks the
API server for a ten-minute token of a ServiceAccount of the tenant (``--service-account``,
whose Role grants ``get whatsappsessions/qr``; TokenRequest needs ``create
serviceaccounts/token`` on it), or takes one from ``--token`` / ``WASO_TOKEN``.

The QR is drawn with half blocks, two modules per character, light modules as blocks (it
reads right on a dark terminal; ``--invert`` for a light one), with a quiet zone of two.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import sys
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlsplit

import qrcode
from kubernetes import client

from waso.cli.connection import EXIT_FAILED, EXIT_USAGE, CliError, Cluster, connect, explain
from waso.cli.requests import parse_target, read_session
from waso.kube import ApiError, Unreachable

RUNTIME_PORT = 8080
POD_PREFIX = "waso-sessions"
QUIET_ZONE = 2
TOKEN_SECONDS = 600
HALF_BLOCKS = {(True, True): "█", (True, False): "▀", (False, True): "▄", (False, False): " "}
"""(top module drawn, bottom module drawn) → character."""


def qr_matrix(payload: str) -> list[list[bool]]:
    """The QR code of ``payload`` as modules (True: dark), without a quiet zone."""
    code = qrcode.QRCode(border=0, error_correction=qrcode.constants.ERROR_CORRECT_L)
    code.add_data(payload)
    code.make(fit=True)
    return [list(row) for row in code.get_matrix()]


def draw(matrix: list[list[bool]], invert: bool = False) -> list[str]:
    """Terminal lines: light modules (the quiet zone included) as blocks unless ``invert``."""
    size = len(matrix)
    width = size + 2 * QUIET_ZONE

    def drawn(row: int, column: int) -> bool:
        inside = 0 <= row - QUIET_ZONE < size and 0 <= column - QUIET_ZONE < size
        dark = inside and matrix[row - QUIET_ZONE][column - QUIET_ZONE]
        return dark if invert else not dark

    lines = []
    for top in range(0, width, 2):
        lines.append(
            "".join(
                HALF_BLOCKS[(drawn(top, column), top + 1 < width and drawn(top + 1, column))] for column in range(width)
            )
        )
    return lines


def read_drawing(lines: list[str], invert: bool = False) -> list[list[bool]]:
    """The modules of a drawing made by ``draw`` (the quiet zone removed): what a test reads off a terminal."""
    rows: list[list[bool]] = []
    for line in lines:
        cells = [next(k for k, v in HALF_BLOCKS.items() if v == char) for char in line]
        rows.append([top for top, _ in cells])
        rows.append([bottom for _, bottom in cells])
    width = len(lines[0])
    rows = rows[:width]  # an odd width leaves the last bottom half empty
    modules = [[cell if invert else not cell for cell in row] for row in rows]
    return [row[QUIET_ZONE : width - QUIET_ZONE] for row in modules[QUIET_ZONE : width - QUIET_ZONE]]


# -- reaching the runtime ----------------------------------------------------------------------


def _token(cluster: Cluster, namespace: str, account: str) -> str:
    kube = connect(cluster, threads=1)
    try:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=["waso"], expiration_seconds=TOKEN_SECONDS)
        )
        core = client.CoreV1Api(kube.api)
        answer = core.create_namespaced_service_account_token(account, namespace, request)
        if answer.status is None:
            raise CliError(f"the API server returned no token for ServiceAccount {namespace}/{account}")
        return str(answer.status.token)
    except client.ApiException as error:
        raise explain(ApiError.from_response(error.status or 0, error.reason or "", error.body),
                      f"ServiceAccount {namespace}/{account}") from None  # fmt: skip
    except OSError as error:
        raise explain(error) from None
    finally:
        kube.close()


@contextlib.contextmanager
def _runtime_connection(cluster: Cluster, namespace: str, shard: int, url: str | None) -> Iterator[Any]:
    """An HTTP connection to the runtime: ``url`` directly, or a port-forward to the session pod."""
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise CliError(f"--url must be http://HOST[:PORT], not {url}", EXIT_USAGE)
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=300)
        try:
            yield connection
        finally:
            connection.close()
        return
    from kubernetes.stream import portforward

    kube = connect(cluster, threads=1)
    pod = f"{POD_PREFIX}-{shard}"
    try:
        core = client.CoreV1Api(kube.api)
        forward = portforward(core.connect_get_namespaced_pod_portforward, pod, namespace, ports=str(RUNTIME_PORT))
        connection = http.client.HTTPConnection("localhost", RUNTIME_PORT, timeout=300)
        connection.sock = forward.socket(RUNTIME_PORT)
        yield connection
        connection.close()
    except client.ApiException as error:
        raise explain(ApiError.from_response(error.status or 0, error.reason or "", error.body), f"pod {pod}") from None
    finally:
        kube.close()


def _events(response: http.client.HTTPResponse) -> Iterator[tuple[str, dict[str, Any]]]:
    """Server-Sent Events: (event, data) pairs; comments (keep-alives) skipped."""
    event, data = "message", ""
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads(data)
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def _fail(response: http.client.HTTPResponse) -> CliError:
    body = response.read().decode(errors="replace")
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:300]
    return CliError(f"the runtime answered {response.status}: {message}")


def main(
    cluster: Cluster,
    text: str,
    *,
    url: str | None,
    service_account: str,
    token: str | None,
    code: bool,
    invert: bool,
    out: IO[str] = sys.stdout,
) -> int:
    target = parse_target(text)
    if target is None:
        raise CliError("usage: kubectl waso pair NAMESPACE/NAME", EXIT_USAGE)
    namespace, name = target
    session = asyncio.run(read_session(cluster, target))
    shard = (session.get("status") or {}).get("shard")
    if shard is None and url is None:
        raise CliError(f"{namespace}/{name} has no session pod yet (not admitted?); see kubectl waso status")
    bearer = token or os.environ.get("WASO_TOKEN") or _token(cluster, namespace, service_account)
    headers = {"Authorization": f"Bearer {bearer}", "Accept": "text/event-stream"}
    clear = "\x1b[2J\x1b[H" if out.isatty() else ""
    try:
        with _runtime_connection(cluster, namespace, int(shard or 0), url) as connection:
            if code:
                connection.request("POST", f"/v1/sessions/{name}/pair-code", headers=headers)
                answer = connection.getresponse()
                if answer.status != 200:
                    raise _fail(answer)
                paired_code = json.loads(answer.read())
                print(f"On the phone of {paired_code['phoneNumber']}: Linked devices → Link with phone number, "
                      f"enter {paired_code['code']}", file=out, flush=True)  # fmt: skip
            connection.request("GET", f"/v1/sessions/{name}/qr", headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                raise _fail(response)
            for event, data in _events(response):
                if event == "qr" and not code:
                    lines = draw(qr_matrix(str(data["code"])), invert)
                    print(clear + "\n".join(lines), file=out)
                    print(f"Scan with WhatsApp (Linked devices) before {data['expiresAt']}; it rotates.", file=out,
                          flush=True)  # fmt: skip
                elif event == "paired":
                    print(f"paired: {namespace}/{name} is linked as {data['jid']}", file=out, flush=True)
                    return 0
                elif event == "timeout":
                    raise CliError("the QR stream ended unpaired (the runtime's stream timeout); run pair again")
                elif event == "error":
                    raise CliError(f"the runtime ended the stream: {data}")
    except (OSError, http.client.HTTPException, Unreachable) as error:
        raise CliError(f"the connection to the runtime broke: {error}") from None
    raise CliError("the QR stream ended before the session was paired", EXIT_FAILED)
