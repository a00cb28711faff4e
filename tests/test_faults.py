"""Faults with real processes: workers killed mid-task, Redis stopped during ingest, an SCP restarted
with files in its spool. Each test waits on conditions with deadlines.

Killing "mid-task" at a known point uses the workers' fault hold (``Settings.fault_hold_dir``): the
task pauses while ``<stage>.hold`` exists and writes ``<stage>.reached`` with its pid, so the test
kills it exactly there instead of guessing with a sleep.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_until
from dicomgen import fixture_images, make_study
from test_workers import NS, active_version, app_for, indexed_count, send
from test_workers import worker_factory as worker_factory  # the fixture

from plugin.store import CodeStore
from workers.failures import FailureLedger


def _hold(folder: Path, stage: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hold = folder / f"{stage}.hold"
    hold.write_text("")
    return hold


@pytest.mark.parametrize("stage", ["before_write", "after_write"])
def test_pool_process_killed_mid_task_is_indexed_once(redis_server, redis_client, worker_factory, tmp_path, stage):
    holds = tmp_path / "holds"
    hold = _hold(holds, stage)
    w = worker_factory(DRH_FAULT_HOLD_DIR=str(holds), DRH_BATCH_CLAIM_SECONDS="5")
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
    store = CodeStore(redis_client, NS)
    version = active_version(redis_client)
    assert store.count(version, "image") == 2
    assert sorted(store.slots_of(version, "image", study.sop_uids)) == [0, 1]
    assert FailureLedger(redis_client, NS).count() == 0
    wait_until(lambda: store.get_code(version, "study", study.study_uid), 30, what="study pooled")
    assert store.count(version, "study") == 1
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
    assert redis_client.hlen("unacked") >= 1  # the message is still the broker's, not lost
    wait_until(lambda: time.monotonic() - killed_at > 3.5, 10, what="visibility timeout")
    worker_factory("second", DRH_TASK_VISIBILITY_TIMEOUT="3")
    wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 1, 90, what="indexed by the second worker")
    store = CodeStore(redis_client, NS)
    assert store.count(active_version(redis_client), "image") == 1
