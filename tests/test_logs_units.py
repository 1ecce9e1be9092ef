"""Log lines name their tenant and session (waso.logs): from the record, the task's context or the process."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from waso import logs


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """The root handler that ``logs.configure`` installs, writing to a buffer; the old handlers are put back."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    logs.configure(tenant="acme")
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_a_line_of_the_process_names_its_tenant(lines: io.StringIO) -> None:
    logging.getLogger("waso.runtime").info("session watch failed: %s", "boom")
    from_thread = threading.Thread(target=lambda: logging.getLogger("waso.runtime").warning("from a thread"))
    from_thread.start()
    from_thread.join()
    first, second = lines.getvalue().splitlines()
    assert first.endswith(" INFO waso.runtime tenant=acme session=- session watch failed: boom")
    assert second.endswith(" WARNING waso.runtime tenant=acme session=- from a thread")


def test_a_sessions_task_names_the_session_and_nothing_else_does(lines: io.StringIO) -> None:
    log = logging.getLogger("waso.runtime")

    async def session_work() -> None:
        log.info("reconnecting")
        await asyncio.create_task(asyncio.to_thread(log.info, "in its thread"))  # to_thread copies the context

    async def main() -> None:
        await asyncio.create_task(session_work(), context=logs.session_context("s1"))
        log.info("after")

    asyncio.run(main())
    assert [line.split(" ", 4)[4] for line in lines.getvalue().splitlines()] == [
        "tenant=acme session=s1 reconnecting",
        "tenant=acme session=s1 in its thread",
        "tenant=acme session=- after",
    ]


def test_a_line_about_another_tenant_names_that_one(lines: io.StringIO) -> None:
    log = logging.getLogger("waso.operator")
    log.info("repair started (%s)", "IdentityMismatch", extra=logs.about("globex", "s7"))
    log.info("%d session pod(s)", 2, extra=logs.about("initech"))
    # kopf's per-object loggers carry the object's reference
    ref = {"apiVersion": "waso.dev/v1alpha1", "kind": "WhatsAppSession", "namespace": "hooli", "name": "s2"}
    log.info("Handler succeeded.", extra={"k8s_ref": ref})
    quota = {**ref, "kind": "TenantQuota", "name": "quota"}
    log.info("Handler succeeded.", extra={"k8s_ref": quota})
    assert [line.split(" ", 4)[4] for line in lines.getvalue().splitlines()] == [
        "tenant=globex session=s7 repair started (IdentityMismatch)",
        "tenant=initech session=- 2 session pod(s)",
        "tenant=hooli session=s2 Handler succeeded.",
        "tenant=hooli session=- Handler succeeded.",
    ]


def test_json_lines_carry_the_same_fields_and_the_exception() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    buffer = io.StringIO()
    try:
        logs.configure(tenant="acme", log_format="json")
        root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]

        async def in_a_session() -> None:
            try:
                raise ValueError("boom")
            except ValueError:
                logging.getLogger("waso.runtime").exception("repair %s failed", "r1")

        async def main() -> None:
            await asyncio.create_task(in_a_session(), context=logs.session_context("s1"))

        asyncio.run(main())
        logging.getLogger("waso.operator").info("admitted", extra=logs.about("globex", "s9"))
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    first, second = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "tenant", "session", "message")} == {
        "level": "ERROR",
        "logger": "waso.runtime",
        "tenant": "acme",
        "session": "s1",
        "message": "repair r1 failed",
    }
    assert first["exception"].endswith("ValueError: boom")
    assert first["time"].endswith("Z")
    assert (second["tenant"], second["session"], second["message"]) == ("globex", "s9", "admitted")
    assert "exception" not in second
