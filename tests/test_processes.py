"""The front process's heap after start-up: frozen out of full collections, later garbage still collected."""

from __future__ import annotations

import gc
import weakref

from plugin.core.processes import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # only the cyclic collector can free these
    return weakref.ref(a)


def test_startup_objects_are_frozen_and_later_cycles_still_collected():
    assert gc.isenabled()
    kept = [_Node() for _ in range(1000)]  # start-up objects: alive for good
    try:
        frozen = freeze_startup_heap()
        assert frozen >= 1000 and gc.get_freeze_count() == frozen
        assert all(gc.is_tracked(n) for n in kept)
        # a full collection no longer walks them...
        assert not any(n is kept[0] for n in gc.get_objects(generation=2))
        # ...and garbage made afterwards is still found and freed
        dead = _cycle()
        assert dead() is not None
        gc.collect()
        assert dead() is None
    finally:
        gc.unfreeze()
