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


class _Applies:
    """A KubeClient whose server-side applies succeed at the next resourceVersion."""

    def __init__(self) -> None:
        self.revision = 10

    async def apply(self, body: dict[str, object], manager: str, subresource: str | None = None) -> dict[str, object]:
        self.revision += 1
        return {"metadata": {"resourceVersion": str(self.revision)}}


def test_a_write_is_pending_until_the_watch_delivers_its_revision() -> None:
    writer = StatusWriter(_Applies(), "WhatsAppSession", "waso-operator")  # type: ignore[arg-type]
    assert writer.pending("acme", "s1", 10) is None  # nothing written: nothing to serialize for
    asyncio.run(writer.write("acme", "s1", {"phase": "Waiting"}, {"phase": "Pending"}, 10))
    assert writer.pending("acme", "s1", 10) == {"phase": "Waiting"}  # the watch still shows revision 10
    assert writer.current("acme", "s1", {"phase": "Pending"}, 10) == {"phase": "Waiting"}
    assert writer.pending("acme", "s1", 11) is None  # delivered: the record is dropped
    assert writer.current("acme", "s1", {"phase": "Waiting"}, 11) == {"phase": "Waiting"}
    assert writer.pending("acme", "s1", 10) is None  # and stays dropped


class _HeldApplies(_Applies):
    """Applies that wait until released: a write in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def apply(self, body: dict[str, object], manager: str, subresource: str | None = None) -> dict[str, object]:
        await self.release.wait()
        return await super().apply(body, manager, subresource)


def test_a_writer_tells_its_own_write_coming_back_from_anyone_elses_change() -> None:
    async def scenario() -> None:
        kube = _HeldApplies()
        writer = StatusWriter(kube, "WhatsAppSession", "waso-operator")  # type: ignore[arg-type]
        assert writer.own("acme", "s1", 10) is False  # never written by it
        write = asyncio.create_task(writer.write("acme", "s1", {"phase": "Waiting"}, {"phase": "Pending"}, 10))
        for _ in range(100):  # the task starts at the loop's next turn and waits in apply()
            if writer.own("acme", "s1", 11) is None:
                break
            await asyncio.sleep(0)
        assert writer.own("acme", "s1", 11) is None  # in flight: not known yet
        kube.release.set()  # the revision is known once the API server answered
        assert (await write).resource_version == 11
        assert writer.pending("acme", "s1", 10) == {"phase": "Waiting"}
        assert writer.own("acme", "s1", 12) is False  # a later change by someone else
        assert writer.own("acme", "s1", 11) is True
        assert writer.pending("acme", "s1", 10) is None  # came back: the observed object holds it now

    asyncio.run(scenario())
