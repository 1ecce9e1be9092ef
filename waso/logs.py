"""Log lines that name their tenant and session.

Every waso process logs through the root handler that ``configure`` sets up, whose format
carries ``tenant=`` and ``session=`` fields, so that ``grep tenant=acme`` finds everything
about one tenant across the operator's and the runtimes' logs. The fields come, in order, from
the record itself (``log.info(..., extra=about(namespace, name))``, for the operator's lines,
which concern many tenants), from the context (``SESSION``, set by a session's task in the
runtime: tasks copy the context, so everything a session's task logs names it), or from the
process (``configure(tenant=...)``: a session runtime serves one tenant, threads included).
kopf's per-object lines name their object's namespace and, for sessions, the session.

With ``json_lines`` (setting ``logFormat: json``), each line is one JSON object with the same
fields (``time``, ``level``, ``logger``, ``tenant``, ``session``, ``message``, and ``exception``
when there is one), for log pipelines that index fields. It is a dozen lines on the standard
library rather than python-json-logger: the fields are fixed, and one dependency fewer.
"""

from __future__ import annotations

import json
import logging
from contextvars import Context, ContextVar, copy_context
from datetime import UTC, datetime
from typing import Literal

FORMAT = "%(asctime)s %(levelname)s %(name)s tenant=%(tenant)s session=%(session)s %(message)s"
NONE = "-"
"""The field's value on a line that concerns no tenant (or no one session)."""

TENANT: ContextVar[str | None] = ContextVar("waso_log_tenant", default=None)
SESSION: ContextVar[str | None] = ContextVar("waso_log_session", default=None)


def about(tenant: str, session: str | None = None) -> dict[str, str]:
    """The ``extra`` of a line about one tenant (and one of its sessions)."""
    return {"tenant": tenant, "session": session or NONE}


class ContextFilter(logging.Filter):
    """Fills ``tenant`` and ``session`` of every record that passes the handler."""

    def __init__(self, tenant: str | None = None) -> None:
        super().__init__()
        self.tenant = tenant

    def filter(self, record: logging.LogRecord) -> bool:
        kopf_object = getattr(record, "k8s_ref", None)  # kopf's per-object loggers
        if isinstance(kopf_object, dict) and kopf_object.get("namespace"):
            record.tenant = getattr(record, "tenant", kopf_object["namespace"])
            if kopf_object.get("kind") == "WhatsAppSession":
                record.session = getattr(record, "session", kopf_object.get("name") or NONE)
        if not hasattr(record, "tenant"):
            record.tenant = TENANT.get() or self.tenant or NONE
        if not hasattr(record, "session"):
            record.session = SESSION.get() or NONE
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the fields of ``FORMAT``."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "tenant": getattr(record, "tenant", NONE),
            "session": getattr(record, "session", NONE),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


LogFormat = Literal["text", "json"]


def configure(level: int = logging.INFO, *, tenant: str | None = None, log_format: LogFormat = "text") -> None:
    """The root handler of a waso process: stderr, ``FORMAT`` or JSON lines, lines from ``level`` up."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT))
    handler.addFilter(ContextFilter(tenant))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def session_context(session: str) -> Context:
    """A copy of the current context in which lines name ``session``: for the tasks of one session."""
    context = copy_context()
    context.run(SESSION.set, session)
    return context
