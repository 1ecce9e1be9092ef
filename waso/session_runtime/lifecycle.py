"""A session's life on a runtime as a pure state machine: (view, event, now) -> (view, actions).

The supervisor feeds it the transport's events and its own commands and carries out
the actions (tell the QR stream listeners, wait before reconnecting); the status it
reports is ``runtime_status(view)``. Nothing here waits, reads a clock or does I/O, so
a unit test drives every transition, the activity rule included, on a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from waso.api.base import format_timestamp
from waso.api.jid import parse_jid
from waso.api.session import ACTIVITY_GRANULARITY, RepairReport, RuntimeState, RuntimeStatus
from waso.session_runtime.transport import (
    Connected,
    Disconnected,
    IncomingMessage,
    LoggedOut,
    MessageAck,
    OutgoingMessage,
    Paired,
    QrCode,
    StreamReplaced,
    TemporaryBan,
    TransportEvent,
)

STREAM_REPLACED_PAUSE = 60.0
"""Another client took the socket: wait at least this long before taking it back."""
UNKNOWN_BAN_PAUSE = 60.0
LAST_ERROR_LIMIT = 4096
"""status.runtime.lastError's maxLength: a longer error is cut, never refused."""


@dataclass(frozen=True)
class Connecting:
    """The supervisor opens a connection; ``stored_jid`` is what the credential store holds now."""

    stored_jid: str | None


@dataclass(frozen=True)
class Stopped:
    """The connection was closed on purpose (not wanted, lease given up or lost, shutdown)."""


@dataclass(frozen=True)
class Activity:
    """A message went out through the API."""


@dataclass(frozen=True)
class Repaired:
    """A repair request was carried out: the store backed up and reset, restored, or (error) left as it was."""

    report: RepairReport
    reset: bool
    """The store is empty now: the identity is gone and the next connection offers a QR code."""


Event = TransportEvent | Connecting | Stopped | Activity | Repaired


@dataclass(frozen=True)
class Notify:
    """Tell the session's QR stream listeners."""

    event: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Reconnect:
    """The connection ended: connect again after max(minimum, the next back-off delay)."""

    minimum: float = 0.0


Action = Notify | Reconnect


@dataclass(frozen=True)
class SessionView:
    """What a runtime knows about one session."""

    state: RuntimeState = RuntimeState.STOPPED
    jid: str | None = None
    stored_jid: str | None = None
    push_name: str | None = None
    connected_at: datetime | None = None
    last_activity: datetime | None = None
    reported_activity: datetime | None = None
    qr: QrCode | None = None
    last_error: str | None = None
    banned_until: datetime | None = None
    last_repair: RepairReport | None = None


def qr_payload(qr: QrCode) -> dict[str, Any]:
    """The data of a `qr` Server-Sent Event."""
    return {"code": qr.code, "expiresAt": format_timestamp(qr.expires_at)}


def _active(view: SessionView, now: datetime) -> SessionView:
    reported = view.reported_activity
    if reported is None or now - reported >= ACTIVITY_GRANULARITY:
        reported = now
    return replace(view, last_activity=now, reported_activity=reported)


def _ended(view: SessionView, state: RuntimeState, error: str, **changes: Any) -> SessionView:
    return replace(view, state=state, last_error=error, connected_at=None, qr=None, **changes)


def step(view: SessionView, event: Event, now: datetime) -> tuple[SessionView, list[Action]]:
    """Apply one event."""
    match event:
        case Connecting(stored_jid):
            return replace(view, state=RuntimeState.CONNECTING, stored_jid=stored_jid, qr=None), []
        case Stopped():
            return replace(view, state=RuntimeState.STOPPED, connected_at=None, qr=None), []
        case QrCode():
            return replace(view, state=RuntimeState.AWAITING_PAIRING, qr=event), [Notify("qr", qr_payload(event))]
        case Paired(jid):
            if view.stored_jid is not None:
                return view, []  # one link per pairing: a second `paired` never replaces stored credentials
            return replace(view, stored_jid=jid, qr=None), [Notify("paired", {"jid": jid})]
        case Connected(jid, push_name):
            connected = replace(
                view,
                state=RuntimeState.CONNECTED,
                jid=jid,
                push_name=push_name,
                stored_jid=view.stored_jid or jid,
                connected_at=now,
                last_error=None,
                banned_until=None,
                qr=None,
            )
            return connected, []
        case IncomingMessage() | OutgoingMessage() | Activity():
            return _active(view, now), []
        case MessageAck():
            return view, []  # a receipt is the other side's activity, not this session's
        case Repaired(report, reset):
            if not reset:  # restored or untouched: the next Connecting reads what the store holds
                return replace(view, last_repair=report), []
            return replace(view, last_repair=report, jid=None, stored_jid=None, push_name=None, qr=None), []
        case LoggedOut(reason):
            lost = _ended(view, RuntimeState.LOGGED_OUT, f"logged out: {reason}", jid=None, stored_jid=None)
            return lost, [Reconnect()]
        case StreamReplaced():
            error = "stream replaced: another client connected with these credentials"
            return _ended(view, RuntimeState.DISCONNECTED, error), [Reconnect(STREAM_REPLACED_PAUSE)]
        case TemporaryBan(until, reason):
            expiry = format_timestamp(until) if until else "an unknown time"
            banned = _ended(view, RuntimeState.BANNED, f"{reason} until {expiry}", banned_until=until)
            remaining = (until - now).total_seconds() if until else UNKNOWN_BAN_PAUSE
            return banned, [Reconnect(max(0.0, remaining))]
        case Disconnected(error):
            return _ended(view, RuntimeState.DISCONNECTED, error), [Reconnect()]
    raise TypeError(f"not a session event: {event!r}")


def runtime_status(view: SessionView) -> RuntimeStatus:
    """status.runtime as this runtime reports it."""
    connected = view.state == RuntimeState.CONNECTED
    parsed = parse_jid(view.jid) if view.jid and connected else None
    return RuntimeStatus(
        state=view.state,
        jid=view.jid if connected else None,
        device_id=parsed.device if parsed else None,
        stored_jid=view.stored_jid,
        push_name=view.push_name,
        connected_at=view.connected_at if connected else None,
        last_activity_at=view.reported_activity,
        qr_expires_at=view.qr.expires_at if view.qr else None,
        last_error=view.last_error[:LAST_ERROR_LIMIT] if view.last_error else None,
        banned_until=view.banned_until if view.state == RuntimeState.BANNED else None,
        last_repair=view.last_repair,
    )
