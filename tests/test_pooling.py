"""Studies due for pooling (plugin.store.ingest, the CLAIM_POOLING script) on a real Redis: what a
worker's scan claims, what a lease protects, what a late instance or a dead worker changes."""

from __future__ import annotations

import json
import threading

from workers.tasks import pool_lease_seconds

A, B, C = "1.2.3.1", "1.2.3.2", "1.2.3.3"


def test_only_studies_past_their_due_time_are_claimed_once(store):
    ingest = store.ingest
    ingest.pool_due(A, 100.0)
    ingest.pool_due(B, 200.0)
    assert ingest.claim_due_studies(now=150.0, lease_seconds=60) == [A]
    assert ingest.claim_due_studies(now=150.0, lease_seconds=60) == []  # leased: not sent twice
    assert ingest.pool_pending() == (1, 1)
    ingest.pool_finished(A)
    assert ingest.claim_due_studies(now=250.0, lease_seconds=60) == [B]
    assert ingest.pool_pending() == (0, 1)


def test_a_late_instance_moves_the_due_time_later_never_earlier(store):
    ingest = store.ingest
    ingest.pool_due(A, 100.0)
    ingest.pool_due(A, 160.0)  # a late instance
    ingest.pool_due(A, 130.0)  # an older instance indexed after it (another worker): no effect
    assert ingest.claim_due_studies(now=150.0, lease_seconds=60) == []
    assert ingest.claim_due_studies(now=161.0, lease_seconds=60) == [A]


def test_a_late_instance_during_pooling_is_pooled_after_it(store):
    ingest = store.ingest
    ingest.pool_due(A, 100.0)
    assert ingest.claim_due_studies(now=101.0, lease_seconds=60) == [A]
    ingest.pool_due(A, 120.0)  # arrives while the first pooling runs
    assert ingest.claim_due_studies(now=121.0, lease_seconds=60) == []  # not twice at once
    ingest.pool_finished(A)
    assert ingest.claim_due_studies(now=122.0, lease_seconds=60) == [A]


def test_a_study_whose_worker_died_is_due_again_when_its_lease_ends(store):
    ingest = store.ingest
    ingest.pool_due(A, 100.0)
    assert ingest.claim_due_studies(now=100.0, lease_seconds=60) == [A]
    # the worker died: no pool_finished; nothing happens before the lease ends...
    assert ingest.claim_due_studies(now=159.0, lease_seconds=60) == []
    # ...and then the next scan, on any worker, takes it
    assert ingest.claim_due_studies(now=160.5, lease_seconds=60) == [A]


def test_a_failed_pooling_waits_then_comes_back(store):
    ingest = store.ingest
    ingest.pool_due(A, 100.0)
    assert ingest.claim_due_studies(now=100.0, lease_seconds=60) == [A]
    ingest.pool_retry_later(A, 1000.0)
    assert ingest.claim_due_studies(now=500.0, lease_seconds=60) == []
    assert ingest.claim_due_studies(now=1001.0, lease_seconds=60) == [A]


def test_concurrent_scanners_never_claim_the_same_study(store):
    uids = [f"1.2.4.{n}" for n in range(300)]
    for uid in uids:
        store.ingest.pool_due(uid, 10.0)
    claimed: list[list[str]] = []
    lock = threading.Lock()

    def scan() -> None:
        while got := store.ingest.claim_due_studies(now=20.0, lease_seconds=60, limit=25):
            with lock:
                claimed.append(got)

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    flat = [uid for batch in claimed for uid in batch]
    assert sorted(flat) == sorted(uids)  # each exactly once


def test_the_lease_stays_within_the_stability_window_plus_half_a_minute():
    assert pool_lease_seconds(60.0) == 90.0
    assert pool_lease_seconds(5.0) == 60.0  # a pooling may wait in the queue a little


def test_a_study_knows_its_instances_received_and_not_yet_settled(store):
    """Each hint is kept in its study's set until the instance is settled (``done``, which a
    redelivered message may call twice); a hint whose payload is gone by another path is dropped, so
    that nothing can hold a study's pooling back for ever."""
    ingest = store.ingest
    for n, at in enumerate((10.0, 30.0, 20.0)):
        ingest.hint({"sop_uid": f"{A}.{n}", "study_uid": A, "path": "p", "source_ae": "", "received_at": at})
    ingest.hint({"sop_uid": f"{B}.0", "study_uid": B, "path": "p", "source_ae": "", "received_at": 50.0})
    assert ingest.queued_in_study(A) == (3, 30.0) and ingest.queued_in_study(B) == (1, 50.0)
    ingest.done(f"{A}.1", A)
    ingest.done(f"{A}.1", A)  # its message delivered again: settles nothing more
    assert ingest.queued_in_study(A) == (2, 20.0)
    store.client.hdel(store.keys.ingest_payload(), f"{A}.2")  # a hint lost (not through done)
    assert ingest.queued_in_study(A) == (1, 10.0)
    assert store.client.zscore(store.keys.ingest_queued(A), f"{A}.2") is None
    ingest.done(f"{A}.0", A)
    assert ingest.queued_in_study(A) == (0, 0.0) and not store.client.exists(store.keys.ingest_queued(A))
    assert ingest.queued_in_study(C) == (0, 0.0) and ingest.queued_in_study(B) == (1, 50.0)


def test_an_instance_received_again_under_another_study_is_waited_for_by_that_study_only(store):
    """A study split or merged at the PACS sends an instance again with another StudyInstanceUID;
    its settling knows the new study only, so the study it left must stop waiting for it now."""
    ingest = store.ingest
    ingest.hint({"sop_uid": f"{A}.0", "study_uid": A, "path": "p", "source_ae": "", "received_at": 10.0})
    ingest.hint({"sop_uid": f"{A}.1", "study_uid": A, "path": "p", "source_ae": "", "received_at": 20.0})
    ingest.hint({"sop_uid": f"{A}.1", "study_uid": B, "path": "p", "source_ae": "", "received_at": 30.0})
    assert ingest.queued_in_study(A) == (1, 10.0) and ingest.queued_in_study(B) == (1, 30.0)
    ingest.hint({"sop_uid": f"{A}.0", "study_uid": A, "path": "p", "source_ae": "", "received_at": 40.0})
    assert ingest.queued_in_study(A) == (1, 40.0)  # received again, same study: waited for from then


def test_a_lost_hint_among_many_is_dropped_when_it_is_the_oldest_or_newest(store):
    """A study's count is its sorted set's size, read in one step whatever the study's size; the
    oldest and newest few members are checked for a lost hint each time it is read."""
    ingest = store.ingest
    for n in range(200):
        ingest.hint({"sop_uid": f"{A}.{n}", "study_uid": A, "path": "p", "source_ae": "", "received_at": 100.0 + n})
    assert ingest.queued_in_study(A) == (200, 299.0)
    store.client.hdel(store.keys.ingest_payload(), f"{A}.0", f"{A}.199")  # lost, not through done
    assert ingest.queued_in_study(A) == (198, 298.0)
    for n in range(1, 199):
        ingest.done(f"{A}.{n}", A)
    assert ingest.queued_in_study(A) == (0, 0.0) and not store.client.exists(store.keys.ingest_queued(A))


def test_the_previous_releases_set_of_queued_instances_is_moved_in(store):
    """An installation upgraded with studies waiting: their instances were kept in a plain set, with
    no reception time; the first look moves them in with their payload's time, and drops the set."""
    ingest = store.ingest
    for n, at in enumerate((10.0, 30.0)):
        store.client.hset(
            store.keys.ingest_payload(),
            f"{A}.{n}",
            json.dumps({"sop_uid": f"{A}.{n}", "study_uid": A, "path": "p", "source_ae": "", "received_at": at}),
        )
    store.client.sadd(store.keys.ingest_queued_before(A), f"{A}.0", f"{A}.1", f"{A}.9")  # .9: settled, no payload
    assert ingest.queued_in_study(A) == (2, 30.0)
    assert not store.client.exists(store.keys.ingest_queued_before(A))
    ingest.done(f"{A}.1", A)
    assert ingest.queued_in_study(A) == (1, 10.0)
