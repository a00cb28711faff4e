"""The model in a worker: loaded once per worker process, lazily, on the configured device.

Celery's guide: expensive resources are cached on the ``Task`` base class and created on first use,
not at import (the SCP imports the Celery app) and not in ``worker_process_init`` (which must not
block). A process may hold more than one encoder while a re-index runs: the active model's and the
new one's, both keyed by checkpoint path.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from celery import Task

log = logging.getLogger("drh.workers.model")


# Cache key of the seeded placeholder model (hashing.encoder.Encoder.random).
RANDOM_KEY = "<random>"


class ModelUnavailable(RuntimeError):
    """A model version is registered in Redis but its checkpoint cannot be loaded on this worker."""


class ModelTask(Task):
    """Base of the tasks that need the encoder. One instance per task type per process."""

    abstract = True
    # Per process (each prefork child fills its own after the fork): checkpoint path -> Encoder.
    _encoders: dict[str, Any] = {}
    _lock = threading.Lock()

    def encoder(self, path: str | None = None) -> Any:
        """The encoder of checkpoint ``path`` (None: ``Settings.model_path``; "": the model shipped
        with the package), loaded once per process."""
        settings = self.app.drh_settings
        key = settings.model_path if path is None else path
        with self._lock:
            enc = self._encoders.get(key)
            if enc is None:
                from hashing.encoder import Encoder

                started = time.monotonic()
                try:
                    if key == RANDOM_KEY:
                        from hashing.encoder import resolve_device

                        enc = Encoder.random(resolve_device(settings.device))
                    else:
                        enc = Encoder.load(key or None, device=settings.device)
                except FileNotFoundError as exc:
                    raise ModelUnavailable(f"model checkpoint {key!r} not found on this worker: {exc}") from exc
                self._encoders[key] = enc
                log.info(
                    "loaded model %s (%d bits) on %s in %.1f s",
                    enc.version,
                    enc.nbits,
                    enc.device,
                    time.monotonic() - started,
                )
                self._announce(enc)
        return enc

    def _announce(self, enc: Any) -> None:
        """Tell the status page which device this process really uses (after ``auto`` is resolved)."""
        from workers.app import redis_for

        settings = self.app.drh_settings
        hostname = getattr(self.request, "hostname", None) or "unknown"
        record = {"device": str(enc.device), "model": enc.version, "pid": os.getpid(), "loaded": time.time()}
        try:
            redis_for(self.app).hset(
                f"{settings.redis_namespace}:workerprocs", f"{hostname}|{os.getpid()}", json.dumps(record)
            )
        except Exception as exc:  # status only: never fail a task for it
            log.warning("could not record the worker device: %s", exc)
