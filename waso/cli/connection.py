"""How the CLI's commands reach the cluster, and the one line they print when they cannot.

Every command that talks to the API server takes ``--kubeconfig`` and ``--context`` (as kubectl
does; ``KUBECONFIG`` otherwise), connects through ``connect`` and lets ``CliError`` carry a
failure to ``waso.cli.main``, which prints ``waso <command>: <message>`` and exits with the
code below: never a traceback for a missing config, an unreachable cluster, a forbidden
request or a missing object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import urllib3
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from waso.kube import ApiError, KubeClient, Unreachable

EXIT_FAILED = 1
"""The command ran and found something wrong (a refused request, problems it reports)."""
EXIT_USAGE = 2
EXIT_NO_CLUSTER = 3
"""No usable kubeconfig, or the API server did not answer."""
EXIT_FORBIDDEN = 4
"""The API server refused the credentials (401) or the request (403)."""
EXIT_NOT_FOUND = 5


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Cluster:
    """Which cluster, as kubectl's flags name it."""

    kubeconfig: str | None = None
    context: str | None = None


def connect(cluster: Cluster, threads: int = 2) -> KubeClient:
    configuration = client.Configuration()
    in_pod = os.environ.get("KUBERNETES_SERVICE_HOST") and not (
        cluster.kubeconfig or cluster.context or os.environ.get("KUBECONFIG")
    )
    try:
        if in_pod:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            path = cluster.kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            if not os.path.exists(path.split(os.pathsep)[0]):
                raise CliError(f"no kubeconfig at {path}: set KUBECONFIG or pass --kubeconfig", EXIT_NO_CLUSTER)
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, context=cluster.context, client_configuration=configuration
            )
    except ConfigException as error:
        raise CliError(f"kubeconfig not usable: {_first_line(error)}", EXIT_NO_CLUSTER) from None
    # One quick attempt: a person waits for the answer, and kubectl does not retry either.
    configuration.retries = urllib3.Retry(total=1, connect=1, read=0, backoff_factor=0.2)
    return KubeClient(client.ApiClient(configuration), threads)


def explain(error: Exception, what: str = "") -> CliError:
    """A failure of the API as one line; ``what`` names the object asked for (for 404)."""
    if isinstance(error, CliError):
        return error
    if isinstance(error, ApiError):
        detail = error.message or error.reason
        if error.status == 401:
            return CliError(f"the API server does not accept these credentials: {detail}", EXIT_FORBIDDEN)
        if error.status == 403:
            return CliError(f"forbidden: {detail}", EXIT_FORBIDDEN)
        if error.status == 404:
            return CliError(f"{what or 'the object'} not found", EXIT_NOT_FOUND)
        return CliError(f"the API server answered {error.status} {error.reason}: {detail}")
    if isinstance(error, Unreachable | urllib3.exceptions.HTTPError | OSError):
        return CliError(f"cannot reach the API server: {_first_line(error)}", EXIT_NO_CLUSTER)
    raise error


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
