"""Model versions in Redis: which are registered, their code width, which one answers queries.

Every stored code is tagged with its model version (its keys carry the version), so a re-index can
build a new version beside the one that answers and switch all readers with one SET of
``ns:model:active``. A version's code width can never change once registered: slots are fixed-width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from plugin.store.keys import Keys

LEVELS = ("image", "study")

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

    def register(self, version: str, nbits: int, rerank_dim: int = 0, **extra: str | int | float) -> ModelInfo:
        """Declare a model version (idempotent); its code width and the width of its re-ranking
        vectors (``rerank_dim``, default the code width) can never change afterwards."""
        key = self.keys.model(version)
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

    def active(self) -> str | None:
        value = self.r.get(self.keys.active())
        return value.decode() if value else None

    def activate(self, version: str) -> None:
        """Make ``version`` answer queries (one SET: atomic for every reader)."""
        self.info(version)
        self.r.set(self.keys.active(), version)

    def ensure_active(self, version: str) -> bool:
        """Activate ``version`` only when no version is active yet; True when it did."""
        self.info(version)
        return bool(self.r.set(self.keys.active(), version, nx=True))

    def drop(self, version: str) -> dict[str, int]:
        """Remove a version that no longer answers: its codes, maps, logs and embeddings.

        A re-index leaves the previous version in place (a way back while the new one proves
        itself); this frees its memory once it is not needed. The active version is refused: a
        replica and every worker depend on it. Returns the live codes removed per level.
        """
        self.info(version)
        if version == self.active():
            raise StoreError(f"model {version} is the active version; activate another one first")
        counts = {level: int(self.r.hlen(self.keys.slot(version, level))) for level in LEVELS}
        k = self.keys
        doomed = [key for level in LEVELS for key in k.code_keys(version, level)] + [k.emb(version), k.model(version)]
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(k.models(), version)  # first: instance linking stops visiting its keys
        pipe.unlink(*doomed)  # freed in the background: a big string does not stall Redis
        pipe.execute()
        self._infos.pop(version, None)
        return counts


def init_log(client: redis.Redis, key: str) -> None:
    """Give a stream its first entry, so that a replica's position always names a real entry."""
    if not client.exists(key):
        client.xadd(key, {"op": "init"}, maxlen=LOG_MAXLEN, approximate=True)
