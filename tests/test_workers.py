"""Celery workers against a real Redis and a real `drh-pacs worker` process (tests/helpers/workers.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from plugin.core.settings import load_settings
from plugin.ops.status import gather
from plugin.search import query as q
from plugin.search.errors import QueryError
from plugin.search.routed import RoutedIndex
from plugin.store import Store
from tests.helpers.dicomgen import fixture_images, make_instance, make_study
from tests.helpers.processes import wait_until
from tests.helpers.workers import NS, active_version, app_for, indexed_count, send, spy_round_trips, worker_env
from workers.app import worker_app
from workers.client import retry_failed


def test_celery_is_configured_for_no_loss_and_no_doubles(redis_server, tmp_path):
    app = worker_app(load_settings(env={}, redis_url=redis_server.url, data_dir=tmp_path))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 3600.0
    assert {q.name for q in conf.task_queues} == {"ingest", "study", "maintenance"}
    assert app.amqp.router.route({}, "drh.index_instance")["queue"].name == "ingest"
    assert app.amqp.router.route({}, "drh.pool_study")["queue"].name == "study"
    assert app.amqp.router.route({}, "drh.reindex_batch")["queue"].name == "maintenance"
    assert {"drh.index_instance", "drh.pool_study", "drh.reindex_plan"} <= set(app.tasks)
    # each queue is bound under its own routing key only: a message goes to exactly one queue
    assert {(q.name, q.exchange.name, q.routing_key) for q in conf.task_queues} == {
        (n, n, n) for n in ("ingest", "study", "maintenance")
    }


def test_worker_modules_do_not_import_torch():
    code = "import sys, workers.client, workers.app, workers.tasks; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_enqueue_raises_when_the_broker_is_down(tmp_path):
    from plugin.core.redis_server import free_port
    from workers.client import EnqueueError, enqueue_instance

    app = app_for(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    t0 = time.monotonic()
    with pytest.raises(EnqueueError):
        enqueue_instance(app, sop_uid="1.2.3", study_uid="1.2", path="/x.dcm", source_ae="A", received_at=1.0)
    assert time.monotonic() - t0 < 20


def test_a_retry_the_broker_refuses_leaves_the_instance_failed_not_retrying(redis_server, store, tmp_path):
    """Marked retrying, then not queued: it would say "retrying" for ever with nothing on its way (and
    the spool reconciler leaves ledger entries to IT staff)."""
    from plugin.core.redis_server import free_port
    from workers.client import EnqueueError

    payload = {"sop_uid": "1.2.3.1", "study_uid": "1.2.3", "path": "/x.dcm", "source_ae": "A", "received_at": 1.0}
    store.ledger.record(payload, "decode: truncated pixel data")
    store.records.update_instance("1.2.3.1", {"state": "failed"})
    app = app_for(redis_server.url, tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(EnqueueError):
        retry_failed(app, "1.2.3.1")
    assert store.ledger.get("1.2.3.1")["state"] == "failed" and "retried_at" not in store.ledger.get("1.2.3.1")
    assert store.records.instance("1.2.3.1")["state"] == "failed"


def test_retry_policy_is_declared_on_the_tasks(redis_server, tmp_path):
    from celery.utils.time import get_exponential_backoff_interval

    from workers.batching import TransientError
    from workers.model import ModelUnavailable

    settings = load_settings(env={}, redis_url=redis_server.url, data_dir=tmp_path, task_max_retries=5)
    app = worker_app(settings)
    for name in ("drh.index_instance", "drh.pool_study", "drh.reindex_batch"):
        task = app.tasks[name]
        assert {TransientError, ModelUnavailable, redis.exceptions.ConnectionError} <= set(task.autoretry_for), name
        assert (task.retry_backoff, task.retry_backoff_max, task.retry_jitter) == (5, 600, True), name
        assert task.max_retries == 5, name
    # what Celery computes from it: 5 s doubling, capped at 10 minutes (before the jitter)
    delays = [get_exponential_backoff_interval(5, n, 600, full_jitter=False) for n in (0, 3, 30)]
    assert delays == [5, 40, 600]


def test_a_device_failure_while_encoding_is_retried_not_recorded_as_the_images_own():
    """A GPU out of memory (or a CUDA error) fails the batch, not its images: retried with back-off,
    and transient (retryable) if it lasts, where it was an "internal error" of every image taken."""
    import torch

    from workers.batching import DeviceError, Item, device_failure, encode_items
    from workers.tasks import RETRY_ON

    class OutOfMemory:  # the model's forward pass on a GPU that ran out of memory
        def encode_images(self, images, batch_size):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    item = Item("1.2.3.1", "1.2.3", "/x.dcm", "", 0.0)
    item.pixels = np.zeros((8, 8), np.uint8)
    with pytest.raises(DeviceError, match="the model's device failed: OutOfMemoryError") as err:
        encode_items(OutOfMemory(), [item], 16)
    assert isinstance(err.value, RETRY_ON)
    assert device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert device_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert not device_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not device_failure(ValueError("CUDA"))


def test_a_stop_asked_during_the_device_check_is_honoured(monkeypatch):
    """serve SIGTERMs its workers when it dies; a worker still checking its device (seconds: torch,
    a GPU probe) must stop, not go on to take tasks as an orphan. The check is replaced here by one
    that is interrupted by SIGTERM, then succeeds."""
    import os
    import signal
    import threading
    from types import SimpleNamespace

    import workers.app as worker_main
    from workers.device import DeviceCheck

    def interrupted(requested: str) -> DeviceCheck:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in this (main) thread between bytecodes
        return DeviceCheck(requested, "cpu", True, "cpu")

    before = signal.getsignal(signal.SIGTERM)
    record = {"state": "starting"}
    settings = SimpleNamespace(device="cpu")
    monkeypatch.setattr(worker_main, "check_device", interrupted)
    assert worker_main._wait_for_device(settings, record, threading.Event()) is None
    assert signal.getsignal(signal.SIGTERM) is before  # its own handler is gone again
    monkeypatch.setattr(worker_main, "check_device", lambda requested: DeviceCheck(requested, "cpu", True, "cpu"))
    assert worker_main._wait_for_device(settings, record, threading.Event()).ok


def test_claim_takes_the_oldest_pending_and_respects_live_claims(store):
    for n in range(5):
        store.ingest.hint({"sop_uid": f"1.{n}", "study_uid": "1", "path": "p", "source_ae": "", "received_at": n})
    now = time.time()
    claim = store.ingest.claim("1.3", 2, now, now + 60, "task-a")
    assert claim.busy_until is None and [p["sop_uid"] for p in claim.payloads] == ["1.3", "1.0", "1.1"]
    assert store.ingest.pending_count() == 2
    # 1.0 is claimed by a live batch: its own message must wait, not hash it a second time
    claim = store.ingest.claim("1.0", 2, now, now + 60, "task-b")
    assert claim.busy_until == pytest.approx(now + 60)
    # ...unless it is task-a's own message delivered again after its worker died
    assert store.ingest.claim("1.3", 0, now, now + 60, "task-a").busy_until is None
    # once the lease has run out (the claiming worker died), the instance can be claimed again
    assert store.ingest.claim("1.0", 0, now + 61, now + 121, "task-b").busy_until is None


def test_an_indexed_batch_is_recorded_in_one_transaction(store, tmp_path, monkeypatch):
    """The batch's states, the end of their pending hints and their counts go to Redis in one MULTI:
    a status page that shows an instance indexed also counts it (a reader once saw the state of the
    second image of a batch before its count). Without ``keep_files`` the spool files go once it is
    recorded."""
    from workers.batching import Item, mark_indexed

    items = []
    for n in range(2):
        path = tmp_path / f"1.2.{n}.dcm"
        path.write_bytes(b"spooled")
        payload = {"sop_uid": f"1.2.{n}", "study_uid": "1.2", "path": str(path), "received_at": 1000.0 + n}
        store.ingest.hint(payload)
        items.append(Item.from_payload(payload))
    sent = spy_round_trips(monkeypatch)
    mark_indexed(store, load_settings(env={}, data_dir=tmp_path, keep_files=False), "m1", items)
    monkeypatch.undo()
    # The latency histogram (HINCRBYFLOAT of its sum) is a metric of its own, written after.
    writes = [(tx, cmds) for tx, cmds in sent if "HSET" in cmds or ("HINCRBY" in cmds and "HINCRBYFLOAT" not in cmds)]
    assert len(writes) == 1 and writes[0][0], sent
    assert writes[0][1].count("HSET") == 2 and writes[0][1].count("HINCRBY") == 4
    figures = gather(store)
    assert figures["by_modality"]["(unread)"]["indexed"] == 2 and store.ingest.pending_count() == 0
    assert all(store.records.instance(it.sop_uid)["state"] == "indexed" for it in items)
    assert not any(Path(it.path).exists() for it in items)


@pytest.mark.slow
def test_a_study_is_indexed_once_pooled_and_a_late_instance_recomputes(
    redis_server, redis_client, worker_factory, tmp_path
):
    worker_factory()
    app = app_for(redis_server.url, tmp_path / "data")
    images = fixture_images("normal")
    study = make_study(tmp_path / "in", images[:3])
    t0 = time.time()
    send(app, study, received_at=t0)
    send(app, study, received_at=t0)  # the PACS sends it all again: nothing doubles
    wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 3, 90, what="3 instances indexed")
    store = Store(redis_client, NS)
    version = active_version(redis_client)
    assert version
    assert store.codes.count(version, "image") == 3
    meta = store.records.study(study.study_uid)
    assert meta["modalities"] == "DX" and meta["n_instances"] == "3" and meta["source_ae"] == "MODALITY1"
    assert meta["patient_id"] == "TEST001"
    wait_until(lambda: store.codes.get(version, "study", study.study_uid), 30, what="study code")
    wait_until(lambda: store.records.study(study.study_uid).get(f"pooled_n:{version}") == "3", 30, what="pooled over 3")
    first = store.codes.get(version, "study", study.study_uid)

    # a late instance (other image, same study) recomputes the study code from 4 embeddings
    late = make_instance(
        images[3],
        study_uid=study.study_uid,
        series_uid=generate_uid(),
        modality="CR",
        instance_number=4,
    )
    late_path = tmp_path / "in" / study.study_uid / f"{late.SOPInstanceUID}.dcm"
    late.save_as(late_path, enforce_file_format=True)
    study.files.append(late_path)
    study.sop_uids.append(late.SOPInstanceUID)
    send(app, study, indices={3})
    wait_until(
        lambda: store.records.study(study.study_uid).get(f"pooled_n:{version}") == "4", 60, what="re-pooled over 4"
    )
    assert store.codes.count(version, "image") == 4 and store.codes.count(version, "study") == 1
    assert store.records.study(study.study_uid)["modalities"] == "CR,DX"
    emb = store.embeddings.get_many(version, study.sop_uids)
    assert len(emb) == 4 and all(np.isfinite(e).all() for e in emb.values())
    # the code is the encoder's pooling of exactly those embeddings
    from hashing.encoder import Encoder

    enc = Encoder.load(None, device="cpu")
    bag = np.stack([emb[s] for s in sorted(emb)])
    assert store.codes.get(version, "study", study.study_uid) == bytes(enc.encode_study(bag)[0])
    # each image's query variants are stored beside its embedding: the encoder's, for its pixels
    from hashing.bits import rerank_similarity
    from hashing.preprocess import load_pixels, read_dataset

    stored = store.embeddings.variants_of(version, study.sop_uids, enc.rerank_dim)
    assert stored.shape == (4, enc.n_variants, enc.rerank_dim) and enc.n_variants == 27
    mine = enc.encode_images([load_pixels(read_dataset(f)) for f in study.files]).variants
    for theirs, ours in zip(stored, mine, strict=True):
        assert min(rerank_similarity(v, w[None])[0] for v, w in zip(theirs, ours, strict=True)) > 0.999
    assert first is not None
    assert store.stats.tasks()["index_instance"]["done"] == 4
    assert store.stats.latency()["count"] == 4


@pytest.mark.slow
def test_a_study_waits_for_its_queued_instances_before_it_is_pooled(
    redis_server, redis_client, worker_factory, tmp_path
):
    """A study stable by the clock (1 s here) with an instance still queued for the model (received,
    its message behind others in the broker) is not pooled from part of it: once that instance is
    indexed, it is pooled over both, once. An instance whose message was lost holds its study back
    only ``study_queue_wait_seconds`` after its reception; then the study is pooled without it, and
    that is counted."""
    worker_factory(DRH_BATCH_SIZE="1", DRH_STUDY_QUEUE_WAIT_SECONDS="90")  # batches would take the queued one
    app = app_for(redis_server.url, tmp_path / "data")
    store = Store(redis_client, NS)
    images = fixture_images("normal")
    study, lost = make_study(tmp_path / "in", images[:2]), make_study(tmp_path / "lost", images[2:4])
    now = time.time()

    def received(s, n: int, at: float) -> None:  # noqa: ANN001 (a generated study)
        """The listener's hint, its message not yet taken."""
        payload = {"sop_uid": s.sop_uids[n], "study_uid": s.study_uid, "path": str(s.files[n]), "received_at": at}
        store.ingest.hint({**payload, "source_ae": "MODALITY1"})

    received(study, 1, now)
    received(lost, 1, now - 30)  # never delivered: 60 s of the wait left (the first task loads the model)
    send(app, study, indices={0}, received_at=now)
    send(app, lost, indices={0}, received_at=now)
    wait_until(lambda: indexed_count(redis_client, [study.sop_uids[0], lost.sop_uids[0]]) == 2, 90, what="indexed")
    version = active_version(redis_client)
    wait_until(lambda: store.stats.tasks()["pool_study"]["waiting"] >= 4, 30, what="pooling waiting")
    assert store.codes.get(version, "study", study.study_uid) is None
    assert store.codes.get(version, "study", lost.study_uid) is None
    assert time.time() < now + 60  # (what was checked is meaningful only before the lost one's wait ends)
    send(app, study, indices={1}, received_at=now)
    wait_until(lambda: store.records.study(study.study_uid).get(f"pooled_n:{version}") == "2", 60, what="pooled")
    wait_until(lambda: store.records.study(lost.study_uid).get(f"pooled_n:{version}") == "1", 120, what="given up")
    assert time.time() >= now + 60
    # the task counts its outcome just after it writes the study's code
    wait_until(lambda: store.stats.tasks()["pool_study"]["done"] >= 2, 30, what="both poolings counted")
    tasks = store.stats.tasks()["pool_study"]
    assert (tasks["done"], tasks["without-queued"]) == (2, 1), tasks  # each study pooled once
    assert store.ingest.queued_in_study(study.study_uid) == (0, 0.0)


def _sr_dataset(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "TEST001"
    return ds


@pytest.mark.slow
def test_non_image_is_ignored_and_a_corrupt_file_is_a_retryable_failure(
    redis_server, redis_client, worker_factory, tmp_path
):
    worker_factory()
    app = app_for(redis_server.url, tmp_path / "data")
    study = make_study(tmp_path / "in", fixture_images("viral")[:1])
    good = study.files[0].read_bytes()
    sr = _sr_dataset(study.study_uid)
    sr_path = tmp_path / "in" / study.study_uid / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    study.files[0].write_bytes(good[: len(good) // 3])  # truncated mid pixel data
    study.files.append(sr_path)
    study.sop_uids.append(sr.SOPInstanceUID)
    send(app, study)
    ledger = Store(redis_client, NS).ledger
    entry = wait_until(lambda: ledger.get(study.sop_uids[0]), 90, what="failure recorded")
    assert entry["kind"] == "permanent" and entry["count"] == 1 and entry["reason"]
    assert "TEST001" not in entry["reason"] and "Test^Patient" not in entry["reason"]
    store = Store(redis_client, NS)
    wait_until(lambda: store.records.instance(sr.SOPInstanceUID).get("state") == "ignored", 30, what="SR ignored")
    assert ledger.get(sr.SOPInstanceUID) is None and ledger.ignored_count() == 1
    assert gather(store)["by_modality"]["SR"]["ignored"] == 1  # counted as soon as it shows ignored
    assert store.records.instance(study.sop_uids[0])["state"] == "failed"
    # asked for similar studies, the study and its image say they were received, not "unknown"
    indexes = {level: RoutedIndex(store, level) for level in ("study", "image")}
    for level, uid, told in (
        ("STUDY", study.study_uid, "reference study received, none indexed: 1 failed, 1 non-image"),
        ("IMAGE", study.sop_uids[0], "reference instance received but its indexing failed"),
    ):
        with pytest.raises(QueryError) as refused:
            q.run_similar(q.SimilarQuery(level, uid, 10), store, indexes)
        assert refused.value.reason == "not-indexable" and refused.value.comment == told and len(told) <= 64

    # IT staff fix the file and retry: indexed, and the ledger entry is gone
    study.files[0].write_bytes(good)
    assert retry_failed(app, study.sop_uids[0])
    wait_until(lambda: indexed_count(redis_client, study.sop_uids[:1]) == 1, 60, what="indexed after retry")
    assert ledger.get(study.sop_uids[0]) is None and ledger.count() == 0


def _health(env: dict[str, str], hostname: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plugin.cli", "worker", "--health", "--hostname", hostname],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_a_healthy_worker_passes_its_health_check(redis_server, redis_client, worker_factory):
    worker = worker_factory("healthy")
    wait_until(
        lambda: Store(redis_client, NS).workers.heartbeats().get(next(iter(_names(redis_client, "healthy@"))), {})
        .get("state") == "online",
        60,
        what="the worker online",
    )  # fmt: skip
    check = _health(worker.env, "healthy@%h")
    assert check.returncode == 0, check.stderr
    assert "online, consuming ingest,study,maintenance on cpu" in check.stdout
    assert _health(worker.env, "nobody@%h").returncode == 1


def _names(client: redis.Redis, prefix: str) -> list[str]:
    return [h for h in Store(client, NS).workers.heartbeats() if h.startswith(prefix)]


@pytest.mark.slow
def test_a_worker_that_cannot_use_its_device_takes_no_task_and_says_why(
    redis_server, redis_client, worker_factory, tmp_path
):
    from plugin.ops.status import gather
    from plugin.store.broker import queue_depth

    app = app_for(redis_server.url, tmp_path / "data")
    send(app, make_study(tmp_path / "in", fixture_images("normal")[:1]))
    # a GPU that is not there (on a CPU machine: no CUDA at all; on a GPU machine: no 100th GPU)
    worker = worker_factory("nogpu", DRH_DEVICE="cuda:99")
    store = Store(redis_client, NS)

    def heartbeat() -> dict:
        return next((w for h, w in store.workers.heartbeats().items() if h.startswith("nogpu@")), {})

    wait_until(lambda: heartbeat().get("state") == "refused", 120, what="the worker to refuse its device")
    assert "device cuda:99 unusable" in heartbeat()["reason"]
    (listed,) = [w for w in gather(store)["workers"] if w["hostname"].startswith("nogpu@")]
    assert listed["state"] == "refused" and "unusable" in listed["reason"]
    assert queue_depth(redis_client, "ingest") == 1  # the instance waits for a worker that can hash it
    assert worker.proc.poll() is None  # it stays, checking its device again, visible as refusing
    assert "takes no task" in worker.log()
    check = _health(worker.env, "nogpu@%h")  # what a container or systemd health check runs
    assert check.returncode == 1 and "refused" in check.stderr and "unusable" in check.stderr

    worker.stop()
    assert worker.proc.returncode == 3
    assert heartbeat()["state"] == "stopped"  # marked, not vanished


@pytest.mark.slow
def test_transient_errors_are_retried_with_backoff_then_recorded(redis_server, redis_client, worker_factory, tmp_path):
    from plugin.core.redis_server import free_port

    # The file is not on this worker and the API it should come from does not answer: transient.
    worker_factory(DRH_API_URL=f"http://127.0.0.1:{free_port()}", DRH_API_TOKEN="t", DRH_TASK_MAX_RETRIES="1")
    app = app_for(redis_server.url, tmp_path / "data")
    study = make_study(tmp_path / "in", fixture_images("bacterial")[:1])
    study.files[0] = tmp_path / "elsewhere" / "x.dcm"
    send(app, study)
    store = Store(redis_client, NS)
    entry = wait_until(lambda: store.ledger.get(study.sop_uids[0]), 60, what="failure after retries")
    assert entry["kind"] == "transient" and "after 1 retries" in entry["reason"]

    # The worker writes the ledger entry, then the instance's state, then the counters: separate
    # writes, so the counters may trail the entry by a moment.
    def counted() -> dict | None:
        stats = store.stats.tasks()["index_instance"]
        return stats if stats["failed"] >= 1 else None

    stats = wait_until(counted, 10, what="the failure counted")
    assert stats["retried"] == 1 and stats["failed"] == 1


@pytest.mark.slow
def test_remote_worker_fetches_the_file_over_the_api(redis_server, redis_client, worker_factory, tmp_path, port):
    import threading

    import uvicorn

    from plugin.http.app import ApiContext, create_app

    data = tmp_path / "plugin-data"
    settings = load_settings(env={}, redis_url=redis_server.url, data_dir=data, api_token="s3cret")
    study = make_study(settings.spool_dir, fixture_images("normal")[:2])
    ctx = ApiContext(settings=settings, store=Store(redis_client, NS))
    api = create_app(ctx)
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 15, what="API up")
        # the worker's data dir is elsewhere: the spool paths do not exist on "its machine"
        worker_factory(DRH_API_URL=f"http://127.0.0.1:{port}", DRH_API_TOKEN="s3cret")
        app = app_for(redis_server.url, tmp_path / "data")
        remote = [Path("/nonexistent-on-worker") / p.name for p in study.files]
        study.files = remote
        send(app, study)
        wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 2, 90, what="indexed via the API")
    finally:
        server.should_exit = True
        thread.join(10)


def _indexed_normal_study(app, redis_client, tmp_path: Path, what: str):  # noqa: ANN001, ANN202
    """Two normal films sent as one study and indexed by the running worker: (study, store, the
    version answering)."""
    study = make_study(tmp_path / "in", fixture_images("normal")[:2])
    send(app, study)
    wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 2, 90, what=what)
    return study, Store(redis_client, NS), active_version(redis_client)


def _chest_model_v2(path: Path) -> Path:
    """A small seeded model "test-v2" for the chest route, saved at ``path``: what a re-index moves to."""
    import torch

    from hashing import checkpoint
    from hashing.dmih import dmih_tiny
    from hashing.drh import drh_tiny
    from hashing.route import Route

    torch.manual_seed(7)
    route = Route("chest-xr", modalities=("CR", "DX"), body_parts=("CHEST",))
    checkpoint.save(
        checkpoint.model_checkpoint(
            version="test-v2", drh=drh_tiny(32), dmih=dmih_tiny(32), input_size=48, mean=0.5, std=0.25, route=route
        ),
        path,
    )
    return path


@pytest.mark.slow
def test_reindex_builds_a_new_version_in_the_background_then_switches(
    redis_server, redis_client, worker_factory, tmp_path
):

    holds = tmp_path / "holds"
    holds.mkdir()
    hold = holds / "reindex_batch.hold"
    # re-indexing on one worker (held mid-way by the test), ingest on another, as on two machines
    worker_factory("maint", DRH_FAULT_HOLD_DIR=str(holds), DRH_WORKER_QUEUES="maintenance")
    worker_factory("ingest", DRH_WORKER_QUEUES="ingest,study")
    data = tmp_path / "data"
    app = app_for(redis_server.url, data)
    first, store, old = _indexed_normal_study(app, redis_client, tmp_path, "first study indexed")
    wait_until(lambda: store.codes.get(old, "study", first.study_uid), 30, what="first study pooled")

    ckpt = _chest_model_v2(tmp_path / "v2.pt")  # replaces the chest model
    hold.write_text("")
    env = worker_env(redis_server.url, data)
    out = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "reindex", str(ckpt)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "test-v2 queued" in out.stdout and old in out.stdout
    wait_until(lambda: (holds / "reindex_batch.reached").exists(), 60, what="re-index running")
    # while it runs the old version answers, and a new arrival is written for both versions
    assert active_version(redis_client) == old and store.models.info("test-v2").state == "building"
    late = make_study(tmp_path / "in", fixture_images("viral")[:1])
    send(app, late)
    wait_until(lambda: indexed_count(redis_client, late.sop_uids) == 1, 60, what="new arrival indexed")
    assert store.codes.get("test-v2", "image", late.sop_uids[0]) is not None
    assert store.codes.get(old, "image", late.sop_uids[0]) is not None
    assert active_version(redis_client) == old
    hold.unlink()

    wait_until(lambda: active_version(redis_client) == "test-v2", 90, what="switch to the new version")
    job = store.reindex.get()
    assert job["state"] == "complete" and job["previous"] == old and job["failed"] == "0"
    assert store.models.info("test-v2").state == "complete"
    assert store.codes.count("test-v2", "image") == 3 and store.codes.count(old, "image") == 3
    wait_until(lambda: store.codes.count("test-v2", "study") == 2, 30, what="both studies pooled with test-v2")
    assert len(store.codes.get("test-v2", "image", first.sop_uids[0])) == 4  # 32 bits
    status = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "reindex", "--status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "complete, 2/2 instances" in status.stdout, status.stdout
    # after the switch, arrivals are hashed with the new model only
    after = make_study(tmp_path / "in", fixture_images("bacterial")[:1])
    send(app, after)
    wait_until(lambda: indexed_count(redis_client, after.sop_uids) == 1, 60, what="indexed after the switch")
    assert store.codes.get("test-v2", "image", after.sop_uids[0]) is not None
    assert store.codes.get(old, "image", after.sop_uids[0]) is None


@pytest.mark.slow
def test_an_unexpected_error_is_recorded_not_lost(redis_server, redis_client, worker_factory, tmp_path):
    # A misconfiguration the code cannot anticipate: the model's version is already registered in
    # Redis with another code length, so every write is refused by the store.
    store = Store(redis_client, NS)
    store.models.register("drh-random-v0", 32)
    store.models.activate("drh-random-v0")
    worker_factory()
    app = app_for(redis_server.url, tmp_path / "data")
    study = make_study(tmp_path / "in", fixture_images("normal")[:1])
    send(app, study)
    entry = wait_until(lambda: store.ledger.get(study.sop_uids[0]), 60, what="failure recorded")
    assert entry["kind"] == "error" and "StoreError" in entry["reason"] and "32 bits" in entry["reason"]
    assert store.records.instance(study.sop_uids[0])["state"] == "failed"


@pytest.mark.slow
def test_workers_write_the_active_version_whatever_their_configured_model(
    redis_server, redis_client, worker_factory, tmp_path
):
    """DRH_MODEL_PATH only seeds an empty installation; changing models goes through reindex."""
    import torch

    from hashing import checkpoint
    from hashing.dmih import dmih_tiny
    from hashing.drh import drh_tiny

    torch.manual_seed(1)
    ckpt = tmp_path / "other.pt"
    checkpoint.save(
        checkpoint.model_checkpoint(
            version="other-v1", drh=drh_tiny(32), dmih=dmih_tiny(32), input_size=48, mean=0.5, std=0.25
        ),
        ckpt,
    )
    app = app_for(redis_server.url, tmp_path / "data")
    first = make_study(tmp_path / "in", fixture_images("normal")[:1])
    worker_factory("configured", DRH_MODEL_PATH=str(ckpt), DRH_EXTRA_MODELS="")
    send(app, first)
    wait_until(lambda: indexed_count(redis_client, first.sop_uids) == 1, 60, what="first instance")
    store = Store(redis_client, NS)
    assert active_version(redis_client) == "other-v1"  # an empty installation takes the configured model
    assert len(store.codes.get("other-v1", "image", first.sop_uids[0])) == 4
    # a second worker configured with the shipped model still writes other-v1 codes
    assert store.models.details("other-v1")["path"] == str(ckpt)
    worker_factory("shipped", DRH_EXTRA_MODELS="")
    second = make_study(tmp_path / "in", fixture_images("viral")[:2])
    send(app, second)
    wait_until(lambda: indexed_count(redis_client, second.sop_uids) == 2, 60, what="second study")
    assert active_version(redis_client) == "other-v1" and store.codes.count("other-v1", "image") == 3
    assert store.models.versions() == ["other-v1"]


@pytest.mark.slow
def test_after_a_package_upgrade_the_previous_default_keeps_indexing_until_the_reindex(
    redis_server, redis_client, worker_factory, tmp_path
):
    """An installation answering with v3, registered as "the shipped default", upgrades the package,
    whose default is now v6. New chest films are still written for v3 (from the v3 the package ships
    by name), so the answering version does not miss them before `drh-pacs reindex --shipped` switches."""
    from hashing.encoder import Encoder
    from hashing.preprocess import load_pixels, read_dataset

    store = Store(redis_client, NS)
    old = Encoder.load("shipped:drh64-cxr-pneumonia-v3", device="cpu")
    assert old.version == "drh64-cxr-pneumonia-v3" and Encoder.load(None, device="cpu").version != old.version
    store.models.register(old.version, old.nbits, rerank_dim=old.rerank_dim, route=old.route, path="")
    store.models.activate(old.version)
    worker_factory(DRH_EXTRA_MODELS="")
    app = app_for(redis_server.url, tmp_path / "data")
    study = make_study(tmp_path / "in", fixture_images("normal")[:1])
    send(app, study)
    wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 1, 90, what="the new film indexed")
    assert store.models.active_routes()["chest-xr"] == old.version
    expected = old.encode_images([load_pixels(read_dataset(study.files[0]))]).codes[0]
    assert store.codes.get(old.version, "image", study.sop_uids[0]) == bytes(expected)


@pytest.mark.slow
def test_a_reindex_that_cannot_read_its_images_does_not_switch(redis_server, redis_client, worker_factory, tmp_path):
    """Every kept file is gone: the new version would answer without the archive. The job fails with
    the reason, the old version keeps answering, `reindex --wait` ends with an error, and each
    instance is in the failure ledger with its reason."""

    worker_factory(DRH_EXTRA_MODELS="")
    data = tmp_path / "data"
    app = app_for(redis_server.url, data)
    study, store, old = _indexed_normal_study(app, redis_client, tmp_path, "study indexed")
    for sop in study.sop_uids:  # the kept files are lost (a disk replaced, a wrong data_dir)
        Path(store.records.instance(sop)["path"]).unlink()
    ckpt = _chest_model_v2(tmp_path / "v2.pt")
    env = worker_env(redis_server.url, data)
    out = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "reindex", str(ckpt), "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "failed, 0/2 instances, 2 failed" in out.stdout and f"{old} keeps answering" in out.stdout, out.stdout
    assert active_version(redis_client) == old and store.models.info("test-v2").state == "building"
    # Each instance is in the failure ledger with its reason (what `drh-pacs failures` lists).
    listed = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "failures"], env=env, capture_output=True, text=True, timeout=60
    )
    for sop in study.sop_uids:
        entry = store.ledger.get(sop)
        assert entry is not None and entry["reason"].startswith("re-index to test-v2: "), entry
        assert entry["study_uid"] == study.study_uid and sop in listed.stdout, listed.stdout
