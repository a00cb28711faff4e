"""``drh-pacs delete-study``, ``compact`` and ``models``: the store's housekeeping, for IT staff.

A study is deleted when it was misfiled (wrong patient), retracted, or must be erased: its codes are
tombstoned in every model version, its metadata, embeddings and failure-ledger entries go, and its
spooled files are removed, so nothing of it can be answered or re-indexed afterwards. Tombstoned slots
still take room in the code strings until ``compact`` renumbers the live ones; replicas notice the new
generation and reload. Compaction holds writers of that (version, level) off for its duration, so run
it in a quiet hour (`deploy/systemd/drh-pacs-compact.timer` runs it weekly) rather than after every deletion.

A re-index keeps the previous model version in Redis (about 375 bytes per code, its UID maps and
change-log entry included, and 370 per instance embedding, measured) so that IT staff can switch
back; ``models drop`` frees it once the new one has proved itself.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time

import redis
from celery import Celery

from plugin.core.header import is_uid
from plugin.core.redis_server import EmbeddedRedisError, resolve_redis_url
from plugin.core.settings import Settings, SettingsError, load_settings
from plugin.ops.status import model_versions
from plugin.store import LEVELS, Store, StoreError
from workers.client import make_celery

log = logging.getLogger("drh.maintenance")


def delete_studies(
    settings: Settings, store: Store, study_uids: list[str], keep_files: bool = False
) -> tuple[int, list[str]]:
    """Delete each study everywhere; returns the number of codes tombstoned, and the UIDs of which
    nothing was found (no record, instance, code or spooled file: a typo, or deleted already)."""
    removed = 0
    unknown = []
    for uid in study_uids:
        sops = store.records.study_instances(uid)
        known = bool(sops or store.records.study(uid))
        codes = store.delete_study(uid)
        folder = settings.spool_dir / uid
        if folder.is_dir():
            known = True
            if not keep_files:
                shutil.rmtree(folder)
        if not (known or codes):
            unknown.append(uid)
            continue
        removed += codes
        log.info("deleted study %s (%d instances)", uid, len(sops))
    return removed, unknown


def compact_all(store: Store, versions: list[str], levels: tuple[str, ...] = LEVELS) -> dict[str, int]:
    """Compact every (version, level) that has tombstones; returns slots reclaimed per pair."""
    reclaimed: dict[str, int] = {}
    for version in versions:
        for level in levels:
            if store.codes.tombstones(version, level):
                reclaimed[f"{version}/{level}"] = store.codes.compact(version, level)
    return reclaimed


def connect(command: str) -> tuple[Settings, Store] | None:
    """Settings and the store, or None after saying why on stderr."""
    try:
        settings = load_settings()
        client = redis.Redis.from_url(resolve_redis_url(settings.redis_url, settings.data_dir))
        client.ping()
    except (SettingsError, EmbeddedRedisError, redis.exceptions.RedisError) as exc:
        print(f"drh-pacs {command}: {exc}", file=sys.stderr)
        return None
    return settings, Store(client, settings.redis_namespace)


def connect_app(command: str) -> Celery | None:
    """The Celery app of the settings (for commands that hand work to the workers), or None after
    saying why on stderr."""
    try:
        return make_celery(load_settings())
    except (SettingsError, RuntimeError) as exc:
        print(f"drh-pacs {command}: {exc}", file=sys.stderr)
        return None


def delete_study_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drh-pacs delete-study", description=__doc__.split("\n")[0])
    parser.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    parser.add_argument("--keep-files", action="store_true", help="leave the spooled DICOM files on disk")
    args = parser.parse_args(argv)
    bad = [u for u in args.study_uids if not is_uid(u)]
    if bad:
        print(f"drh-pacs delete-study: not valid UIDs: {', '.join(bad)}", file=sys.stderr)
        return 2
    connected = connect("delete-study")
    if connected is None:
        return 2
    settings, store = connected
    removed, unknown = delete_studies(settings, store, args.study_uids, keep_files=args.keep_files)
    deleted = len(args.study_uids) - len(unknown)
    if deleted:
        print(f"deleted {deleted} study(ies), {removed} code(s) tombstoned; `drh-pacs compact` reclaims them")
    if unknown:
        print(f"drh-pacs delete-study: not known here, nothing deleted: {', '.join(unknown)}", file=sys.stderr)
        return 1
    return 0


def compact_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drh-pacs compact", description="reclaim the slots of deleted codes")
    parser.add_argument("--version", action="append", help="model version (repeatable; default: all)")
    args = parser.parse_args(argv)
    connected = connect("compact")
    if connected is None:
        return 2
    _, store = connected
    try:
        reclaimed = compact_all(store, args.version or store.models.versions())
    except StoreError as exc:
        print(f"drh-pacs compact: {exc}", file=sys.stderr)
        return 1
    for pair, n in reclaimed.items():
        print(f"{pair}: {n} slot(s) reclaimed")
    if not reclaimed:
        print("nothing to compact")
    return 0


def repool_main(argv: list[str] | None = None) -> int:
    """Pool every stored study again: the workers compute its series and study codes from the
    stored embeddings (no model pass, except for volume slices not sampled yet). Studies stored
    before series codes existed get theirs this way."""
    parser = argparse.ArgumentParser(
        prog="drh-pacs repool",
        description="pool every stored study again: series and study codes from the stored embeddings",
    )
    parser.parse_args(argv)
    connected = connect("repool")
    if connected is None:
        return 2
    _, store = connected
    studies = store.records.study_uids()
    now = time.time()
    for study in studies:
        store.ingest.pool_due(study, now)
    print(f"{len(studies)} study(ies) due for pooling; the workers pool them as they scan (drh-pacs status)")
    return 0


def models_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="drh-pacs models", description="list the model versions in Redis, or drop one that no longer answers"
    )
    sub = parser.add_subparsers(dest="action")
    sub.add_parser("list", help="versions, their state and sizes (the default)")
    drop = sub.add_parser("drop", help="remove a version's codes and embeddings (never the active one)")
    drop.add_argument("version")
    args = parser.parse_args(argv)
    connected = connect("models")
    if connected is None:
        return 2
    _, store = connected
    rebuilding = store.reindex.running_version()
    rows = model_versions(store)
    if args.action == "drop":
        if all(r["version"] != args.version for r in rows):
            print(f"drh-pacs models: unknown model version {args.version!r}", file=sys.stderr)
            return 1
        if args.version == rebuilding:
            print(f"drh-pacs models: a re-index to {args.version} is running; it cannot be dropped", file=sys.stderr)
            return 1
        try:
            counts = store.models.drop(args.version)
        except StoreError as exc:
            print(f"drh-pacs models: {exc}", file=sys.stderr)
            return 1
        log.info("dropped model version %s (%s)", args.version, counts)
        print(f"dropped {args.version}: {counts['image']} image and {counts['study']} study code(s) removed")
        return 0
    if not rows:
        print("no model version registered yet (the first worker registers the default model)")
        return 0
    header = (
        f"{'version':<32} {'bits':>4}  {'state':<9} {'image codes':>11} {'study codes':>11} {'embeddings':>10}"
        f" {'variants':>8}"
    )
    print(header + "  route")
    for r in rows:
        mark = " (active)" if r["active"] else " (re-indexing)" if r["version"] == rebuilding else ""
        print(
            f"{r['version']:<32} {r['nbits']:>4}  {r['state']:<9} {r['image']:>11} {r['study']:>11}"
            f" {r['embeddings']:>10} {r['variants']:>8}{mark}  {r['serves']}"
        )
    return 0
