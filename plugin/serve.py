"""``drh-pacs serve``: the wiring point of the front process, and the supervisor of its children.

It reads the settings, takes the data directory's lock (one ``serve`` per data dir), starts (in this
order) an embedded Redis when no ``redis_url`` is configured, ``serve_workers`` Celery worker
processes, the replica indexes, the DICOM SCP and the HTTP API; prints where each listens; then
watches its children: a dead embedded Redis or worker is restarted with back-off
(:class:`plugin.core.processes.Backoff`), and ``/health`` says unhealthy meanwhile. Children cannot
outlive it (:func:`plugin.core.processes.die_with_parent`). On SIGINT/SIGTERM it stops them in the
reverse order, so nothing a peer was told is stored can be lost: the SCP stops accepting first,
workers finish (or hand back) their task, Redis writes its data last.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from plugin.core.logs import setup_logging
from plugin.core.processes import (
    Backoff,
    DataDirLock,
    DataDirLocked,
    die_with_parent,
    freeze_startup_heap,
    python_module,
)
from plugin.core.redis_server import EmbeddedRedis, EmbeddedRedisError, runtime_url_file, write_runtime_url
from plugin.core.settings import Settings, SettingsError, load_settings
from plugin.store.heartbeats import HEARTBEAT_SECONDS, worker_state

log = logging.getLogger("drh.serve")

# How often the replica indexes pull changes from Redis. Queries also refresh on demand, so this
# only bounds how stale an idle index can get.
INDEX_REFRESH_SECONDS = 0.5
# How often the main thread checks its children.
SUPERVISE_SECONDS = 1.0
# A failing refresh is logged once, then at most this often while it keeps failing.
REPEAT_WARNING_SECONDS = 60.0
# What serve's own files (spool, temporary uploads) are created with: the service user and its
# group (workers on the same machine) read them, nobody else.
UMASK = 0o027


@dataclass
class Child:
    """One supervised child process and its restart back-off."""

    name: str
    spawn: Any  # () -> subprocess.Popen
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)
    down_since: float | None = None

    def start(self) -> None:
        self.proc = self.spawn()
        self.started_at = time.monotonic()
        self.down_since = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Running:
    """Everything `serve` started, so it can be supervised and stopped in the right order."""

    settings: Settings
    lock: DataDirLock | None = None
    redis: EmbeddedRedis | None = None
    redis_backoff: Backoff = field(default_factory=Backoff)
    redis_down_since: float | None = None
    workers: list[Child] = field(default_factory=list)
    scp: Any = None
    http: Any = None
    http_thread: threading.Thread | None = None
    refresher: threading.Thread | None = None
    reconcile: Any = None  # plugin.ops.orthanc.ScheduledReconcile, when Orthanc is configured
    heartbeats: Any = None  # plugin.store.heartbeats.WorkerRegistry: what the workers last said
    stop_event: threading.Event = field(default_factory=threading.Event)

    def parts(self) -> dict[str, dict[str, Any]]:
        """The state of each supervised part, for ``/health`` (which adds Redis's own answer)."""
        out: dict[str, dict[str, Any]] = {}
        if self.redis is not None:
            up = self.redis.alive()
            out["embedded_redis"] = {"ok": up, "detail": "running" if up else _down("restarting", self.redis_backoff)}
        if self.settings.serve_workers:
            alive = sum(c.alive() for c in self.workers)
            detail = f"{alive} of {len(self.workers)} running"
            if alive < len(self.workers):
                detail += "; restarting the others"
            silent = self._silent_workers()
            if silent:
                detail += f"; {', '.join(silent)} running but silent (no heartbeat for 30 s: hung or stopped?)"
            out["workers"] = {"ok": alive == len(self.workers) and not silent, "detail": detail}
        if self.scp is not None:
            up = self.scp.alive()
            out["dicom"] = {"ok": up, "detail": "accepting" if up else "not accepting"}
        return out

    def _silent_workers(self) -> list[str]:
        """Children alive for a while whose heartbeat stopped: a process that neither works nor dies
        (frozen, stopped with SIGSTOP, wedged) looks alive to ``poll()`` alone."""
        if self.heartbeats is None:
            return []
        now_mono, now = time.monotonic(), time.time()
        try:
            beats = self.heartbeats.heartbeats()
        except Exception:  # noqa: BLE001 - Redis away: /health says so in its own part
            return []
        host = socket.gethostname()
        return [
            child.name
            for n, child in enumerate(self.workers)
            if child.alive()
            and now_mono - child.started_at > 6 * HEARTBEAT_SECONDS
            and worker_state(beats.get(worker_hostname(n, host), {}), now) == "offline"
        ]

    def supervise(self, now: float | None = None) -> None:
        """Restart what died, each with its own back-off. Called from the main thread only, since a
        child's parent-death signal follows the thread that started it."""
        now = time.monotonic() if now is None else now
        if self.redis is not None and not self.redis.alive():
            if self.redis_down_since is None:
                self.redis_down_since = now
                code = self.redis.proc.returncode if self.redis.proc else None
                delay = self.redis_backoff.failed(now - self.redis.started_at, now)
                log.error("embedded Redis exited (code %s); restarting it in %.0f s", code, delay)
            elif self.redis_backoff.due(now):
                try:
                    self.redis.start()
                except EmbeddedRedisError as exc:
                    delay = self.redis_backoff.failed(0.0, now)
                    log.error("embedded Redis did not restart (%s); next try in %.0f s", exc, delay)
                else:
                    down = now - self.redis_down_since
                    log.warning("embedded Redis restarted on port %d after %.0f s down", self.redis.port, down)
                    self.redis_down_since = None
        for child in self.workers:
            if child.alive():
                continue
            if child.down_since is None:
                child.down_since = now
                code = child.proc.returncode if child.proc else None
                delay = child.backoff.failed(now - child.started_at, now)
                log.error("%s (pid %s) exited with %s; restarting it in %.0f s", child.name, _pid(child), code, delay)
            elif child.backoff.due(now):
                child.start()
                log.warning("%s restarted (pid %s)", child.name, _pid(child))
                if self.scp is not None:
                    # the dead worker held messages unacknowledged; without this they wait for the
                    # broker's visibility timeout (an hour by default)
                    self.scp.reconciler.requeue_soon()

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
        for child in self.workers:
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)  # Celery warm shutdown: finish or hand back the task
        for child in self.workers:
            if child.proc is None:
                continue
            try:
                child.proc.wait(60)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 60 s; killing it (its task is redelivered)", child.name)
                child.proc.kill()  # its pool processes follow it (PR_SET_PDEATHSIG)
                child.proc.wait()
        if self.refresher is not None:
            self.refresher.join(5)
        if self.redis is not None:
            log.info("stopping embedded Redis")
            self.redis.stop()
            runtime_url_file(self.settings.data_dir).unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release()


def _down(what: str, backoff: Backoff) -> str:
    wait = max(0.0, backoff.next_at - time.monotonic())
    return f"down; {what} in {wait:.0f} s" if wait else f"down; {what}"


def _pid(child: Child) -> str:
    return str(child.proc.pid) if child.proc is not None else "-"


def worker_hostname(n: int, host: str) -> str:
    """The Celery name of serve's n-th worker (``%h``: Celery puts this machine's hostname there)."""
    return f"serve{n}@{host}"


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
    env["DRH_STUDY_QUEUE_WAIT_SECONDS"] = str(settings.study_queue_wait_seconds)
    env["DRH_REDIS_NAMESPACE"] = settings.redis_namespace
    return env


def _spawn_worker(settings: Settings, n: int) -> subprocess.Popen[bytes]:
    """A ``drh-pacs worker`` child: leader of its own process group (so its pool can be killed with
    it) and signalled SIGTERM (warm shutdown) if ``serve`` dies."""
    cmd = python_module("plugin.cli", "worker", "--hostname", worker_hostname(n, "%h"))
    return subprocess.Popen(cmd, env=_worker_env(settings), preexec_fn=die_with_parent(signal.SIGTERM), process_group=0)


def start(settings: Settings) -> Running:
    """Start every component; on any failure, stop what was started and re-raise."""
    from hashing import kernels
    from plugin.dicom.scp import start_scp
    from plugin.http.app import ApiContext, create_app
    from plugin.search import eligible
    from plugin.search.routed import RoutedIndex
    from plugin.store import LEVELS, Store
    from workers.client import make_celery

    running = Running(settings)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        running.lock = DataDirLock(settings.data_dir).acquire(on_wait=lambda m: print(f"data dir  {m}", flush=True))
        _fresh_tmp_dir(settings)
        if not settings.redis_url:
            running.redis = EmbeddedRedis(
                settings.redis_dir, password=settings.embedded_redis_password(), keep_fds=(running.lock.fd,)
            ).start()
            settings = running.settings = settings.replace(redis_url=running.redis.url)
            write_runtime_url(settings.data_dir, settings.redis_url)
            print(f"redis     {_redacted(settings.redis_url)} (embedded, data in {settings.redis_dir})", flush=True)
        else:
            print(f"redis     {_redacted(settings.redis_url)}", flush=True)

        client = redis.Redis.from_url(settings.redis_url)
        client.ping()
        store = Store(client, settings.redis_namespace)
        running.heartbeats = store.workers
        celery_app = make_celery(settings)

        for n in range(settings.serve_workers):
            child = Child(f"worker {n}", spawn=lambda n=n: _spawn_worker(running.settings, n))
            child.start()
            running.workers.append(child)
        if settings.serve_workers:
            print(f"workers   {settings.serve_workers} Celery worker process(es), device {settings.device}", flush=True)
        else:
            print("workers   none started here (run `drh-pacs worker` against the same Redis)", flush=True)

        kernels.warm_up()  # compile the scan and the filter passes now rather than on the first C-FIND
        eligible.warm_up()
        indexes = {level: RoutedIndex(store, level) for level in LEVELS}  # a replica per route
        running.refresher = threading.Thread(
            target=_refresh_forever, args=(indexes, running.stop_event), name="index-refresh", daemon=True
        )
        running.refresher.start()

        try:
            running.scp = start_scp(settings, store, indexes, celery_app)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise  # a TLS file, the spool's folder...: its own message, with its path
            raise ListenError(
                f"the DICOM listener cannot listen on {settings.dicom_host}:{settings.dicom_port}:"
                f" {exc.strerror or exc} (another program on this port? DRH_DICOM_PORT or --dicom-port chooses another)"
            ) from exc
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

        ctx = ApiContext(settings=settings, store=store, index=indexes, celery=celery_app, health=running.parts)
        ctx.extra["dicom_counters"] = running.scp.counters  # the listener's counts, for /metrics and /status
        running.http, running.http_thread = _start_http(settings, create_app(ctx))
        token_note = "DRH_API_TOKEN" if settings.api_token else f"token in {settings.data_dir / 'api-token'}"
        print(f"http      http://{settings.http_host}:{settings.http_port}/ ({token_note})", flush=True)
        frozen = freeze_startup_heap()  # no full collection pauses every thread for their sake
        log.info("start-up objects kept out of full garbage collections: %d", frozen)
    except BaseException:
        running.stop()
        raise
    return running


def _refresh_forever(indexes: dict[str, Any], stop: threading.Event) -> None:
    """Keep the replicas fresh; while Redis is away, say so once a minute rather than twice a second."""
    failing_since: float | None = None
    warned_at = 0.0
    while not stop.is_set():
        try:
            for index in indexes.values():
                index.refresh()
        except redis.exceptions.RedisError as exc:
            now = time.monotonic()
            if failing_since is None:
                failing_since = warned_at = now
                log.warning("index refresh failed (%s); retrying", exc)
            elif now - warned_at >= REPEAT_WARNING_SECONDS:
                warned_at = now
                log.warning("index refresh still failing after %.0f s (%s)", now - failing_since, exc)
        else:
            if failing_since is not None:
                log.info("index refresh works again after %.0f s", time.monotonic() - failing_since)
                failing_since = None
        stop.wait(INDEX_REFRESH_SECONDS)


class ListenError(RuntimeError):
    """A listener of serve could not open its port: said in one line, not a traceback."""


def _start_http(settings: Settings, app: Any) -> tuple[Any, threading.Thread]:
    import uvicorn

    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive():
            raise ListenError(
                f"the HTTP API cannot listen on {settings.http_host}:{settings.http_port} (another program on"
                " this port? DRH_HTTP_PORT or --http-port chooses another; uvicorn's line above says why)"
            )
        if time.monotonic() > deadline:
            raise ListenError("the HTTP API did not start in 15 s")
        time.sleep(0.05)
    return server, thread


def _fresh_tmp_dir(settings: Settings) -> None:
    """Empty data_dir/tmp: what is there is left from a previous run (only ``serve`` writes there,
    and it owns the data dir: :class:`plugin.core.processes.DataDirLock`)."""
    if settings.tmp_dir.exists():
        shutil.rmtree(settings.tmp_dir, ignore_errors=True)
    settings.tmp_dir.mkdir(mode=0o700)


def _redacted(url: str) -> str:
    """A Redis URL without its password, for printing."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="drh-pacs serve",
        description="Run the whole service until Ctrl-C: Redis (embedded when DRH_REDIS_URL is empty), the "
        "workers, the DICOM listener and the HTTP API; every setting also comes from DRH_* variables "
        "(README, 'Configuration').",
    )
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
    os.umask(UMASK)
    # Temporary files (received datasets, uploads) on the data disk, private (/tmp may be RAM);
    # the documented knobs: TMPDIR for the children, tempfile.tempdir for this process.
    os.environ["TMPDIR"] = str(settings.tmp_dir)
    tempfile.tempdir = str(settings.tmp_dir)
    try:
        running = start(settings)
    except (DataDirLocked, EmbeddedRedisError, ListenError) as exc:
        print(f"drh-pacs serve: {exc}", file=sys.stderr)
        return 1
    print("ready     press Ctrl-C to stop", flush=True)
    try:
        while not stop.wait(SUPERVISE_SECONDS):
            running.supervise()
    finally:
        running.stop()
        print("stopped", flush=True)
    return 0
