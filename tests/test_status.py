"""Status figures, `drh-pacs status`, Prometheus /metrics and the IT status page, from a real system:
a real Redis, a real worker process that indexed real files, and the HTTP API app."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from plugin.core.redis_server import free_port
from plugin.core.settings import load_settings
from plugin.http.app import ApiContext, create_app
from plugin.ops import metrics
from plugin.ops.status import gather, render_text
from plugin.store import Store
from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.processes import wait_until
from tests.helpers.workers import NS, app_for, indexed_count, send

TOKEN = "test-token"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def running(redis_server, redis_client, worker_factory, tmp_path):
    """A worker that indexed two instances and failed on a truncated third; files in the spool."""
    data = tmp_path / "data"
    settings = load_settings(env={}, redis_url=redis_server.url, data_dir=data, api_token=TOKEN)
    worker_factory("statusw")
    study = make_study(settings.spool_dir, fixture_images("normal")[:3])
    good = study.files[2].read_bytes()
    study.files[2].write_bytes(good[:2000])
    app = app_for(redis_server.url, data)
    send(app, study)
    ledger = Store(redis_client, NS).ledger
    wait_until(lambda: indexed_count(redis_client, study.sop_uids[:2]) == 2, 90, what="2 indexed")
    wait_until(lambda: ledger.count() == 1, 60, what="1 failure")
    wait_until(lambda: gather(Store(redis_client, NS))["queues"]["ingest"] == 0, 60, what="ingest queue drained")
    ctx = ApiContext(settings=settings, store=Store(redis_client, NS), celery=app)
    return settings, study, good, ctx


@pytest.mark.slow
def test_figures_text_and_metrics_agree(running, redis_client, redis_server, tmp_path):
    settings, study, _good, _ctx = running
    f = gather(Store(redis_client, NS))
    assert f["redis_ok"] and f["queues"] == {"ingest": 0, "study": 0, "maintenance": 0}
    # the shipped routes answer, each with its model; the two radiographs are the chest model's
    assert {m["route"] for m in f["models"] if m["active"]} == {"chest-xr", "us-breast", "general"}
    model = next(m for m in f["models"] if m["route"] == "chest-xr")
    assert model["active"] and model["image"] == 2 and model["nbits"] == 64
    assert all(m["image"] == 0 for m in f["models"] if m is not model)
    (w,) = f["workers"]
    assert w["hostname"].startswith("statusw@") and w["device"] == "cpu" and w["concurrency"] == 1
    assert f["tasks"]["index_instance"]["done"] == 2 and f["tasks"]["index_instance"]["failed"] == 1
    assert f["latency"]["count"] == 2
    assert f["failures"]["count"] == 1 and f["failures"]["recent"][0]["sop_uid"] == study.sop_uids[2]

    text = render_text(f)
    assert w["hostname"] in text and "device cpu" in text
    assert model["version"] in text and "images         2" in text
    assert study.sop_uids[2] in text and "1 failed" in text

    samples = _samples(metrics.render(f).decode())
    assert samples[("drh_redis_up", ())] == 1
    assert samples[("drh_queue_depth", (("queue", "ingest"),))] == 0
    assert samples[("drh_tasks_total", (("outcome", "done"), ("task", "index_instance")))] == 2
    assert samples[("drh_ingest_latency_seconds_count", ())] == 2
    assert samples[("drh_ingest_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    key = (
        "drh_index_codes",
        (("active", "1"), ("level", "image"), ("route", "chest-xr"), ("version", model["version"])),
    )
    assert samples[key] == 2
    assert samples[("drh_worker_processes", (("device", "cpu"), ("worker", w["hostname"])))] == 1
    assert samples[("drh_failed_instances", ())] == 1

    # the terminal command prints the same figures
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRH_")}
    env.update(DRH_REDIS_URL=redis_server.url, DRH_DATA_DIR=str(tmp_path / "cli"))
    out = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert w["hostname"] in out.stdout and study.sop_uids[2] in out.stdout and model["version"] in out.stdout


@pytest.mark.slow
def test_http_ops_routes(running, redis_client):
    settings, study, good, ctx = running
    client = TestClient(create_app(ctx))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    assert client.get("/health").status_code == 200  # liveness needs no token
    assert client.get("/metrics").status_code == 401
    assert client.get("/ready", headers=auth).json() == {"ready": True, "reasons": []}

    m = client.get("/metrics", headers=auth)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert _samples(m.text)[("drh_failed_instances", ())] == 1

    js = client.get("/api/status", headers=auth).json()
    assert js["models"][0]["image"] == 2 and js["latency"]["buckets"][-1][0] == "+Inf"
    page = client.get("/status", headers=auth)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert study.sop_uids[2] in page.text and f"retry('{study.sop_uids[2]}')" in page.text
    assert "TEST001" not in page.text  # no patient identifiers on the IT page

    # a spooled file for remote workers; never anything outside the spool
    f = client.get(f"/api/instances/{study.sop_uids[0]}/file", headers=auth)
    assert f.status_code == 200 and f.content == study.files[0].read_bytes()
    assert client.get("/api/instances/1.2.3.4/file", headers=auth).status_code == 404
    assert client.get("/api/instances/..%2F..%2Fetc/file", headers=auth).status_code in (400, 404)
    Store(redis_client, NS).records.update_instance("1.2.3.5", {"path": "/etc/hostname"})
    assert client.get("/api/instances/1.2.3.5/file", headers=auth).status_code == 404

    # retry from the page's button: the fixed file is indexed and leaves the ledger
    assert client.post("/api/failures/9.9.9/retry", headers=auth).status_code == 404
    study.files[2].write_bytes(good)
    r = client.post(f"/api/failures/{study.sop_uids[2]}/retry", headers=auth)
    assert r.status_code == 200 and r.json()["retried"] == 1
    wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 3, 60, what="retried instance indexed")
    assert Store(redis_client, NS).ledger.count() == 0


@pytest.mark.slow
def test_it_sees_the_dicom_listener_the_spool_orthanc_and_workers_that_are_down(tmp_path, redis_client, redis_server):
    import socket
    import time

    from plugin.http.status_page import render_html
    from tests.helpers.dicomwire import closed_by_peer
    from tests.helpers.peers import dcmtk, findscu, running_plugin

    nowhere = f"http://127.0.0.1:{free_port()}"
    with running_plugin(tmp_path, redis_server.url, allowed_calling_aes=["VIEWER"], orthanc_url=nowhere) as plugin:
        store, counters = plugin.store, plugin.server.counters

        def figures() -> dict:
            return gather(store, settings=plugin.settings, dicom=counters)

        # before anything happened, every counter is there at zero (an alert on increase() sees the first burst)
        first = _samples(metrics.render(figures()).decode())
        assert first[("drh_dicom_requests_total", (("operation", "C-FIND"), ("outcome", "failure")))] == 0
        assert first[("drh_dicom_association_rejections_total", (("reason", "calling-ae"),))] == 0
        assert first[("drh_tasks_total", (("outcome", "failed"), ("task", "index_instance")))] == 0

        port = str(plugin.port)
        assert dcmtk("echoscu", "-aet", "VIEWER", "-aec", "DRHPACS", "127.0.0.1", port).returncode == 0
        assert dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "DRHPACS", "127.0.0.1", port).returncode != 0
        keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.3.4"]
        findscu(plugin.port, keys, tmp_path / "rsp", called="SIMILAR")  # refused: the index is empty
        with socket.create_connection(("127.0.0.1", plugin.port), timeout=10) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not DICOM: refused by admission control
            wait_until(lambda: closed_by_peer(garbage), 10, what="the connection refused")
        # a worker killed five minutes ago (its last heartbeat), and one refusing its device
        beat = {"queues": ["ingest"], "concurrency": 1, "device": "cuda:0", "started": time.time() - 600}
        store.workers.beat({**beat, "hostname": "gone@gpu1", "state": "online", "last_seen": time.time() - 300})
        store.workers.beat({**beat, "hostname": "nogpu@gpu2", "state": "refused", "last_seen": time.time(),
                            "reason": "device cuda:0 unusable: CUDA is not available"})  # fmt: skip

        f = figures()
        samples = _samples(metrics.render(f).decode())
        assert samples[("drh_dicom_associations_total", (("outcome", "accepted"),))] == 2
        assert samples[("drh_dicom_association_rejections_total", (("reason", "calling-ae"),))] == 1
        assert samples[("drh_dicom_requests_total", (("operation", "C-ECHO"), ("outcome", "success")))] == 1
        assert samples[("drh_dicom_requests_total", (("operation", "C-FIND"), ("outcome", "failure")))] == 1
        assert samples[("drh_dicom_request_duration_seconds_count", (("operation", "C-FIND"),))] == 1
        refused = ("drh_dicom_admission_refusals_total", (("reason", "not-an-association-request"),))
        assert first[refused] == 0 and samples[refused] == 1
        assert samples[("drh_spool_free_bytes", ())] > 0 and samples[("drh_spool_size_bytes", ())] > 0
        assert samples[("drh_orthanc_up", ())] == 0 and f["orthanc"]["error"].startswith("unreachable")
        assert samples[("drh_orthanc_reconcile_last_success_timestamp_seconds", ())] == 0
        assert samples[("drh_worker_up", (("device", "cuda:0"), ("worker", "gone@gpu1")))] == 0
        assert samples[("drh_worker_up", (("device", "cuda:0"), ("worker", "nogpu@gpu2")))] == 0
        assert samples[("drh_worker_last_seen_timestamp_seconds", (("worker", "gone@gpu1"),))] < time.time() - 299

        text = render_text(f)
        assert "gone@gpu1" in text and "OFFLINE" in text and "seen 5 min ago" in text
        assert "REFUSED" in text and "CUDA is not available" in text and "NONE ONLINE" in text
        assert "orthanc" in text and "DOWN: unreachable" in text and "GB free" in text
        assert "refused by admission control: not-an-association-request 1" in text
        assert "associations REJECTED: calling-ae 1" in text
        page = render_html(f)
        assert "OFFLINE" in page and "REFUSED" in page and "<h2>DICOM</h2>" in page and "is DOWN" in page
        assert "Refused by admission control: not-an-association-request 1." in page


def test_status_when_redis_is_down(tmp_path):
    import redis

    dead = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    f = gather(Store(dead, NS))
    assert not f["redis_ok"] and "Redis unavailable" in f["error"]
    assert "Redis unavailable" in render_text(f)
    assert _samples(metrics.render(f).decode())[("drh_redis_up", ())] == 0
    settings = load_settings(env={}, redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path, api_token=TOKEN)
    client = TestClient(create_app(ApiContext(settings=settings, store=Store(dead, NS))))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    health = client.get("/health")  # Redis is a part the process depends on: unhealthy, and says why
    assert health.status_code == 503 and health.json()["parts"]["redis"]["ok"] is False
    r = client.get("/ready", headers=auth)
    assert r.status_code == 503 and "Redis unavailable" in r.json()["reasons"][0]
    assert client.get("/status", headers=auth).status_code == 503


def test_a_worker_process_lists_every_model_it_loaded(redis_client):
    """One pool process serves every route's model; each load replaced the last, and the status said
    a worker that had just indexed chest films had only the general model."""
    import time

    store = Store(redis_client, "workers-models")
    now = time.time()
    store.workers.beat({"hostname": "w@host", "state": "online", "queues": ["ingest"], "concurrency": 1,
                        "device": "cpu", "started": now - 60, "last_seen": now})  # fmt: skip
    store.workers.record_process("w@host", 4242, {"device": "cpu", "model": "chest-v7", "pid": 4242, "loaded": now})
    store.workers.record_process("w@host", 4242, {"device": "cpu", "model": "general-v1", "pid": 4242, "loaded": now})
    (w,) = gather(store)["workers"]
    assert w["models"] == ["chest-v7", "general-v1"] and w["device"] == "cpu"
    store.workers.forget_processes("w@host")  # the worker starts again: its old processes are gone
    assert store.workers.processes() == {}
