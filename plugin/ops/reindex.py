"""``drh-pacs reindex MODEL [--wait]`` and ``drh-pacs register MODEL --route ...``: a new model
version for a route, built in the background from what the route holds.

Starting a job loads the checkpoint here once, to learn its version, code length and route (and to
fail now, not in every worker, if it is broken), registers the version for its route (the one its
checkpoint declares, or the one ``register`` gives), records the job (:mod:`plugin.store.reindex`)
and queues its plan; the workers do the rest (:mod:`workers.reindex`) while the route's previous
version (or, for a new route, the general model) keeps answering.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from celery import Celery

from hashing.route import Route
from plugin.core.settings import configured_models
from plugin.ops.maintenance import connect_app
from plugin.store import ACTIVE_STATES
from workers.client import REINDEX_PLAN, send, store_for


def start(app: Celery, model_path: str, *, force: bool = False, route: Route | None = None) -> dict[str, str]:
    """Register the new version for ``route`` (default: the one its checkpoint declares) and queue
    the plan; returns the job."""
    from hashing.encoder import SHIPPED_PREFIX, Encoder

    store = store_for(app)
    job = store.reindex.get()
    if job.get("state") in ACTIVE_STATES and not force:
        raise RuntimeError(f"a re-index to {job.get('version')} is already {job['state']} (use --force to restart)")
    # Workers find the checkpoint by this path: make it absolute (the same path on every worker).
    if model_path and not model_path.startswith(SHIPPED_PREFIX):
        model_path = str(Path(model_path).resolve())
    enc = Encoder.load(model_path or None, device="cpu")
    # A route registered before any image arrived must not keep the shipped routes out.
    store.models.seed(configured_models(app.drh_settings), lambda path: Encoder.load(path or None, device="cpu"))
    route = route or enc.route
    if not route.general and not route.specificity():
        raise RuntimeError(
            f"{enc.version} declares route {route.name} with no modality, body part or photometric"
            " interpretation: it would take every image no more specific route takes. Say what it serves"
            " (drh-pacs register ... --modality MG --body-part BREAST), or --general"
        )
    if store.models.details(enc.version) and store.models.route_of(enc.version).name != route.name:
        raise RuntimeError(
            f"model {enc.version} is registered for route {store.models.route_of(enc.version).name}; a version"
            " serves one route (train or save it under another version to serve another)"
        )
    if enc.version == store.models.active(route.name):
        raise RuntimeError(f"model {enc.version} is already the active version of route {route.name}")
    store.models.register(
        enc.version, enc.nbits, rerank_dim=enc.rerank_dim, route=route, path=model_path, emb_dim=enc.emb_dim
    )
    store.models.set_state(enc.version, "building")
    store.reindex.start(enc.version, model_path, store.models.active(route.name) or "")
    store.reindex.update({"route": route.name})
    send(app, REINDEX_PLAN, version=enc.version)
    return store.reindex.get()


def start_resort(app: Celery, route: str) -> dict[str, str]:
    """A re-index of ``route`` with the version already answering for it, which takes only the
    stored images that route takes but another route (or no model) holds: the re-sort of
    ``drh-pacs reroute``. The images leave the other routes' indexes at the end, as in any re-index."""
    store = store_for(app)
    job = store.reindex.get()
    if job.get("state") in ACTIVE_STATES:
        raise RuntimeError(f"a re-index to {job.get('version')} is {job['state']}: wait for it to end")
    version = store.models.active(route)
    if version is None:
        raise RuntimeError(f"no version answers for route {route}")
    store.reindex.start(version, store.models.details(version).get("path", ""), version)
    store.reindex.update({"route": route, "mode": "resort"})
    send(app, REINDEX_PLAN, version=version)
    return store.reindex.get()


def describe(job: dict[str, str]) -> str:
    what = "re-sort into" if job.get("mode") == "resort" else "re-index to"
    return (
        f"{what} {job.get('version')} (route {job.get('route') or '?'}): {job.get('state')},"
        f" {job.get('done', 0)}/{job.get('total', 0)} instances,"
        f" {job.get('failed', 0)} failed, studies pooled {job.get('studies_done', 0)}"
        f" (previous version {job.get('previous') or '(none)'})" + (f": {job['reason']}" if job.get("reason") else "")
    )


# Without a terminal (a log file, cron, a systemd unit) progress is a line this often: a bar's
# carriage-return redraws make one unreadable line there, which may show only when the job ends.
LINE_EVERY_S = 30.0


def follow(app: Celery) -> dict[str, str]:
    """A progress bar until the job ends (a line every :data:`LINE_EVERY_S` seconds when stderr
    is not a terminal); returns its final state."""
    from tqdm import tqdm

    store = store_for(app)
    if not sys.stderr.isatty():
        return follow_lines(store.reindex.get, LINE_EVERY_S)
    job = store.reindex.get()
    with tqdm(total=int(job.get("total", 0)) or None, unit="img", desc=f"re-index {job['version']}") as bar:
        while job.get("state") in ACTIVE_STATES:
            total = int(job.get("total", 0))
            if total and bar.total != total:
                bar.total = total
            bar.n = int(job.get("done", 0)) + int(job.get("failed", 0))
            bar.set_postfix_str(job.get("state", ""))
            bar.refresh()
            time.sleep(1.0)
            job = store.reindex.get()
        bar.n = int(job.get("done", 0)) + int(job.get("failed", 0))
        bar.refresh()
    return job


def follow_lines(get: Callable[[], dict[str, str]], every: float, poll: float = 1.0) -> dict[str, str]:
    """Print :func:`describe` of the job ``get`` returns now, every ``every`` seconds while it is
    active, and once when it ends; returns its final state."""
    job = get()
    last: float | None = None
    while job.get("state") in ACTIVE_STATES:
        now = time.monotonic()
        if last is None or now - last >= every:
            print(describe(job), file=sys.stderr, flush=True)
            last = now
        time.sleep(poll)
        job = get()
    print(describe(job), file=sys.stderr, flush=True)
    return job


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs reindex MODEL_PATH [--wait]`` or ``drh-pacs reindex --status``."""
    parser = argparse.ArgumentParser(prog="drh-pacs reindex", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="checkpoint of the new model version")
    parser.add_argument("--shipped", action="store_true", help="re-index to the model shipped with the package")
    parser.add_argument("--status", action="store_true", help="show the progress of the current job")
    parser.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    parser.add_argument("--force", action="store_true", help="restart even if a job is running")
    args = parser.parse_args(argv)
    app = connect_app("reindex")
    if app is None:
        return 2
    if args.model or args.shipped:
        try:
            job = start(app, "" if args.shipped else args.model, force=args.force)
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"drh-pacs reindex: {exc}", file=sys.stderr)
            return 1
        print(f"re-index to {job['version']} queued; {job['previous'] or '(none)'} answers until it completes")
    elif not args.status:
        parser.error("give a model checkpoint, --shipped, or --status")
    return _report(app, args.wait)


def _report(app: Celery, wait: bool) -> int:
    job = store_for(app).reindex.get()
    if not job:
        print("no re-index job")
        return 0
    if not wait:
        print(describe(job))
        return 0 if job.get("state") != "failed" else 1
    job = follow(app)
    print(describe(job))
    return 0 if job.get("state") == "complete" else 1


def register_main(argv: list[str] | None = None) -> int:
    """``drh-pacs register MODEL --route NAME [--modality ...] [--body-part ...] [--wait]``."""
    parser = argparse.ArgumentParser(
        prog="drh-pacs register",
        description="serve a trained checkpoint for a route (modalities, body parts) and re-index, in the"
        " background, the stored images that route takes",
    )
    parser.add_argument("model", help="checkpoint (drh-pacs train --out), or shipped:NAME")
    parser.add_argument("--route", help="route name (lower-case letters, digits, '-'); default: the checkpoint's")
    parser.add_argument("--modality", action="append", default=[], help="a modality it serves (repeat: MG, US...)")
    parser.add_argument("--body-part", action="append", default=[], help="a BodyPartExamined it serves (BREAST...)")
    parser.add_argument("--photometric", action="append", default=[], help="a PhotometricInterpretation it serves")
    parser.add_argument("--general", action="store_true", help="serve every image no other route takes")
    parser.add_argument("--wait", action="store_true", help="follow the re-index with a progress bar until it ends")
    parser.add_argument("--force", action="store_true", help="restart even if a re-index is running")
    args = parser.parse_args(argv)
    route = None
    if args.route or args.modality or args.body_part or args.photometric or args.general:
        if not args.route:
            parser.error("--modality, --body-part, --photometric and --general need --route NAME")
        try:
            route = Route(
                args.route, tuple(args.modality), tuple(args.body_part), tuple(args.photometric), args.general
            )
        except ValueError as exc:
            parser.error(str(exc))
    app = connect_app("register")
    if app is None:
        return 2
    try:
        job = start(app, args.model, force=args.force, route=route)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"drh-pacs register: {exc}", file=sys.stderr)
        return 1
    served = store_for(app).models.route_of(job["version"]).describe()
    print(
        f"{job['version']} registered for route {served}; re-indexing what it takes in the background"
        f" ({job['previous'] or 'the general model or no model'} answers for it until then)"
    )
    return _report(app, args.wait)
