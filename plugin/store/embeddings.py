"""What each instance leaves per model version beside its code: its float embedding, the input of
DMIH study pooling, and the re-ranking vectors of its query variants.

Embeddings are kept so a study code can be recomputed from stored embeddings alone, without the
pixels, when a late instance arrives or the study is pooled again. float16: half the memory, and
pooling does not need more precision.

Variants (:mod:`hashing.variants`, int8 ``(V, rerank_dim)``, 3,456 bytes for v6) are what a query
whose reference is this instance, or its study, re-ranks by; they are only read for a reference, so
they stay in Redis, out of the replicas' memory. Written and deleted with the embedding: one
instance's pair is in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import redis

from plugin.store import scripts
from plugin.store.keys import Keys


class Embeddings:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._study_variants = client.register_script(scripts.STUDY_VARIANTS)

    def put(self, version: str, sop_uid: str, embedding: np.ndarray, variants: np.ndarray | None = None) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.keys.emb(version), sop_uid, np.asarray(embedding, dtype=np.float16).tobytes())
        if variants is not None and np.asarray(variants).size:
            pipe.hset(self.keys.variants(version), sop_uid, np.asarray(variants, np.int8).tobytes())
        pipe.execute()

    def get_many(self, version: str, sop_uids: Iterable[str]) -> dict[str, np.ndarray]:
        """Embeddings of the given instances that have one, as float32."""
        uids = list(sop_uids)
        if not uids:
            return {}
        raw = self.r.hmget(self.keys.emb(version), uids)
        return {u: np.frombuffer(b, dtype=np.float16).astype(np.float32) for u, b in zip(uids, raw, strict=True) if b}

    def variants_of(self, version: str, sop_uids: Iterable[str], width: int) -> np.ndarray:
        """The stored variants of those instances that have them, int8 ``(m, V, width)``."""
        uids = list(sop_uids)
        return _stacked([b for b in (self.r.hmget(self.keys.variants(version), uids) if uids else []) if b], width)

    def study_variants(self, version: str, study_uid: str, width: int, limit: int) -> np.ndarray:
        """The stored variants of the study's first ``limit`` instances in UID order (those that have
        them), int8 ``(m, V, width)``: :meth:`variants_of` of ``sorted(study_instances)[:limit]``, in
        one round trip."""
        found = self._study_variants(
            keys=[self.keys.study_instances(study_uid), self.keys.variants(version)], args=[limit]
        )
        return _stacked([b for b in found if b], width)

    def count(self, version: str) -> int:
        return int(self.r.hlen(self.keys.emb(version)))

    def variants_count(self, version: str) -> int:
        """Instances with stored query variants (3,456 bytes each for v6 and v7): 0 for a model without them."""
        return int(self.r.hlen(self.keys.variants(version)))

    def delete(self, version: str, sop_uids: Sequence[str]) -> None:
        if sop_uids:
            pipe = self.r.pipeline(transaction=False)
            pipe.hdel(self.keys.emb(version), *sop_uids)
            pipe.hdel(self.keys.variants(version), *sop_uids)
            pipe.execute()


def _stacked(raw: list[bytes], width: int) -> np.ndarray:
    """Stored variants (each ``V * width`` int8 bytes) as ``(m, V, width)``; ``(0, 0, width)`` for none."""
    if not raw:
        return np.zeros((0, 0, width), np.int8)
    return np.frombuffer(b"".join(raw), np.int8).reshape(len(raw), -1, width)
