"""`drh-pacs serve` as a real process: its embedded Redis locked down, its children supervised and
unable to outlive it, one serve per data directory, and /health telling the truth meanwhile."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys

import pytest
import redis

from plugin.core.redis_server import DISABLED_COMMANDS, runtime_url_file
from tests.helpers.processes import wait_until
from tests.helpers.serve import ServeProc, alive, cmdline

pytestmark = pytest.mark.slow  # starts `drh-pacs serve`, its Redis and workers


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_embedded_redis_is_locked_down_and_the_data_dir_has_one_owner(tmp_path):
    data = tmp_path / "data"
    serve = ServeProc(data, tmp_path / "serve.log")
    try:
        url_file = runtime_url_file(data)
        url = url_file.read_text().strip()
        password = (data / "redis-password").read_text().strip()
        # the password is generated, kept like the API token, and carried by the runtime URL only
        assert len(password) >= 32 and f":{password}@" in url
        assert _mode(data / "redis-password") == 0o600
        assert _mode(url_file) == 0o600 and _mode(url_file.parent) == 0o700
        assert password not in serve.log()  # printed redacted
        # the libraries' objects are kept out of full garbage collections (each would stall every thread)
        frozen = re.search(r"start-up objects kept out of full garbage collections: (\d+)", serve.log())
        assert frozen is not None and int(frozen.group(1)) > 10_000
        redis_pid = serve.redis_pid()
        assert redis_pid is not None and password not in cmdline(redis_pid)  # `ps` does not show it
        # files and folders private to the service user
        redis_dir = data / "redis"
        assert _mode(redis_dir) == 0o700
        files = [p for p in redis_dir.rglob("*") if p.is_file()]
        assert any(p.name.startswith("appendonly") for p in files) and (redis_dir / "redis.conf") in files
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}

        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, password="wrong").ping()
        client = redis.Redis.from_url(url)
        assert client.ping()
        for command in ("CONFIG GET dir", "CONFIG SET dir /tmp", "DEBUG SLEEP 0", "MODULE LIST", "SLAVEOF localhost 1"):
            with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
                client.execute_command(*command.split())
        assert {"CONFIG", "DEBUG", "MODULE", "REPLICAOF", "SHUTDOWN"} <= set(DISABLED_COMMANDS)
        # what drh-pacs and its backup script do use still works
        assert client.info("persistence")["aof_enabled"] == 1
        assert client.bgsave()

        # `drh-pacs status` finds the protected Redis through the runtime URL
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRH_")}
        status = subprocess.run(
            [sys.executable, "-m", "plugin.cli", "status", "--json"],
            env={**env, "DRH_DATA_DIR": str(data)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr

        # a second serve on the same data dir is refused at once, naming the owner
        second = ServeProc(data, tmp_path / "second.log", wait_ready=False)
        assert second.proc.wait(60) != 0
        assert f"in use by another drh-pacs serve (pid {serve.pid}" in second.log()
        assert serve.health()[0] == 200 and serve.redis_pid() == redis_pid  # the first one untouched

        # another serve whose DICOM port is taken says which port and which setting, in one line
        third = ServeProc(tmp_path / "data3", tmp_path / "third.log", wait_ready=False,
                          DRH_DICOM_PORT=str(serve.dicom_port))  # fmt: skip
        assert third.proc.wait(60) == 1
        assert f"drh-pacs serve: the DICOM listener cannot listen on 127.0.0.1:{serve.dicom_port}" in third.log()
        assert "DRH_DICOM_PORT" in third.log() and "Traceback" not in third.log()
    finally:
        serve.stop()


def test_serve_restarts_a_dead_redis_and_worker_and_health_says_so_meanwhile(tmp_path):
    serve = ServeProc(tmp_path / "data", tmp_path / "serve.log", workers=1)
    try:
        wait_until(lambda: serve.health()[0] == 200, 120, what="healthy with its worker")
        client = redis.Redis.from_url(runtime_url_file(tmp_path / "data").read_text().strip())
        client.set("drh:probe", "kept")
        wait_until(lambda: client.info("persistence")["aof_last_write_status"] == "ok", 10, what="AOF written")

        old_redis = serve.redis_pid()
        os.kill(old_redis, signal.SIGKILL)
        code, body = wait_until(lambda: (h := serve.health())[0] == 503 and h, 10, what="/health 503")
        assert body["status"] == "unhealthy" and body["parts"]["redis"]["ok"] is False
        assert body["parts"]["embedded_redis"]["ok"] is False
        wait_until(lambda: serve.health()[0] == 200, 60, what="Redis restarted and healthy again")
        assert serve.redis_pid() not in (None, old_redis)
        assert client.get("drh:probe") == b"kept"  # same port, same password, same data
        assert "embedded Redis exited" in serve.log() and "embedded Redis restarted" in serve.log()

        (old_worker,) = serve.worker_pids()
        os.kill(old_worker, signal.SIGKILL)
        code, body = wait_until(
            lambda: (h := serve.health())[0] == 503 and not h[1]["parts"]["workers"]["ok"] and h, 10, what="503"
        )
        assert body["parts"]["workers"]["detail"].startswith("0 of 1 running")
        wait_until(lambda: serve.health()[0] == 200, 60, what="worker restarted")
        assert serve.worker_pids() not in ([], [old_worker])
    finally:
        serve.stop()


def test_children_die_with_serve_and_a_new_serve_takes_over_the_data(tmp_path):
    data = tmp_path / "data"
    first = ServeProc(data, tmp_path / "first.log", workers=1)
    try:
        wait_until(lambda: first.health()[0] == 200, 120, what="healthy with its worker")
        wait_until(lambda: len(first.children()) >= 3, 60, what="Redis, the worker and its pool process")
        children = first.children()
        client = redis.Redis.from_url(runtime_url_file(data).read_text().strip())
        client.set("drh:probe", "survives")
        first.kill_main()  # SIGKILL to serve alone, as the OOM killer would
        wait_until(lambda: not any(alive(p) for p in children), 60, what=f"no orphan left of {children}")
    finally:
        first.stop()
    second = ServeProc(data, tmp_path / "second.log")
    try:
        client = redis.Redis.from_url(runtime_url_file(data).read_text().strip())
        assert client.get("drh:probe") == b"survives"
    finally:
        second.stop()


def test_children_run_the_installed_code_whatever_folder_serve_starts_in(tmp_path):
    """serve's workers are ``python -m plugin.cli``: from a folder holding another copy of drh-pacs
    (an old checkout), a plain ``-m`` would run that copy. The command serve uses does not."""
    from plugin.core.processes import python_module

    shadow = tmp_path / "old-checkout" / "plugin"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise SystemExit('the old checkout ran')\n")
    (shadow / "cli.py").write_text("")
    run = subprocess.run(
        python_module("plugin.cli", "--help"), cwd=shadow.parent, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "drh-pacs" in run.stdout, run.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "--help"], cwd=shadow.parent, capture_output=True, text=True, timeout=120
    )
    assert "the old checkout ran" in plain.stderr  # what serve used to start


def test_health_says_a_worker_that_runs_but_stopped_beating_is_unhealthy(tmp_path, redis_client):
    """A worker frozen (SIGSTOP, a wedged process) is alive to ``poll()``: /health said "1 of 1
    running" and ok, while the status page said no worker online. Its heartbeat tells."""
    import socket
    import time

    from plugin.core.settings import load_settings
    from plugin.serve import Child, Running, worker_hostname
    from plugin.store import Store

    settings = load_settings(env={"DRH_DATA_DIR": str(tmp_path), "DRH_SERVE_WORKERS": "1"})
    child = Child("worker 0", spawn=lambda: subprocess.Popen(["sleep", "60"]))
    child.start()
    store = Store(redis_client, "serve-health")
    running = Running(settings, workers=[child], heartbeats=store.workers)
    try:
        name = worker_hostname(0, socket.gethostname())
        beat = {"hostname": name, "state": "online", "queues": ["ingest"], "concurrency": 1, "device": "cpu"}
        store.workers.beat({**beat, "last_seen": time.time() - 120})
        assert running.parts()["workers"]["ok"] is True  # just started: its first beats may be on the way
        child.started_at -= 120
        part = running.parts()["workers"]
        assert part["ok"] is False and "worker 0 running but silent" in part["detail"]
        store.workers.beat({**beat, "last_seen": time.time()})
        assert running.parts()["workers"] == {"ok": True, "detail": "1 of 1 running"}
    finally:
        child.proc.kill()
        child.proc.wait()
