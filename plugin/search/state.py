"""What a replica holds for one loaded (model version, generation): arrays indexed by slot.

The codes as 64-bit word planes (:mod:`hashing.search`), the int8 re-ranking vectors (one byte per
bit of the code), a byte per slot saying whether it may be returned (0) or not (deleted or unknown:
255), each slot's study number and UID, and per study number the filter record
(:data:`plugin.store.ATTR_DTYPE`) kept as one array per field. The UIDs are one fixed-width bytes
array (64 bytes a slot, not a million Python strings), so that a search answers without a round
trip to Redis. No readable patient ID: a patient is a 64-bit key.
"""

from __future__ import annotations

import bisect

import numpy as np

from hashing.search import MultiIndexHash, n_words, to_words
from plugin.store import ATTR_DTYPE, UID_WIDTH

NEVER = np.uint8(255)


class Columns:
    """Study filter records as one array per field (a strided field of a 24-byte record compares
    several times slower)."""

    FIELDS = ATTR_DTYPE.names

    def __init__(self, size: int) -> None:
        self.size = size
        self.cols = {f: np.zeros(size, ATTR_DTYPE[f].newbyteorder("=")) for f in self.FIELDS}

    def grown(self, size: int) -> Columns:
        out = Columns(size)
        for f in self.FIELDS:
            out.cols[f][: self.size] = self.cols[f]
        return out

    def put(self, sn: np.ndarray | slice, records: np.ndarray) -> None:
        for f in self.FIELDS:
            self.cols[f][sn] = records[f]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cols.values())


class State:
    """One loaded (version, generation): arrays indexed by slot, grown by doubling."""

    # The journal of changed study records keeps at most this many study numbers, in this many
    # entries (one per batch a refresh applies).
    JOURNAL = 1 << 16
    JOURNAL_ENTRIES = 1 << 12

    def __init__(self, version: str, level: str, nbits: int, generation: int, rerank_dim: int = 0) -> None:
        self.version = version
        self.level = level
        self.nbits = nbits
        self.rerank_dim = rerank_dim or nbits
        self.nbytes = nbits // 8
        self.generation = generation
        self.n = 0  # slots known (allocated) so far
        self.live = 0
        self.planes = np.zeros((n_words(nbits), 0), np.uint64)
        self.rerank = np.zeros((0, self.rerank_dim), np.int8)  # per slot: the int8 re-ranking vector (zeros: none)
        self.exclude = np.zeros(0, np.uint8)  # 0 live, 255 deleted / unknown
        self.slot_sn = np.zeros(0, np.uint32)  # as the store keeps them (plugin.store.codes)
        self.uids = np.zeros(0, f"S{UID_WIDTH}")  # b"": none (deleted, or not read at load)
        self.attrs = Columns(1)
        # Study numbers in use: one past the highest seen. The columns' capacity grows by doubling;
        # a filter tests these only (a replica just past a doubling would test twice as many).
        self.studies = 1
        # Study level only (one slot per study): study number -> slot, -1 for none. Lets a
        # selective filter go from the few passing studies straight to their slots.
        self.sn_slot = np.full(1, -1, np.int64)
        self.log_pos = "0-0"
        self.attr_pos = "0-0"
        self.mih: MultiIndexHash | None = None
        self.building = False  # a rebuild of the tables is running
        self.changed_since_build: list[np.ndarray] = []
        # Which study records changed, for filters cached over them (plugin.search.eligible): each
        # put_attrs is a new attrs_version and journals its study numbers. The journal keeps the
        # latest changes (JOURNAL); a cache older than attrs_floor is recomputed.
        self.attrs_version = 0
        self.attrs_floor = 0
        # Bumped when a slot already known is given another study number (a link, a re-set):
        # what is kept per slot (plugin.search.eligible) is then gathered again, not extended.
        self.slots_version = 0
        # Bumped when slots are deleted (a row mask kept with them in it is made again).
        self.deletions = 0
        self._journal: list[tuple[int, np.ndarray]] = []
        self._journal_size = 0

    def reserve(self, n: int) -> None:
        cap = self.exclude.shape[0]
        if n <= cap:
            return
        new = max(n, cap * 2, 1024)
        planes = np.zeros((self.planes.shape[0], new), np.uint64)
        planes[:, :cap] = self.planes
        exclude = np.full(new, NEVER, np.uint8)
        exclude[:cap] = self.exclude
        slot_sn = np.zeros(new, np.uint32)
        slot_sn[:cap] = self.slot_sn
        rerank = np.zeros((new, self.rerank_dim), np.int8)
        rerank[:cap] = self.rerank
        uids = np.zeros(new, self.uids.dtype)
        uids[:cap] = self.uids
        self.planes, self.exclude, self.slot_sn, self.rerank, self.uids = planes, exclude, slot_sn, rerank, uids

    def put_uids(self, slots: np.ndarray | slice, uids: np.ndarray | list[bytes]) -> None:
        """Each slot's UID (room reserved); the array widens for a UID longer than it holds (a
        non-conformant one), rather than cut it."""
        width = uids.dtype.itemsize if isinstance(uids, np.ndarray) else max(map(len, uids), default=0)
        if width > self.uids.dtype.itemsize:
            self.uids = self.uids.astype(f"S{width}")
        self.uids[slots] = uids

    def uids_at(self, rows: np.ndarray) -> list[str]:
        """The UIDs of ``rows`` ("" where a slot has none)."""
        return [u.decode() for u in self.uids[rows].tolist()]

    def reserve_studies(self, n: int) -> None:
        """Room for study numbers below ``n``, which are now in use."""
        self.studies = max(self.studies, n)
        if n > self.attrs.size:
            size = max(n, self.attrs.size * 2, 1024)
            self.attrs = self.attrs.grown(size)
            sn_slot = np.full(size, -1, np.int64)
            sn_slot[: self.sn_slot.shape[0]] = self.sn_slot
            self.sn_slot = sn_slot

    def put_attrs(self, sn: np.ndarray, records: np.ndarray) -> None:
        """Write the filter records of study numbers ``sn`` (room reserved), journalled."""
        self.attrs.put(sn, records)
        self.attrs_version += 1
        self._journal.append((self.attrs_version, np.asarray(sn, np.int64)))
        self._journal_size += np.size(sn)
        if self._journal_size > self.JOURNAL or len(self._journal) > self.JOURNAL_ENTRIES:
            # Drop the older half at once (a pop per entry would cost a list copy each).
            cut = len(self._journal) // 2 or 1
            self.attrs_floor = self._journal[cut - 1][0]
            self._journal_size -= sum(sn.size for _, sn in self._journal[:cut])
            del self._journal[:cut]

    def attrs_changed_since(self, version: int) -> np.ndarray | None:
        """Study numbers whose records changed after ``version`` (unique), or None when the journal
        no longer reaches back that far."""
        if version < self.attrs_floor:
            return None
        # Versions ascend: a cache that is up to date looks at no entry (a filtered search asks this).
        first = bisect.bisect_right(self._journal, version, key=lambda entry: entry[0])
        changed = [sn for _, sn in self._journal[first:]]
        return np.unique(np.concatenate(changed)) if changed else np.empty(0, np.int64)

    def code(self, slot: int) -> bytes:
        return np.ascontiguousarray(self.planes[:, slot]).view(np.uint8)[: self.nbytes].tobytes()

    def memory_bytes(self) -> int:
        """Bytes held by the arrays (capacity, not just the live part)."""
        arrays = (self.planes, self.rerank, self.exclude, self.slot_sn, self.uids, self.attrs, self.sn_slot)
        total = sum(a.nbytes for a in arrays)
        if self.mih is not None:
            total += self.mih.nbytes
        return total


def words_of(codes: bytes, nbytes: int) -> np.ndarray:
    """Packed codes (concatenated bytes) to (W, n) word planes."""
    n = len(codes) // nbytes
    return to_words(np.frombuffer(codes, np.uint8).reshape(n, nbytes))
