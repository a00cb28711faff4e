"""Float instance embeddings per model version: the input of DMIH study pooling.

Kept so a study code can be recomputed from stored embeddings alone, without the pixels, when a
late instance arrives or the study is pooled again. float16: half the memory, and pooling does
not need more precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import redis

from plugin.store.keys import Keys


class Embeddings:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys

    def put(self, version: str, sop_uid: str, embedding: np.ndarray) -> None:
        self.r.hset(self.keys.emb(version), sop_uid, np.asarray(embedding, dtype=np.float16).tobytes())

    def get_many(self, version: str, sop_uids: Iterable[str]) -> dict[str, np.ndarray]:
        """Embeddings of the given instances that have one, as float32."""
        uids = list(sop_uids)
        if not uids:
            return {}
        raw = self.r.hmget(self.keys.emb(version), uids)
        return {u: np.frombuffer(b, dtype=np.float16).astype(np.float32) for u, b in zip(uids, raw, strict=True) if b}

    def count(self, version: str) -> int:
        return int(self.r.hlen(self.keys.emb(version)))

    def delete(self, version: str, sop_uids: Sequence[str]) -> None:
        if sop_uids:
            self.r.hdel(self.keys.emb(version), *sop_uids)
