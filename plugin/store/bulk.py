"""Bulk writes of study codes into a fresh namespace: what the benchmarks fill a million studies with.

What n ``codes.upsert`` and ``records.put_study`` calls would leave, minus the change-log entries (a
replica's first load is a full snapshot anyway), in a few hundred round trips instead of millions.
Only for an empty namespace with no other writer: it does not merge, lock or log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from plugin.store import Store
from plugin.store.attributes import ATTR_DTYPE


def load_studies(
    store: Store,
    version: str,
    codes: np.ndarray,
    uids: Sequence[str],
    attrs: np.ndarray,
    vocabularies: Mapping[str, Sequence[str]],
    record: Callable[[int], Mapping[str, str]] | None = None,
    rerank: np.ndarray | None = None,
    step: int = 20_000,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Study ``i`` gets slot ``i``, study number ``i + 1``, code ``codes[i]`` and filter record
    ``attrs[i + 1]`` (``attrs`` is :data:`ATTR_DTYPE`, row 0 unused); ``record(i)``, when given, is its
    study hash; ``rerank`` (int8 ``(n, rerank_dim)``) their re-ranking vectors. ``vocabularies`` lists the
    terms of each filter vocabulary in number order."""
    n, nbytes = codes.shape
    if attrs.dtype != ATTR_DTYPE or len(attrs) != n + 1 or len(uids) != n:
        raise ValueError("codes, uids and attrs (n + 1 records) must describe the same studies")
    store.models.register(version, nbytes * 8, rerank_dim=0 if rerank is None else int(rerank.shape[1]))
    store.models.activate(version)
    store.models.set_state(version, "complete")
    k, r = store.keys, store.client
    r.set(k.codes(version, "study"), np.ascontiguousarray(codes, np.uint8).tobytes())
    r.set(k.next(version, "study"), n)
    r.set(k.slotsn(version, "study"), np.arange(1, n + 1, dtype="<u4").tobytes())
    r.set(k.snext(), n)
    r.set(k.sattr(), attrs.tobytes())
    if rerank is not None:
        r.set(k.rerank(version, "study"), np.ascontiguousarray(rerank, np.int8).tobytes())
    for field, terms in vocabularies.items():
        r.hset(k.vocab(field), mapping={t: i + 1 for i, t in enumerate(terms)} | {"#next": len(terms)})
    for s in range(0, n, step):
        e = min(n, s + step)
        pipe = r.pipeline(transaction=False)
        pipe.hset(k.slot(version, "study"), mapping={uids[i]: i for i in range(s, e)})
        pipe.hset(k.uid(version, "study"), mapping={i: uids[i] for i in range(s, e)})
        pipe.hset(k.sno(), mapping={uids[i]: i + 1 for i in range(s, e)})
        if record is not None:
            for i in range(s, e):
                pipe.hset(k.study(uids[i]), mapping=dict(record(i)))
        pipe.execute()
        if progress is not None:
            progress(e)
