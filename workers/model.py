"""The model in a worker: loaded once per worker process, lazily, on the configured device.

Celery's guide: expensive resources are cached on the ``Task`` base class and created on first use,
not at import (the front processes import the Celery app) and not in ``worker_process_init`` (which
must not block). A process holds one encoder per route it serves (and, while a re-index runs, the new model
too), keyed by checkpoint path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Task

from hashing.route import Route, fell_back, first_match, taking
from plugin.core.settings import configured_models
from plugin.store import Store
from workers.client import store_for

log = logging.getLogger("drh.workers.model")


# Cache key of the seeded placeholder model (hashing.encoder.Encoder.random).
RANDOM_KEY = "<random>"


class ModelUnavailable(RuntimeError):
    """A model version is registered in Redis but its checkpoint cannot be loaded on this worker."""


def shipped_predecessor(version: str) -> str | None:
    """``shipped:VERSION`` when the package ships an earlier default under its version's name
    (``hashing/weights/VERSION.pt``), else None."""
    from hashing.encoder import SHIPPED_PREFIX, resolve_model_path

    try:
        resolve_model_path(f"{SHIPPED_PREFIX}{version}")
    except FileNotFoundError:
        return None
    return f"{SHIPPED_PREFIX}{version}"


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
            previous = shipped_predecessor(version)
            if previous is not None and self.encoder(previous).version == version:
                # The default of an earlier release, still shipped by name: after a package upgrade the
                # old version keeps indexing new arrivals (written for it and the re-index's target)
                # until `drh-pacs reindex --shipped` switches to the new default.
                return self.encoder(previous)
            raise ModelUnavailable(
                f"model {version} is registered with checkpoint {path or '(shipped default)'}, which holds"
                f" version {enc.version} on this worker: restore that checkpoint, or move to the new model"
                " with `drh-pacs reindex`"
            )
        return enc

    _bootstrapped: set[str] = set()  # namespaces whose configured models this process has registered

    def bootstrap_routes(self) -> None:
        """Seed an empty installation with the configured models (:meth:`ModelRegistry.seed`), once
        per process."""
        settings = self.app.drh_settings
        if settings.redis_namespace in self._bootstrapped:
            return
        for version in self.store.models.seed(configured_models(settings), self.encoder):
            log.info("model %s answers for route %s", version, self.store.models.route_of(version).describe())
        self._bootstrapped.add(settings.redis_namespace)

    def router(self) -> Router:
        """Which versions an image is written for, from one reading of the routes."""
        self.bootstrap_routes()
        target = self.store.reindex.running_version()
        target_route = self.store.models.route_of(target) if target else None
        unrouted = self.app.drh_settings.unrouted
        return Router(self.store.models.table(), target, target_route, self.encoder_for_version, unrouted)

    def pool_versions(self) -> list[tuple[str, Any]]:
        """(version, encoder) of every answering version and of a re-index's new one: a study is
        pooled for each that holds embeddings of its images."""
        self.bootstrap_routes()
        store = self.store
        versions = list(dict.fromkeys(store.models.active_routes().values()))
        target = store.reindex.running_version()
        if target and target not in versions:
            versions.append(target)
        return [(version, self.encoder_for_version(version)) for version in versions]


class Router:
    """The routing of one batch: an image goes to the answering version of the first route that
    takes it (:func:`hashing.route.first_match`), and also to a re-index's new version when, once
    that version answers, the image will be its route's: a new route is complete when it takes over."""

    def __init__(
        self,
        table: list[tuple[Route, str]],
        target: str | None,
        target_route: Route | None,
        encoder: Any,
        unrouted: str = "general",
    ) -> None:
        """``table``: the answering (route, version) pairs; ``unrouted``: ``Settings.unrouted``. The
        routes are read as :meth:`plugin.store.models.ModelRegistry.matching` reads them for a
        re-index (:func:`hashing.route.taking`), so the two agree on which images a route takes."""
        self.target = target
        self.encoder = encoder
        routes = [r for r, _ in table]
        self._routes = taking(routes, unrouted)
        self._versions = {r.name: v for r, v in table}
        self.target_route = target_route
        self._after = taking(routes, unrouted, replacing=target_route) if target_route is not None else []

    def fell_back(self, header: tuple[str, str, str]) -> bool:
        """The image goes to the general model though a specific route takes its modality
        (:func:`hashing.route.fell_back`)."""
        return fell_back(self._routes, *header)

    def __call__(self, header: tuple[str, str, str]) -> list[tuple[str, str, Any]]:
        """(route, version, encoder) the image is written for, the answering one first; [] when no
        route takes it."""
        out: list[tuple[str, str, Any]] = []
        route = first_match(self._routes, *header)
        if route is not None:
            version = self._versions[route.name]
            out.append((route.name, version, self.encoder(version)))
        tr = self.target_route
        if self.target and tr is not None and first_match(self._after, *header) == tr:
            if all(v != self.target for _, v, _ in out):
                out.append((tr.name, self.target, self.encoder(self.target)))
        return out
