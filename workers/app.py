"""The Celery application: configured for no loss and no doubles, and the `drh-pacs worker` command.

Delivery guarantees, and why each setting is there:

- ``task_acks_late``: a message is acknowledged only when its task has finished, so a worker that
  dies mid-task leaves it in the broker. This is safe only because every task is idempotent (keyed
  by SOP Instance UID / Study Instance UID, see :mod:`workers.tasks`).
- ``task_reject_on_worker_lost``: when a pool process is killed (SIGKILL, the OOM killer) the
  parent worker requeues its message at once instead of acknowledging it as failed.
- ``visibility_timeout`` (Redis transport): when a whole worker machine vanishes, its unacknowledged
  messages are handed to another worker after ``task_visibility_timeout`` seconds.
- ``worker_prefetch_multiplier = 1``: a process holds one model message at a time, so a slow GPU
  batch never sits on messages another idle worker could take. Batching for the model is done by
  the task itself (see :func:`workers.tasks.index_instance`), not by prefetching.

Queues: ``ingest`` (one task per received instance: decode and hash; model work, GPU workers),
``study`` (DMIH study pooling; needs the model too) and ``maintenance`` (re-indexing, retries from
the failure ledger). A worker consumes ``Settings.worker_queues``; a GPU machine typically takes all
three, a CPU-only helper only ``maintenance`` or nothing.

This module must not import torch (the SCP imports it to enqueue): the model lives in
:mod:`workers.model` and is imported by the tasks only when one runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from plugin.redis_embedded import resolve_redis_url
from plugin.settings import Settings, SettingsError, load_settings

log = logging.getLogger("drh.workers")

QUEUES = ("ingest", "study", "maintenance")
TASK_ROUTES = {
    "drh.index_instance": {"queue": "ingest"},
    "drh.pool_study": {"queue": "study"},
    "drh.reindex_plan": {"queue": "maintenance"},
    "drh.reindex_batch": {"queue": "maintenance"},
    "drh.reindex_finish": {"queue": "maintenance"},
}
# Seconds between worker heartbeats in Redis (the status page lists live workers from them).
HEARTBEAT_SECONDS = 10.0


class EnqueueError(RuntimeError):
    """The broker or Redis did not accept the task; the caller keeps the file and retries later."""


def make_celery(settings: Settings) -> Celery:
    """The Celery application for these settings; tasks of :mod:`workers.tasks` are registered on it.

    The settings and a lazily created Redis client travel on the app object (``app.drh_settings``,
    :func:`redis_for`), so tasks get them explicitly rather than from module globals.
    """
    redis_url = resolve_redis_url(settings.redis_url, settings.data_dir)
    broker = settings.broker_url or redis_url
    settings = settings.replace(redis_url=redis_url, broker_url=broker)
    app = Celery("drh", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # One direct exchange per queue, bound by its own name: a queue declared without one would
        # share Celery's default binding and every message would land in all three queues.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="ingest",
        task_default_exchange="ingest",
        task_default_routing_key="ingest",
        task_routes=TASK_ROUTES,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.task_visibility_timeout,
            # publishing while Redis restarts: fail fast so the SCP keeps the file on its spool
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            "max_retries": 1,
        },
        broker_connection_timeout=5,
        task_publish_retry=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.drh_settings = settings  # type: ignore[attr-defined]
    app.drh_redis = None  # type: ignore[attr-defined]
    from workers import tasks

    tasks.register(app)
    return app


def redis_for(app: Celery) -> redis.Redis:
    """The store's Redis client of this process (created on first use, after any fork)."""
    client = getattr(app, "drh_redis", None)
    if client is None or getattr(app, "drh_redis_pid", None) != os.getpid():
        client = redis.Redis.from_url(
            app.drh_settings.redis_url,  # type: ignore[attr-defined]
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        app.drh_redis = client  # type: ignore[attr-defined]
        app.drh_redis_pid = os.getpid()  # type: ignore[attr-defined]
    return client


def enqueue_instance(
    celery_app: Celery, *, sop_uid: str, study_uid: str, path: str, source_ae: str, received_at: float
) -> None:
    """Queue one received instance for indexing; raises :class:`EnqueueError` when not accepted.

    Two writes: the batching hint (``ns:ingest:pending``, see :mod:`workers.tasks`) and the Celery
    message itself. Only the message matters for delivery; the hint lets a worker that holds one
    message hash other pending instances in the same model batch. Either failing raises, and the
    SCP keeps the spooled file for its reconciler.
    """
    from workers.tasks import pending_hint

    payload = {
        "sop_uid": sop_uid,
        "study_uid": study_uid,
        "path": str(path),
        "source_ae": source_ae or "",
        "received_at": float(received_at),
    }
    try:
        pending_hint(celery_app, payload)
        celery_app.send_task("drh.index_instance", kwargs=payload, queue="ingest", retry=False)
    except Exception as exc:  # kombu/redis raise many different types for "broker down"
        raise EnqueueError(f"could not enqueue instance {sop_uid}: {exc.__class__.__name__}: {exc}") from exc


def _heartbeat_loop(app: Celery, record: dict[str, Any], stop: threading.Event) -> None:
    """Publish this worker in the hash ``ns:workers`` so status pages see it (one HGETALL, no key
    scan); readers drop entries not refreshed for three heartbeats. Removed on a clean exit."""
    settings: Settings = app.drh_settings  # type: ignore[attr-defined]
    key = f"{settings.redis_namespace}:workers"
    _forget_old_processes(app, record["hostname"])
    while not stop.is_set():
        try:
            client = redis_for(app)
            record["last_seen"] = time.time()
            client.hset(key, record["hostname"], json.dumps(record))
        except redis.exceptions.RedisError as exc:
            log.warning("worker heartbeat failed: %s", exc)
        stop.wait(HEARTBEAT_SECONDS)
    try:
        redis_for(app).hdel(key, record["hostname"])
    except redis.exceptions.RedisError:
        pass


def _forget_old_processes(app: Celery, hostname: str) -> None:
    """Drop the device records of this worker's previous run (its pool processes are gone)."""
    settings: Settings = app.drh_settings  # type: ignore[attr-defined]
    key = f"{settings.redis_namespace}:workerprocs"
    try:
        client = redis_for(app)
        stale = [f for f in client.hkeys(key) if f.decode().rsplit("|", 1)[0] == hostname]
        if stale:
            client.hdel(key, *stale)
    except redis.exceptions.RedisError as exc:
        log.warning("could not prune old worker records: %s", exc)


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs worker``: a prefork Celery worker on the configured queues."""
    from plugin.logs import setup_logging

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
        app = make_celery(settings)
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
