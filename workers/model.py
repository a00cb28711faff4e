"""The model in a worker: loaded once per worker process, lazily, on the configured device.

Celery's guide: expensive resources are cached on the ``Task`` base class and created on first use,
not at import (the front processes import the Celery app) and not in ``worker_process_init`` (which
must not block). A process may hold more than one encoder while a re-index runs: the active model's
and the new one's, both keyed by checkpoint path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Task

from plugin.store import Store
from workers.client import store_for

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

    @property
    def store(self) -> Store:
        return store_for(self.app)

    def encoder(self, path: str | None = None) -> Any:
        """The encoder of checkpoint ``path`` (None: ``Settings.model_path``; "": the model shipped
        with the package), loaded once per process."""
        settings = self.app.drh_settings
        key = settings.model_path if path is None else path
        with self._lock:
            enc = self._encoders.get(key)
            if enc is None:
                from hashing.encoder import Encoder, resolve_device

                started = time.monotonic()
                try:
                    if key == RANDOM_KEY:
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
        hostname = getattr(self.request, "hostname", None) or "unknown"
        record = {"device": str(enc.device), "model": enc.version, "pid": os.getpid(), "loaded": time.time()}
        try:
            self.store.workers.record_process(hostname, os.getpid(), record)
        except Exception as exc:  # status only: never fail a task for it
            log.warning("could not record the worker device: %s", exc)

    def encoder_for_version(self, version: str) -> Any:
        """The encoder of a registered version, from the checkpoint path recorded with it."""
        settings = self.app.drh_settings
        details = self.store.models.details(version)
        path = details["path"] if "path" in details else settings.model_path
        enc = self.encoder(path)
        if enc.version != version:
            from hashing.encoder import RANDOM_VERSION

            if version == RANDOM_VERSION:
                # The seeded placeholder used before trained weights shipped: reproducible at will, so
                # an installation started with it keeps working after a package upgrade.
                return self.encoder(RANDOM_KEY)
            raise ModelUnavailable(
                f"model {version} is registered with checkpoint {path or '(shipped default)'}, which holds"
                f" version {enc.version} on this worker: restore that checkpoint, or move to the new model"
                " with `drh-pacs reindex`"
            )
        return enc

    def target_versions(self) -> list[tuple[str, Any]]:
        """(version, encoder) pairs a new instance must be written for: the active model and, while a
        re-index runs, the new one too (so it is complete when it takes over)."""
        settings = self.app.drh_settings
        store = self.store
        active = store.models.active()
        if active is None:
            enc = self.encoder(settings.model_path)
            store.models.register(
                enc.version, enc.nbits, rerank_dim=enc.rerank_dim, path=settings.model_path, emb_dim=enc.emb_dim
            )
            if store.models.ensure_active(enc.version):
                store.models.set_state(enc.version, "complete")  # the first version is built as studies arrive
            active = store.models.active() or enc.version
        versions = [active]
        target = store.reindex.running_version()
        if target and target != active:
            versions.append(target)
        return [(version, self.encoder_for_version(version)) for version in versions]
