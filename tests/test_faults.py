"""Faults with real processes: workers killed mid-task, Redis stopped during ingest, an SCP restarted
with files in its spool. Each test waits on conditions with deadlines.

Killing "mid-task" at a known point uses the workers' fault hold (``Settings.fault_hold_dir``): the
task pauses while ``<stage>.hold`` exists and writes ``<stage>.reached`` with its pid, so the test
kills it exactly there instead of guessing with a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import redis

from plugin.core.redis_server import EmbeddedRedis, free_port
from plugin.store import Store
from plugin.store.broker import in_flight
from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.processes import DCMTK, stop_process_group, wait_until
from tests.helpers.workers import NS, active_version, app_for, indexed_count, send

pytestmark = pytest.mark.slow  # real DICOM peers, Orthanc, workers or deployment tools


def _hold(folder: Path, stage: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hold = folder / f"{stage}.hold"
    hold.write_text("")
    return hold


@pytest.mark.parametrize("stage", ["before_write", "after_write"])
def test_pool_process_killed_mid_task_is_indexed_once(redis_server, redis_client, worker_factory, tmp_path, stage):
    holds = tmp_path / "holds"
    hold = _hold(holds, stage)
    w = worker_factory(DRH_FAULT_HOLD_DIR=str(holds), DRH_BATCH_CLAIM_SECONDS="2")
    app = app_for(redis_server.url, tmp_path / "data")
    study = make_study(tmp_path / "in", fixture_images("normal")[:2])
    send(app, study)
    reached = wait_until(lambda: (holds / f"{stage}.reached").exists() and holds / f"{stage}.reached", 60, what=stage)
    pid = int(reached.read_text())
    assert pid in w.pool_pids()
    reached.unlink()
    os.kill(pid, signal.SIGKILL)  # the OOM killer, a segfault in a decoder...
    wait_until(lambda: pid not in w.pool_pids() and w.pool_pids(), 30, what="pool process replaced")
    hold.unlink()
    wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 2, 90, what="indexed after the kill")
    store = Store(redis_client, NS)
    version = active_version(redis_client)
    assert store.codes.count(version, "image") == 2
    assert sorted(store.codes.slots_of(version, "image", study.sop_uids)) == [0, 1]
    assert Store(redis_client, NS).ledger.count() == 0
    wait_until(lambda: store.codes.get(version, "study", study.study_uid), 30, what="study pooled")
    assert store.codes.count(version, "study") == 1
    assert "WorkerLostError" in w.log() or "SIGKILL" in w.log()


def test_whole_worker_killed_mid_task_is_redelivered_to_another(redis_server, redis_client, worker_factory, tmp_path):
    holds = tmp_path / "holds"
    hold = _hold(holds, "before_write")
    # A short visibility timeout stands for "the machine is gone": its unacknowledged message goes
    # to the next worker once the timeout has passed.
    first = worker_factory("first", DRH_FAULT_HOLD_DIR=str(holds), DRH_TASK_VISIBILITY_TIMEOUT="3")
    app = app_for(redis_server.url, tmp_path / "data", task_visibility_timeout=3.0)
    study = make_study(tmp_path / "in", fixture_images("viral")[:1])
    send(app, study)
    wait_until(lambda: (holds / "before_write.reached").exists(), 60, what="task mid-way")
    first.kill()
    hold.unlink()
    killed_at = time.monotonic()
    assert in_flight(redis_client) >= 1  # the message is still the broker's, not lost
    wait_until(lambda: time.monotonic() - killed_at > 3.5, 10, what="visibility timeout")
    worker_factory("second", DRH_TASK_VISIBILITY_TIMEOUT="3")
    wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 1, 90, what="indexed by the second worker")
    store = Store(redis_client, NS)
    assert store.codes.count(active_version(redis_client), "image") == 1


# -- the SCP side: `drh-pacs serve` as a real process, Redis that we stop and restart ------------


class Serve:
    """`drh-pacs serve` (SCP, API and one worker) against an external Redis, in its own session."""

    def __init__(self, tmp_path: Path, redis_url: str, name: str) -> None:
        self.log = tmp_path / f"{name}.log"
        self.dicom_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRH_")}
        env.update(
            DRH_DATA_DIR=str(tmp_path / "data"),
            DRH_REDIS_URL=redis_url,
            DRH_DICOM_PORT=str(self.dicom_port),
            DRH_HTTP_PORT=str(free_port()),
            DRH_STUDY_STABLE_SECONDS="1",
            DRH_API_TOKEN="t",
            DRH_DEVICE="cpu",
            DRH_SERVE_WORKERS="1",
            OMP_NUM_THREADS="1",
        )
        out = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plugin.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

        def ready() -> bool:
            assert self.proc.poll() is None, f"serve exited early:\n{self.log.read_text()}"
            return "ready" in self.log.read_text()

        wait_until(ready, 90, what="drh-pacs serve ready")

    def kill(self) -> None:
        """SIGKILL the serve process and its workers: a crash or a power cut of the host."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process_group(self.proc, signal.SIGINT, 90)
        print(f"--- {self.log.name} ---\n{self.log.read_text()[-6000:]}")


def storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK / "storescu"), "-aet", "TESTPACS", "-aec", "DRHPACS", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def outside_redis(tmp_path):
    """A Redis we can stop and start again on the same port with the same data (AOF on)."""
    servers: list[EmbeddedRedis] = []

    def start(port: int | None = None) -> EmbeddedRedis:
        server = EmbeddedRedis(tmp_path / "redis", port=port).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def _spooled(data: Path, study) -> list[Path]:
    return [data / "spool" / study.study_uid / f"{sop}.dcm" for sop in study.sop_uids]


def test_redis_stopped_during_ingest_files_kept_and_indexed_when_it_returns(outside_redis, tmp_path):
    r1 = outside_redis()
    serve = Serve(tmp_path, r1.url, "serve")
    try:
        study = make_study(tmp_path / "in", fixture_images("normal")[:3])
        r1.stop()
        sent = storescu(serve.dicom_port, study.files)
        # the SCP answered success: every file is on the durable spool, byte for byte
        assert sent.returncode == 0, sent.stderr
        for original, spooled in zip(study.files, _spooled(tmp_path / "data", study), strict=True):
            assert spooled.exists()
            assert pydicom.dcmread(spooled).SOPInstanceUID == pydicom.dcmread(original).SOPInstanceUID
        r2 = outside_redis(port=r1.port)
        client = redis.Redis.from_url(r2.url)
        wait_until(lambda: indexed_count(client, study.sop_uids) == 3, 150, what="indexed after Redis returned")
        store = Store(client, NS)
        assert store.codes.count(active_version(client), "image") == 3
        assert store.records.study(study.study_uid)["n_instances"] == "3"
    finally:
        serve.stop()


def test_scp_restarted_with_files_in_its_spool_reconciles_them(outside_redis, tmp_path):
    r1 = outside_redis()
    first = Serve(tmp_path, r1.url, "serve-1")
    study = make_study(tmp_path / "in", fixture_images("viral")[:2])
    try:
        r1.stop()
        assert storescu(first.dicom_port, study.files).returncode == 0
        assert all(p.exists() for p in _spooled(tmp_path / "data", study))
    finally:
        first.kill()  # the host crashes: nothing was queued, the files are all there is
        print(f"--- {first.log.name} ---\n{first.log.read_text()[-3000:]}")
    r2 = outside_redis(port=r1.port)
    client = redis.Redis.from_url(r2.url)
    assert indexed_count(client, study.sop_uids) == 0
    second = Serve(tmp_path, r2.url, "serve-2")
    try:
        wait_until(lambda: indexed_count(client, study.sop_uids) == 2, 90, what="spool reconciled at start")
        assert Store(client, NS).codes.count(active_version(client), "image") == 2
    finally:
        second.stop()


def test_a_file_whose_decoding_kills_the_worker_is_failed_not_redelivered_for_ever(
    redis_server, redis_client, worker_factory, tmp_path
):
    """A codec that crashes the process on one file must not crash workers for ever: after
    MAX_DECODE_CRASHES deaths while decoding it, the instance is a permanent failure."""
    from workers.batching import MAX_DECODE_CRASHES

    w = worker_factory(DRH_BATCH_CLAIM_SECONDS="2")
    app = app_for(redis_server.url, tmp_path / "data")
    study = make_study(tmp_path / "in", fixture_images("viral")[:1])
    sop = study.sop_uids[0]
    study.files[0].unlink()
    os.mkfifo(study.files[0])  # opening it blocks inside the decode step until the process is killed
    send(app, study)
    for attempt in range(1, MAX_DECODE_CRASHES + 1):
        wait_until(
            lambda a=attempt: (
                int(redis_client.hget(Store(redis_client, NS).keys.ingest_decoding(), sop) or 0) == a and w.pool_pids()
            ),
            60,
            what=f"decode attempt {attempt}",
        )
        for pid in w.pool_pids():
            os.kill(pid, signal.SIGKILL)  # as a codec's segfault would
    store = Store(redis_client, NS)
    entry = wait_until(lambda: store.ledger.get(sop), 90, what="the instance given up as failed")
    assert entry["kind"] == "permanent" and f"killed the worker process {MAX_DECODE_CRASHES} times" in entry["reason"]
    # The worker writes the ledger entry, then the instance's state, then clears its crash count:
    # wait for the last of them (a check right after the ledger entry once caught the count still set).
    wait_until(
        lambda: (
            store.records.instance(sop).get("state") == "failed"
            and redis_client.hget(store.keys.ingest_decoding(), sop) is None
        ),
        30,
        what="the instance failed and its crash count cleared",
    )


# -- a crash of the worker, then of serve, inside the stability window --------------------------
STABLE = 30.0  # study_stable_seconds of this test


def _searchable(port: int, study_uid: str) -> bool:
    """A viewer's similar query with this study as the reference is answered (not "not yet indexed")."""
    proc = subprocess.run(
        [str(DCMTK / "findscu"), "-v", "-S", "-aet", "VIEWER", "-aec", "SIMILAR", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    return proc.returncode == 0 and "Success" in output and "Failed" not in output


def test_search_is_back_within_minutes_of_a_crash_of_the_worker_then_serve(tmp_path):
    from tests.helpers.serve import ServeProc

    data = tmp_path / "data"
    settings = {"DRH_STUDY_STABLE_SECONDS": str(STABLE), "DRH_DICOM_VIEWERS": "VIEWER=127.0.0.1:104"}
    first = ServeProc(data, tmp_path / "serve-1.log", workers=1, **settings)
    studies = [make_study(tmp_path / f"in{n}", fixture_images()[2 * n : 2 * n + 2]) for n in range(3)]
    try:
        for study in studies:
            sent = storescu(first.dicom_port, study.files)
            assert sent.returncode == 0, sent.stderr  # acknowledged: may never be lost
        acknowledged = time.monotonic()
        (worker,) = first.worker_pids()
        os.kill(worker, signal.SIGKILL)  # the worker's main process: its pool follows it
        first.kill_main()  # then serve itself, before any study was stable
        assert time.monotonic() - acknowledged < STABLE
    finally:
        first.stop()
    second = ServeProc(data, tmp_path / "serve-2.log", workers=1, **settings)
    try:
        client = redis.Redis.from_url(runtime_url(data))
        sops = [sop for study in studies for sop in study.sop_uids]
        wait_until(
            lambda: all(_searchable(second.dicom_port, s.study_uid) for s in studies),
            acknowledged + 2 * STABLE + 60 - time.monotonic(),
            interval=2,
            what="every study searchable at study level within 2 x the stability window + 60 s",
        )
        wait_until(
            lambda: indexed_count(client, sops) == len(sops),
            acknowledged + 300 - time.monotonic(),
            interval=1,
            what="every acknowledged instance indexed within 5 minutes",
        )
        assert Store(client, NS).codes.count(active_version(client), "study") == len(studies)
    finally:
        second.stop()


def runtime_url(data: Path) -> str:
    from plugin.core.redis_server import runtime_url_file

    return runtime_url_file(data).read_text().strip()
