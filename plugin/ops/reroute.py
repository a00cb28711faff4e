"""``drh-pacs reroute [--dry-run]``: move every stored image to the route that takes it now.

Routes change what an image belongs to: an installation from before routes had one model that
hashed everything (after the upgrade it serves chest radiographs only, and the breast ultrasound or
CT it hashed then still sit in its index, where a chest query could find them); a route registered
later, or ``DRH_UNROUTED`` changed to ``none``, leaves images under a route that no longer takes
them. New arrivals are always routed right; this command sorts what is already stored.

It compares, for each indexed image (or one stored without a model), the route of the version that
holds it with the first route that takes it now (:meth:`plugin.store.models.ModelRegistry.matching`),
prints how many move from where to where, per modality, and (unless ``--dry-run``) moves them:

- into a route that takes them: one re-sort per route (:func:`plugin.ops.reindex.start_resort`), run
  by the workers like a re-index with the version already answering: only the images to move are
  encoded, then they leave their old route's index (codes removed, studies pooled again there);
- into no route (``DRH_UNROUTED=none``): their codes leave the old index here, their records say
  ``no-model`` and are counted per modality, and the studies they leave are pooled again by the
  workers.

Re-sorts run one after another (one re-index job at a time), each followed with a progress bar.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

from celery import Celery

from hashing.route import first_match
from plugin.core.header import recorded_routing
from plugin.core.settings import configured_models
from plugin.ops.maintenance import connect_app
from plugin.ops.reindex import describe, follow, start_resort
from plugin.store import ACTIVE_STATES, Store
from workers.client import POOL_STUDY, send, store_for

_FIELDS = ("study_uid", "modality", "body_part", "route_body_part", "photometric", "indexed_version", "route")
NO_MODEL = "(no model)"


@dataclass(frozen=True)
class Move:
    sop_uid: str
    study_uid: str
    modality: str
    old_version: str  # "" when stored without a model
    old_route: str  # NO_MODEL when stored without a model
    new_route: str  # NO_MODEL when no route takes it now


def misrouted(store: Store, unrouted: str) -> list[Move]:
    """The stored images whose route is not the one that takes them now."""
    routes = store.models.matching(unrouted)
    out = []
    for sop, rec in store.records.instances_in_states(("indexed", "no-model", "volume-slice"), _FIELDS):
        old_version = rec["indexed_version"] if rec["state"] == "indexed" else ""
        old = store.models.route_held(rec) or NO_MODEL
        route = first_match(routes, *recorded_routing(rec))
        new = route.name if route is not None else NO_MODEL
        if new != old:
            out.append(Move(sop, rec["study_uid"], rec["modality"] or "(none)", old_version, old, new))
    return out


def summary(moves: list[Move]) -> list[str]:
    """One line per (from, to, modality), the largest first."""
    counts = Counter((m.old_route, m.new_route, m.modality) for m in moves)
    return [f"  {n:>8}  {mod:<6} {old} -> {new}" for (old, new, mod), n in counts.most_common()]


def to_no_model(app: Celery, store: Store, moves: list[Move]) -> int:
    """Take images that no route takes now out of their old index, as stored without a model; the
    studies they leave are pooled again there by the workers. Returns the studies queued."""
    left: set[tuple[str, str]] = set()
    for m in moves:
        if m.old_version:
            store.codes.delete(m.old_version, "image", m.sop_uid)
            store.embeddings.delete(m.old_version, [m.sop_uid])
        fields = {"state": "no-model", "indexed_version": "", "route": "", "represented_by": ""}
        store.records.update_instance(m.sop_uid, fields)
        store.stats.count_no_model(m.modality)
        old = m.old_version or store.models.active(m.old_route)  # a slice outside the sample: its route's
        if old:
            left.add((old, m.study_uid))
    for version, study in sorted(left):
        send(app, POOL_STUDY, study_uid=study, version=version)
    return len(left)


def run(app: Celery, dry_run: bool = False, out: Any = sys.stdout) -> int:
    """Print the moves, then make them (unless ``dry_run``); 0 when everything is where it belongs."""
    from hashing.encoder import Encoder

    store = store_for(app)
    job = store.reindex.get()
    if job.get("state") in ACTIVE_STATES:
        print(f"drh-pacs reroute: {describe(job)}: wait for it to end", file=sys.stderr)
        return 1
    # An installation from before routes learns its routes first (what a worker does at start).
    store.models.seed(configured_models(app.drh_settings), lambda path: Encoder.load(path or None, device="cpu"))
    moves = misrouted(store, app.drh_settings.unrouted)
    if not moves:
        print("every stored image is in the route that takes it", file=out)
        return 0
    print(f"{len(moves)} stored image(s) are not in the route that takes them now:", file=out)
    for line in summary(moves):
        print(line, file=out)
    if dry_run:
        return 0
    unserved = [m for m in moves if m.new_route == NO_MODEL]
    if unserved:
        studies = to_no_model(app, store, unserved)
        print(f"{len(unserved)} image(s) stored without a model now; {studies} study(ies) pooled again", file=out)
    failed = 0
    for route in sorted({m.new_route for m in moves} - {NO_MODEL}):
        start_resort(app, route)
        job = follow(app)
        print(describe(job), file=out)
        failed += int(job.get("failed", 0) or 0) + (job.get("state") != "complete")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="drh-pacs reroute",
        description="move every stored image to the route that takes it now (an archive indexed before"
        " routes, or before a route was added)",
    )
    parser.add_argument("--dry-run", action="store_true", help="only say what would move, per modality")
    args = parser.parse_args(argv)
    app = connect_app("reroute")
    if app is None:
        return 2
    try:
        return run(app, dry_run=args.dry_run)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"drh-pacs reroute: {exc}", file=sys.stderr)
        return 1
