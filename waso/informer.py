"""An in-memory index of one kind's objects, kept current by a watch: the operator's view of the cluster.

Each object is reduced to its facts (a small frozen record) as it arrives, and the facts are
kept by namespace and uid; a listing is read in pages and replaces the index at once when it
is complete, so a consumer never sees half a cluster. ``synced`` is set after the first
complete listing. kopf's indexes did this before; its pre-population of them wakes every
waiting object each time one more is indexed, which made starting with thousands of sessions
quadratic (1,000 sessions: 6.6 s to index; see docs/operator.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from waso.kube import Items, KubeClient, follow

T = TypeVar("T")
log = logging.getLogger("waso.informer")


class Informer(Generic[T]):
    """The facts of every ``kind`` object in scope, by namespace; ``on_change`` after each change that ``wakes``."""

    def __init__(
        self,
        kube: KubeClient,
        kind: str,
        facts: Callable[[Mapping[str, Any]], T | None],
        on_change: Callable[[], None],
        *,
        in_scope: Callable[[str], bool] = lambda _: True,
        label_selector: str | None = None,
        wakes: Callable[[T], bool] = lambda _: True,
        handled: Callable[[T | None, T | None], bool] = lambda _before, _after: False,
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.facts = facts
        self.on_change = on_change
        self.in_scope = in_scope
        self.label_selector = label_selector
        self.wakes = wakes
        self.handled = handled
        """Whether the consumer took a change in itself (facts before, after; None: absent), so that it calls for
        no ``on_change``: its own write coming back, which it knows already, or a new object it decides alone."""
        self.synced = asyncio.Event()
        self._index: dict[str, dict[str, T]] = {}
        self._listing: dict[str, dict[str, T]] = {}
        self.view: Mapping[str, Iterable[T]] = _ByNamespace(self)
        """By namespace, the facts of its objects: always the current index (the same object throughout)."""

    async def run(self) -> None:
        await follow(self.kube, self.kind, None, self._page, self._event, label_selector=self.label_selector)

    def __len__(self) -> int:
        return sum(len(objects) for objects in self._index.values())

    def _page(self, items: Items, first: bool, last: bool) -> None:
        if first:
            self._listing = {}
        for item in items:
            self._put(self._listing, item)
        if last:
            self._index, self._listing = self._listing, {}
            if not self.synced.is_set():
                log.debug("%s: %d listed", self.kind, len(self))
                self.synced.set()
            self.on_change()

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        namespace, uid = _identity(obj)
        before = self._index.get(namespace, {}).get(uid)
        if kind == "DELETED":
            _drop(self._index, namespace, uid)
        current = None if kind == "DELETED" else self._put(self._index, obj)
        # Only a change of the facts, into or out of a state that wakes: a pod's status written by the scheduler
        # again and again, or a Lease renewed, changes nothing a pass would decide.
        if current == before or not any(facts is not None and self.wakes(facts) for facts in (current, before)):
            return
        if not self.handled(before, current):
            self.on_change()

    def _put(self, index: dict[str, dict[str, T]], obj: Mapping[str, Any]) -> T | None:
        namespace, uid = _identity(obj)
        if not self.in_scope(namespace):
            return None
        current = self.facts(obj)
        if current is None:  # not one this index keeps (any more)
            _drop(index, namespace, uid)
            return None
        index.setdefault(namespace, {})[uid] = current
        return current


def _drop(index: dict[str, dict[str, T]], namespace: str, uid: str) -> None:
    """Forget an object, and its namespace once it holds no other."""
    objects = index.get(namespace)
    if objects is not None and objects.pop(uid, None) is not None and not objects:
        del index[namespace]


def _identity(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["uid"]


class _ByNamespace(Mapping[str, Iterable[T]]):
    def __init__(self, informer: Informer[T]) -> None:
        self._informer = informer

    def __getitem__(self, namespace: str) -> Iterable[T]:
        return self._informer._index[namespace].values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._informer._index)

    def __len__(self) -> int:
        return len(self._informer._index)
