"""The failure ledger and `drh-pacs failures`, against a real Redis (the broker is the same Redis)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest

from plugin.ops.status import gather
from plugin.store import Store
from plugin.store.keys import Keys
from tests.helpers.workers import NS, spy_round_trips


def _payload(n: int) -> dict:
    return {
        "sop_uid": f"1.2.3.{n}",
        "study_uid": "1.2.3",
        "path": f"/spool/1.2.3/1.2.3.{n}.dcm",
        "source_ae": "PACS",
        "received_at": 1000.0 + n,
    }


def test_ledger_counts_repeats_and_keeps_first_seen(redis_client):
    ledger = Store(redis_client, NS).ledger
    first = ledger.record(_payload(1), "decode: unsupported transfer syntax", kind="permanent")
    time.sleep(0.01)  # distinct timestamps (a unit test of the ledger, not a wait on a process)
    again = ledger.record(_payload(1), "decode: unsupported transfer syntax (again)", kind="permanent")
    assert again["count"] == 2 and again["first_seen"] == first["first_seen"]
    assert again["last_seen"] > first["last_seen"] and again["reason"].endswith("(again)")
    ledger.record(_payload(2), "file missing", kind="permanent")
    assert [e["sop_uid"] for e in ledger.list()] == ["1.2.3.2", "1.2.3.1"]
    assert ledger.count() == 2
    assert ledger.resolve("1.2.3.1") and not ledger.resolve("1.2.3.1")
    assert ledger.count() == 1 and [e["sop_uid"] for e in ledger.list()] == ["1.2.3.2"]


def test_a_failure_is_recorded_in_one_transaction(redis_client, monkeypatch):
    """The ledger entry, the instance's state, the end of its pending hint (and of its study's wait for
    it) and both counts go to Redis in one MULTI: a status page that sees the instance failed also
    counts it, and a worker killed halfway leaves none of it."""
    from workers.batching import Item, record_failure

    sent = spy_round_trips(monkeypatch)
    store = Store(redis_client, NS)
    record_failure(store, Item.from_payload(_payload(7)), "decode: truncated pixel data", "permanent")
    monkeypatch.undo()
    writes = [(tx, cmds) for tx, cmds in sent if any(c in ("HSET", "HINCRBY", "ZREM") for c in cmds)]
    assert len(writes) == 1, sent
    transaction, commands = writes[0]
    assert transaction and sorted(commands) == [
        "HDEL", "HINCRBY", "HINCRBY", "HSET", "HSET", "HSET", "ZADD", "ZREM", "ZREM"
    ]  # fmt: skip
    assert store.records.unindexed("1.2.3") == {"failed": 1}  # a query on its study says why it has no answer
    assert store.records.instance("1.2.3.7")["state"] == "failed"
    assert gather(store)["by_modality"]["(unread)"]["failed"] == 1
    assert store.ledger.get("1.2.3.7")["reason"] == "decode: truncated pixel data"


def _cli(redis_url: str, tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRH_")}
    env.update(DRH_REDIS_URL=redis_url, DRH_DATA_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-m", "plugin.cli", "failures", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_cli_lists_and_retries(redis_server, redis_client, tmp_path):
    ledger = Store(redis_client, NS).ledger
    for n in range(3):
        ledger.record(_payload(n), f"decode: bad pixel data {n}", kind="permanent")

    out = _cli(redis_server.url, tmp_path, "list")
    assert out.returncode == 0, out.stderr
    assert "3 failed instance(s)" in out.stdout and "bad pixel data 2" in out.stdout
    listed = json.loads(_cli(redis_server.url, tmp_path, "list", "--json").stdout)
    assert {e["sop_uid"] for e in listed} == {"1.2.3.0", "1.2.3.1", "1.2.3.2"}

    out = _cli(redis_server.url, tmp_path, "retry", "1.2.3.1")
    assert out.returncode == 0, out.stderr
    assert ledger.get("1.2.3.1")["state"] == "retrying"
    assert gather(Store(redis_client, NS))["queues"]["ingest"] == 1

    out = _cli(redis_server.url, tmp_path, "retry", "9.9.9")
    assert out.returncode == 1 and "not in the failure ledger" in out.stderr

    out = _cli(redis_server.url, tmp_path, "retry", "--all")
    assert out.returncode == 0 and "re-queued 3" in out.stdout
    assert gather(Store(redis_client, NS))["queues"]["ingest"] == 4
    # the queued tasks carry the original reception, so they are not mistaken for duplicates
    msg = json.loads(redis_client.lindex(Keys.queue_lists("ingest")[0], 0))
    assert msg["headers"]["task"] == "drh.index_instance"
    _args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
    assert kwargs["received_at"] == 1000.0 + int(kwargs["sop_uid"].rsplit(".", 1)[1])


def test_refused_c_stores_are_listed_with_their_reason_and_go_once_a_copy_is_indexed(
    redis_server, redis_client, tmp_path
):
    ledger = Store(redis_client, NS).ledger
    ledger.record_refused("1.2.3.7", "1.2.3", "ORTHANC", "pixel data truncated (100 of 100352 bytes)", 0xC000)
    ledger.record_refused("1.2.3.7", "1.2.3", "ORTHANC", "pixel data truncated (100 of 100352 bytes)", 0xC000)
    (entry,) = ledger.refused()
    assert entry["count"] == 2 and entry["status"] == "0xc000" and entry["source_ae"] == "ORTHANC"
    assert ledger.refused_among(["1.2.3.7", "1.2.3.8"]) == {"1.2.3.7"}

    listed = _cli(redis_server.url, tmp_path, "list")
    assert "1 refused at reception (`drh-pacs failures refused`)" in listed.stdout
    out = _cli(redis_server.url, tmp_path, "refused")
    assert out.returncode == 0, out.stderr
    assert "1.2.3.7  status 0xc000  from ORTHANC" in out.stdout and "pixel data truncated" in out.stdout
    assert json.loads(_cli(redis_server.url, tmp_path, "refused", "--json").stdout)[0]["sop_uid"] == "1.2.3.7"
    retry = _cli(redis_server.url, tmp_path, "retry", "1.2.3.7")
    assert retry.returncode == 1 and "refused at reception" in retry.stderr and "send it again" in retry.stderr

    ledger.resolve("1.2.3.7")  # what a worker does once a (corrected) copy is indexed
    assert ledger.refused_count() == 0


@pytest.mark.slow
def test_cli_reports_redis_down(tmp_path):
    from plugin.core.redis_server import free_port

    out = _cli(f"redis://127.0.0.1:{free_port()}/0", tmp_path, "list")
    assert out.returncode == 1 and "unavailable" in out.stderr
