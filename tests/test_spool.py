"""The durable spool and its reconciler (plugin.dicom.spool), without a network or a broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin.dicom.spool import Reconciler, Spool, SpoolError

BAD_UIDS = ["../../etc", "..", "1..2", ".1", "1.", "1.2/3", "1.2.3a", "1.2.3\n", "", "1." * 32 + "1"]


@pytest.mark.parametrize("bad", BAD_UIDS)
def test_spool_path_components_are_checked(tmp_path, bad):
    with pytest.raises(SpoolError):
        Spool(tmp_path).write(bad, "1.2.3", b"x")
    with pytest.raises(SpoolError):
        Spool(tmp_path).write("1.2.3", bad, b"x")
    entry = Spool(tmp_path).write("1.2.3", "1.2.3.4", [b"DI", b"CM"])
    assert Path(entry.path).read_bytes() == b"DICM"


def test_a_uid_with_a_leading_zero_in_a_component_is_taken(tmp_path):
    """Not conformant, but written by older equipment and kept by archives (refused, those studies
    would never be searchable)."""
    entry = Spool(tmp_path).write("1.2.840.0123", "1.2.840.0123.035541", b"DICM")
    assert Path(entry.path).parent.name == "1.2.840.0123" and Path(entry.path).read_bytes() == b"DICM"


# -- the spool reconciler, one function at a time ------------------------------------------------------
def _reconciler(tmp_path, done: set[str], fail: list[bool], **kwargs):
    from plugin.dicom.spool import Spool

    queued: list[str] = []

    def enqueue(entry) -> None:
        if fail and fail[0]:
            raise ConnectionError("broker down")
        queued.append(entry.sop_uid)

    spool = Spool(tmp_path / "spool")
    rec = Reconciler(spool, is_done=lambda entries: {e.sop_uid for e in entries} & done, enqueue=enqueue, **kwargs)
    return spool, rec, queued


def test_reconciler_full_pass_queues_what_is_neither_done_nor_tracked(tmp_path):
    done: set[str] = {"1.2.3.2"}
    spool, rec, queued = _reconciler(tmp_path, done, [])
    for sop in ("1.2.3.1", "1.2.3.2", "1.2.3.3"):
        spool.write("1.2.3", sop, b"x")
    (spool.root / "1.2.3" / ".incoming-x.part").write_bytes(b"half")  # a write in progress: never queued
    assert rec.run_once(full=True) == 2
    assert sorted(queued) == ["1.2.3.1", "1.2.3.3"]
    assert rec.run_once() == 0  # queued recently: not again
    done |= {"1.2.3.1", "1.2.3.3"}
    rec.run_once()
    assert rec.pending == 0


def test_reconciler_retries_failed_queueing_at_once_and_respects_the_grace_of_fresh_files(tmp_path):
    fail = [True]
    spool, rec, queued = _reconciler(tmp_path, set(), fail, grace=3600)
    tracked = spool.write("1.2.4", "1.2.4.1", b"x")
    rec.track(tracked, enqueued=False)  # the handler could not queue it
    rec.full_scan()
    spool.write("1.2.4", "1.2.4.2", b"x")  # a fresh file nobody told us about (its handler may be queueing it)
    rec.full_scan()
    assert rec.run_once() == 0 and rec.pending == 2  # broker still down: kept
    fail[0] = False
    assert rec.run_once() == 1 and queued == ["1.2.4.1"]  # the fresh untracked file waits out its grace


def test_reconciler_requeues_a_queued_file_that_stays_unindexed(tmp_path):
    spool, rec, queued = _reconciler(tmp_path, set(), [], requeue_after=0.0)
    entry = spool.write("1.2.5", "1.2.5.1", b"x")
    rec.track(entry, enqueued=True)
    assert rec.run_once() == 1 and queued == ["1.2.5.1"]


def test_reconciler_does_not_queue_again_what_a_worker_will_take_in_a_backlog(tmp_path):
    """A backlog longer than the requeue period: each file's hint is kept and the queue has messages,
    so a worker will take it; queuing it again made duplicates that grew with the square of the
    backlog (at each pass, and at each start-up). Once nothing would take it (the queue empty), it is
    queued again."""
    coming: set[str] = set()
    spool, rec, queued = _reconciler(tmp_path, set(), [], requeue_after=0.0, coming=lambda es: {
        e.sop_uid for e in es} & coming)  # fmt: skip
    tracked = spool.write("1.2.6", "1.2.6.1", b"x")
    rec.track(tracked, enqueued=True)
    spool.write("1.2.6", "1.2.6.2", b"x")  # found at start-up, its hint kept from before the restart
    coming |= {"1.2.6.1", "1.2.6.2"}
    assert rec.run_once(full=True) == 0 and rec.pending == 2
    assert rec.run_once() == 0
    rec.requeue_soon()  # a worker restarted: its messages come back with the broker, the hints stay
    assert rec.run_once() == 0 and queued == []
    coming.clear()  # the queue is empty (or the hints are gone): nothing would take them
    assert rec.run_once() == 2 and sorted(queued) == ["1.2.6.1", "1.2.6.2"]


def test_a_file_is_coming_while_its_hint_is_kept_and_the_ingest_queue_has_messages(tmp_path, store, redis_server):
    """The reconciler's question asked of a real Redis (``plugin.dicom.scp._coming_checker``): a
    file is coming while its hint waits to be claimed and the ingest queue has messages."""
    from plugin.dicom.scp import _coming_checker
    from plugin.store.keys import Keys
    from tests.helpers.peers import make_settings

    coming = _coming_checker(store, make_settings(tmp_path, redis_server.url))
    spool = Spool(tmp_path / "spool")
    kept, gone = spool.write("1.2.7", "1.2.7.1", b"x"), spool.write("1.2.7", "1.2.7.2", b"x")
    store.ingest.hint({"sop_uid": kept.sop_uid, "study_uid": "1.2.7", "path": str(kept.path), "received_at": 1.0})
    assert coming([kept, gone]) == set()  # no message waiting: nothing would take it
    store.client.lpush(Keys.queue_lists("ingest")[0], b"{}")  # a message of another instance
    assert coming([kept, gone]) == {kept.sop_uid}
    store.ingest.claim(kept.sop_uid, 0, now=2.0, lease_until=60.0, claimer="task-1")  # a batch takes it...
    store.ingest.release([kept.sop_uid])  # ...and fails: only its own message brings it back, if any
    assert coming([kept, gone]) == set()


def test_a_slice_of_a_volume_or_an_image_without_a_model_is_done_for_the_reconciler(tmp_path, store):
    """The reconciler's other question (``plugin.dicom.scp._done_checker``), asked of a real Redis.
    Its settled states lacked the workers' "volume-slice" and "no-model": the slices of every CT or
    MR series were queued again at each start and every 15 minutes, and the worker called them
    duplicates."""
    from plugin.dicom.scp import _done_checker

    spool = Spool(tmp_path / "spool")
    entries = {state: spool.write("1.2.8", f"1.2.8.{n}", b"x") for n, state in enumerate(
        ("indexed", "volume-slice", "no-model", "queued", "volume-slice-old"), start=1)}  # fmt: skip
    for state, entry in entries.items():
        at = entry.received_at - 3600 if state.endswith("-old") else entry.received_at  # an earlier reception
        fields = {"state": state.removesuffix("-old"), "indexed_received_at": repr(at), "study_uid": "1.2.8"}
        store.records.update_instance(entry.sop_uid, fields)
    done = _done_checker(store)(list(entries.values()))
    assert done == {entries[s].sop_uid for s in ("indexed", "volume-slice", "no-model")}
