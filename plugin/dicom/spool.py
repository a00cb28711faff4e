"""The durable spool of received DICOM files, and the reconciler that gets every one indexed.

A C-STORE is answered "success" only once the file is on disk for good: written to a temporary name,
``fsync``-ed, renamed into place (atomic: a reader sees the old file or the whole new one, never half
of one) and the directory ``fsync``-ed so the rename itself survives a power cut. Only then is a task
queued. If the broker or Redis is down at that moment the file simply waits in the spool: the
:class:`Reconciler` (run at start-up and periodically) queues spooled files that are neither indexed
nor failed, so nothing acknowledged to a PACS is ever lost.

Layout: ``spool_dir/<StudyInstanceUID>/<SOPInstanceUID>.dcm``. The sender's AE title is in the file
meta (``SourceApplicationEntityTitle``) and the reception time is the file's mtime, so the spool alone
is enough to re-queue a file after a restart.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from plugin.core.header import is_uid

log = logging.getLogger("drh.spool")

SUFFIX = ".dcm"
# A queued file that is still not indexed after this long is queued again (its task may have been
# lost with a broker that had no persistence). Duplicates are harmless: indexing is idempotent.
REQUEUE_SECONDS = 900.0
# Even with nothing pending, walk the whole spool this often to catch files nobody told us about.
FULL_SCAN_SECONDS = 3600.0


# "Last queued" of a file whose queueing failed: due at the next pass, no grace period.
_NEVER = float("-inf")


class SpoolError(OSError):
    """The file could not be made durable; the sender must be told it failed."""


@dataclass(frozen=True)
class SpoolEntry:
    study_uid: str
    sop_uid: str
    path: Path
    received_at: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_ae_of(path: Path) -> str:
    """The sender's AE title recorded in the file meta ("" when absent or unreadable)."""
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - a damaged file still gets queued; the worker reports why it fails
        return ""
    return str(meta.get("SourceApplicationEntityTitle", "") or "").strip()


class Spool:
    """Durable files under one directory. Thread-safe: every write goes to its own temp file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        if not (is_uid(study_uid) and is_uid(sop_uid)):
            # UIDs become path components: anything else could escape the spool directory.
            raise SpoolError(f"not a valid UID pair: {study_uid!r} / {sop_uid!r}")
        return self.root / study_uid / f"{sop_uid}{SUFFIX}"

    def write(self, study_uid: str, sop_uid: str, chunks: bytes | Iterable[bytes]) -> SpoolEntry:
        """Make ``chunks`` durable at the instance's path; returns once it survives a crash."""
        final = self.path_for(study_uid, sop_uid)
        folder = final.parent
        try:
            new_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            if new_folder:
                _fsync_dir(folder.parent)
            fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", suffix=".part", dir=folder)
            try:
                with os.fdopen(fd, "wb") as fh:
                    if isinstance(chunks, (bytes, bytearray, memoryview)):
                        fh.write(chunks)
                    else:
                        for chunk in chunks:
                            fh.write(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp_name, final)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            _fsync_dir(folder)
        except OSError as exc:
            raise SpoolError(f"cannot spool instance {sop_uid}: {exc}") from exc
        return SpoolEntry(study_uid, sop_uid, final, final.stat().st_mtime)

    def find(self, sop_uid: str, study_uid: str) -> Path | None:
        path = self.path_for(study_uid, sop_uid)
        return path if path.exists() else None

    def study_files(self, study_uid: str) -> list[Path]:
        if not is_uid(study_uid):
            return []
        folder = self.root / study_uid
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))

    def entries(self) -> Iterator[SpoolEntry]:
        """Every complete spooled file (temp files of writes in progress are skipped)."""
        if not self.root.is_dir():
            return
        with os.scandir(self.root) as studies:
            for study in studies:
                if not study.is_dir() or not is_uid(study.name):
                    continue
                with os.scandir(study.path) as files:
                    for f in files:
                        if not f.name.endswith(SUFFIX) or f.name.startswith("."):
                            continue
                        sop_uid = f.name[: -len(SUFFIX)]
                        if not is_uid(sop_uid):
                            continue
                        try:
                            mtime = f.stat().st_mtime
                        except FileNotFoundError:
                            continue  # removed under us (indexed with keep_files off)
                        yield SpoolEntry(study.name, sop_uid, Path(f.path), mtime)


class Reconciler:
    """Queues spooled files that are neither indexed nor failed: at start-up and every ``interval`` s.

    ``is_done(entries) -> set of the SOP UIDs already settled`` asks the store in one batch; ``enqueue(entry)``
    raises when the broker is down (the entry then stays pending and is retried at the next tick).
    The C-STORE handler tells it about every new file with :meth:`track`, so a periodic tick only
    looks at pending files, not the whole archive; a full walk happens at start-up and hourly.

    ``coming(entries) -> set of SOP UIDs`` names the files a worker will still take without being
    queued again: their batching hint waits to be claimed and the broker has messages waiting (each
    task claims the oldest pending hints with its own instance, so a hint whose message was lost is
    taken by the next batch). Those are not queued again; before, in a backlog longer than ``requeue_after``
    every waiting file was queued again each time, and at each start-up: duplicates grew with the
    square of the backlog.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        is_done: Callable[[list[SpoolEntry]], set[str]],
        enqueue: Callable[[SpoolEntry], None],
        interval: float = 30.0,
        grace: float = 30.0,
        requeue_after: float = REQUEUE_SECONDS,
        coming: Callable[[list[SpoolEntry]], set[str]] | None = None,
    ) -> None:
        self.spool = spool
        self.is_done = is_done
        self.coming = coming or (lambda entries: set())
        self.enqueue = enqueue
        self.interval = interval
        self.grace = grace
        self.requeue_after = requeue_after
        self._lock = threading.Lock()
        # sop uid -> (entry, monotonic time it was last queued; None: found by a scan, never queued
        # by us; _NEVER: queueing failed)
        self._pending: dict[str, tuple[SpoolEntry, float | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_full_scan = 0.0

    def track(self, entry: SpoolEntry, enqueued: bool) -> None:
        """A file the handler spooled: queued (retry only if still not indexed much later) or not (asap)."""
        with self._lock:
            self._pending[entry.sop_uid] = (entry, time.monotonic() if enqueued else _NEVER)

    def requeue_soon(self) -> None:
        """Queue every pending file again at the next pass (still-unsettled ones only): a worker died
        holding messages the broker will only hand out again after its visibility timeout."""
        with self._lock:
            self._pending = {uid: (entry, _NEVER) for uid, (entry, _) in self._pending.items()}

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def unqueued(self) -> int:
        """Files waiting for their first successful queueing (it failed, or a scan found them): the
        broker was down, or is; they are safe in the spool and queued at the next pass."""
        with self._lock:
            return sum(1 for _, last in self._pending.values() if last is None or last == _NEVER)

    def full_scan(self) -> None:
        """Walk the whole spool and take every file not yet done into the pending set."""
        batch: list[SpoolEntry] = []
        for entry in self.spool.entries():
            batch.append(entry)
            if len(batch) >= 1000:
                self._adopt(batch)
                batch = []
        if batch:
            self._adopt(batch)
        self._last_full_scan = time.monotonic()

    def _adopt(self, batch: list[SpoolEntry]) -> None:
        done = self.is_done(batch)
        with self._lock:
            for entry in batch:
                if entry.sop_uid not in done and entry.sop_uid not in self._pending:
                    self._pending[entry.sop_uid] = (entry, None)

    def run_once(self, *, full: bool = False) -> int:
        """One reconciliation pass; returns how many files were queued."""
        if full or time.monotonic() - self._last_full_scan > FULL_SCAN_SECONDS:
            self.full_scan()
        with self._lock:
            pending = list(self._pending.values())
        if not pending:
            return 0
        done: set[str] = set()
        for start in range(0, len(pending), 1000):
            done |= self.is_done([e for e, _ in pending[start : start + 1000]])
        now_mono = time.monotonic()
        now_wall = time.time()
        due: list[SpoolEntry] = []
        for entry, last in pending:
            if entry.sop_uid in done:
                with self._lock:
                    self._pending.pop(entry.sop_uid, None)
                continue
            if last is not None and now_mono - last < self.requeue_after:
                continue
            if last is None and now_wall - entry.received_at < self.grace and not full:
                continue  # the receiving handler may still be queueing it
            due.append(entry)
        coming: set[str] = set()
        for start in range(0, len(due), 1000):
            coming |= self.coming(due[start : start + 1000])
        queued = 0
        for entry in due:
            if entry.sop_uid in coming:
                with self._lock:  # looked at again a requeue period on
                    self._pending[entry.sop_uid] = (entry, now_mono)
                continue
            if not entry.path.exists():
                with self._lock:
                    self._pending.pop(entry.sop_uid, None)
                continue
            try:
                self.enqueue(entry)
            except Exception as exc:  # noqa: BLE001 - broker down: keep it pending, say so once per pass
                log.warning("spool reconciler: cannot queue (%s); %d file(s) wait in the spool", exc, len(due))
                break
            queued += 1
            with self._lock:
                self._pending[entry.sop_uid] = (entry, now_mono)
        if queued:
            log.info("spool reconciler: queued %d spooled file(s) for indexing", queued)
        return queued

    def start(self) -> Reconciler:
        self._thread = threading.Thread(target=self._loop, name="spool-reconciler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                self.run_once(full=first)
                first = False
            except Exception:  # noqa: BLE001 - Redis down: try again at the next tick
                log.warning("spool reconciler pass failed; retrying in %.0f s", self.interval, exc_info=True)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def with_source_ae(data: bytes, source_ae: str) -> list[bytes]:
    """A Part 10 file's bytes with ``SourceApplicationEntityTitle`` set in its file meta.

    The dataset after the meta group is kept byte for byte (compressed pixel data untouched). Data
    without a preamble and meta group is returned as it is.
    """
    import io

    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return [data]
    group_length = int.from_bytes(data[140:144], "little")
    end = 144 + group_length
    meta = dcmread(io.BytesIO(data[:end]), force=True).file_meta
    meta.SourceApplicationEntityTitle = source_ae
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    buffer.write(data[:128] + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return [buffer.getvalue(), data[end:]]
