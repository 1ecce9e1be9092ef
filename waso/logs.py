"""Log lines that name their tenant and session.

Every waso process logs through the root handler that ``configure`` sets up, whose format
carries ``tenant=`` and ``session=`` fields, so that ``grep tenant=acme`` finds everything
about one tenant across the operator's and the runtimes' logs. The fields come, in order, from
the record itself (``log.info(..., extra=about(namespace, name))``, for the operator's lines,
which concern many tenants), from the context (``SESSION``, set by a session's task in the
runtime: tasks copy the context, so everything a session's task logs names it), or from the
process (``configure(tenant=...)``: a session runtime serves one tenant, threads included).
kopf's per-object lines name their object's namespace and, for sessions, the session.
"""

from __future__ import annotations

import logging
from contextvars import Context, ContextVar, copy_context

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


def configure(level: int = logging.INFO, *, tenant: str | None = None) -> None:
    """The root handler of a waso process: stderr, ``FORMAT``, lines from ``level`` up."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
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
