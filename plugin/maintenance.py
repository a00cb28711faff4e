"""``drh-pacs delete-study`` and ``drh-pacs compact``: the store's deletion and compaction, for IT staff.

A study is deleted when it was misfiled (wrong patient), retracted, or must be erased: its codes are
tombstoned in every model version, its metadata, embeddings and failure-ledger entries go, and its
spooled files are removed, so nothing of it can be answered or re-indexed afterwards. Tombstoned slots
still take room in the code strings until ``compact`` renumbers the live ones; replicas notice the new
generation and reload. Compaction holds writers of that (version, level) off for its duration, so run
it in a quiet hour (e.g. weekly from cron) rather than after every deletion.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys

import redis

from plugin.dicom_meta import is_uid
from plugin.redis_embedded import EmbeddedRedisError, resolve_redis_url
from plugin.settings import Settings, SettingsError, load_settings
from plugin.store import LEVELS, CodeStore, StoreError

log = logging.getLogger("drh.maintenance")


def delete_studies(settings: Settings, store: CodeStore, study_uids: list[str], keep_files: bool = False) -> int:
    """Delete each study everywhere; returns the number of codes tombstoned."""
    from workers.failures import FailureLedger

    ledger = FailureLedger(store.r, settings.redis_namespace)
    removed = 0
    for uid in study_uids:
        sops = store.study_instances(uid)
        removed += store.delete_study(uid)
        for sop in sops:
            ledger.resolve(sop)
        folder = settings.spool_dir / uid
        if not keep_files and folder.is_dir():
            shutil.rmtree(folder)
        log.info("deleted study %s (%d instances)", uid, len(sops))
    return removed


def tombstones(store: CodeStore, version: str, level: str) -> int:
    return int(store.r.bitcount(store.keys.tomb(version, level)))


def compact_all(store: CodeStore, versions: list[str], levels: tuple[str, ...] = LEVELS) -> dict[str, int]:
    """Compact every (version, level) that has tombstones; returns slots reclaimed per pair."""
    reclaimed: dict[str, int] = {}
    for version in versions:
        for level in levels:
            if tombstones(store, version, level):
                reclaimed[f"{version}/{level}"] = store.compact(version, level)
    return reclaimed


def _connect(command: str) -> tuple[Settings, CodeStore] | None:
    """Settings and the store, or None after saying why on stderr."""
    try:
        settings = load_settings()
        client = redis.Redis.from_url(resolve_redis_url(settings.redis_url, settings.data_dir))
        client.ping()
    except (SettingsError, EmbeddedRedisError, redis.exceptions.RedisError) as exc:
        print(f"drh-pacs {command}: {exc}", file=sys.stderr)
        return None
    return settings, CodeStore(client, settings.redis_namespace)


def delete_study_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drh-pacs delete-study", description=__doc__.split("\n")[0])
    parser.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    parser.add_argument("--keep-files", action="store_true", help="leave the spooled DICOM files on disk")
    args = parser.parse_args(argv)
    bad = [u for u in args.study_uids if not is_uid(u)]
    if bad:
        print(f"drh-pacs delete-study: not valid UIDs: {', '.join(bad)}", file=sys.stderr)
        return 2
    connected = _connect("delete-study")
    if connected is None:
        return 2
    settings, store = connected
    removed = delete_studies(settings, store, args.study_uids, keep_files=args.keep_files)
    print(f"deleted {len(args.study_uids)} study(ies), {removed} code(s) tombstoned; `drh-pacs compact` reclaims them")
    return 0


def compact_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drh-pacs compact", description="reclaim the slots of deleted codes")
    parser.add_argument("--version", action="append", help="model version (repeatable; default: all)")
    args = parser.parse_args(argv)
    connected = _connect("compact")
    if connected is None:
        return 2
    _, store = connected
    try:
        reclaimed = compact_all(store, args.version or store.models())
    except StoreError as exc:
        print(f"drh-pacs compact: {exc}", file=sys.stderr)
        return 1
    for pair, n in reclaimed.items():
        print(f"{pair}: {n} slot(s) reclaimed")
    if not reclaimed:
        print("nothing to compact")
    return 0
