"""How the front processes reach the workers: the Celery application, configured, and the messages
they send. It imports neither the tasks nor torch, so the SCP, the HTTP API and the CLI can enqueue
without loading a model (``tests/test_layers.py`` holds this).

Delivery guarantees, and why each setting is there:

- ``task_acks_late``: a message is acknowledged only when its task has finished, so a worker that
  dies mid-task leaves it in the broker. Safe only because every task is idempotent (keyed by SOP
  Instance UID / Study Instance UID, see :mod:`workers.tasks`).
- ``task_reject_on_worker_lost``: when a pool process is killed (SIGKILL, the OOM killer) the
  parent worker requeues its message at once instead of acknowledging it as failed.
- ``visibility_timeout`` (Redis transport): when a whole worker machine vanishes, its unacknowledged
  messages are handed to another worker after ``task_visibility_timeout`` seconds.
- ``worker_prefetch_multiplier = 1``: a process holds one model message at a time, so a slow GPU
  batch never sits on messages another idle worker could take. Batching for the model is done by
  the task itself (:mod:`workers.batching`), not by prefetching.

Queues: ``ingest`` (one task per received instance: decode and hash; model work), ``study`` (DMIH
study pooling; needs the model too) and ``maintenance`` (re-indexing). A new queue is a name in
:data:`QUEUES` and its tasks in :data:`TASK_ROUTES`.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from plugin.core.redis_server import resolve_redis_url
from plugin.core.settings import Settings
from plugin.store import Store

QUEUES = ("ingest", "study", "maintenance")

INDEX_INSTANCE = "drh.index_instance"
POOL_STUDY = "drh.pool_study"
REINDEX_PLAN = "drh.reindex_plan"
REINDEX_BATCH = "drh.reindex_batch"
REINDEX_FINISH = "drh.reindex_finish"

TASK_ROUTES = {
    INDEX_INSTANCE: {"queue": "ingest"},
    POOL_STUDY: {"queue": "study"},
    REINDEX_PLAN: {"queue": "maintenance"},
    REINDEX_BATCH: {"queue": "maintenance"},
    REINDEX_FINISH: {"queue": "maintenance"},
}


class EnqueueError(RuntimeError):
    """The broker or Redis did not accept the task; the caller keeps the file and retries later."""


def make_celery(settings: Settings) -> Celery:
    """The Celery application for these settings, configured for no loss and no doubles.

    The settings and a lazily created store travel on the app object (``app.drh_settings``,
    :func:`store_for`), so tasks get them explicitly rather than from module globals. No task is
    registered here: senders address tasks by name; :func:`workers.app.worker_app` registers them.
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
    app.drh_store = None  # type: ignore[attr-defined]
    return app


def store_for(app: Celery) -> Store:
    """The store of this process (its Redis client created on first use, after any fork)."""
    store = getattr(app, "drh_store", None)
    if store is None or getattr(app, "drh_store_pid", None) != os.getpid():
        settings: Settings = app.drh_settings  # type: ignore[attr-defined]
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )
        store = Store(client, settings.redis_namespace)
        app.drh_store = store  # type: ignore[attr-defined]
        app.drh_store_pid = os.getpid()  # type: ignore[attr-defined]
    return store


def enqueue_instance(
    app: Celery, *, sop_uid: str, study_uid: str, path: str, source_ae: str, received_at: float
) -> None:
    """Queue one received instance for indexing; raises :class:`EnqueueError` when not accepted.

    Two writes: the batching hint (:mod:`plugin.store.ingest`) and the Celery message itself. Only
    the message matters for delivery; the hint lets a worker that holds one message hash other
    pending instances in the same model batch. Either failing raises, and the caller keeps the
    spooled file for its reconciler.
    """
    payload = {
        "sop_uid": sop_uid,
        "study_uid": study_uid,
        "path": str(path),
        "source_ae": source_ae or "",
        "received_at": float(received_at),
    }
    try:
        store_for(app).ingest.hint(payload)
        app.send_task(INDEX_INSTANCE, kwargs=payload, queue="ingest", retry=False)
    except Exception as exc:  # kombu/redis raise many different types for "broker down"
        raise EnqueueError(f"could not enqueue instance {sop_uid}: {exc.__class__.__name__}: {exc}") from exc


def retry_failed(app: Celery, sop_uid: str) -> bool:
    """Re-queue one instance of the failure ledger; False when it is not in the ledger.

    The received_at of the original arrival is kept, so the task is not mistaken for a duplicate
    of a newer arrival; the instance is marked ``retrying`` first, since a worker treats a
    ``failed`` instance as settled (so that a redelivery does not fail it twice), and back to
    ``failed`` when the broker refuses the message (:class:`EnqueueError` is raised).
    """
    store = store_for(app)
    entry = store.ledger.mark_retrying(sop_uid)
    if entry is None:
        return False
    store.records.update_instance(sop_uid, {"state": "retrying"})
    try:
        enqueue_instance(
            app,
            sop_uid=sop_uid,
            study_uid=entry["study_uid"],
            path=entry["path"],
            source_ae=entry.get("source_ae", ""),
            received_at=float(entry.get("received_at", 0.0)),
        )
    except EnqueueError:
        # not queued: a failure again, not "retrying" for ever with nothing on its way
        store.ledger.unmark_retrying(sop_uid)
        store.records.update_instance(sop_uid, {"state": "failed"})
        raise
    return True


def retry_all_failed(app: Celery) -> int:
    store = store_for(app)
    return sum(retry_failed(app, uid) for uid in store.ledger.all_uids())


def send(app: Celery, task: str, **kwargs: Any) -> None:
    """Send a task by name to its queue (:data:`TASK_ROUTES`)."""
    app.send_task(task, kwargs=kwargs, queue=TASK_ROUTES[task]["queue"])
