"""One writer per kind and field manager for its part of ``status``.

The operator owns every field of a status except ``runtime``; a session runtime owns
``status.runtime``. Each writes its part with server-side apply under its own field
manager, so neither can clobber the other, and only when the desired part differs from
what the API server holds. What the server holds is the latest observed object (from a
watch) unless this writer wrote a newer revision that the watch has not delivered yet:
its own write is the truth until then. That record is what keeps a fast writer from
writing the same status twice and a slow watch from hiding a write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from waso.api.tenancy import revision
from waso.kube import ApiError, KubeClient, reference

log = logging.getLogger("waso.status")

Wire = dict[str, Any]


class Outcome(StrEnum):
    WRITTEN = "written"
    UNCHANGED = "unchanged"
    GONE = "gone"
    """The object no longer exists: nothing to write."""
    FAILED = "failed"
    """Refused or unreachable; the caller retries later."""


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    resource_version: int | None = None
    error: ApiError | None = None


@dataclass(frozen=True)
class _Write:
    part: Wire
    resource_version: int


class StatusWriter:
    """Writes ``status`` (``field=None``) or ``status.<field>`` of one kind as field manager ``manager``."""

    def __init__(
        self,
        kube: KubeClient,
        kind: str,
        manager: str,
        field: str | None = None,
        on_write: Callable[[], None] = lambda: None,
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.manager = manager
        self.field = field
        self.on_write = on_write
        self.writes = 0
        self._written: dict[tuple[str, str], _Write] = {}
        self._in_flight: set[tuple[str, str]] = set()

    def current(self, namespace: str, name: str, observed: Wire | None, observed_revision: int) -> Wire | None:
        """What the server holds of this writer's part: its own newer write, else the observed part."""
        written = self.pending(namespace, name, observed_revision)
        return written if written is not None else observed

    def pending(self, namespace: str, name: str, observed_revision: int) -> Wire | None:
        """This writer's own write that the watch has not delivered yet (newer than ``observed_revision``).

        Cheaper than ``current`` for callers that would otherwise serialize the observed part for nothing:
        most objects have no write in flight."""
        key = (namespace, name)
        written = self._written.get(key)
        if written is None:
            return None
        if observed_revision < written.resource_version:
            return written.part
        del self._written[key]
        return None

    def own(self, namespace: str, name: str, observed_revision: int) -> bool | None:
        """Whether an observed revision is this writer's last write coming back through the watch; None while a
        write of the object is in flight (its revision is not known before the API server's answer). Once it
        came back, the record of the write is dropped: the observed object holds it."""
        key = (namespace, name)
        if key in self._in_flight:
            return None
        written = self._written.get(key)
        if written is None or written.resource_version != observed_revision:
            return False
        del self._written[key]
        return True

    async def write(
        self, namespace: str, name: str, desired: Wire, observed: Wire | None, observed_revision: int
    ) -> Result:
        """Apply ``desired`` unless the server already holds it."""
        if _same(desired, self.current(namespace, name, observed, observed_revision)):
            return Result(Outcome.UNCHANGED)
        body = reference(self.kind, namespace, name)
        body["status"] = {self.field: desired} if self.field else desired
        self._in_flight.add((namespace, name))
        try:
            result = await self.kube.apply(body, self.manager, "status")
        except ApiError as error:
            self.forget(namespace, name)
            if error.status == 404:
                return Result(Outcome.GONE, error=error)
            log.warning("status of %s %s/%s not written: %s", self.kind, namespace, name, error)
            return Result(Outcome.FAILED, error=error)
        except OSError as error:  # unreachable: what the server holds is unknown
            self.forget(namespace, name)
            log.warning("status of %s %s/%s not written: %s", self.kind, namespace, name, error)
            return Result(Outcome.FAILED)
        finally:
            self._in_flight.discard((namespace, name))
        written = revision(result["metadata"].get("resourceVersion"))
        self._written[(namespace, name)] = _Write(desired, written)
        self.writes += 1
        self.on_write()
        return Result(Outcome.WRITTEN, written)

    def forget(self, namespace: str, name: str) -> None:
        self._written.pop((namespace, name), None)

    def retain(self, keys: Callable[[], set[tuple[str, str]]]) -> None:
        """Drop the records of objects that are gone (``keys``: those that exist, asked only if any is recorded)."""
        if not self._written:
            return  # the watch delivered every write (the usual case): no set of 10,000 keys built for nothing
        for key in set(self._written) - keys():
            del self._written[key]


def _same(desired: Wire, current: Wire | None) -> bool:
    """Equal once fields set to None (absent) are dropped on both sides."""

    def present(wire: Wire | None) -> Wire:
        return {k: v for k, v in (wire or {}).items() if v is not None}

    return present(desired) == present(current)
