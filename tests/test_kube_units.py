"""API access when the API server does not answer: an OSError the I/O loops handle, never a crash."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes import client

from tests.support import free_port
from waso.kube import KubeClient, Unreachable
from waso.status_writer import Outcome, StatusWriter


def unreachable() -> KubeClient:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    configuration.retries = False
    return KubeClient(client.ApiClient(configuration), threads=1)


def test_an_unreachable_api_server_raises_an_oserror() -> None:
    kube = unreachable()
    try:
        with pytest.raises(Unreachable) as raised:
            asyncio.run(kube.get("Namespace", None, "acme"))
        assert isinstance(raised.value, OSError)

        async def first_event() -> None:
            async for _ in kube.watch("WhatsAppSession", "acme", "1"):
                pass

        with pytest.raises(Unreachable):
            asyncio.run(first_event())
    finally:
        kube.close()


def test_a_status_write_to_an_unreachable_api_server_fails_softly_and_is_not_recorded() -> None:
    kube = unreachable()
    writer = StatusWriter(kube, "WhatsAppSession", "waso-runtime", "runtime")
    try:
        result = asyncio.run(writer.write("acme", "s1", {"state": "Connected"}, None, 0))
        assert result.outcome == Outcome.FAILED
        assert writer.writes == 0
        assert writer.current("acme", "s1", None, 0) is None  # nothing believed written
    finally:
        kube.close()
