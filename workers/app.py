"""``drh-pacs worker``: the worker process, the one wiring point on the workers' side.

It reads the settings, builds the Celery application (:mod:`workers.client`), registers the tasks
(:mod:`workers.tasks`, :mod:`workers.reindex`), publishes a heartbeat for the status page, scans for
studies due for pooling when it takes the ``study`` queue (:func:`workers.tasks.scan_due_studies`),
and runs a prefork Celery worker on ``Settings.worker_queues``. Its pool processes die with it
(``PR_SET_PDEATHSIG``): a worker killed by the OOM killer or SIGKILL leaves no orphan holding a
model. A GPU machine typically takes all queues, a CPU-only helper only ``maintenance``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import redis
from billiard.util import set_pdeathsig
from celery import Celery
from celery.signals import worker_process_init

from plugin.core.logs import setup_logging
from plugin.core.settings import Settings, SettingsError, load_settings
from plugin.store import HEARTBEAT_SECONDS
from workers import reindex, tasks
from workers.client import QUEUES, make_celery, store_for

log = logging.getLogger("drh.workers")


def worker_app(settings: Settings) -> Celery:
    """The Celery application with the tasks registered: what a worker process runs."""
    app = make_celery(settings)
    tasks.register(app)
    reindex.register(app)
    return app


def _heartbeat_loop(app: Celery, record: dict[str, Any], stop: threading.Event) -> None:
    """Publish this worker for status pages every :data:`HEARTBEAT_SECONDS`; readers drop entries not
    refreshed for three periods. Removed on a clean exit."""
    try:
        store_for(app).workers.forget_processes(record["hostname"])
    except redis.exceptions.RedisError as exc:
        log.warning("could not prune old worker records: %s", exc)
    while not stop.is_set():
        try:
            record["last_seen"] = time.time()
            store_for(app).workers.beat(record)
        except redis.exceptions.RedisError as exc:
            log.warning("worker heartbeat failed: %s", exc)
        stop.wait(HEARTBEAT_SECONDS)
    try:
        store_for(app).workers.remove(record["hostname"])
    except redis.exceptions.RedisError:
        pass


def _pool_scan_loop(app: Celery, stop: threading.Event) -> None:
    """Claim due studies every :data:`workers.tasks.POOL_SCAN_SECONDS`; a Redis outage is logged once
    a minute at most, and the scan goes on when Redis is back."""
    warned_at = float("-inf")
    while not stop.wait(tasks.POOL_SCAN_SECONDS):
        try:
            tasks.scan_due_studies(app)
        except Exception as exc:  # noqa: BLE001 - Redis or the broker away: the leases keep the studies
            if time.monotonic() - warned_at >= 60.0:
                warned_at = time.monotonic()
                log.warning("scan for studies due for pooling failed (%s); retrying", exc)


def _die_with_worker(**_: Any) -> None:
    """In each pool process: SIGKILL when the worker's main process dies (it held the messages,
    which the broker hands out again)."""
    try:
        set_pdeathsig(signal.SIGKILL)
    except OSError as exc:  # not Linux
        log.debug("pool process not bound to its parent: %s", exc)


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs worker``: a prefork Celery worker on the configured queues."""
    parser = argparse.ArgumentParser(prog="drh-pacs worker", description="run a Celery worker for drh-pacs")
    parser.add_argument("--queues", help="comma separated queues (overrides DRH_WORKER_QUEUES)")
    parser.add_argument("--concurrency", type=int, help="processes (overrides DRH_WORKER_CONCURRENCY)")
    parser.add_argument("--device", help="auto, cpu or cuda:N (overrides DRH_DEVICE)")
    parser.add_argument("--hostname", default=f"drh-{os.getpid()}@{socket.gethostname()}", help="Celery node name")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"device": args.device, "worker_concurrency": args.concurrency}
    if args.queues:
        overrides["worker_queues"] = [q.strip() for q in args.queues.split(",") if q.strip()]
    try:
        settings = load_settings(**overrides)
        app = worker_app(settings)
    except (SettingsError, RuntimeError) as exc:
        print(f"drh-pacs worker: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    unknown = set(settings.worker_queues) - set(QUEUES)
    if unknown:
        print(f"drh-pacs worker: unknown queues {sorted(unknown)}; known: {', '.join(QUEUES)}", file=sys.stderr)
        return 2
    hostname = args.hostname.replace("%h", socket.gethostname())
    record = {
        "hostname": hostname,
        "pid": os.getpid(),
        "queues": settings.worker_queues,
        "concurrency": settings.worker_concurrency,
        # As configured: the pool processes report the device they really use once the model is
        # loaded (workers.model). Resolving "auto" here would initialise CUDA before the fork.
        "device": settings.device,
        "started": time.time(),
    }
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat_loop, args=(app, record, stop), name="drh-heartbeat", daemon=True)
    beat.start()
    if "study" in settings.worker_queues:
        scan = threading.Thread(target=_pool_scan_loop, args=(app, stop), name="drh-pool-scan", daemon=True)
        scan.start()
    worker_process_init.connect(_die_with_worker, weak=False)
    log.info("worker %s on queues %s, device %s", hostname, ",".join(settings.worker_queues), record["device"])
    try:
        app.worker_main(
            [
                "worker",
                f"--pool={args.pool}",
                f"--concurrency={settings.worker_concurrency}",
                f"--queues={','.join(settings.worker_queues)}",
                f"--hostname={hostname}",
                f"--loglevel={settings.log_level}",
                "--without-mingle",
                "--without-gossip",
            ]
        )
    finally:
        stop.set()
        beat.join(5)
    return 0
