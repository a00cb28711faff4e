"""The replica index against a real Redis: bulk load, incremental sync, filters, concurrency.

Every answer is checked against a brute-force scan of what the store holds (STYLE.md habit 8).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis

from hashing import bits
from hashing.search import brute_force
from plugin.search.errors import QueryError
from plugin.search.filters import Filters
from plugin.search.replica import QUERY_REFRESH_WAIT, IndexNotReady, ReplicaIndex
from plugin.store import Store
from plugin.store.models import StoreError
from tests.helpers.processes import wait_until

NBITS = 64


def rand_codes(rng: np.random.Generator, n: int, centres: int = 8, flip: float = 0.08) -> np.ndarray:
    """Clustered codes with duplicates, so ties are common."""
    c = rng.integers(0, 2, size=(centres, NBITS), dtype=np.uint8)
    b = c[rng.integers(0, centres, size=n)] ^ (rng.random((n, NBITS)) < flip).astype(np.uint8)
    return bits.pack(b)


def expected(live: dict[str, tuple[int, bytes]], query: bytes, k: int, max_distance=None, allowed=None):
    """Brute force over {uid: (slot, code)}: [(uid, distance)] by (distance, slot)."""
    items = [(u, s, c) for u, (s, c) in live.items() if allowed is None or u in allowed]
    if not items:
        return []
    items.sort(key=lambda t: t[1])
    codes = np.frombuffer(b"".join(c for _, _, c in items), np.uint8).reshape(len(items), -1)
    rows, d = brute_force(codes, np.frombuffer(query, np.uint8), len(items))
    out = [(items[r][0], int(x)) for r, x in zip(rows, d, strict=True)]
    if max_distance is not None:
        out = [h for h in out if h[1] <= max_distance]
    return out[:k]


def _spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str, note: Callable[[tuple], object]) -> list:
    """Replace ``module.name`` by the real function that first appends ``note(args)`` to the list
    returned: which filter passes ran, and over how many records."""
    seen: list = []
    real = getattr(module, name)

    def spied(*args):  # noqa: ANN002, ANN202
        seen.append(note(args))
        return real(*args)

    monkeypatch.setattr(module, name, spied)
    return seen


def study_passes(meta: dict[str, str], f: Filters, excluded_patient: str | None = None) -> bool:
    """The filters written plainly over one study's metadata: the reference the replica is checked against."""
    return (
        (not f.modalities or bool(set(meta["modalities"].split(",")) & set(f.modalities)))
        and (not f.date_from or meta["study_date"] >= f.date_from)
        and (not f.date_to or meta["study_date"] <= f.date_to)
        and (not f.body_part or meta["body_part"] == f.body_part)
        and (not f.patient_id or meta["patient_id"] == f.patient_id)
        and not (excluded_patient and meta["patient_id"] == excluded_patient)
    )


def as_pairs(hits):
    return [(h.uid, h.distance) for h in hits]


@pytest.fixture
def store(redis_client):
    s = Store(redis_client, namespace="t")
    s.models.register("m1", NBITS)
    s.models.activate("m1")
    return s


def fill(store: Store, codes: np.ndarray, level: str = "study", prefix: str = "1.2.") -> dict[str, tuple[int, bytes]]:
    live = {}
    for i, c in enumerate(codes):
        uid = f"{prefix}{i}"
        slot, _ = store.codes.upsert("m1", level, uid, c)
        live[uid] = (slot, bytes(c))
    return live


def loaded_with_deletions(store: Store, rng: np.random.Generator, n: int, every: int):  # noqa: ANN201
    """``n`` stored codes, every ``every``-th deleted, and a replica loaded after: (live, replica)."""
    live = fill(store, rand_codes(rng, n))
    for uid in list(live)[::every]:
        store.codes.delete("m1", "study", uid)
        del live[uid]
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    return live, idx


def test_not_ready_without_active_model(redis_client):
    idx = ReplicaIndex(Store(redis_client, namespace="t"), "study")
    idx.refresh()
    assert not idx.ready and len(idx) == 0
    with pytest.raises(IndexNotReady):
        idx.search(b"\0" * 8, 5)


def test_bulk_load_then_incremental_sync_matches_brute_force(store):
    rng = np.random.default_rng(1)
    live, idx = loaded_with_deletions(store, rng, 400, 7)
    assert idx.ready and idx.version == "m1" and idx.nbits == 64 and len(idx) == len(live)
    loaded_state = idx._state
    for q in rand_codes(rng, 10):
        assert as_pairs(idx.search(bytes(q), 15)) == expected(live, bytes(q), 15)

    # Incremental: new codes, changed codes, deletions, re-insertion of a deleted UID (new slot).
    more = fill(store, rand_codes(rng, 150), prefix="1.3.")
    live.update(more)
    for uid in list(live)[:30:3]:
        c = bytes(rand_codes(rng, 1)[0])
        slot, changed = store.codes.upsert("m1", "study", uid, c)
        live[uid] = (slot, c)
    for uid in list(live)[40:60]:
        store.codes.delete("m1", "study", uid)
        del live[uid]
    gone = "1.2.0"
    assert gone not in live
    c = bytes(rand_codes(rng, 1)[0])
    live[gone] = (store.codes.upsert("m1", "study", gone, c)[0], c)
    idx.refresh()
    assert idx._state is loaded_state, "an incremental refresh must not reload"
    assert len(idx) == len(live) == store.codes.count("m1", "study")
    for q in rand_codes(rng, 10):
        for k, r in ((10, None), (1, None), (500, None), (50, 6)):
            assert as_pairs(idx.search(bytes(q), k, max_distance=r)) == expected(live, bytes(q), k, r)
    q = live["1.3.5"][1]
    assert as_pairs(idx.radius_search(q, 4)) == expected(live, q, 10**6, max_distance=4)
    assert idx.code_of("1.3.5") == live["1.3.5"][1]
    assert idx.code_of(list(store.client.hkeys(store.keys.slot("m1", "study")))[0].decode()) is not None
    assert idx.code_of("9.9.9") is None


def test_refresh_with_nothing_new_keeps_state(store):
    fill(store, rand_codes(np.random.default_rng(2), 20))
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    st = idx._state
    pos = st.log_pos
    idx.refresh()
    idx.refresh()
    assert idx._state is st and st.log_pos == pos


def test_a_deleted_code_is_gone_after_the_refresh_a_query_makes(store):
    """A code deleted in Redis is never returned once the replica has refreshed (a served query
    refreshes first), and its UID leaves the replica's memory."""
    live = fill(store, rand_codes(np.random.default_rng(3), 50))
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    q = live["1.2.4"][1]
    assert as_pairs(idx.search(q, 1)) == [("1.2.4", 0)]
    store.codes.delete("m1", "study", "1.2.4")
    del live["1.2.4"]
    idx.refresh()
    assert as_pairs(idx.search(q, 10)) == expected(live, q, 10)
    assert b"1.2.4" not in idx._state.uids.tolist()


def test_a_search_answers_from_memory_while_redis_does_not_answer(redis_server, redis_client):
    """The search sends nothing to Redis: the UIDs it answers with are the replica's own. Redis is
    paused (CLIENT PAUSE, every command of every client held) and the replica's client gives up on
    a reply after half a second, so a round trip inside the search would fail it."""
    rng = np.random.default_rng(31)
    setup = Store(redis_client, namespace="t")
    setup.models.register("m1", NBITS)
    setup.models.activate("m1")
    codes = rand_codes(rng, 400)
    vectors = bits.quantize_rerank(rng.standard_normal((400, NBITS)))
    for i, (c, v) in enumerate(zip(codes, vectors, strict=True)):
        setup.codes.upsert("m1", "study", f"1.2.{i}", c, rerank=v)
    impatient = redis.Redis.from_url(redis_server.url, socket_timeout=0.5)
    idx = ReplicaIndex(Store(impatient, namespace="t"), "study")
    idx.refresh()
    queries = [(bytes(codes[i]), vectors[i]) for i in range(0, 400, 57)]
    before = [idx.search(q, 10, rerank=v, exclude_uids=("1.2.0",)) for q, v in queries]
    redis_client.execute_command("CLIENT", "PAUSE", 2000, "ALL")
    during = [idx.search(q, 10, rerank=v, exclude_uids=("1.2.0",)) for q, v in queries]
    with pytest.raises(redis.TimeoutError):  # the pause was on: a round trip would have failed
        impatient.ping()
    assert during == before and all(len(hits) == 10 for hits in during)
    redis_client.ping()  # held until the pause ends
    impatient.close()


def test_a_compaction_after_the_last_refresh_changes_no_answer(store):
    """The replica's UIDs are its own slots': a compaction that renumbers Redis's slots after the
    replica's last refresh does not make it answer with other UIDs; the refresh then reloads."""
    rng = np.random.default_rng(32)
    live, idx = loaded_with_deletions(store, rng, 300, 3)
    assert store.codes.compact("m1", "study") == 100
    queries = [bytes(q) for q in rand_codes(rng, 5)]
    for q in queries:
        assert as_pairs(idx.search(q, 20)) == expected(live, q, 20)
    assert idx.generation == 0  # answered from its own slots, not by reloading
    idx.refresh()
    assert idx.generation == 1
    for q in queries:
        assert as_pairs(idx.search(q, 20)) == expected(live, q, 20)


def test_a_query_does_not_wait_for_a_reload_running_in_another_thread(redis_client, store):
    """A reload (here after a compaction) holds the replica's refresh for as long as it reads; at a
    million codes that is seconds. A query's refresh waits QUERY_REFRESH_WAIT for it, then the loaded
    state answers. Redis is paused so that the background reload stays stuck in its read."""
    rng = np.random.default_rng(34)
    live, idx = loaded_with_deletions(store, rng, 200, 4)
    store.codes.compact("m1", "study")
    q = bytes(rand_codes(rng, 1)[0])
    redis_client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    reload = threading.Thread(target=idx.refresh)  # the background refresher's call: it waits
    reload.start()
    wait_until(lambda: idx._refresh_lock.locked(), timeout=2)
    assert idx.refresh(wait=QUERY_REFRESH_WAIT) is False
    assert as_pairs(idx.search(q, 10)) == expected(live, q, 10)
    assert reload.is_alive()  # all of it while the reload was still waiting for Redis
    reload.join(timeout=10)
    assert not reload.is_alive() and idx.generation == 1
    assert idx.refresh(wait=QUERY_REFRESH_WAIT) is True


def test_a_uid_longer_than_dicom_allows_comes_back_whole(store):
    """DICOM UIDs have at most 64 characters, but a store holds what it was sent: a longer one, at
    load or arriving later, is answered whole, not cut to the replica's width."""
    rng = np.random.default_rng(33)
    codes = rand_codes(rng, 3)
    long_at_load, long_later = "1.2." + "7" * 70, "1.3." + "8" * 90
    store.codes.upsert("m1", "study", long_at_load, codes[0])
    store.codes.upsert("m1", "study", "1.2.1", codes[1])
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    assert idx.search(bytes(codes[0]), 1)[0].uid == long_at_load
    store.codes.upsert("m1", "study", long_later, codes[2])
    idx.refresh()
    assert idx.search(bytes(codes[2]), 1)[0].uid == long_later
    assert idx.search(bytes(codes[0]), 1)[0].uid == long_at_load


def test_model_switch_and_compaction_reload(store):
    rng = np.random.default_rng(4)
    live = fill(store, rand_codes(rng, 300))
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    # Compaction: slots renumbered in the same order, generation bumped, replica reloads.
    for uid in list(live)[::2]:
        store.codes.delete("m1", "study", uid)
        del live[uid]
    old_state = idx._state
    assert store.codes.compact("m1", "study") == 150
    idx.refresh()
    assert idx._state is not old_state and idx.generation == 1
    live = {u: (store.codes.slots_of("m1", "study", [u])[0], c) for u, (_, c) in live.items()}
    assert sorted(s for s, _ in live.values()) == list(range(150))
    for q in rand_codes(rng, 5):
        assert as_pairs(idx.search(bytes(q), 20)) == expected(live, bytes(q), 20)
    # A write after compaction is followed incrementally.
    c = bytes(rand_codes(rng, 1)[0])
    live["1.5.1"] = (store.codes.upsert("m1", "study", "1.5.1", c)[0], c)
    idx.refresh()
    assert idx.search(c, 1)[0].distance == 0 and len(idx) == 151

    # Model switch: a second model with a different code length takes over.
    store.models.register("m2", 32)
    codes2 = np.random.default_rng(5).integers(0, 256, size=(40, 4), dtype=np.uint8)
    for i, c in enumerate(codes2):
        store.codes.upsert("m2", "study", f"2.{i}", c)
    idx.refresh()
    assert idx.version == "m1"
    store.models.activate("m2")
    idx.refresh()
    assert idx.version == "m2" and idx.nbits == 32 and len(idx) == 40
    assert idx.search(bytes(codes2[3]), 1)[0].uid in {
        f"2.{i}" for i in range(40) if bytes(codes2[i]) == bytes(codes2[3])
    }


def test_trimmed_log_forces_reload(store):
    rng = np.random.default_rng(6)
    live = fill(store, rand_codes(rng, 100))
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    first = idx._state
    more = fill(store, rand_codes(rng, 30), prefix="1.4.")
    live.update(more)
    store.client.xtrim(store.keys.log("m1", "study"), maxlen=5, approximate=False)
    idx.refresh()
    assert idx._state is not first and len(idx) == 130
    q = bytes(rand_codes(rng, 1)[0])
    assert as_pairs(idx.search(q, 30)) == expected(live, q, 30)


def test_filters_keep_the_k_nearest_among_passing_studies(store):
    rng = np.random.default_rng(7)
    codes = rand_codes(rng, 240)
    live = {}
    meta = {}
    for i, c in enumerate(codes):
        uid = f"1.7.{i}"
        m = {
            "patient_id": f"P{i % 9}",
            "study_date": f"2020{1 + i % 12:02d}{1 + i % 28:02d}",
            "modalities": ["CR", "DX", "CR,DX", "CT"][i % 4],
            "body_part": ["CHEST", "ABDOMEN", "HAND"][i % 3],
        }
        # Half the studies get their metadata before the code, half after: both must link.
        if i % 2:
            store.records.put_study(uid, m)
        live[uid] = (store.codes.upsert("m1", "study", uid, c)[0], bytes(c))
        if not i % 2:
            store.records.put_study(uid, m)
        meta[uid] = m
    live["1.7.nometa"] = (store.codes.upsert("m1", "study", "1.7.nometa", codes[0])[0], bytes(codes[0]))
    idx = ReplicaIndex(store, "study")
    idx.refresh()

    def allowed(f: Filters, excluded_patient: str | None = None) -> set[str]:
        return {uid for uid, m in meta.items() if study_passes(m, f, excluded_patient)}

    cases = [
        (Filters(modalities=("DX",)), None),
        (Filters(modalities=("ct", "MR"), date_from="20200301", date_to="20200930"), None),
        (Filters(body_part="HAND"), None),
        (Filters(patient_id="P4"), None),
        (Filters(modalities=("CR",)), "P4"),
        (None, "P4"),
        (Filters(date_to="20200215"), None),
        (Filters(modalities=("MR",)), None),
        (Filters(body_part="KNEE"), None),
    ]
    for f, out in cases:
        ok = allowed(f or Filters(), out)
        for q in codes[:6]:
            got = as_pairs(idx.search(bytes(q), 12, filters=f, exclude_patient=out))
            assert got == expected(live, bytes(q), 12, allowed=ok), (f, out)
    assert idx.search(bytes(codes[0]), 10, filters=Filters(modalities=("MR",))) == []

    # Exclusion by UID (the reference study) and a metadata change followed incrementally.
    ref = "1.7.3"
    got = as_pairs(idx.search(live[ref][1], 10, exclude_uids=[ref]))
    assert got == expected(live, live[ref][1], 10, allowed=set(live) - {ref})
    store.records.put_study("1.7.5", {"body_part": "KNEE"})
    meta["1.7.5"]["body_part"] = "KNEE"
    idx.refresh()
    assert as_pairs(idx.search(bytes(codes[0]), 5, filters=Filters(body_part="KNEE"))) == [
        ("1.7.5", expected(live, bytes(codes[0]), 300, allowed={"1.7.5"})[0][1])
    ]
    with pytest.raises(QueryError):
        Filters(date_from="2020-13")


def test_image_level_filters_use_the_instance_study(store):
    rng = np.random.default_rng(8)
    codes = rand_codes(rng, 60)
    live = {}
    study_of = {}
    for i, c in enumerate(codes):
        sop, study = f"1.8.{i}", f"1.9.{i % 6}"
        study_of[sop] = study
        if i % 3 == 0:  # worker order: code first, then the instance record
            live[sop] = (store.codes.upsert("m1", "image", sop, c)[0], bytes(c))
            store.records.put_instance(sop, study, {"modality": "CR"})
        elif i % 3 == 1:  # re-index order: the instance record exists already
            store.records.put_instance(sop, study, {"modality": "CR"})
            live[sop] = (store.codes.upsert("m1", "image", sop, c)[0], bytes(c))
        else:  # the caller names the study
            live[sop] = (store.codes.upsert("m1", "image", sop, c, study_uid=study)[0], bytes(c))
    idx = ReplicaIndex(store, "image")
    idx.refresh()
    for s in range(6):
        store.records.put_study(f"1.9.{s}", {"patient_id": f"P{s % 2}", "modalities": "CR", "study_date": "20210101"})
    idx.refresh()
    ok = {sop for sop, st in study_of.items() if int(st.rsplit(".", 1)[1]) % 2 == 1}
    store.codes.upsert("m1", "image", "1.8.unlinked", codes[0])  # no study known yet
    live["1.8.unlinked"] = (store.codes.slots_of("m1", "image", ["1.8.unlinked"])[0], bytes(codes[0]))
    idx.refresh()
    for f, out in ((Filters(patient_id="P1"), None), (None, "P0")):
        for q in codes[:5]:
            got = idx.search(bytes(q), 7, filters=f, exclude_patient=out)
            assert as_pairs(got) == expected(live, bytes(q), 7, allowed=ok)
    assert idx.search(bytes(codes[0]), 1)[0].distance == 0


@pytest.mark.parametrize("date_from", ["", "20190101"])
def test_a_kept_row_mask_loses_a_study_deleted_after_it(store, date_from):
    """The same filter asked again reuses its row mask; a study deleted in between (nothing else
    changed: no record, no new slot) must be gone from the next answer."""
    rng = np.random.default_rng(23)
    codes = rand_codes(rng, 60)
    live = {}
    for i, c in enumerate(codes):
        live[f"1.6.{i}"] = (store.codes.upsert("m1", "study", f"1.6.{i}", c)[0], bytes(c))
        store.records.put_study(f"1.6.{i}", {"modalities": "CT" if i % 2 else "MR", "study_date": "20200101"})
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    f = Filters(modalities=("CT",), date_from=date_from)
    ct = {f"1.6.{i}" for i in range(1, 60, 2)}
    q = bytes(codes[1])
    first = as_pairs(idx.search(q, 5, filters=f))
    assert first == expected(live, q, 5, allowed=ct) and first[0][0] == "1.6.1"
    store.codes.delete("m1", "study", "1.6.1")
    del live["1.6.1"]
    idx.refresh()
    assert as_pairs(idx.search(q, 5, filters=f)) == expected(live, q, 5, allowed=ct - {"1.6.1"})


@pytest.mark.parametrize("date_from", ["", "20190101"])
def test_a_kept_filter_follows_images_linked_to_their_study_after_it(store, date_from):
    """Images whose code came before their instance record have no study yet and pass no filter. A
    filter kept in slot order from then must see them once they are linked (their slots change study,
    no study record changes), and stop seeing one linked again to a study that fails it."""
    rng = np.random.default_rng(21)
    codes = rand_codes(rng, 40)
    store.records.put_study("1.9.0", {"modalities": "CT", "study_date": "20200101"})
    store.records.put_study("1.9.1", {"modalities": "MR", "study_date": "20200101"})
    live = {}
    for i, c in enumerate(codes):
        live[f"1.8.{i}"] = (store.codes.upsert("m1", "image", f"1.8.{i}", c)[0], bytes(c))
        if i < 20:
            store.records.put_instance(f"1.8.{i}", "1.9.0", {"modality": "CT"})
    idx = ReplicaIndex(store, "image")
    idx.refresh()
    f = Filters(modalities=("CT",), date_from=date_from)
    ct = {f"1.8.{i}" for i in range(20)}
    assert as_pairs(idx.search(bytes(codes[30]), 8, filters=f)) == expected(live, bytes(codes[30]), 8, allowed=ct)
    for i in range(20, 30):
        store.records.put_instance(f"1.8.{i}", "1.9.0", {"modality": "CT"})
    store.records.put_instance("1.8.0", "1.9.1", {"modality": "MR"})
    idx.refresh()
    ct = (ct | {f"1.8.{i}" for i in range(20, 30)}) - {"1.8.0"}
    for q in (codes[30], codes[0], codes[25]):
        assert as_pairs(idx.search(bytes(q), 8, filters=f)) == expected(live, bytes(q), 8, allowed=ct)


def test_selective_and_broad_filters_agree_with_brute_force_at_study_and_image_level(store):
    """Past a few hundred studies a selective filter (one patient, a rare body part) lists its
    studies' slots, and a broad one (a modality, a date range) masks the scan by study instead.
    Both ways, and with the reference patient left out, the answer is the brute force's."""
    from plugin.search.eligible import FEW

    rng = np.random.default_rng(14)
    n_studies = 3 * FEW
    codes = rand_codes(rng, 2 * n_studies)
    meta, live, study_of = {}, {"study": {}, "image": {}}, {}
    for i in range(n_studies):
        uid = f"5.1.{i}"
        meta[uid] = {
            "patient_id": f"P{i % (n_studies // 2)}",  # two studies per patient
            "study_date": f"{2000 + i % 20}0{1 + i % 9}15",
            "modalities": "CT" if i % 5 == 0 else "CR",
            "body_part": "KNEE" if i == 7 else "CHEST",
        }
        store.records.put_study(uid, meta[uid])
        live["study"][uid] = (store.codes.upsert("m1", "study", uid, codes[i])[0], bytes(codes[i]))
        for j in range(2):
            sop, c = f"5.2.{i}.{j}", codes[n_studies + i] if j else codes[i]
            store.records.put_instance(sop, uid, {"modality": meta[uid]["modalities"]})
            live["image"][sop] = (store.codes.upsert("m1", "image", sop, c)[0], bytes(c))
            study_of[sop] = uid

    selective = [(Filters(patient_id="P5"), None), (Filters(body_part="KNEE"), None)]
    broad = [
        (Filters(modalities=("CT",)), None),
        (Filters(date_from="20050101", date_to="20091231"), None),
        (Filters(modalities=("CT",), date_from="20050101"), "P10"),
    ]
    for level in ("study", "image"):
        idx = ReplicaIndex(store, level)
        idx.refresh()
        for cases, is_selective in ((selective, True), (broad, False)):
            for f, out in cases:
                exclude, rows = idx._eligibility.rows(idx._state, f, out)
                assert (rows is not None) == is_selective and exclude is not None, (level, f)
                ok = {u for u in live[level] if study_passes(meta[study_of.get(u, u)], f, out)}
                assert ok
                for q in codes[:: 2 * FEW // 3]:
                    got = as_pairs(idx.search(bytes(q), 15, filters=f, exclude_patient=out))
                    assert got == expected(live[level], bytes(q), 15, allowed=ok), (level, f, out)


def test_multi_index_path_equals_scan(store):
    rng = np.random.default_rng(9)
    live = fill(store, rand_codes(rng, 3000, centres=30))
    mih = ReplicaIndex(store, "study", mih_min=1000)
    scan = ReplicaIndex(store, "study", mih_min=10**9)
    mih.refresh()
    scan.refresh()
    assert mih._state.mih is not None and scan._state.mih is None
    queries = rand_codes(rng, 8)
    for q in queries:
        assert as_pairs(mih.search(bytes(q), 10)) == as_pairs(scan.search(bytes(q), 10)) == expected(live, bytes(q), 10)
    # Changes after the build are scanned outside the tables until the rebuild.
    for uid in list(live)[:200]:
        c = bytes(rand_codes(rng, 1)[0])
        live[uid] = (store.codes.upsert("m1", "study", uid, c)[0], c)
    live.update(fill(store, rand_codes(rng, 100), prefix="1.6."))
    mih.refresh()
    scan.refresh()
    for q in queries:
        assert as_pairs(mih.search(bytes(q), 25)) == expected(live, bytes(q), 25)
        # no metadata: nothing passes
        assert mih.search(bytes(q), 5, exclude_patient="nobody") == []

    # The tables are rebuilt in the background once enough rows sit outside them.
    eager = ReplicaIndex(store, "study", mih_min=1000, mih_rebuild_min=50, mih_rebuild_fraction=0.0)
    eager.refresh()
    first = eager._state.mih
    for uid in list(live)[300:400]:
        c = bytes(rand_codes(rng, 1)[0])
        live[uid] = (store.codes.upsert("m1", "study", uid, c)[0], c)
    eager.refresh()
    wait_until(lambda: eager._state.mih is not first and not eager._state.building, 30, what="the MIH rebuild")
    assert eager._state.mih.pending(eager._state.n) == 0
    for q in queries:
        assert as_pairs(eager.search(bytes(q), 25)) == expected(live, bytes(q), 25)


def test_concurrent_writers_and_queries_match_brute_force(store):
    """Workers write while the query side refreshes and searches; every answer is checked.

    The expected answer is rebuilt from the store's change log up to the position the replica had
    reached (the log carries each code), so the check is exact even while writes continue.
    """
    rng = np.random.default_rng(10)
    fill(store, rand_codes(rng, 200))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        w = Store(redis.Redis(connection_pool=store.client.connection_pool), namespace="t")
        r = np.random.default_rng(seed)
        i = 0
        try:
            while not stop.is_set():
                uid = f"1.{seed}.{r.integers(0, 300)}"
                if r.random() < 0.2:
                    w.codes.delete("m1", "study", uid)
                else:
                    w.codes.upsert("m1", "study", uid, rand_codes(r, 1)[0])
                i += 1
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (21, 22)]
    for t in threads:
        t.start()
    idx = ReplicaIndex(store, "study", batch=100)
    checked = 0
    positions: set[bytes | str] = set()
    deadline = time.monotonic() + 120
    try:
        # Keep checking until the replica has caught the writers mid-stream many times: a count of
        # queries alone would pass on a loaded machine where the writer threads barely got scheduled.
        while checked < 40 or (len(positions) < 20 and time.monotonic() < deadline):
            idx.refresh()
            q = bytes(rand_codes(rng, 1)[0])
            got = as_pairs(idx.search(q, 10))
            pos = idx._state.log_pos
            live: dict[str, tuple[int, bytes]] = {}
            for _, f in store.client.xrange(store.keys.log("m1", "study"), max=pos):
                if f[b"op"] == b"set":
                    live[f[b"uid"].decode()] = (int(f[b"slot"]), f[b"code"])
                elif f[b"op"] == b"del":
                    live.pop(f[b"uid"].decode(), None)
            assert got == expected(live, q, 10)
            checked += 1
            positions.add(pos)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert len(positions) >= 20, "the writers did not run while the replica was queried"


def test_delete_study_removes_it_from_every_level_and_version(store):
    store.models.register("m2", 64)
    rng = np.random.default_rng(11)
    codes = rand_codes(rng, 8)
    for i in range(3):
        sop = f"3.1.{i}"
        store.records.put_instance(sop, "3.1", {"modality": "CR"})
        for v in ("m1", "m2"):
            store.codes.upsert(v, "image", sop, codes[i])
        store.embeddings.put("m1", sop, np.ones(4, np.float32))
    store.records.put_study("3.1", {"patient_id": "P1", "modalities": "CR"})
    for v in ("m1", "m2"):
        store.codes.upsert(v, "study", "3.1", codes[3])
    store.codes.upsert("m1", "study", "3.2", codes[4])
    store.records.put_study("3.2", {"patient_id": "P2", "modalities": "CR"})
    study_idx, image_idx = ReplicaIndex(store, "study"), ReplicaIndex(store, "image")
    study_idx.refresh()
    image_idx.refresh()
    assert len(study_idx) == 2 and len(image_idx) == 3
    assert store.delete_study("3.1") == 8
    study_idx.refresh()
    image_idx.refresh()
    assert len(study_idx) == 1 and len(image_idx) == 0
    assert [h.uid for h in study_idx.search(bytes(codes[3]), 5)] == ["3.2"]
    assert study_idx.search(bytes(codes[3]), 5, filters=Filters(patient_id="P1")) == []
    assert (
        store.records.study("3.1") == {}
        and store.records.instance("3.1.0") == {}
        and store.records.study_instances("3.1") == []
    )
    assert store.embeddings.get_many("m1", ["3.1.0"]) == {}
    assert store.codes.count("m2", "image") == 0 and store.codes.count("m2", "study") == 0


def test_the_compiled_record_test_matches_numpy_for_every_combination_of_tests():
    """The filter pass over the records (one compiled loop for every test at once) against the
    same tests written plainly in numpy, on random records with unknown ones among them."""
    from plugin.search.eligible import BODY, MODALITY, NOT_PATIENT, PATIENT, _test_studies

    rng = np.random.default_rng(12)
    n = 5000
    flags = (rng.random(n) < 0.9).astype(np.uint16)
    body = rng.integers(0, 5, n).astype(np.uint16)
    modmask = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True) & np.uint64(0x8000_0000_0000_00FF)
    patient = rng.integers(1, 30, n).astype(np.uint64)
    body_id, mods, p_in, p_out = 3, np.uint64((1 << 63) | 4), np.uint64(7), np.uint64(9)
    plain = {
        BODY: body == body_id,
        MODALITY: (modmask & mods) != 0,
        PATIENT: patient == p_in,
        NOT_PATIENT: patient != p_out,
    }
    for tests in range(0, 32, 2):
        want = flags == 1
        for bit, ok in plain.items():
            if tests & bit:
                want &= ok
        fail = np.empty(n, np.uint8)
        count = _test_studies(flags, body, modmask, patient, tests, body_id, mods, p_in, p_out, fail)
        assert count == int(np.count_nonzero(want)), tests
        assert np.array_equal(fail, np.where(want, 0, 255).astype(np.uint8)), tests


def test_the_compiled_row_mask_matches_numpy():
    """The per-slot pass that makes a row mask (a kept result, the deletion mask, a date range)
    against the same written plainly, with unknown dates (0) among them."""
    from plugin.search.eligible import _gather, _slot_mask

    rng = np.random.default_rng(14)
    n, studies = 5000, 900
    per_study = np.where(rng.random(studies) < 0.4, 0, 255).astype(np.uint8)
    dates = rng.integers(20000101, 20251231, studies).astype(np.int32)
    dates[rng.random(studies) < 0.05] = 0
    slot_sn = rng.integers(0, studies, n).astype(np.uint32)
    rest, slot_dates = np.empty(n, np.uint8), np.empty(n, np.int32)
    _gather(per_study, slot_sn, rest)
    _gather(dates, slot_sn, slot_dates)
    assert np.array_equal(rest, per_study[slot_sn]) and np.array_equal(slot_dates, dates[slot_sn])
    exclude = np.where(rng.random(n) < 0.1, 255, 0).astype(np.uint8)
    for lo, hi in ((20050101, 20101231), (1, 99991231), (20300101, 20301231)):
        out = np.empty(n, np.uint8)
        _slot_mask(rest, exclude, slot_dates, lo, hi, out)
        ok = (rest == 0) & (exclude == 0) & (slot_dates >= lo) & (slot_dates <= hi)
        assert np.array_equal(out, np.where(ok, 0, 255).astype(np.uint8)), (lo, hi)


def test_excluding_a_patient_with_many_nearest_studies_still_returns_the_k_nearest(store):
    """The excluded patient owns the 60 nearest codes: the search must widen until k others pass."""
    rng = np.random.default_rng(13)
    q = rand_codes(rng, 1)[0]
    live, allowed = {}, set()
    for i in range(60):
        uid = f"4.1.{i}"
        live[uid] = (store.codes.upsert("m1", "study", uid, q)[0], bytes(q))
        store.records.put_study(uid, {"patient_id": "SAME"})
    for i, c in enumerate(rand_codes(rng, 200)):
        uid = f"4.2.{i}"
        live[uid] = (store.codes.upsert("m1", "study", uid, c)[0], bytes(c))
        store.records.put_study(uid, {"patient_id": f"O{i}"})
        allowed.add(uid)
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    for k in (1, 5, 30):
        got = as_pairs(idx.search(bytes(q), k, exclude_patient="SAME"))
        assert got == expected(live, bytes(q), k, allowed=allowed)
        assert len(got) == k and not any(u.startswith("4.1.") for u, _ in got)
    assert as_pairs(idx.search(bytes(q), 500, exclude_patient="SAME")) == expected(live, bytes(q), 500, allowed=allowed)


def _store_with_vectors(redis_client, codes, width, rng):  # noqa: ANN001, ANN202
    """Study codes 1.9.<i> of model m1, each with a random int8 re-ranking vector of ``width`` values:
    (store, vectors, live) with live as :func:`expected` takes it."""
    from hashing.bits import quantize_rerank

    store = Store(redis_client, namespace="t")
    store.models.register("m1", NBITS, rerank_dim=width)
    store.models.activate("m1")
    vectors = quantize_rerank(rng.standard_normal((len(codes), width)))
    live = {}
    for i, (c, v) in enumerate(zip(codes, vectors, strict=True)):
        live[f"1.9.{i}"] = (store.codes.upsert("m1", "study", f"1.9.{i}", c, rerank=v)[0], bytes(c))
    return store, vectors, live


def _clustered_replica_with_vectors(redis_client, seed, width):  # noqa: ANN001, ANN202
    """2,500 codes in three clusters with re-ranking vectors of ``width`` values, stored and loaded:
    (rng, codes, store, vectors, live, replica), the rng where the set-up left it."""
    rng = np.random.default_rng(seed)
    codes = rand_codes(rng, 2500, centres=3, flip=0.1)
    store, vectors, live = _store_with_vectors(redis_client, codes, width, rng)
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    return rng, codes, store, vectors, live, idx


@pytest.mark.parametrize("width", [NBITS, 128])
def test_reranked_top_k_equals_brute_force_over_the_shortlist(redis_client, width):
    """With a re-ranking vector, the answer is the Hamming shortlist re-sorted by cosine, exactly;
    the vectors may be wider than the code (a model's whitened layout: 128 values for 64 bits)."""
    from hashing.bits import quantize_rerank, rerank_similarity
    from hashing.search import shortlist_size

    rng = np.random.default_rng(14)
    codes = rand_codes(rng, 600, centres=4, flip=0.03)  # heavy ties: the re-ranking decides
    store, vectors, live = _store_with_vectors(redis_client, codes, width, rng)
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    with pytest.raises(StoreError, match="re-ranking vector"):
        store.codes.upsert("m1", "study", "1.9.0", codes[0], rerank=vectors[0][: width // 2])
    with pytest.raises(ValueError, match="re-ranking vector"):
        idx.search(bytes(codes[0]), 10, rerank=vectors[0][: width // 2])
    later = quantize_rerank(rng.standard_normal(width))
    store.codes.upsert("m1", "study", "1.9.7", codes[7], rerank=later)  # a new vector, same code: followed
    vectors[7] = later
    idx.refresh()
    for q in range(0, 600, 97):
        query, qv = bytes(codes[q]), vectors[q]
        for k in (1, 10, 40):
            shortlist = expected(live, query, shortlist_size(k))
            sims = rerank_similarity(qv, vectors[[int(u.rsplit(".", 1)[1]) for u, _ in shortlist]])
            best = [shortlist[i] for i in np.argsort(-sims, kind="stable")[:k]]
            got = idx.search(query, k, rerank=qv)
            assert [(h.uid, h.distance) for h in got] == best
            assert [h.similarity for h in got] == pytest.approx(sorted(sims, reverse=True)[:k], abs=1e-6)
    found = idx.lookup("1.9.7")
    assert found is not None and found[0] == bytes(codes[7]) and np.array_equal(found[1], later)


def test_query_variants_rerank_a_larger_shortlist_by_their_best_cosine(redis_client):
    """With the reference's variants (V, d), the answer is the 1,000-code tolerant shortlist re-sorted by
    each candidate's best cosine to any variant: brute force over the shortlist, in float64."""
    from hashing.bits import quantize_rerank
    from hashing.search import TOLERANT_SHORTLIST, shortlist_size

    width = 128
    rng, codes, store, vectors, live, idx = _clustered_replica_with_vectors(redis_client, 15, width)
    assert shortlist_size(10, tolerant=True) == TOLERANT_SHORTLIST == 1000
    for q in (0, 1234):
        query = bytes(codes[q])
        variants = quantize_rerank(rng.standard_normal((27, width)))
        shortlist = expected(live, query, TOLERANT_SHORTLIST)
        cand = vectors[[int(u.rsplit(".", 1)[1]) for u, _ in shortlist]].astype(np.float64)
        var = variants.astype(np.float64)
        cos = (var @ cand.T) / np.outer(np.linalg.norm(var, axis=1), np.linalg.norm(cand, axis=1))
        best_cos = cos.max(axis=0)
        order = np.argsort(-best_cos, kind="stable")[:10]
        got = idx.search(query, 10, rerank=variants)
        assert [(h.uid, h.distance) for h in got] == [shortlist[i] for i in order]
        assert [h.similarity for h in got] == pytest.approx(best_cos[order], abs=1e-5)
        # one variant alone is the plain re-ranking of the 300-code shortlist
        plain = idx.search(query, 10, rerank=variants[0])
        assert max(h.distance for h in plain) <= expected(live, query, 300)[-1][1]


def test_reranking_fetched_during_the_scan_gives_the_same_answer(redis_client):
    """The reference's variants fetched from Redis while the scan runs (as a served query does) give
    the answer of the variants passed in; a reference without stored variants is re-ranked by its own
    vector from the plain shortlist, exactly as when that vector is passed; while one query waits for
    its variants, other searches of the same replica answer; a fetch that fails fails the search with
    its own error."""
    from concurrent.futures import Future

    from hashing.bits import quantize_rerank
    from plugin.search.query import fetch_reranking

    width = 128
    rng, codes, store, vectors, _, idx = _clustered_replica_with_vectors(redis_client, 16, width)
    variants = quantize_rerank(rng.standard_normal((27, width)))
    store.embeddings.put("m1", "2.1.1", np.zeros(8, np.float32), variants)
    for q in (3, 1500):
        query, own = bytes(codes[q]), vectors[q]
        for k in (1, 10, 40):
            by_variants = idx.search(query, k, exclude_uids=(f"1.9.{q}",), rerank=variants)
            fetched = fetch_reranking(store, "m1", "IMAGE", "2.1.1", own)
            assert idx.search(query, k, exclude_uids=(f"1.9.{q}",), rerank=fetched) == by_variants
            assert np.array_equal(fetched.result(), variants)
            by_own = idx.search(query, k, exclude_uids=(f"1.9.{q}",), rerank=own)
            none_stored = fetch_reranking(store, "m1", "IMAGE", "2.1.404", own)
            assert idx.search(query, k, exclude_uids=(f"1.9.{q}",), rerank=none_stored) == by_own
            assert by_own != by_variants or k == 1
    # While one query waits for its variants, other searches of the same replica go on.
    entered = threading.Event()

    class Waiting(Future):
        def result(self, timeout=None):  # noqa: ANN001, ANN201
            entered.set()
            return super().result(timeout)

    slow, answers = Waiting(), []
    waiting = threading.Thread(target=lambda: answers.append(idx.search(query, 10, rerank=slow)), daemon=True)
    waiting.start()
    try:
        assert entered.wait(30)
        other = threading.Thread(target=lambda: answers.append(idx.search(query, 10, rerank=own)), daemon=True)
        other.start()
        other.join(30)
        assert not other.is_alive() and answers == [idx.search(query, 10, rerank=own)]
    finally:
        slow.set_result(variants)
    waiting.join(30)
    assert answers[1] == idx.search(query, 10, rerank=variants)

    failed: Future = Future()
    failed.set_exception(redis.exceptions.ConnectionError("Redis went away"))
    with pytest.raises(redis.exceptions.ConnectionError, match="went away"):
        idx.search(bytes(codes[0]), 10, rerank=failed)
    narrow: Future = Future()
    narrow.set_result(variants[:, : width // 2])
    with pytest.raises(ValueError, match="re-ranking vector"):
        idx.search(bytes(codes[0]), 10, rerank=narrow)


@pytest.mark.parametrize("journal", [1 << 16, 3])
def test_a_cached_filter_follows_every_change_of_the_records(store, monkeypatch, journal):
    """The per-study result of a filter is kept between searches and brought up to date by testing
    again only the records that changed (or all of them, once the journal of changes no longer
    reaches back: ``journal`` 3). Each round changes records, adds studies with and without a
    record and deletes some; the same filters must still give the brute-force answer."""
    from plugin.search import eligible
    from plugin.search.state import State

    monkeypatch.setattr(State, "JOURNAL", journal)
    tested_sizes = _spy(monkeypatch, eligible, "_test_studies", lambda args: len(args[0]))  # records tested
    rng = np.random.default_rng(17)
    codes = rand_codes(rng, 400)
    live, meta = {}, {}

    def random_meta() -> dict[str, str]:
        return {
            "patient_id": f"P{rng.integers(0, 12)}",
            "study_date": f"20{rng.integers(10, 25)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
            "modalities": ["CR", "DX", "CR,DX", "CT", "MR"][rng.integers(0, 5)],
            "body_part": ["CHEST", "ABDOMEN", "HAND"][rng.integers(0, 3)],
        }

    def add(i: int, with_record: bool = True) -> None:
        uid = f"1.9.{i}"
        live[uid] = (store.codes.upsert("m1", "study", uid, codes[i])[0], bytes(codes[i]))
        if with_record:
            meta[uid] = random_meta()
            store.records.put_study(uid, meta[uid])

    for i in range(300):
        add(i)
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    cases = [
        (Filters(modalities=("CT",)), None),
        (Filters(modalities=("CR",), date_from="20150101", date_to="20201231"), None),
        (Filters(body_part="HAND", date_to="20180101"), "P3"),
        (Filters(patient_id="P5"), None),
        (None, "P7"),
    ]
    nxt = 300
    for round_ in range(5):
        # The same modalities with a range new to the round: the kept result without the range, and the dates.
        new_range = Filters(modalities=("CR", "DX"), date_from=f"20{12 + round_}0101", date_to="20221231")
        for f, out in [*cases, (new_range, None), (new_range, "P2")]:
            ok = {u for u, m in meta.items() if u in live and study_passes(m, f or Filters(), out)}
            for q in codes[round_ : round_ + 3]:
                got = as_pairs(idx.search(bytes(q), 15, filters=f, exclude_patient=out))
                assert got == expected(live, bytes(q), 15, allowed=ok), (round_, f, out)
        tested_sizes.clear()
        # Change some records (one the other way round: a record for a study that had none)...
        for uid in rng.choice(sorted(meta), 8, replace=False).tolist():
            meta[uid] = {**meta[uid], **random_meta()}
            store.records.put_study(uid, meta[uid])
        for uid in [u for u in live if u not in meta][:1]:
            meta[uid] = random_meta()
            store.records.put_study(uid, meta[uid])
        # ...add studies, one still without a record, and delete some.
        for i in range(nxt, nxt + 6):
            add(i, with_record=i != nxt + 5)
        nxt += 6
        for uid in rng.choice(sorted(live), 3, replace=False).tolist():
            store.codes.delete("m1", "study", uid)
            del live[uid]
        idx.refresh()
        idx.search(bytes(codes[0]), 5, filters=cases[0][0])
        if journal > 100:  # the cached result was brought up to date from the changed records only
            assert tested_sizes and max(tested_sizes) <= 15, tested_sizes
        else:  # the journal did not reach back: every record tested again
            assert tested_sizes and max(tested_sizes) >= 300, tested_sizes


def test_a_filter_new_to_the_query_tests_only_what_is_new(store, monkeypatch):
    """The same modality asked with a date range new to each query: the modality's result is kept,
    in study and in slot order, beside the dates in slot order, so that after the first query no
    record is tested and nothing is gathered through the slots' study numbers; each query's scan tests
    its range itself (one pass over the codes and the slots, no row mask written). A range asked a
    second time gets its row mask, which the third time reuses. The answer is the brute-force one
    every time."""
    from hashing import kernels
    from plugin.search import eligible

    calls = _spy(monkeypatch, eligible, "_test_studies", lambda args: (int(args[4]), len(args[0])))  # tests, records
    gathers = _spy(monkeypatch, eligible, "_gather", lambda args: len(args[2]))  # slots gathered
    masks = _spy(monkeypatch, eligible, "_slot_mask", lambda args: len(args[5]))  # slots masked
    fused = _spy(monkeypatch, kernels, "hamming_in_range", lambda args: len(args[7]))  # slots scanned with the range
    rng = np.random.default_rng(19)
    codes = rand_codes(rng, 300)
    live, meta = {}, {}
    for i, c in enumerate(codes):
        uid = f"1.8.{i}"
        live[uid] = (store.codes.upsert("m1", "study", uid, c)[0], bytes(c))
        if i % 10:  # every tenth study has no record: it passes no filter
            meta[uid] = {
                "study_date": f"20{rng.integers(10, 25)}0{rng.integers(1, 10)}15",
                "modalities": ["CT", "MR", "CR"][rng.integers(0, 3)],
            }
            store.records.put_study(uid, meta[uid])
    idx = ReplicaIndex(store, "study")
    idx.refresh()
    spies = (calls, gathers, masks, fused)

    def search(f: Filters, q: bytes) -> None:
        for seen in spies:
            seen.clear()
        ok = {u for u, m in meta.items() if study_passes(m, f)}
        assert as_pairs(idx.search(q, 12, filters=f)) == expected(live, q, 12, allowed=ok), f

    for year in range(2012, 2020):
        f = Filters(modalities=("CT",), date_from=f"{year}0101", date_to="20991231")
        search(f, bytes(codes[year % 300]))
        first = year == 2012
        assert sorted(t for t, _ in calls) == ([eligible.MODALITY] if first else []), calls  # then it is kept
        assert gathers == ([300, 300] if first else []), gathers  # the result and the dates, in slot order
        assert (masks, fused) == ([], [300]), (masks, fused)  # the range tested in the scan's one pass
    search(f, bytes(codes[7]))  # the last filter, asked again: its row mask is made
    assert (calls, gathers, masks, fused) == ([], [], [300], []), spies
    search(f, bytes(codes[8]))  # and a third time: kept
    assert (calls, gathers, masks, fused) == ([], [], [], []), spies
