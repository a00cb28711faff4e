"""The Redis store against a real Redis server."""

import numpy as np
import pytest

from plugin.store import Store, StoreError


def test_upsert_is_idempotent_by_uid(redis_client):
    store = Store(redis_client)
    store.models.register("m1", 64)
    code = np.arange(8, dtype=np.uint8)
    slot, changed = store.codes.upsert("m1", "image", "1.2.3", code)
    assert (slot, changed) == (0, True)
    assert store.codes.upsert("m1", "image", "1.2.3", code) == (0, False)
    slot2, _ = store.codes.upsert("m1", "image", "1.2.4", code[::-1].copy())
    assert slot2 == 1
    assert store.codes.count("m1", "image") == 2
    assert store.codes.get("m1", "image", "1.2.4") == bytes(code[::-1])


def test_code_width_is_checked(redis_client):
    store = Store(redis_client)
    store.models.register("m1", 64)
    with pytest.raises(StoreError):
        store.codes.upsert("m1", "image", "1.2.3", b"\x00" * 4)
    with pytest.raises(StoreError):
        store.models.register("m1", 32)


def test_slot_allocation_is_safe_with_concurrent_writers(redis_client):
    import threading

    import redis

    pool = redis_client.connection_pool
    Store(redis_client).models.register("m1", 64)
    results: dict[str, set[int]] = {}
    lock = threading.Lock()

    def worker(w: int) -> None:
        store = Store(redis.Redis(connection_pool=pool))
        rng = np.random.default_rng(w)
        for i in range(150):
            uid = f"1.2.{i}" if i % 3 == 0 else f"1.3.{w}.{i}"  # every third UID written by all
            slot, _ = store.codes.upsert("m1", "study", uid, rng.integers(0, 256, 8, dtype=np.uint8))
            with lock:
                results.setdefault(uid, set()).add(slot)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = Store(redis_client)
    assert all(len(slots) == 1 for slots in results.values()), "one UID, one slot"
    slots = sorted(next(iter(s)) for s in results.values())
    assert slots == list(range(len(results))), "slots are dense and never shared"
    assert store.codes.count("m1", "study") == len(results) == 50 + 4 * 100


def test_delete_tombstones_and_reinsert_takes_a_new_slot(redis_client):
    store = Store(redis_client)
    store.models.register("m1", 32)
    for i in range(5):
        store.codes.upsert("m1", "image", f"1.{i}", bytes([i] * 4))
    assert store.codes.delete("m1", "image", "1.2") == 2
    assert store.codes.delete("m1", "image", "1.2") is None
    assert store.codes.get("m1", "image", "1.2") is None and store.codes.count("m1", "image") == 4
    snap = store.codes.snapshot("m1", "image")
    assert snap.n_slots == 5 and snap.deleted.tolist() == [False, False, True, False, False]
    assert store.codes.upsert("m1", "image", "1.2", bytes([9] * 4)) == (5, True)
    assert store.codes.uids_of("m1", "image", [2, 5]) == [None, "1.2"]
    assert store.codes.slots_of("m1", "image", ["1.2", "nope"]) == [5, None]


def test_change_log_carries_what_replicas_need(redis_client):
    store = Store(redis_client, namespace="x")
    store.models.register("m1", 64)
    code = bytes(range(8))
    store.codes.upsert("m1", "study", "1.1", code)
    store.codes.upsert("m1", "study", "1.1", code)  # unchanged: not logged
    store.codes.delete("m1", "study", "1.1")
    entries = [f for _, f in redis_client.xrange(store.keys.log("m1", "study"))]
    assert [f[b"op"] for f in entries] == [b"init", b"set", b"del"]
    assert entries[1][b"code"] == code and entries[1][b"uid"] == b"1.1" and int(entries[1][b"sn"]) >= 1


def test_put_study_keeps_a_filter_record_from_the_merged_hash(redis_client):
    from plugin.store import ATTR_DTYPE, FLAG_KNOWN, patient_key

    store = Store(redis_client, namespace="x")
    store.records.put_study("1.5", {"patient_id": "PID-1", "study_date": "20190304"})
    store.records.put_study("1.5", {"modalities": "CR,dx", "body_part": "chest"})
    store.records.put_study("1.5", {"modalities": "CR,dx", "body_part": "chest"})  # no change, no log entry
    sn = store.records.study_number("1.5")
    raw = redis_client.getrange(store.keys.sattr(), sn * ATTR_DTYPE.itemsize, (sn + 1) * ATTR_DTYPE.itemsize - 1)
    rec = np.frombuffer(raw, ATTR_DTYPE)[0]
    assert rec["flags"] == FLAG_KNOWN and rec["date"] == 20190304 and rec["patient"] == patient_key("PID-1")
    assert store.records.vocabulary("modality", ["CR", "DX", "MR"]) == [1, 2, None]
    assert rec["modmask"] == 0b11 and rec["body"] == store.records.vocabulary("body_part", ["CHEST"])[0]
    assert redis_client.xlen(store.keys.attrlog()) == 2
    assert store.records.study("1.5")["patient_id"] == "PID-1", "the C-FIND hash is kept as written"
    assert b"PID-1" not in raw


def test_concurrent_put_study_never_loses_a_field(redis_client):
    import threading

    import redis

    from plugin.store import ATTR_DTYPE

    pool = redis_client.connection_pool
    for round_ in range(20):
        uid = f"1.6.{round_}"
        barrier = threading.Barrier(2)

        def write(meta: dict[str, str], uid: str = uid, barrier: threading.Barrier = barrier) -> None:
            s = Store(redis.Redis(connection_pool=pool))
            barrier.wait()
            s.records.put_study(uid, meta)

        a = threading.Thread(target=write, args=({"study_date": "20200101"},))
        b = threading.Thread(target=write, args=({"patient_id": "P9"},))
        a.start()
        b.start()
        a.join()
        b.join()
        sn = Store(redis_client).records.study_number(uid)
        rec = np.frombuffer(redis_client.getrange(Store(redis_client).keys.sattr(), sn * 24, sn * 24 + 23), ATTR_DTYPE)[
            0
        ]
        assert rec["date"] == 20200101 and rec["patient"] != 0


def test_image_slot_is_linked_to_its_study_in_either_order(redis_client):
    store = Store(redis_client)
    store.models.register("m1", 64)
    store.models.register("m2", 64)
    slot_a, _ = store.codes.upsert("m1", "image", "9.1", bytes(8))  # code first
    store.codes.upsert("m2", "image", "9.1", bytes(8))
    store.records.put_instance("9.1", "8.1", {"modality": "CR"})
    store.records.put_instance("9.2", "8.1", {"modality": "CR"})  # instance first
    slot_b, _ = store.codes.upsert("m1", "image", "9.2", bytes([1] * 8))
    sn = store.records.study_number("8.1")
    for v in ("m1", "m2"):
        snap = store.codes.snapshot(v, "image")
        assert snap.slot_sn[slot_a] == sn
    assert store.codes.snapshot("m1", "image").slot_sn[slot_b] == sn
    ops = [f[b"op"] for _, f in redis_client.xrange(store.keys.log("m1", "image"))]
    assert ops == [b"init", b"set", b"link", b"set"]


def test_compaction_renumbers_in_order_and_loses_no_concurrent_write(redis_client):
    import threading

    import redis

    store = Store(redis_client)
    store.models.register("m1", 64)
    rng = np.random.default_rng(0)
    expected: dict[str, bytes] = {}
    for i in range(400):
        c = bytes(rng.integers(0, 256, 8, dtype=np.uint8))
        store.codes.upsert("m1", "study", f"1.{i}", c)
        expected[f"1.{i}"] = c
    for i in range(0, 400, 3):
        store.codes.delete("m1", "study", f"1.{i}")
        del expected[f"1.{i}"]
    order_before = sorted(expected, key=lambda u: store.codes.slots_of("m1", "study", [u])[0])
    stop = threading.Event()
    written: dict[str, bytes] = {}

    def writer() -> None:
        w = Store(redis.Redis(connection_pool=redis_client.connection_pool))
        r = np.random.default_rng(1)
        i = 0
        while not stop.is_set() or i < 50:
            c = bytes(r.integers(0, 256, 8, dtype=np.uint8))
            w.codes.upsert("m1", "study", f"2.{i}", c)
            written[f"2.{i}"] = c
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        reclaimed = store.codes.compact("m1", "study")
    finally:
        stop.set()
        t.join()
    assert reclaimed == 134
    expected.update(written)
    assert store.codes.count("m1", "study") == len(expected)
    for uid, code in expected.items():
        assert store.codes.get("m1", "study", uid) == code, uid
    order_after = sorted(order_before, key=lambda u: store.codes.slots_of("m1", "study", [u])[0])
    assert order_after == order_before, "compaction keeps the slot order (and so the tie-break)"
    snap = store.codes.snapshot("m1", "study")
    assert snap.generation == 1 and not snap.deleted.any() and snap.n_slots == len(expected)


def test_changes_detects_a_trimmed_log(redis_client):
    store = Store(redis_client)
    store.models.register("m1", 64)
    pos = store.codes.snapshot("m1", "study").log_pos
    for i in range(10):
        store.codes.upsert("m1", "study", f"1.{i}", bytes([i] * 8))
    ch = store.codes.changes("m1", "study", pos, "0-0")
    assert len(ch.log) == 10 and not ch.log_lost
    redis_client.xtrim(store.keys.log("m1", "study"), maxlen=3, approximate=False)
    assert store.codes.changes("m1", "study", pos, "0-0").log_lost


def test_value_helpers():
    from plugin.store.attributes import parse_date, patient_key, split_modalities

    assert parse_date("20200131") == 20200131 and parse_date("2020-01-31") == 20200131
    assert parse_date("") == 0 and parse_date("2020013") == 0 and parse_date(None) == 0
    assert split_modalities("cr, DX\\CR") == ["CR", "DX"]
    assert patient_key("") == 0 and patient_key(" A ") == patient_key("A") != patient_key("B")


def test_rerank_vectors_follow_their_slot_through_upsert_log_and_compaction(redis_client):
    store = Store(redis_client)
    store.models.register("m1", 16)
    vec = np.arange(-8, 8, dtype=np.int8)
    store.codes.upsert("m1", "study", "1.1", bytes(2), rerank=vec)
    assert store.codes.upsert("m1", "study", "1.1", bytes(2), rerank=vec) == (0, False)
    assert store.codes.upsert("m1", "study", "1.1", bytes(2), rerank=vec[::-1].copy())[1]  # same code, new vector
    store.codes.upsert("m1", "study", "1.2", b"\x01\x00", rerank=vec)
    store.codes.delete("m1", "study", "1.1")
    store.codes.compact("m1", "study")
    snap = store.codes.snapshot("m1", "study")
    assert snap.n_slots == 1 and np.array_equal(snap.rerank[0], vec)
    last = [f for _, f in redis_client.xrange(store.keys.log("m1", "study"))]
    assert last[0][b"op"] == b"init"  # compaction restarts the log; replicas reload the snapshot
    with pytest.raises(StoreError):
        store.codes.upsert("m1", "study", "1.3", bytes(2), rerank=np.zeros(8, np.int8))


def test_a_study_s_variants_come_from_its_first_instances_in_uid_order_in_one_call(redis_client):
    """What a study reference is re-ranked by: the stored variants of its first instances in UID
    order (those without stored variants skipped), the same as listing the instances and then
    reading their variants, which took two round trips."""
    store = Store(redis_client, namespace="t")
    rng = np.random.default_rng(3)
    sops = [f"1.5.{n}" for n in rng.permutation(70)]  # not stored in UID order
    for n, sop in enumerate(sops):
        store.records.put_instance(sop, "1.5", {"modality": "DX"})
        if n % 5:  # every fifth image indexed by a version without variants
            store.embeddings.put("v6", sop, np.ones(4, np.float32), rng.integers(-127, 128, (27, 8), dtype=np.int8))
    first = sorted(store.records.study_instances("1.5"))[:64]
    expected = store.embeddings.variants_of("v6", first, 8)
    got = store.embeddings.study_variants("v6", "1.5", 8, 64)
    assert got.shape == expected.shape and 48 <= got.shape[0] < 64
    np.testing.assert_array_equal(got, expected)
    assert store.embeddings.study_variants("v6", "1.5", 8, 3).shape[0] <= 3
    assert store.embeddings.study_variants("v5", "1.5", 8, 64).shape == (0, 0, 8)  # no variants stored
    assert store.embeddings.study_variants("v6", "no.such.study", 8, 64).shape == (0, 0, 8)
