"""Real ``drh-pacs worker`` processes for the tests, and sending them instances as the SCP would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from plugin.core.settings import load_settings
from plugin.store import Store
from tests.helpers.processes import stop_process_group, wait_until
from workers.client import enqueue_instance, make_celery

NS = "drh"


def worker_env(redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a test worker: the session Redis, a private data dir, CPU, quick pooling."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRH_")}
    env.update(
        DRH_REDIS_URL=redis_url,
        DRH_DATA_DIR=str(data_dir),
        DRH_DEVICE="cpu",
        DRH_STUDY_STABLE_SECONDS="1",
        DRH_LOG_LEVEL="INFO",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


class WorkerProc:
    """A `drh-pacs worker` child process in its own session (so its pool children go with it)."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str = "test") -> None:
        self.env = env
        self.log_path = log_path
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, client: redis.Redis) -> WorkerProc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plugin.cli", "worker", "--hostname", f"{self.name}@%h", "--concurrency", "1"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_until(
            lambda: (
                self.proc.poll() is not None
                or any(h.startswith(f"{self.name}@") for h in Store(client, NS).workers.heartbeats())
            ),
            timeout=60,
            what="worker heartbeat",
        )
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool), as a vanished machine would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process_group(self.proc, signal.SIGTERM, 30)


def app_for(redis_url: str, data_dir: Path, **overrides):
    return make_celery(load_settings(env={}, redis_url=redis_url, data_dir=data_dir, **overrides))


def send(app, study, received_at: float | None = None, indices=None) -> None:
    for n, (sop, path) in enumerate(zip(study.sop_uids, study.files, strict=True)):
        if indices is not None and n not in indices:
            continue
        enqueue_instance(
            app,
            sop_uid=sop,
            study_uid=study.study_uid,
            path=str(path),
            source_ae="MODALITY1",
            received_at=received_at or time.time(),
        )


def indexed_count(client: redis.Redis, sops: list[str]) -> int:
    store = Store(client, NS)
    return sum(store.records.instance(s).get("state") == "indexed" for s in sops)


def active_version(client: redis.Redis) -> str:
    """The version answering for the generated studies (DX, CHEST): the chest route's, or whichever
    route takes them (the general one, a test's model)."""
    found = Store(client, NS).models.route_for("DX", "CHEST")
    return found[1] if found else ""


def spy_round_trips(monkeypatch) -> list[tuple[bool, list[str]]]:  # noqa: ANN001
    """Record every pipelined round trip to Redis from now on (until ``monkeypatch.undo()``): whether
    it was a transaction, and its commands. What a worker's writes look like on the wire, against a
    real Redis (its MONITOR is disabled in the tests' server)."""
    sent: list[tuple[bool, list[str]]] = []
    execute = redis.client.Pipeline.execute

    def spy(pipe, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        sent.append((pipe.transaction or pipe.explicit_transaction, [c[0][0] for c in pipe.command_stack]))
        return execute(pipe, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", spy)
    return sent
