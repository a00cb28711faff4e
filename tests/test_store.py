"""The Redis store against a real Redis server."""

import numpy as np
import pytest

from plugin.store import CodeStore, StoreError


def test_upsert_is_idempotent_by_uid(redis_client):
    store = CodeStore(redis_client)
    store.register_model("m1", 64)
    code = np.arange(8, dtype=np.uint8)
    slot, changed = store.upsert_code("m1", "image", "1.2.3", code)
    assert (slot, changed) == (0, True)
    assert store.upsert_code("m1", "image", "1.2.3", code) == (0, False)
    slot2, _ = store.upsert_code("m1", "image", "1.2.4", code[::-1].copy())
    assert slot2 == 1
    assert store.count("m1", "image") == 2
    assert store.get_code("m1", "image", "1.2.4") == bytes(code[::-1])


def test_code_width_is_checked(redis_client):
    store = CodeStore(redis_client)
    store.register_model("m1", 64)
    with pytest.raises(StoreError):
        store.upsert_code("m1", "image", "1.2.3", b"\x00" * 4)
    with pytest.raises(StoreError):
        store.register_model("m1", 32)
