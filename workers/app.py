"""``drh-pacs worker``: the worker process, the one wiring point on the workers' side.

It reads the settings, builds the Celery application (:mod:`workers.client`), registers the tasks
(:mod:`workers.tasks`, :mod:`workers.reindex`), publishes a heartbeat for the status page, checks
that it can use its device (:mod:`workers.device`) and only then scans for studies due for pooling
when it takes the ``study`` queue (:func:`workers.tasks.scan_due_studies`) and runs a prefork Celery
worker on ``Settings.worker_queues``. Its pool processes die with it (``PR_SET_PDEATHSIG``): a worker
killed by the OOM killer or SIGKILL leaves no orphan holding a model. A GPU machine typically takes
all queues, a CPU-only helper only ``maintenance``.

A worker whose device is unusable takes no task (and claims no study for pooling): it says why in
its heartbeat (state ``refused``, shown on the status page and in ``drh_worker_up``), checks again
every :data:`DEVICE_RECHECK_SECONDS`, and starts consuming once the device works.
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
from celery.signals import worker_process_init, worker_ready

from plugin.core.logs import setup_logging
from plugin.core.settings import Settings, SettingsError, load_settings
from plugin.store import HEARTBEAT_SECONDS
from workers import reindex, tasks
from workers.client import QUEUES, make_celery, store_for
from workers.device import DeviceCheck, check_device

log = logging.getLogger("drh.workers")

# While the device is unusable, how often it is checked again.
DEVICE_RECHECK_SECONDS = 60.0
# Exit status of a worker stopped (SIGTERM) while it was refusing its device.
EXIT_DEVICE_UNUSABLE = 3


def worker_app(settings: Settings) -> Celery:
    """The Celery application with the tasks registered: what a worker process runs."""
    app = make_celery(settings)
    tasks.register(app)
    reindex.register(app)
    return app


def _beat(app: Celery, record: dict[str, Any]) -> None:
    try:
        record["last_seen"] = time.time()
        store_for(app).workers.beat(record)
    except redis.exceptions.RedisError as exc:
        log.warning("worker heartbeat failed: %s", exc)


def _heartbeat_loop(app: Celery, record: dict[str, Any], stop: threading.Event, wake: threading.Event) -> None:
    """Publish this worker for status pages every :data:`HEARTBEAT_SECONDS` (at once when ``wake`` is
    set: its state changed). On a clean exit the record says ``stopped``; a worker that dies without
    a word is shown offline by the readers once its beats stop."""
    try:
        workers = store_for(app).workers
        workers.forget_processes(record["hostname"])
        workers.forget_silent(time.time())
    except redis.exceptions.RedisError as exc:
        log.warning("could not prune old worker records: %s", exc)
    while not stop.is_set():
        _beat(app, record)
        wake.wait(HEARTBEAT_SECONDS)
        wake.clear()
    record["state"] = "stopped"
    _beat(app, record)


def _wait_for_device(settings: Settings, record: dict[str, Any], wake: threading.Event) -> DeviceCheck | None:
    """Check the device; while it is unusable, say so in the heartbeat and check again. None when the
    worker was asked to stop meanwhile (SIGTERM, Ctrl-C), the check itself included: a worker that
    ``serve`` started gets SIGTERM when ``serve`` dies, and the check (loading torch, probing a GPU)
    takes seconds. A stop asked then and not honoured left an orphan worker running on."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            check = check_device(settings.device)
            if stopping.is_set():
                log.info("asked to stop during the device check; stopping")
                return None
            if check.ok:
                return check
            record.update(state="refused", reason=f"device {check.device} unusable: {check.detail}")
            wake.set()
            log.error(
                "%s; this worker takes no task (checking again in %.0f s; fix the device or set DRH_DEVICE)",
                record["reason"],
                DEVICE_RECHECK_SECONDS,
            )
            if stopping.wait(DEVICE_RECHECK_SECONDS):
                return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Seconds a health check waits for the worker's answer to a Celery ping.
HEALTH_PING_SECONDS = 5.0


def health(app: Celery, hostname: str) -> tuple[bool, str]:
    """Whether worker ``hostname`` takes tasks: its heartbeat says online (not refusing its device,
    not silent) and its Celery consumer answers a ping. For container and systemd health checks."""
    from plugin.store import worker_state

    record = store_for(app).workers.heartbeats().get(hostname)
    if record is None:
        return False, f"{hostname}: no heartbeat (not started, or another --hostname)"
    state = worker_state(record, time.time())
    if state != "online":
        return False, f"{hostname}: {state}" + (f" ({record['reason']})" if record.get("reason") else "")
    # A ping is a broadcast, which the broker does not keep for a consumer that is (re)connecting:
    # ask again, within the same time, rather than call a worker that missed one message unhealthy.
    deadline = time.monotonic() + HEALTH_PING_SECONDS
    while not any(hostname in answer for answer in app.control.ping([hostname], timeout=1.0)):
        if time.monotonic() >= deadline:
            return False, f"{hostname}: online by its heartbeat, but its Celery consumer does not answer"
    return True, f"{hostname}: online, consuming {','.join(record.get('queues', []))} on {record.get('device')}"


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
    parser.add_argument(
        "--health",
        action="store_true",
        help="do not run a worker: exit 0 when the worker named by --hostname takes tasks, 1 otherwise",
    )
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
    if args.health:
        try:
            ok, why = health(app, hostname)
        except Exception as exc:  # noqa: BLE001 - Redis or the broker away: not healthy, say why
            ok, why = False, f"{hostname}: cannot ask ({type(exc).__name__}: {exc})"
        print(why, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    record = {
        "hostname": hostname,
        "pid": os.getpid(),
        "queues": settings.worker_queues,
        "concurrency": settings.worker_concurrency,
        # As configured until the device check resolves it ("auto" -> cuda:0 or cpu); the pool
        # processes report the device they really use once the model is loaded (workers.model).
        "device": settings.device,
        "state": "starting",
        "reason": "",
        "started": time.time(),
    }
    stop = threading.Event()
    wake = threading.Event()
    beat = threading.Thread(target=_heartbeat_loop, args=(app, record, stop, wake), name="drh-heartbeat", daemon=True)
    beat.start()
    worker_process_init.connect(_die_with_worker, weak=False)
    try:
        check = _wait_for_device(settings, record, wake)
        if check is None:  # asked to stop before the device was used
            return EXIT_DEVICE_UNUSABLE if record["state"] == "refused" else 0
        # "online" once the Celery consumer is ready (worker_ready), not before: a health check that
        # sees "online" may ping it at once
        record.update(reason="", device=check.device, device_name=check.detail)
        wake.set()

        def online(**_: Any) -> None:
            record["state"] = "online"
            wake.set()

        worker_ready.connect(online, weak=False)
        log.info(
            "worker %s on queues %s, device %s (%s)",
            hostname,
            ",".join(settings.worker_queues),
            check.device,
            check.detail,
        )
        if "study" in settings.worker_queues:
            scan = threading.Thread(target=_pool_scan_loop, args=(app, stop), name="drh-pool-scan", daemon=True)
            scan.start()
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
        wake.set()
        beat.join(5)
    return 0
