"""Reconciling with Orthanc: ``drh-pacs backfill orthanc``, and the same on a schedule inside ``serve``.

New studies reach drh-pacs through the Orthanc drop-in (``deploy/orthanc/drh-pacs-forward.py``),
which retries until drh-pacs has them. This is the safety net behind it, and the way to index what
Orthanc held before: it asks Orthanc's REST API (orthanc-rest-client) which studies exist, downloads
each instance drh-pacs does not have yet into the spool (the same durable write as a C-STORE), and
queues it for the workers with Orthanc's AE title as its source, so a later C-MOVE is forwarded to
Orthanc. Instances drh-pacs refused at reception (``drh-pacs failures refused``) are left alone: a
corrected copy must come from the PACS. An instance it cannot take (no valid UID) is refused the same
way, with its reason, and the walk goes on: one bad instance in a years-old archive must not stop
every later run at the same study.

The command's first run walks the whole archive, page by page, resumable: each finished Orthanc
study is recorded in Redis (:mod:`plugin.store.backfill`), so an interrupted run (Ctrl-C, a crash, a
broker outage) starts again where it stopped. Once a walk has finished, later runs are incremental:
they read Orthanc's change log (``/changes``) from the last change reconciled, and look only at
studies that appeared, grew or became stable since. ``--restart`` forgets all of it.

``serve`` runs the incremental part every ``Settings.orthanc_reconcile_seconds`` when
``orthanc_url`` is set (:class:`ScheduledReconcile`): the first time it starts following the change
log from its current end and never walks the archive by itself (a years-long archive queued ahead
of new studies is a decision for IT staff, made by running the command). Run the command on the
machine of ``drh-pacs serve``: it writes into the same spool.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import redis

from plugin.core.header import is_uid
from plugin.core.redis_server import resolve_redis_url
from plugin.core.settings import Settings, SettingsError, load_settings
from plugin.dicom.spool import Spool, with_source_ae
from plugin.dicom.status import STORE_CANNOT_UNDERSTAND
from plugin.store import SETTLED_STATES, Store
from workers.client import enqueue_instance, make_celery

log = logging.getLogger("drh.backfill")

PAGE = 500
CHANGES_PAGE = 1000
# Changes that name a study whose content may be new to drh-pacs.
STUDY_CHANGES = {"NewStudy", "StableStudy"}


class BackfillError(RuntimeError):
    """The run stopped. ``resumable``: running it again continues (Orthanc or the broker was away);
    otherwise something must be fixed first (the credentials)."""

    def __init__(self, message: str, resumable: bool = True) -> None:
        super().__init__(message)
        self.resumable = resumable


def rest_client(url: str, user: str, password: str) -> Any:
    """An orthanc-rest-client for the REST API at ``url`` (backfill here, thumbnails in the HTTP API)."""
    from orthanc_rest_client import Orthanc
    from requests.auth import HTTPBasicAuth

    auth = HTTPBasicAuth(user, password) if user else None
    return Orthanc(url.rstrip("/"), auth=auth, warn_insecure=False)


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def connect(url: str, user: str, password: str) -> tuple[Any, dict[str, Any]]:
    """An Orthanc client and its ``/system``; BackfillError naming the cause when it cannot be used."""
    client = rest_client(url, user, password)
    try:
        return client, client.get_system()
    except Exception as exc:  # noqa: BLE001 - requests/apiron raise many kinds
        status = _http_status(exc)
        if status in (401, 403):
            who = f"user {user!r}" if user else "no user"
            raise BackfillError(
                f"Orthanc at {url} refused the credentials ({who}, HTTP {status}): check --user/--password"
                " (DRH_ORTHANC_USER, DRH_ORTHANC_PASSWORD) against Orthanc's RegisteredUsers",
                resumable=False,
            ) from exc
        raise BackfillError(f"cannot reach Orthanc at {url}: {exc}") from exc


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


def last_change(client: Any) -> int:
    """The sequence number of Orthanc's newest change (``/changes?last``; 0 when there is none)."""
    import warnings

    with warnings.catch_warnings():  # apiron warns about "?last", which has no value by design
        warnings.simplefilter("ignore", RuntimeWarning)
        return int(client.get_changes(last=True).get("Last", 0) or 0)


def iter_changed_studies(client: Any, since: int, page: int = CHANGES_PAGE) -> Iterator[tuple[list[str], int]]:
    """(study IDs a page of Orthanc's change log names, the last change of that page), from ``since``.

    A new series names its study too (an instance arriving in an existing study after Orthanc
    restarted is not announced as a stable study again).
    """
    while True:
        page_of = client.get_changes(since=since, limit=page)
        studies: list[str] = []
        for change in page_of.get("Changes", []):
            kind, resource = change.get("ChangeType"), change.get("ID", "")
            if kind in STUDY_CHANGES and change.get("ResourceType") == "Study":
                studies.append(resource)
            elif kind == "NewSeries":
                try:
                    studies.append(client.get_one_series(resource)["ParentStudy"])
                except Exception as exc:
                    if not _not_found(exc):
                        raise  # Orthanc failing: the run stops before this page, and a rerun reads it again
                    log.debug("series %s gone: %s", resource, exc)  # deleted meanwhile: nothing to index
        last = int(page_of.get("Last", since) or since)
        yield list(dict.fromkeys(studies)), last
        if page_of.get("Done", True) or last <= since:
            return
        since = last


def _have(store: Store, sop_uids: list[str]) -> tuple[set[str], set[str]]:
    """Instances drh-pacs already has (settled by a worker), and those it refused at reception or in an
    earlier run (its sender's to fix): neither is fetched again, and the second are counted refused."""
    states = store.records.settled_states(sop_uids)
    have = {uid for uid, (state, _) in zip(sop_uids, states, strict=True) if state in SETTLED_STATES}
    return have, store.ledger.refused_among(sop_uids) - have


def _not_found(exc: Exception) -> bool:
    """Orthanc answered 404: the resource was deleted meanwhile (anything else is Orthanc failing)."""
    return getattr(getattr(exc, "response", None), "status_code", None) == 404


def backfill_study(
    client: Any, orthanc_id: str, *, store: Any, spool: Any, enqueue: Any, source_ae: str
) -> tuple[int, int, int]:
    """Spool and queue the instances of one Orthanc study that drh-pacs lacks; (queued, skipped, refused).

    An instance drh-pacs cannot take (no valid Study or SOP Instance UID) is refused as the DICOM
    listener refuses it: recorded with its reason (``drh-pacs failures refused``), and the walk goes
    on; a rerun skips it. One deleted from Orthanc meanwhile is skipped. Anything else (Orthanc, the
    spool's disk, the broker) raises: the run stops there and a rerun resumes at this study.
    """
    try:
        study = client.get_study(orthanc_id)
        instances = client.get_study_instances(orthanc_id)
    except Exception as exc:
        if _not_found(exc):
            return 0, 0, 0
        raise
    study_uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", "") or "")
    listed = sorted((str(i.get("MainDicomTags", {}).get("SOPInstanceUID", "") or ""), i["ID"]) for i in instances)
    have, refused_before = _have(store, [sop for sop, _ in listed if sop])
    queued = skipped = refused = 0
    for sop_uid, instance_id in listed:
        if sop_uid in have:
            skipped += 1  # indexed already
            continue
        if sop_uid in refused_before:
            refused += 1  # by the listener or an earlier run: recorded with its reason already
            continue
        if not (is_uid(study_uid) and is_uid(sop_uid)):
            refused += 1
            _refuse(store, sop_uid, study_uid, instance_id, source_ae)
            continue
        if spool.find(sop_uid, study_uid) is not None:
            skipped += 1  # in the spool (forwarded; the reconciler covers it)
            continue
        try:
            data = b"".join(client.get_instance_file(instance_id))
        except Exception as exc:
            if _not_found(exc):
                skipped += 1
                continue
            raise
        entry = spool.write(study_uid, sop_uid, with_source_ae(data, source_ae))
        enqueue(entry, source_ae)
        queued += 1
    return queued, skipped, refused


def _refuse(store: Any, sop_uid: str, study_uid: str, instance_id: str, source_ae: str) -> None:
    reason = f"missing or invalid Study/SOP Instance UID (Orthanc instance {instance_id})"
    log.warning("backfill: Orthanc instance %s refused: %s", instance_id, reason)
    if sop_uid:  # the ledger is by SOP Instance UID; without one, the log line is the record
        store.ledger.record_refused(sop_uid, study_uid, source_ae, reason, STORE_CANNOT_UNDERSTAND)


def run(
    settings: Settings,
    url: str,
    user: str,
    password: str,
    *,
    restart: bool = False,
    limit: int | None = None,
    progress_bar: bool = True,
    walk: bool = True,
) -> dict[str, int]:
    """One reconciliation (the whole walk, or the changes since the last one); returns counts.

    ``walk`` False (the schedule): never walk the archive; the first run only starts following the
    change log. Raises BackfillError when Orthanc or the broker fails; the outcome is recorded.
    """
    redis_url = resolve_redis_url(settings.redis_url, settings.data_dir)
    settings = settings.replace(redis_url=redis_url)
    store = Store(redis.Redis.from_url(redis_url), settings.redis_namespace)
    progress = store.backfill(url)
    try:
        counts = _run(settings, store, progress, url, user, password, restart, limit, progress_bar, walk)
    except BackfillError as exc:
        progress.outcome(str(exc))
        raise
    finally:
        store.close()
    return counts


def _run(
    settings: Settings,
    store: Store,
    progress: Any,
    url: str,
    user: str,
    password: str,
    restart: bool,
    limit: int | None,
    progress_bar: bool,
    walk: bool,
) -> dict[str, int]:
    from tqdm import tqdm

    client, system = connect(url, user, password)
    source_ae = str(system.get("DicomAet") or "ORTHANC")
    spool = Spool(settings.spool_dir)
    celery_app = make_celery(settings)
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

    def one(orthanc_id: str, counts: dict[str, int]) -> None:
        try:
            queued, skipped, refused = backfill_study(
                client, orthanc_id, store=store, spool=spool, enqueue=enqueue, source_ae=source_ae
            )
        except Exception as exc:  # noqa: BLE001 - stop: a rerun resumes from this study
            raise BackfillError(f"stopped at Orthanc study {orthanc_id}: {exc}") from exc
        progress.mark_done(orthanc_id)
        counts["studies"] += 1
        counts["queued"] += queued
        counts["skipped"] += skipped
        counts["refused"] += refused

    counts = {"studies": 0, "queued": 0, "skipped": 0, "refused": 0, "already_done": 0, "incremental": 0, "since": 0}
    try:
        since = progress.since()
        newest = last_change(client)
        if since is not None and newest < since:
            log.warning("Orthanc's change log restarted (%d < %d): following it from its start", newest, since)
            since = 0
        if since is None and not walk:
            log.warning(
                "following Orthanc's changes from change %d on; `drh-pacs backfill orthanc` indexes what"
                " Orthanc held before",
                newest,
            )
            progress.set_since(newest)
            since = newest
        if since is not None and (progress.walked() or not walk):
            counts.update(incremental=1, since=since)
            for studies, last in iter_changed_studies(client, since):
                for orthanc_id in studies:
                    one(orthanc_id, counts)
                progress.set_since(last)
        else:
            total = int(client.get_statistics().get("CountStudies", 0))
            bar = tqdm(total=total, unit="study", desc="backfill orthanc", file=sys.stderr, disable=not progress_bar)
            complete = True
            try:
                for orthanc_id in iter_studies(client):
                    if limit is not None and counts["studies"] >= limit:
                        complete = False
                        break
                    if progress.is_done(orthanc_id):
                        counts["already_done"] += 1
                    else:
                        one(orthanc_id, counts)
                    bar.update(1)
                    bar.set_postfix(queued=counts["queued"], skipped=counts["skipped"])
            finally:
                bar.close()
            if complete:
                progress.set_walked()
                if since is None:
                    progress.set_since(newest)  # changes from the walk's start on are read incrementally
    except BackfillError:
        raise
    except Exception as exc:  # noqa: BLE001 - Orthanc went away mid-run
        raise BackfillError(f"Orthanc at {url} failed mid-run: {exc}") from exc
    finally:
        progress.finished()
    progress.outcome()
    return counts


class ScheduledReconcile:
    """``serve``'s reconciliation with Orthanc every ``orthanc_reconcile_seconds``, in a thread.

    A failed run is logged and recorded (the status page and ``drh_orthanc_reconcile_*`` metrics
    show it) and tried again at the next period; it never stops the service.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="orthanc-reconcile", daemon=True)

    def start(self) -> ScheduledReconcile:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)

    def _loop(self) -> None:
        s = self.settings
        while not self.stop_event.wait(s.orthanc_reconcile_seconds):
            try:
                counts = run(s, s.orthanc_url, s.orthanc_user, s.orthanc_password, progress_bar=False, walk=False)
            except BackfillError as exc:
                log.error("reconciliation with Orthanc failed: %s", exc)
                continue
            except Exception:  # noqa: BLE001 - a bug or Redis away: log, try again next period
                log.exception("reconciliation with Orthanc failed")
                continue
            if counts["refused"]:
                log.warning(
                    "reconciliation with Orthanc: %d instance(s) refused (`drh-pacs failures refused` says why)",
                    counts["refused"],
                )
            if counts["queued"]:
                log.warning(
                    "reconciliation with Orthanc: %d instance(s) of %d study(ies) were missing and are now queued",
                    counts["queued"],
                    counts["studies"],
                )
            else:
                log.info("reconciliation with Orthanc: %d study(ies) checked, nothing missing", counts["studies"])


def _refused(counts: dict[str, int]) -> str:
    n = counts["refused"]
    return f", {n} instance(s) REFUSED (`drh-pacs failures refused` says why)" if n else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="drh-pacs backfill orthanc",
        description="Index every study of an Orthanc archive that drh-pacs does not have yet (resumable;"
        " after a first complete walk, only what changed in Orthanc since).",
    )
    parser.add_argument("--url", help="Orthanc REST URL (default: setting orthanc_url)")
    parser.add_argument("--user", help="Orthanc user (default: setting orthanc_user)")
    parser.add_argument("--password", help="Orthanc password (default: setting orthanc_password)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many new studies (first walk)")
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
        hint = "; run it again to resume" if exc.resumable else ""
        print(f"drh-pacs backfill orthanc: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("drh-pacs backfill orthanc: interrupted; run it again to resume", file=sys.stderr)
        return 130
    if counts["incremental"]:
        print(
            f"backfill orthanc: {counts['studies']} study(ies) changed in Orthanc since change {counts['since']},"
            f" {counts['queued']} instance(s) queued, {counts['skipped']} already present{_refused(counts)}"
        )
    else:
        print(
            f"backfill orthanc: {counts['studies']} new study(ies), {counts['queued']} instance(s) queued,"
            f" {counts['skipped']} already present, {counts['already_done']} study(ies) done in earlier runs"
            f"{_refused(counts)}"
        )
    return 0
