"""WhatsApp JIDs of linked devices: ``user:device@s.whatsapp.net``, parsed by waso itself."""

from __future__ import annotations

import re
from dataclasses import dataclass

_JID = re.compile(r"^(?P<user>[0-9]{5,20})(?::(?P<device>[0-9]{1,4}))?@s\.whatsapp\.net$")


@dataclass(frozen=True)
class Jid:
    user: str
    device: int

    def __str__(self) -> str:
        return f"{self.user}:{self.device}@s.whatsapp.net"


def parse_jid(text: str) -> Jid | None:
    """A linked device's JID, or None when it is not one (a bare user JID has device 0: the phone)."""
    match = _JID.match(text)
    if match is None:
        return None
    return Jid(match["user"], int(match["device"] or 0))
