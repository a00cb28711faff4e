"""The replicas of one level, one per route: answers never mix anatomies.

Each route (chest radiographs, breast ultrasound, the general model...) has its own answering
model version, hence its own codes, and a code of one model means nothing to another. A similar
query therefore searches only the replica of its reference's route: :meth:`RoutedIndex.locate`
finds which route holds the reference, and the search runs there. Routes appear and disappear
as models are registered and switched (``ns:routes``); :meth:`RoutedIndex.refresh` follows.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from plugin.search.replica import ReplicaIndex
from plugin.store import Store

log = logging.getLogger("drh.search.routed")


class RoutedIndex:
    """Per route, a :class:`ReplicaIndex` of ``level``; the surface of a single replica (``ready``,
    ``version``, ``search``...) is the default route's (the only one, else the general one), for
    callers that know one model only (benchmarks, the bulk tools)."""

    def __init__(self, store: Store, level: str) -> None:
        self.store = store
        self.level = level
        self._by_route: dict[str, ReplicaIndex] = {}
        self._order: list[str] = []  # matching order of the routes (most specific first)
        self._answering: dict[str, str] | None = None  # route -> version when _names was read
        self._names: list[str] = []
        self._lock = threading.Lock()

    # -- following the store -------------------------------------------------------------------
    def refresh(self, wait: float | None = None) -> None:
        """Follow the routes (new ones get a replica, dropped ones lose it), then refresh each
        (``wait``: see :meth:`ReplicaIndex.refresh`)."""
        answering = self.store.models.active_routes()
        if answering != self._answering:  # the matching order only changes with the routes' versions
            self._names = [route.name for route, _ in self.store.models.table()]
            self._answering = answering
        names = self._names
        with self._lock:
            for name in names:
                if name not in self._by_route:
                    self._by_route[name] = ReplicaIndex(self.store, self.level, route=name)
            for name in [n for n in self._by_route if n not in names]:
                log.info("route %s no longer answers: its %s replica is dropped", name, self.level)
                self._by_route.pop(name).close()
            self._order = names
            indexes = [self._by_route[n] for n in names]
        for index in indexes:
            index.refresh(wait)

    def close(self) -> None:
        with self._lock:
            for index in self._by_route.values():
                index.close()
            self._by_route.clear()

    # -- per route -------------------------------------------------------------------------------
    def routes(self) -> list[tuple[str, ReplicaIndex]]:
        """(route name, replica) in matching order."""
        with self._lock:
            return [(n, self._by_route[n]) for n in self._order if n in self._by_route]

    def for_route(self, name: str) -> ReplicaIndex | None:
        with self._lock:
            return self._by_route.get(name)

    def locate(self, uid: str) -> tuple[str, ReplicaIndex, tuple[bytes, np.ndarray]] | None:
        """(route, replica, (code, re-ranking vector)) of the route whose replica holds ``uid``.

        A study whose images went to several routes has a study code in each: the most specific
        route answers for it (the matching order), as it would for a new image of that study."""
        for name, index in self.routes():
            found = index.lookup(uid)
            if found is not None:
                return name, index, found
        return None

    def default(self) -> ReplicaIndex | None:
        """The replica of the store's default route (:meth:`ModelRegistry.default_route`: the only
        route, else the general one, else the first)."""
        routes = self.routes()
        if not routes:
            return None
        if len(routes) == 1:
            return routes[0][1]
        return self.for_route(self.store.models.default_route() or "") or routes[0][1]

    # -- the surface of one replica (the default route's) ----------------------------------------
    @property
    def ready(self) -> bool:
        return any(index.ready for _, index in self.routes())

    @property
    def version(self) -> str | None:
        index = self.default()
        return index.version if index is not None else None

    @property
    def nbits(self) -> int | None:
        index = self.default()
        return index.nbits if index is not None else None

    def __len__(self) -> int:
        return sum(len(index) for _, index in self.routes())

    def memory_bytes(self) -> int:
        return sum(index.memory_bytes() for _, index in self.routes())

    def lookup(self, uid: str) -> tuple[bytes, np.ndarray] | None:
        found = self.locate(uid)
        return None if found is None else found[2]

    def code_of(self, uid: str) -> bytes | None:
        found = self.lookup(uid)
        return None if found is None else found[0]

    def search(self, *args: Any, **kwargs: Any) -> Any:
        index = self.default()
        if index is None:
            from plugin.search.replica import IndexNotReady

            raise IndexNotReady(f"the {self.level} index is not loaded (no model answers yet)")
        return index.search(*args, **kwargs)
