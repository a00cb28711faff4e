"""``drh-pacs backfill orthanc``: index an existing Orthanc archive, resumable, with progress.

New studies reach drh-pacs through Orthanc's Lua script (``deploy/orthanc/drh-pacs-forward.lua``);
this command is for what Orthanc held before, and for catching up after an outage. It walks Orthanc's
studies page by page over the REST API (orthanc-rest-client), downloads each instance drh-pacs does
not have yet into the spool (the same durable write as a C-STORE), and queues it for the workers
with Orthanc's AE title as its source, so a later C-MOVE is forwarded to Orthanc.

Resumable: each finished Orthanc study is recorded in Redis (:mod:`plugin.store.backfill`), so an
interrupted run (Ctrl-C, a crash, a broker outage) starts again where it stopped; ``--restart``
forgets it.
Run it on the machine of ``drh-pacs serve`` (it writes into the same spool).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from typing import Any

import redis

from plugin.core.redis_server import resolve_redis_url
from plugin.core.settings import Settings, SettingsError, load_settings
from plugin.dicom.spool import Spool, with_source_ae
from plugin.store import SETTLED_STATES, Store
from workers.client import enqueue_instance, make_celery

log = logging.getLogger("drh.backfill")

PAGE = 500


class BackfillError(RuntimeError):
    pass


def connect(url: str, user: str, password: str) -> Any:
    """An orthanc-rest-client for the REST API at ``url`` (backfill here, thumbnails in the HTTP API)."""
    from orthanc_rest_client import Orthanc
    from requests.auth import HTTPBasicAuth

    auth = HTTPBasicAuth(user, password) if user else None
    return Orthanc(url.rstrip("/"), auth=auth, warn_insecure=False)


def iter_studies(client: Any, page: int = PAGE) -> Iterator[str]:
    """Orthanc study IDs in Orthanc's own (stable) order, one page at a time."""
    since = 0
    while True:
        batch = client.get_studies(params={"since": since, "limit": page})
        if not batch:
            return
        yield from batch
        if len(batch) < page:
            return
        since += len(batch)


def _settled(store: Store, sop_uids: list[str]) -> set[str]:
    """Instances drh-pacs already has: settled by a worker."""
    states = store.records.settled_states(sop_uids)
    return {uid for uid, (state, _) in zip(sop_uids, states, strict=True) if state in SETTLED_STATES}


def backfill_study(
    client: Any, orthanc_id: str, *, store: Any, spool: Any, enqueue: Any, source_ae: str
) -> tuple[int, int]:
    """Spool and queue the instances of one Orthanc study that drh-pacs lacks; (queued, skipped)."""
    study = client.get_study(orthanc_id)
    study_uid = study["MainDicomTags"]["StudyInstanceUID"]
    instances = client.get_study_instances(orthanc_id)
    by_sop = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in instances}
    have = _settled(store, list(by_sop))
    queued = skipped = 0
    for sop_uid, instance_id in sorted(by_sop.items()):
        if sop_uid in have or spool.find(sop_uid, study_uid) is not None:
            skipped += 1  # indexed already, or in the spool (forwarded; the reconciler covers it)
            continue
        data = b"".join(client.get_instance_file(instance_id))
        entry = spool.write(study_uid, sop_uid, with_source_ae(data, source_ae))
        enqueue(entry, source_ae)
        queued += 1
    return queued, skipped


def run(settings: Settings, url: str, user: str, password: str, *, restart: bool, limit: int | None) -> dict[str, int]:
    """The whole backfill; returns counts. Raises BackfillError when Orthanc or the broker fails."""
    from tqdm import tqdm

    redis_url = resolve_redis_url(settings.redis_url, settings.data_dir)
    settings = settings.replace(redis_url=redis_url)
    client = connect(url, user, password)
    try:
        system = client.get_system()
        total = int(client.get_statistics().get("CountStudies", 0))
    except Exception as exc:  # noqa: BLE001 - requests/apiron raise many kinds
        raise BackfillError(f"cannot reach Orthanc at {url}: {exc}") from exc
    source_ae = str(system.get("DicomAet") or "ORTHANC")
    store = Store(redis.Redis.from_url(redis_url), settings.redis_namespace)
    spool = Spool(settings.spool_dir)
    celery_app = make_celery(settings)
    progress = store.backfill(url)
    if restart:
        progress.restart()
    progress.started(source_ae)

    def enqueue(entry: Any, ae: str) -> None:
        enqueue_instance(
            celery_app,
            sop_uid=entry.sop_uid,
            study_uid=entry.study_uid,
            path=str(entry.path),
            source_ae=ae,
            received_at=entry.received_at,
        )

    done_before = progress.done_count()
    counts = {"studies": 0, "queued": 0, "skipped": 0, "already_done": 0}
    bar = tqdm(total=total, initial=0, unit="study", desc="backfill orthanc", file=sys.stderr)
    try:
        for orthanc_id in iter_studies(client):
            if limit is not None and counts["studies"] >= limit:
                break
            if progress.is_done(orthanc_id):
                counts["already_done"] += 1
                bar.update(1)
                continue
            try:
                queued, skipped = backfill_study(
                    client, orthanc_id, store=store, spool=spool, enqueue=enqueue, source_ae=source_ae
                )
            except Exception as exc:  # noqa: BLE001 - stop: a rerun resumes from this study
                raise BackfillError(f"stopped at Orthanc study {orthanc_id}: {exc}") from exc
            progress.mark_done(orthanc_id)
            counts["studies"] += 1
            counts["queued"] += queued
            counts["skipped"] += skipped
            bar.update(1)
            bar.set_postfix(queued=counts["queued"], skipped=counts["skipped"])
    finally:
        bar.close()
        progress.finished()
    log.info("backfill: %d done before this run", done_before)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="drh-pacs backfill orthanc",
        description="Index every study of an Orthanc archive that drh-pacs does not have yet (resumable).",
    )
    parser.add_argument("--url", help="Orthanc REST URL (default: setting orthanc_url)")
    parser.add_argument("--user", help="Orthanc user (default: setting orthanc_user)")
    parser.add_argument("--password", help="Orthanc password (default: setting orthanc_password)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many new studies")
    parser.add_argument("--restart", action="store_true", help="forget the recorded progress and walk everything")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"drh-pacs backfill orthanc: {exc}", file=sys.stderr)
        return 2
    url = args.url or settings.orthanc_url
    if not url:
        print("drh-pacs backfill orthanc: no Orthanc URL (--url or DRH_ORTHANC_URL)", file=sys.stderr)
        return 2
    user = args.user if args.user is not None else settings.orthanc_user
    password = args.password if args.password is not None else settings.orthanc_password
    try:
        counts = run(settings, url, user, password, restart=args.restart, limit=args.limit)
    except BackfillError as exc:
        print(f"drh-pacs backfill orthanc: {exc}; run it again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("drh-pacs backfill orthanc: interrupted; run it again to resume", file=sys.stderr)
        return 130
    print(
        f"backfill orthanc: {counts['studies']} new study(ies), {counts['queued']} instance(s) queued,"
        f" {counts['skipped']} already present, {counts['already_done']} study(ies) done in earlier runs"
    )
    return 0
