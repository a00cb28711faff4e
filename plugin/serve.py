"""``drh-pacs serve``: the wiring point of the front process.

It reads the settings, starts (in this order) an embedded Redis when no ``redis_url`` is configured,
``serve_workers`` Celery worker processes, the replica indexes, the DICOM SCP and the HTTP API; prints
where each listens; and on SIGINT/SIGTERM stops them in the reverse order, so nothing a peer was told
is stored can be lost: the SCP stops accepting first, workers finish (or hand back) their task,
Redis writes its data last.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from plugin.core.logs import setup_logging
from plugin.core.redis_server import EmbeddedRedis, runtime_url_file
from plugin.core.settings import Settings, SettingsError, load_settings

log = logging.getLogger("drh.serve")

# How often the replica indexes pull changes from Redis. Queries also refresh on demand, so this
# only bounds how stale an idle index can get.
INDEX_REFRESH_SECONDS = 0.5


@dataclass
class Running:
    """Everything `serve` started, so it can be stopped in the right order."""

    settings: Settings
    redis: EmbeddedRedis | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    scp: Any = None
    http: Any = None
    http_thread: threading.Thread | None = None
    refresher: threading.Thread | None = None
    reconcile: Any = None  # plugin.ops.orthanc.ScheduledReconcile, when Orthanc is configured
    stop_event: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.stop_event.set()
        if self.reconcile is not None:
            self.reconcile.stop()
        if self.scp is not None:
            log.info("stopping DICOM SCP")
            self.scp.shutdown()
        if self.http is not None:
            log.info("stopping HTTP API")
            self.http.should_exit = True
            if self.http_thread is not None:
                self.http_thread.join(10)
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Celery warm shutdown: finish or hand back the task
        for proc in self.workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in 60 s; killing it (its task is redelivered)", proc.pid)
                proc.kill()
                proc.wait()
        if self.refresher is not None:
            self.refresher.join(5)
        if self.redis is not None:
            log.info("stopping embedded Redis")
            self.redis.stop()
            runtime_url_file(self.settings.data_dir).unlink(missing_ok=True)


def _worker_env(settings: Settings) -> dict[str, str]:
    """Child workers get the resolved settings that differ from what they would read themselves."""
    env = dict(os.environ)
    env["DRH_REDIS_URL"] = settings.redis_url
    env["DRH_DATA_DIR"] = str(settings.data_dir)
    if settings.broker_url:
        env["DRH_BROKER_URL"] = settings.broker_url
    if settings.model_path:
        env["DRH_MODEL_PATH"] = settings.model_path
    env["DRH_DEVICE"] = settings.device
    env["DRH_STUDY_STABLE_SECONDS"] = str(settings.study_stable_seconds)
    env["DRH_REDIS_NAMESPACE"] = settings.redis_namespace
    return env


def _spawn_worker(settings: Settings, n: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "plugin.cli", "worker", "--hostname", f"serve{n}@%h"]
    return subprocess.Popen(cmd, env=_worker_env(settings))


def start(settings: Settings) -> Running:
    """Start every component; on any failure, stop what was started and re-raise."""
    from hashing import kernels
    from plugin.dicom.scp import start_scp
    from plugin.http.app import ApiContext, create_app
    from plugin.search.replica import ReplicaIndex
    from plugin.store import Store
    from workers.client import make_celery

    running = Running(settings)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if not settings.redis_url:
            running.redis = EmbeddedRedis(settings.redis_dir).start()
            settings = running.settings = settings.replace(redis_url=running.redis.url)
            url_file = runtime_url_file(settings.data_dir)
            url_file.parent.mkdir(parents=True, exist_ok=True)
            url_file.write_text(settings.redis_url + "\n")
            print(f"redis     {settings.redis_url} (embedded, data in {settings.redis_dir})", flush=True)
        else:
            print(f"redis     {_redacted(settings.redis_url)}", flush=True)

        client = redis.Redis.from_url(settings.redis_url)
        client.ping()
        store = Store(client, settings.redis_namespace)
        celery_app = make_celery(settings)

        running.workers = [_spawn_worker(settings, n) for n in range(settings.serve_workers)]
        if settings.serve_workers:
            print(f"workers   {settings.serve_workers} Celery worker process(es), device {settings.device}", flush=True)
        else:
            print("workers   none started here (run `drh-pacs worker` against the same Redis)", flush=True)

        kernels.warm_up()  # compile the scan now rather than on the first C-FIND
        indexes = {level: ReplicaIndex(store, level) for level in ("study", "image")}
        running.refresher = threading.Thread(
            target=_refresh_forever, args=(indexes, running.stop_event), name="index-refresh", daemon=True
        )
        running.refresher.start()

        running.scp = start_scp(settings, store, indexes, celery_app)
        print(
            f"dicom     {settings.ae_title}@{settings.dicom_host}:{settings.dicom_port}"
            f" (similar queries: called AE {settings.similar_ae_title})",
            flush=True,
        )

        if settings.orthanc_url and settings.orthanc_reconcile_seconds > 0:
            from plugin.ops.orthanc import ScheduledReconcile

            running.reconcile = ScheduledReconcile(settings).start()
            print(
                f"orthanc   {settings.orthanc_url}: reconciled every {settings.orthanc_reconcile_seconds:g} s",
                flush=True,
            )

        ctx = ApiContext(settings=settings, store=store, index=indexes, celery=celery_app)
        ctx.extra["dicom_counters"] = running.scp.counters  # the listener's counts, for /metrics and /status
        running.http, running.http_thread = _start_http(settings, create_app(ctx))
        token_note = "DRH_API_TOKEN" if settings.api_token else f"token in {settings.data_dir / 'api-token'}"
        print(f"http      http://{settings.http_host}:{settings.http_port}/ ({token_note})", flush=True)
    except BaseException:
        running.stop()
        raise
    return running


def _refresh_forever(indexes: dict[str, Any], stop: threading.Event) -> None:
    while not stop.is_set():
        for index in indexes.values():
            try:
                index.refresh()
            except redis.exceptions.RedisError as exc:
                log.warning("index refresh failed (%s); retrying", exc)
        stop.wait(INDEX_REFRESH_SECONDS)


def _start_http(settings: Settings, app: Any) -> tuple[Any, threading.Thread]:
    import uvicorn

    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"HTTP API could not start on {settings.http_host}:{settings.http_port}")
        if time.monotonic() > deadline:
            raise RuntimeError("HTTP API did not start in 15 s")
        time.sleep(0.05)
    return server, thread


def _redacted(url: str) -> str:
    """A Redis URL without its password, for printing."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drh-pacs serve", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, help="overrides DRH_DATA_DIR")
    parser.add_argument("--redis-url", help="overrides DRH_REDIS_URL (empty: embedded Redis)")
    parser.add_argument("--dicom-port", type=int, help="overrides DRH_DICOM_PORT")
    parser.add_argument("--http-port", type=int, help="overrides DRH_HTTP_PORT")
    parser.add_argument("--workers", type=int, dest="serve_workers", help="overrides DRH_SERVE_WORKERS")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(**vars(args))
    except SettingsError as exc:
        print(f"drh-pacs serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        print(f"\nreceived {signal.Signals(signum).name}, stopping...", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    running = start(settings)
    print("ready     press Ctrl-C to stop", flush=True)
    try:
        while not stop.wait(1.0):
            for n, proc in enumerate(running.workers):
                if proc.poll() is not None:
                    log.error("worker process %s exited with %s; restarting it", proc.pid, proc.returncode)
                    running.workers[n] = _spawn_worker(running.settings, n)
    finally:
        running.stop()
        print("stopped", flush=True)
    return 0
