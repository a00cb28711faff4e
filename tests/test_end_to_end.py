"""The whole path with real parts: `drh-pacs serve` (embedded Redis, a Celery worker process, the SCP,
the HTTP API), DCMTK `storescu` sending generated studies, DCMTK `findscu` asking for similar studies.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import redis

from plugin.core.redis_server import free_port, runtime_url_file
from plugin.dicom.status import DISTANCE, PRIVATE_CREATOR, PRIVATE_GROUP, RANK, SCORE
from plugin.store import Store
from tests.helpers.dicomgen import Study, fixture_images, make_study
from tests.helpers.processes import DCMTK, wait_until

pytestmark = pytest.mark.slow  # real DICOM peers, Orthanc, workers or deployment tools


@dataclass
class Server:
    proc: subprocess.Popen[str]
    data_dir: Path
    dicom_port: int
    http_port: int
    token: str
    log: Path

    redis_url: str = ""

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url or runtime_url_file(self.data_dir).read_text().strip())


def _start_serve(data_dir: Path, log: Path, **env_extra: str) -> Server:
    dicom_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "DRH_DATA_DIR": str(data_dir),
        "DRH_DICOM_PORT": str(dicom_port),
        "DRH_HTTP_PORT": str(http_port),
        "DRH_STUDY_STABLE_SECONDS": "1",
        "DRH_API_TOKEN": "test-token",
        "DRH_DEVICE": "cpu",
        "DRH_DICOM_VIEWERS": "VIEWER=127.0.0.1:104",  # the findscu below queries as VIEWER
    }
    env.pop("DRH_REDIS_URL", None)
    env.update(env_extra)
    out = log.open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
    )
    server = Server(proc, data_dir, dicom_port, http_port, "test-token", log, env_extra.get("DRH_REDIS_URL", ""))

    def ready() -> bool:
        assert proc.poll() is None, f"serve exited early:\n{log.read_text()}"
        return "ready" in log.read_text()

    wait_until(ready, timeout=90, what="drh-pacs serve to print 'ready'")
    return server


def _wait_ready(server: Server) -> None:
    """/ready answers 200 once Redis answers, a model is active and the replicas are loaded."""

    def ready() -> bool:
        response = httpx.get(
            f"http://127.0.0.1:{server.http_port}/ready",
            headers={"Authorization": f"Bearer {server.token}"},
            timeout=10,
        )
        return response.status_code == 200

    wait_until(ready, timeout=60, what="/ready")


def _stop_serve(server: Server) -> int:
    server.proc.send_signal(signal.SIGINT)
    try:
        return server.proc.wait(90)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        pytest.fail(f"serve did not stop within 90 s of Ctrl-C:\n{server.log.read_text()}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Server]:
    server = _start_serve(tmp_path / "data", tmp_path / "serve.log")
    yield server
    if server.proc.poll() is None:
        _stop_serve(server)


def storescu(server: Server, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK / "storescu"), "-aet", "TESTPACS", "-aec", "DRHPACS", "127.0.0.1", str(server.dicom_port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
    )


def findscu_similar(server: Server, reference: str, out_dir: Path) -> tuple[list[pydicom.Dataset], str]:
    """Study Root C-FIND to called AE SIMILAR; returns the pending responses in arrival order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={reference}",
        "PatientID",
        "StudyDate",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
        "RetrieveAETitle",
    ]
    cmd = [str(DCMTK / "findscu"), "-S", "-aet", "VIEWER", "-aec", "SIMILAR", "-X", "-od", str(out_dir)]
    for key in keys:
        cmd += ["-k", key]
    done = subprocess.run(cmd + ["127.0.0.1", str(server.dicom_port)], capture_output=True, text=True, timeout=60)
    answers = [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]
    return answers, done.stdout + done.stderr


def _chest_version(store: Store) -> str:
    """The version answering for the generated studies (DX, CHEST)."""
    found = store.models.route_for("DX", "CHEST")
    return found[1] if found else ""


def _study_indexed(server: Server, study_uid: str) -> bool:
    store = Store(server.redis())
    version = _chest_version(store)
    return bool(version) and store.codes.get(version, "study", study_uid) is not None


def _private(ds: pydicom.Dataset, offset: int) -> int:
    return int(ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[offset].value)


def _send_studies(tmp_path: Path, server: Server) -> list[Study]:
    studies = [
        make_study(tmp_path / "studies", fixture_images(label)[:3], patient_id=f"PAT-{label}")
        for label in ("normal", "bacterial", "viral")
    ]
    result = storescu(server, [f for s in studies for f in s.files])
    assert result.returncode == 0, result.stdout + result.stderr
    for study in studies:
        wait_until(
            lambda s=study: _study_indexed(server, s.study_uid),
            timeout=180,
            what=f"study {study.study_uid} to be indexed",
        )
    return studies


def test_stored_studies_are_found_by_similarity_over_dicom(tmp_path: Path, served: Server) -> None:
    studies = _send_studies(tmp_path, served)
    reference = studies[0].study_uid
    answers, log = findscu_similar(served, reference, tmp_path / "rsp")
    found = [ds.StudyInstanceUID for ds in answers]
    assert sorted(found) == sorted(s.study_uid for s in studies[1:]), log
    assert reference not in found
    # nearest first: the Hamming shortlist re-ranked by the stored vectors, so the score falls
    scores = [float(ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[SCORE].value) for ds in answers]
    assert scores == sorted(scores, reverse=True)
    ranks = [_private(ds, RANK) for ds in answers]
    assert ranks == list(range(1, len(answers) + 1))
    for ds in answers:
        assert ds.PatientID.startswith("PAT-")
        assert int(ds.NumberOfStudyRelatedInstances) == 3

    # The HTTP API answers the same ranking, behind its token.
    url = f"http://127.0.0.1:{served.http_port}"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/api/similar/study/{reference}", timeout=10).status_code == 401
    answer = httpx.get(
        f"{url}/api/similar/study/{reference}", headers={"Authorization": f"Bearer {served.token}"}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    http_ranked = [(r["study"]["study_instance_uid"], r["distance"]) for r in answer.json()["results"]]
    assert http_ranked == [(ds.StudyInstanceUID, _private(ds, DISTANCE)) for ds in answers]

    # `drh-pacs status` reports the index and workers, and the DICOM listener's counts (from serve's
    # process, through its HTTP API: with another HTTP port it says it could not read them).
    def status(**env: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "plugin.cli", "status"],
            env={**os.environ, "DRH_DATA_DIR": str(served.data_dir), "DRH_API_TOKEN": served.token, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    text = status(DRH_HTTP_PORT=str(served.http_port))
    assert "ingest" in text and "study" in text
    assert re.search(r"dicom\s+\d+ association\(s\) open, accepted \d+", text) and "C-FIND success" in text
    elsewhere = status(DRH_HTTP_PORT=str(free_port()))
    assert "dicom       counts not read: serve's HTTP API at http://127.0.0.1:" in elsewhere

    # The log says how each C-FIND ended, not a line per study answered.
    serve_log = served.log.read_text()
    assert re.search(r"Find SCP Response \d+: 0x0000 \(Success\)", serve_log)
    assert "(Pending)" not in serve_log

    assert _stop_serve(served) == 0
    assert "stopped" in served.log.read_text()


def test_a_study_sent_twice_is_one_entry(tmp_path: Path, served: Server) -> None:
    studies = _send_studies(tmp_path, served)
    twice = studies[1]
    assert storescu(served, twice.files).returncode == 0
    store = Store(served.redis())
    version = _chest_version(store)
    # The second copy is indexed (its task ran) without creating new codes.
    wait_until(
        lambda: store.records.study(twice.study_uid).get("n_instances") == "3", what="the re-sent study's metadata"
    )
    assert store.codes.count(version, "image") == sum(len(s.files) for s in studies)
    assert store.codes.count(version, "study") == len(studies)
    answers, log = findscu_similar(served, studies[0].study_uid, tmp_path / "rsp")
    found = [ds.StudyInstanceUID for ds in answers]
    assert found.count(twice.study_uid) == 1, log


def test_restart_keeps_the_index(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = _start_serve(data_dir, tmp_path / "serve-1.log")
    try:
        studies = _send_studies(tmp_path, server)
    finally:
        assert _stop_serve(server) == 0
    server = _start_serve(data_dir, tmp_path / "serve-2.log")
    try:
        _wait_ready(server)
        answers, out = findscu_similar(server, studies[2].study_uid, tmp_path / "rsp")
        assert sorted(ds.StudyInstanceUID for ds in answers) == sorted(s.study_uid for s in studies[:2]), out
    finally:
        assert _stop_serve(server) == 0


def test_external_redis_and_a_separate_worker(tmp_path: Path, redis_server, redis_client) -> None:
    """With a Redis URL, serve uses that Redis and starts no worker of its own when told so; a
    `drh-pacs worker` started apart (as on another machine) does the model work."""
    server = _start_serve(
        tmp_path / "data", tmp_path / "serve.log", DRH_REDIS_URL=redis_server.url, DRH_SERVE_WORKERS="0"
    )
    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "worker"],
        env={
            **os.environ,
            "DRH_REDIS_URL": redis_server.url,
            "DRH_DATA_DIR": str(tmp_path / "worker-data"),
            "DRH_STUDY_STABLE_SECONDS": "1",
            "DRH_DEVICE": "cpu",
        },
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert not runtime_url_file(server.data_dir).exists()  # no embedded Redis was started
        studies = _send_studies(tmp_path, server)
        answers, log = findscu_similar(server, studies[1].study_uid, tmp_path / "rsp")
        assert sorted(ds.StudyInstanceUID for ds in answers) == sorted([studies[0].study_uid, studies[2].study_uid])
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert _stop_serve(server) == 0
