"""Model versions in Redis: which are registered, their code width, which ones answer queries.

Every stored code is tagged with its model version (its keys carry the version), so a re-index can
build a new version beside the one that answers and switch all readers with one HSET of
``ns:routes``. A version's code width can never change once registered: slots are fixed-width.

Each version serves one route (:class:`hashing.route.Route`: modalities, body parts, photometric
interpretations, or *general*), recorded with it; one version per route answers at a time, and
several routes answer at once (chest radiographs, breast ultrasound, the general model...). The
store keeps routes as data (``hashing.route`` is plain Python, no model is loaded here).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from hashing.route import LEGACY, Route, first_match, in_matching_order, taking
from plugin.store.keys import Keys

LEVELS = ("image", "series", "study")

# Change-log streams are trimmed (approximately) to this many entries; a replica further behind reloads.
LOG_MAXLEN = 1_000_000


class StoreError(RuntimeError):
    """The store refuses an operation (unknown model version, wrong code width...)."""


@dataclass(frozen=True)
class ModelInfo:
    version: str
    nbits: int
    state: str
    path: str = ""
    rerank_dim: int = 0  # values per re-ranking vector (0: the code width, as versions before it was recorded)
    route: Route = LEGACY

    def __post_init__(self) -> None:
        if not self.rerank_dim:
            object.__setattr__(self, "rerank_dim", self.nbits)

    @property
    def nbytes(self) -> int:
        return self.nbits // 8


class ModelRegistry:
    """Registered versions and the active one. Cheap to share: it caches only code widths."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._infos: dict[str, ModelInfo] = {}

    def register(
        self, version: str, nbits: int, rerank_dim: int = 0, route: Route | None = None, **extra: str | int | float
    ) -> ModelInfo:
        """Declare a model version (idempotent); its code width and the width of its re-ranking
        vectors (``rerank_dim``, default the code width) can never change afterwards. ``route`` (what
        it serves) is recorded the first time, or replaced when given again (a registration may
        narrow what a checkpoint declares); a version registered without one is general."""
        key = self.keys.model(version)
        if route is not None:
            self.r.hset(key, mapping={"route": route.name, "route_spec": json.dumps(route.as_dict())})
        self.r.hsetnx(key, "nbits", nbits)
        self.r.hsetnx(key, "rerank_dim", rerank_dim or nbits)
        self.r.hsetnx(key, "created", time.time())
        self.r.hsetnx(key, "state", "building")
        if extra:
            self.r.hset(key, mapping={k: str(v) for k, v in extra.items()})
        self.r.sadd(self.keys.models(), version)
        for level in LEVELS:
            init_log(self.r, self.keys.log(version, level))
        init_log(self.r, self.keys.attrlog())
        info = self.info(version)
        if info.nbits != nbits:
            raise StoreError(f"model {version} is registered with {info.nbits} bits, not {nbits}")
        if info.rerank_dim != (rerank_dim or nbits):
            raise StoreError(
                f"model {version} is registered with {info.rerank_dim}-value re-ranking vectors, not {rerank_dim}"
            )
        return info

    def info(self, version: str) -> ModelInfo:
        data = self.r.hgetall(self.keys.model(version))
        if not data:
            raise StoreError(f"unknown model version {version!r}")
        return ModelInfo(
            version,
            int(data[b"nbits"]),
            data.get(b"state", b"building").decode(),
            data.get(b"path", b"").decode(),
            int(data.get(b"rerank_dim", 0)),
            _route(data.get(b"route_spec")),
        )

    def details(self, version: str) -> dict[str, str]:
        """Everything recorded with a version (nbits, created, state, path, emb_dim...); {} if unknown."""
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.keys.model(version)).items()}

    def nbytes(self, version: str) -> int:
        """Code width of a version; cached, since it can never change once registered."""
        info = self._infos.get(version)
        if info is None:
            info = self.info(version)
            self._infos[version] = info
        return info.nbytes

    def rerank_dim(self, version: str) -> int:
        """Width of a version's re-ranking vectors (cached like :meth:`nbytes`)."""
        self.nbytes(version)
        return self._infos[version].rerank_dim

    def versions(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self.keys.models()))

    def set_state(self, version: str, state: str) -> None:
        self.r.hset(self.keys.model(version), "state", state)

    def route_of(self, version: str) -> Route:
        """The route a version serves (general when it was registered without one)."""
        return _route(self.r.hget(self.keys.model(version), "route_spec"))

    def active_routes(self) -> dict[str, str]:
        """Route name -> the version answering for it. An installation from before routes had one
        answering version (``ns:model:active``): it is moved, once, to the route it records."""
        data = self.r.hgetall(self.keys.routes())
        if not data:
            legacy = self.r.get(self.keys.active())
            if legacy is None:
                return {}
            version = legacy.decode()
            self.r.hsetnx(self.keys.routes(), self.route_of(version).name, version)
            self.r.delete(self.keys.active())
            data = self.r.hgetall(self.keys.routes())
        return {k.decode(): v.decode() for k, v in data.items()}

    def table(self) -> list[tuple[Route, str]]:
        """(route, answering version) in matching order: the most specific route first, ties by
        name, general routes last (:func:`hashing.route.first_match` takes the first that fits)."""
        version_of = {}
        for version in self.active_routes().values():
            version_of[self.route_of(version)] = version
        return [(route, version_of[route]) for route in in_matching_order(list(version_of))]

    def matching(self, unrouted: str = "general", replacing: Route | None = None) -> list[Route]:
        """The routes that take images, in matching order: the answering ones (with ``replacing`` in
        place of the route of its name: what a re-index will answer with), general routes left out
        when ``unrouted`` is ``none`` (:attr:`plugin.core.settings.Settings.unrouted`)."""
        return taking([r for r, _ in self.table()], unrouted, replacing)

    def route_held(self, record: dict[str, str]) -> str:
        """The route an instance is in now, from its record ("" when none: stored without a model):
        the route recorded with it, or, for a record from before routes, the route of the version
        that indexed it."""
        if record.get("state") == "no-model":
            return ""
        if record.get("route"):
            return record["route"]
        version = record.get("indexed_version") or ""
        return self.route_of(version).name if version else ""

    def route_for(self, modality: str, body_part: str, photometric: str = "") -> tuple[Route, str] | None:
        """The answering (route, version) an image with this header belongs to, None when none takes it."""
        table = self.table()
        route = first_match([r for r, _ in table], modality, body_part, photometric)
        return next(((r, v) for r, v in table if r == route), None) if route else None

    def default_route(self) -> str | None:
        """The only route, else the general route, else the first in matching order: what a
        single-model installation, its benchmarks and tests mean by "the" model's route."""
        return self._default_of(self.active_routes())

    def _default_of(self, routes: dict[str, str]) -> str | None:
        if len(routes) <= 1:
            return next(iter(routes), None)
        table = self.table()
        return next((r.name for r, _ in table if r.general), table[0][0].name)

    def active(self, route: str | None = None) -> str | None:
        """The version answering for ``route``; without one, for :meth:`default_route`."""
        routes = self.active_routes()
        name = route if route is not None else self._default_of(routes)
        return routes.get(name) if name is not None else None

    def activate(self, version: str) -> None:
        """Make ``version`` answer for its route (one HSET: atomic for every reader)."""
        self.info(version)
        self.active_routes()  # an installation from before routes is moved first
        self.r.hset(self.keys.routes(), self.route_of(version).name, version)

    def ensure_active(self, version: str) -> bool:
        """Activate ``version`` only when its route has no answering version yet; True when it did."""
        self.info(version)
        self.active_routes()
        return bool(self.r.hsetnx(self.keys.routes(), self.route_of(version).name, version))

    def seed(self, paths: list[str], load: Callable[[str], Any]) -> list[str]:
        """Make an empty installation answer with the models at ``paths`` (``load(path)`` gives an
        encoder: version, nbits, rerank_dim, emb_dim, route, supersedes), each for the route its checkpoint
        declares, the first of a route winning; returns the versions that now answer.

        Once an installation has routes, settings no longer change them (``drh-pacs register`` and
        ``reindex`` do), except to move an installation from before routes: its one version learns
        its route from its checkpoint, and the routes that frees are seeded. Called by every worker
        process and by ``register``/``reindex`` (so that registering a first route does not leave
        the shipped ones out).
        """
        answering = self.active_routes()  # (moves a single pre-route version under "general")
        if answering:
            if all(self.details(v).get("route_spec") for v in answering.values()):
                return []  # every answering version says what it serves: nothing to load or seed
            for path in paths:
                enc = load(path)
                # A version from before routes learns what it serves from its checkpoint, or from
                # the checkpoint of the model that succeeds it (the shipped default names the
                # defaults it replaced: an installation upgraded across two releases runs one of those).
                for version in (enc.version, *enc.supersedes):
                    known = self.details(version)
                    if known and not known.get("route_spec"):
                        info = self.info(version)
                        self.register(version, info.nbits, rerank_dim=info.rerank_dim, route=enc.route)
            if not self.tidy_routes():
                return []
        seeded = []
        for path in paths:
            enc = load(path)
            if self.active(enc.route.name) is not None and not self.is_active(enc.version):
                continue  # its route already answers (an earlier model in the list took it)
            self.register(
                enc.version, enc.nbits, rerank_dim=enc.rerank_dim, route=enc.route, path=path, emb_dim=enc.emb_dim
            )
            if self.ensure_active(enc.version):
                self.set_state(enc.version, "complete")  # a first version is built as images arrive
                seeded.append(enc.version)
        return seeded

    def tidy_routes(self) -> list[str]:
        """Move route entries whose version now records another route to that route, unless it
        already answers (an installation from before routes moved its one version under "general";
        its checkpoint, or its successor's, says what it serves). Returns the route names freed."""
        stale = {name: version for name, version in self.active_routes().items() if self.route_of(version).name != name}
        if stale:
            self.r.hdel(self.keys.routes(), *stale)
            for version in stale.values():
                self.r.hsetnx(self.keys.routes(), self.route_of(version).name, version)
        return list(stale)

    def is_active(self, version: str) -> bool:
        return version in self.active_routes().values()

    def drop(self, version: str) -> dict[str, int]:
        """Remove a version that no longer answers: its codes, maps, logs and embeddings.

        A re-index leaves the previous version in place (a way back while the new one proves
        itself); this frees its memory once it is not needed. The active version is refused: a
        replica and every worker depend on it. Returns the live codes removed per level.
        """
        self.info(version)
        if self.is_active(version):
            raise StoreError(
                f"model {version} is the active version of route {self.route_of(version).name};"
                " activate another one first"
            )
        counts = {level: int(self.r.hlen(self.keys.slot(version, level))) for level in LEVELS}
        k = self.keys
        doomed = [key for level in LEVELS for key in k.code_keys(version, level)]
        doomed += [k.emb(version), k.variants(version), k.model(version)]
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(k.models(), version)  # first: instance linking stops visiting its keys
        pipe.unlink(*doomed)  # freed in the background: a big string does not stall Redis
        pipe.execute()
        self._infos.pop(version, None)
        return counts


def _route(spec: bytes | str | None) -> Route:
    return Route.from_dict(json.loads(spec)) if spec else LEGACY


def init_log(client: redis.Redis, key: str) -> None:
    """Give a stream its first entry, so that a replica's position always names a real entry."""
    if not client.exists(key):
        client.xadd(key, {"op": "init"}, maxlen=LOG_MAXLEN, approximate=True)
