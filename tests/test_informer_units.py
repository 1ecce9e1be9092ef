"""The informer's index: listings in pages, watch events, scope and wake-ups, without an API server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from waso.informer import Informer
from waso.kube import KubeClient


def _obj(namespace: str, uid: str, value: int) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "uid": uid, "name": uid}, "value": value}


def _value(obj: Mapping[str, Any]) -> int | None:
    value = obj["value"]
    return None if value < 0 else int(value)


def _informer(changes: list[int], **options: Any) -> Informer[int]:
    kube = cast(KubeClient, None)  # run() is not called: the API is never reached
    return Informer(kube, "Thing", _value, lambda: changes.append(1), **options)


def _seen(informer: Informer[int]) -> dict[str, list[int]]:
    return {namespace: sorted(values) for namespace, values in informer.view.items()}


def test_a_listing_replaces_the_index_only_when_its_last_page_is_in() -> None:
    changes: list[int] = []
    informer = _informer(changes)
    informer._page([_obj("a", "1", 1)], True, False)
    informer._page([_obj("b", "2", 2)], False, False)
    assert _seen(informer) == {}  # half a cluster is never shown
    assert not informer.synced.is_set()
    informer._page([], False, True)
    assert _seen(informer) == {"a": [1], "b": [2]}
    assert informer.synced.is_set()
    assert changes == [1]
    # A listing again (after a watch failed): what is not in it any more is gone.
    informer._page([_obj("b", "2", 3)], True, False)
    informer._page([], False, True)
    assert _seen(informer) == {"b": [3]}
    assert len(informer) == 1


def test_watch_events_update_delete_and_drop_what_stops_being_indexed() -> None:
    changes: list[int] = []
    informer = _informer(changes)
    informer._page([], True, True)
    informer._event("ADDED", _obj("a", "1", 1))
    informer._event("ADDED", _obj("a", "2", 2))
    informer._event("MODIFIED", _obj("a", "1", 5))
    assert _seen(informer) == {"a": [2, 5]}
    assert len(changes) == 4  # the listing and three changes
    informer._event("MODIFIED", _obj("a", "1", 5))  # the object changed, its facts did not: nothing to decide
    assert len(changes) == 4
    informer._event("MODIFIED", _obj("a", "2", -1))  # its facts say: not one of ours any more
    informer._event("DELETED", _obj("a", "1", 5))
    assert _seen(informer) == {}
    assert "a" not in informer.view
    assert len(changes) == 6


def test_namespaces_out_of_scope_are_not_indexed_and_only_waking_facts_wake() -> None:
    changes: list[int] = []
    informer = _informer(changes, in_scope=lambda namespace: namespace.startswith("t-"), wakes=lambda v: v > 10)
    informer._page([_obj("t-a", "1", 1), _obj("other", "2", 2)], True, True)
    assert _seen(informer) == {"t-a": [1]}
    changes.clear()
    informer._event("ADDED", _obj("other", "3", 50))
    informer._event("MODIFIED", _obj("t-a", "1", 2))
    assert changes == []
    informer._event("MODIFIED", _obj("t-a", "1", 20))
    informer._event("MODIFIED", _obj("t-a", "1", 5))  # out of the waking state (a pressure that ended)
    informer._event("DELETED", _obj("t-a", "1", 5))
    assert changes == [1, 1]
    assert _seen(informer) == {}


def test_the_consumers_own_write_coming_back_wakes_nothing() -> None:
    changes: list[int] = []
    own = {7}  # the values the consumer wrote itself
    informer = _informer(changes, handled=lambda _before, after: after in own)
    informer._page([_obj("a", "1", 1)], True, True)
    changes.clear()
    informer._event("MODIFIED", _obj("a", "1", 7))
    assert changes == []
    assert _seen(informer) == {"a": [7]}  # indexed all the same
    informer._event("MODIFIED", _obj("a", "1", 8))  # anyone else's change wakes
    informer._event("DELETED", _obj("a", "1", 8))
    assert changes == [1, 1]
