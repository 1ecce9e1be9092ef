"""Device health, judged from what the runtime reports, never from a magic number alone.

Real WhatsApp hands out device numbers far above 10 (public reports show :32 and :53),
so a high device number is normal. The checks: a connected session must have an
identity; the JID must parse as ``user:device@s.whatsapp.net`` with device >= 1; the
live JID must equal the stored one. ``max_device_id`` is an opt-in policy (the old
gateway refused anything above 10).
"""

from __future__ import annotations

from dataclasses import dataclass

from waso.api.conditions import Reason
from waso.api.jid import parse_jid
from waso.api.session import RuntimeState, RuntimeStatus


@dataclass(frozen=True)
class Health:
    healthy: bool | None
    """None: nothing to judge yet."""
    reason: Reason
    message: str


def device_health(runtime: RuntimeStatus | None, max_device_id: int | None = None) -> Health:
    if runtime is None or runtime.state is None:
        return Health(None, Reason.NO_RUNTIME_REPORT, "no session runtime has reported yet")
    if runtime.jid is None:
        if runtime.state == RuntimeState.CONNECTED:
            return Health(False, Reason.MISSING_IDENTITY, "connected but the runtime reports no JID")
        return Health(None, Reason.NOT_PAIRED, "no live identity to check")
    jid = parse_jid(runtime.jid)
    if jid is None or jid.device < 1:
        return Health(
            False, Reason.MALFORMED_JID, f"JID {runtime.jid!r} is not user:device@s.whatsapp.net with device >= 1"
        )
    if runtime.stored_jid is not None and runtime.stored_jid != runtime.jid:
        return Health(
            False,
            Reason.IDENTITY_MISMATCH,
            f"live JID {runtime.jid} differs from the stored JID {runtime.stored_jid}",
        )
    if max_device_id is not None and jid.device > max_device_id:
        return Health(
            False,
            Reason.DEVICE_ID_ABOVE_POLICY,
            f"device number {jid.device} is above the configured maxDeviceId {max_device_id}",
        )
    return Health(True, Reason.HEALTHY, f"device {jid.device} of {jid.user} is consistent")
