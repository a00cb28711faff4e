"""Which slots of a replica a filtered search may return, computed from the study filter records.

Filters restrict the *study* attributes (:class:`plugin.search.filters.Filters`); each slot points at its
study's record. The answer comes in the cheapest form for the search that follows:

- a broad filter (a modality, a date range): a byte per slot (0 eligible), which the scan ORs in with
  each slot's distance;
- a selective one (one patient, a rare body part: at most 1/:data:`FEW` of all studies pass): the
  short list of eligible slots, so that only those need a distance;
- the reference patient's exclusion alone, when at most 1/64 of the studies fail it: the deletion
  mask with the few excluded slots set.

A study without a record (metadata not written yet, or an image not yet linked to its study: study
number 0) passes no filter, not even an exclusion: it cannot be shown not to be the excluded
patient's.

Speed. Done as numpy steps (a pass per test, a gather of the study's result for every slot, a
subtraction, an OR), a search at a million studies with a modality and a date range took p50 / p99
7.0 / 8.0 ms (README, release note "filtered search at 1M"), over the 5 ms that unfiltered search
keeps. Now one compiled function tests the records (a vectorised loop per test asked,
:func:`_test_studies`). Its result per study, for the filter without its date range, is kept for the
last few filters and brought up to date from the records that change (:meth:`Eligibility._tested`):
a viewer asks the same modality again and again, with a range new to the query ("before this
study"). For the last few of them the result is also kept in slot order, beside the study dates in
slot order, so that a query's row mask is one streaming pass over the slots (:func:`_slot_mask`)
and the scan needs no lookup through each slot's study number. A range asked for the first time
gets no row mask at all: the scan tests it in its distance pass (:class:`hashing.search.InRange`),
and the mask is made when the same range is asked again (:meth:`Eligibility._exclusion`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hashing.kernels import jit, rows_at_most
from hashing.search import Exclusion, InRange
from plugin.search.filters import Filters
from plugin.search.state import NEVER, State
from plugin.store import FLAG_KNOWN, patient_key
from plugin.store.attributes import modality_mask

# Which tests a filter asks of the records (bits of `_test_studies`'s `tests`); every filter also
# asks that the study has a record.
BODY, MODALITY, PATIENT, NOT_PATIENT = 2, 4, 8, 16
# When at most 1/FEW of all studies pass, only their slots get a distance (hashing.search.knn_rows);
# otherwise the scan of every slot ORs in the studies' bytes. At 1M studies the scan costs about
# 1.2 ms whatever passes, while listing the passing studies, sorting their slots and gathering their
# codes grows with their number: about 0.3 ms for 4,000 (1 in 256), 1.5-2 ms for 32,000 (1 in 32).
FEW = 256


@jit
def _test_studies(
    flags: np.ndarray,
    body: np.ndarray,
    modmask: np.ndarray,
    patient: np.ndarray,
    tests: int,
    body_id: int,
    modalities: np.uint64,
    patient_in: np.uint64,
    patient_out: np.uint64,
    fail: np.ndarray,
) -> int:
    """``fail[i]`` = 0 where record i is known and passes every test in ``tests``, 255 where not.
    Returns how many pass.

    One loop per test asked, each branch-free over one column (ANDing a 0/1 byte per record), so
    that each vectorises: about 1 ms at a million records for a modality. A date range is not
    tested here: it is tested per slot (:func:`_slot_mask`), so a range new to the query needs no
    pass over the records. One loop
    testing every field (its tests chosen inside) vectorised only for some choices, and collecting the
    passing numbers in it made it six times slower; the caller collects them when they are few.
    """
    n = flags.shape[0]
    for i in range(n):
        fail[i] = np.uint8((flags[i] & FLAG_KNOWN) != 0)  # 1: passes so far
    if tests & BODY:
        for i in range(n):
            fail[i] &= np.uint8(body[i] == body_id)
    if tests & MODALITY:
        for i in range(n):
            fail[i] &= np.uint8((modmask[i] & modalities) != 0)
    if tests & PATIENT:
        for i in range(n):
            fail[i] &= np.uint8(patient[i] == patient_in)
    if tests & NOT_PATIENT:
        for i in range(n):
            fail[i] &= np.uint8(patient[i] != patient_out)
    count = 0
    for i in range(n):
        count += fail[i]
        fail[i] -= np.uint8(1)  # 1 -> 0, 0 -> 255
    return count


@jit
def _gather(values: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = values[index[i]]``: a per-study column in slot order."""
    for i in range(out.shape[0]):
        out[i] = values[index[i]]


@jit
def _slot_mask(rest: np.ndarray, exclude: np.ndarray, date: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """``out[i]`` = 0 where slot i is live (``exclude``), its study passes the rest of the filter
    (``rest``) and its study date is in [lo, hi]; 255 where not. One streaming pass over 6 bytes a
    slot, all in slot order: it vectorises, where a test through each slot's study number does not."""
    for i in range(out.shape[0]):
        inside = np.uint8(date[i] >= lo) & np.uint8(date[i] <= hi)
        out[i] = rest[i] | exclude[i] | np.uint8(inside - np.uint8(1))  # 1 -> 0, 0 -> 255


def warm_up() -> None:
    """Compile (or load from the cache) the filter passes now, on a few records of the replica's
    column types (:class:`plugin.search.state.Columns`)."""
    cols = State("warm-up", "study", 64, 0).attrs
    fail, none = np.zeros(cols.size, np.uint8), np.uint64(0)
    _test_studies(
        cols["flags"], cols["body"], cols["modmask"], cols["patient"],
        BODY | MODALITY | PATIENT | NOT_PATIENT, 1, none, none, none, fail,
    )  # fmt: skip
    slots = np.zeros(cols.size, np.uint32)
    dates = np.zeros(cols.size, cols["date"].dtype)
    _gather(fail, slots, fail)
    _gather(cols["date"], slots, dates)
    _slot_mask(fail, fail, dates, 1, 2, fail)


@dataclass
class _Tested:
    """A filter's per-study result (0 passes, 255 fails) for one replica state, as of a version of
    its records."""

    state: weakref.ref
    version: int  # State.attrs_version it reflects
    fail: np.ndarray  # capacity >= size
    size: int  # study numbers covered
    passed: int


@dataclass
class _PerSlot:
    """A per-study column in slot order (``values[i]`` = the column at slot i's study number), for one
    replica state, as of a version of its records and of its slots' study numbers."""

    state: weakref.ref
    attrs_version: int
    slots_version: int
    n: int  # slots covered
    values: np.ndarray  # capacity >= n
    deletions: int = 0  # State.deletions, for a row mask (which has the deleted slots in it)


def _take(cache: OrderedDict, key: tuple, limit: int) -> tuple[Any, bool]:
    """``key``'s entry, taken out (the caller puts it back as the most recent), and True; else, when
    ``cache`` holds ``limit`` entries, its least recently used one, whose buffer the caller reuses for
    ``key`` (no fresh pages), and False; else (None, False)."""
    entry = cache.pop(key, None)
    if entry is not None:
        return entry, True
    if len(cache) >= limit:
        return cache.popitem(last=False)[1], False
    return None, False


def _room(values: np.ndarray, size: int, keep: int) -> np.ndarray:
    """``values`` with room for ``size`` entries (grown by doubling), its first ``keep`` kept."""
    if values.shape[0] >= size:
        return values
    grown = np.empty(max(size, 2 * values.shape[0]), values.dtype)
    grown[:keep] = values[:keep]
    return grown


def _columns(columns: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, ...]:
    """The record columns :func:`_test_studies` reads, in its order, the first ``size`` of each."""
    return tuple(columns[field][:size] for field in ("flags", "body", "modmask", "patient"))


class Eligibility:
    """Filter evaluation over one replica's records; caches the vocabulary numbers it looks up, the
    per-study result of the last :attr:`CACHED` filters, the last :attr:`SLOT_CACHED` of those results
    and the study dates in slot order, and the row masks of the last :attr:`SLOT_CACHED` filters.

    Keeps its per-study and per-slot byte arrays between searches (fresh pages cost page faults at
    every query): what :meth:`rows` returns is valid until its next call, which the replica's lock
    serialises (as it serialises the record changes the cached results follow).
    """

    # Filter results kept per study (a megabyte each at a million studies), without their date
    # range: the range is tested per slot (:func:`_slot_mask`).
    CACHED = 8
    # Of those, kept in slot order too (a byte per slot each; the dates take four more); and the
    # row masks of as many whole filters (a byte per slot each).
    SLOT_CACHED = 4
    # Date ranges asked once, remembered so that the second time makes and keeps their mask
    # (:meth:`_exclusion`).
    ASKED = 64

    def __init__(self, level: str, vocabulary: Callable[[str, list[str]], list[int | None]]) -> None:
        self.level = level
        self._lookup = vocabulary
        self._vocab: dict[tuple[str, str], int] = {}
        self._cache: OrderedDict[tuple, _Tested] = OrderedDict()  # least recently used first
        self._slots: OrderedDict[tuple, _PerSlot] = OrderedDict()  # the same keys, in slot order
        self._dates: _PerSlot | None = None
        self._masks: OrderedDict[tuple, _PerSlot] = OrderedDict()  # whole filters' row masks
        self._asked: OrderedDict[tuple, bool] = OrderedDict()  # ranges asked once (least recent first)

    def rows(
        self, st: State, filters: Filters | None, exclude_patient: str | None = None
    ) -> tuple[Exclusion | None, np.ndarray | None]:
        """(exclude, rows) for a search.

        - ``exclude``: uint8 per slot, 0 where a slot may be returned (None: every slot may); or, for
          a date range asked for the first time, such a mask and the range for the scan to test
          (:meth:`_exclusion`);
        - ``rows``, when not None, lists every eligible slot (ascending): the filter is selective
          and only those rows need a distance.
        """
        n = st.n
        restricts = filters is not None and filters.restricts()
        if not restricts and not exclude_patient:
            # No filter: only deleted slots are left out (no mask at all while none is).
            return (st.exclude[:n] if st.live < n else None), None
        f = filters or Filters()
        key, dates = self._key(f, exclude_patient)
        tested = self._tested(st, key, {field: column[: st.studies] for field, column in st.attrs.cols.items()})
        fail, passed, size = tested.fail[: tested.size], tested.passed, tested.size
        if key[0] == NOT_PATIENT and dates is None and size - passed <= size // 64:
            # Exclusion only (every study but a few: the excluded patient's and the unknown ones):
            # mark the slots of those few.
            exclude = st.exclude[:n].copy()
            exclude[self.slots_of_studies(st, np.flatnonzero(fail))] = NEVER
            return exclude, None
        if passed <= size // FEW and self.level == "study":
            # Few pass: collected by skipping the blocks where none does (0.1 ms for a patient's few
            # studies at 1M, where np.flatnonzero reads every byte: 0.6 ms), then their dates.
            sns = np.empty(passed, np.int64)
            rows_at_most(fail, np.uint8(0), sns)
            if dates is not None:
                d = st.attrs["date"][sns]
                sns = sns[(d >= dates[0]) & (d <= dates[1])]
            rows = self.slots_of_studies(st, sns)
            return st.exclude[:n], np.sort(rows[st.exclude[rows] == 0])
        if passed > size // FEW:
            return self._exclusion(st, key, tested, dates), None
        mask = self._slot_mask(st, key, tested, dates)
        if n - np.count_nonzero(mask) <= n // 16:
            # Few studies pass, but their images may be many: their list too when it is short.
            return mask, np.flatnonzero(mask == 0)
        return mask, None

    @property
    def nbytes(self) -> int:
        """Memory held by the cached filter results, their slot-order copies, the dates in slot order
        and the row masks."""
        kept = [t.fail for t in self._cache.values()]
        kept += [v.values for v in (*self._slots.values(), *self._masks.values(), self._dates) if v is not None]
        return sum(a.nbytes for a in kept)

    def _key(self, f: Filters, exclude_patient: str | None) -> tuple[tuple, tuple[int, int] | None]:
        """The arguments of :func:`_test_studies` for the filter without its date range (the key of its
        cached result), and the range, if any, as (lo, hi)."""
        key_out = np.uint64(patient_key(exclude_patient)) if exclude_patient else np.uint64(0)
        tests, body_id, modalities, key_in = 0, 0, np.uint64(0), np.uint64(0)
        if f.patient_id:
            tests |= PATIENT
            key_in = np.uint64(patient_key(f.patient_id))
        if f.body_part:
            tests |= BODY
            (number,) = self.vocabulary("body_part", [f.body_part])
            body_id = number or -1  # a body part never seen matches nothing
        if f.modalities:
            tests |= MODALITY
            modalities = np.uint64(modality_mask(self.vocabulary("modality", list(f.modalities))))
        if exclude_patient:
            tests |= NOT_PATIENT
        dates = None
        if f.date_from or f.date_to:
            # Unknown dates are 0 and fall outside every range. Filters checked both are dates.
            dates = (int(f.date_from) if f.date_from else 1, int(f.date_to) if f.date_to else 99991231)
        # numpy's uint64 in the key too: they are _test_studies's arguments (as Python ints they would
        # compile another version of it).
        return (tests, body_id, modalities, key_in, key_out), dates

    def _tested(self, st: State, key: tuple, columns: dict[str, np.ndarray]) -> _Tested:
        """The per-study result of the filter ``key`` (the arguments of :func:`_test_studies`) on
        ``st``'s records, from the cache when it holds one for this state.

        Why a cache: testing every record is a pass over 13 bytes per study (1.0-1.8 ms at a
        million), and a viewer asks the same filter again and again (a modality, a patient's
        exclusion), with or without a date range (which is not part of the key: :meth:`_slot_mask`).
        A cached result is brought up to date by testing again only the records that changed since
        (:meth:`State.attrs_changed_since`), so it is always the result a full pass would give;
        studies numbered since are unknown (255) until their record comes, which is itself a change.
        """
        size = st.studies
        tested, own = _take(self._cache, key, self.CACHED)
        changed = st.attrs_changed_since(tested.version) if own and tested.state() is st else None
        if tested is None:
            tested = _Tested(weakref.ref(st), 0, np.empty(0, np.uint8), 0, 0)
        tested.fail = _room(tested.fail, size, tested.size)
        if changed is None:  # not cached for this state (or the journal no longer reaches back)
            tested.passed = _test_studies(*_columns(columns, size), *key, tested.fail[:size])
        else:
            tested.fail[tested.size : size] = NEVER  # numbered since, no record yet
            changed = changed[changed < size]
            if changed.size:
                before = int(np.count_nonzero(tested.fail[changed] == 0))
                again = np.empty(changed.size, np.uint8)
                picked = {field: column[changed] for field, column in columns.items()}
                tested.passed += _test_studies(*_columns(picked, changed.size), *key, again) - before
                tested.fail[changed] = again
        tested.state, tested.version, tested.size = weakref.ref(st), st.attrs_version, size
        self._cache[key] = tested
        return tested

    def _exclusion(self, st: State, key: tuple, tested: _Tested, dates: tuple[int, int] | None) -> Exclusion:
        """The scan's exclusion for a broad filter: its row mask (:meth:`_slot_mask`), or for a date
        range asked for the first time, the mask of the filter without its range and the study dates in
        slot order, for the scan to test the range itself (:class:`hashing.search.InRange`).

        Why not always the mask: the mask of a range new to the query is written for that query alone,
        then read back by the scan (p50 1.38 ms at a million for both passes, 1.14 fused). Why not
        always the range: the mask of a range asked again is kept, and the scan then reads 9 bytes a slot,
        not 13 (0.82 ms). So a range's mask is made the second time it is asked.
        """
        if dates is None or (key, dates) in self._masks or self._asked.pop((key, dates), False):
            return self._slot_mask(st, key, tested, dates)
        self._asked[(key, dates)] = True
        while len(self._asked) > self.ASKED:
            self._asked.popitem(last=False)
        base = self._slot_mask(st, key, tested, None)
        self._dates = self._per_slot(st, self._dates, st.attrs["date"])
        return InRange(base, self._dates.values[: st.n], dates[0], dates[1])

    def _slot_mask(self, st: State, key: tuple, tested: _Tested, dates: tuple[int, int] | None) -> np.ndarray:
        """Per slot, 0 where the slot is live and its study passes the filter (``tested``, and the date
        range ``dates`` when given), 255 where not: the search's row mask.

        Why in slot order: the scan over every code then ORs one byte per slot in with each
        distance, a pass that vectorises; going through each slot's study number to its result was a
        gather per slot. The mask of the same filter asked again is kept as long as nothing changed
        (records, slots, deletions): the scan alone reads 10 bytes a slot. A range new to the query
        makes it in one pass over the kept result and dates in slot order (:meth:`_per_slot`): 7 bytes
        a slot more. At a million (2-core development machine, interleaved, p50): the scan with the
        old gather 1.34 ms plus 0.4 for a new range's dates; a kept mask 0.82; a new range 1.41.
        """
        n = st.n
        mask, own = _take(self._masks, (key, dates), self.SLOT_CACHED)
        if own and (
            mask.state() is st
            and (mask.attrs_version, mask.slots_version, mask.deletions, mask.n)
            == (st.attrs_version, st.slots_version, st.deletions, n)
        ):
            self._masks[(key, dates)] = mask
            return mask.values[:n]
        if mask is None:
            mask = _PerSlot(weakref.ref(st), 0, 0, 0, np.empty(0, np.uint8))
        mask.values = _room(mask.values, n, 0)
        rest, own = _take(self._slots, key, self.SLOT_CACHED)
        if rest is not None and not own:
            rest.slots_version = -1  # another filter's: gathered again, into its buffer
        rest = self._per_slot(st, rest, tested.fail)
        self._slots[key] = rest
        if dates is None:
            np.bitwise_or(rest.values[:n], st.exclude[:n], out=mask.values[:n])
        else:
            self._dates = self._per_slot(st, self._dates, st.attrs["date"])
            _slot_mask(rest.values[:n], st.exclude[:n], self._dates.values[:n], dates[0], dates[1], mask.values[:n])
        mask.state, mask.attrs_version, mask.slots_version, mask.deletions, mask.n = (
            weakref.ref(st), st.attrs_version, st.slots_version, st.deletions, n
        )  # fmt: skip
        self._masks[(key, dates)] = mask
        return mask.values[:n]

    def _per_slot(self, st: State, kept: _PerSlot | None, column: np.ndarray) -> _PerSlot:
        """``column`` (per study number) in slot order for ``st``'s slots, from ``kept`` when it is this
        state's: extended over the slots added since, and changed where study records changed (study
        level, through each study's slot; at image level a study's slots are not indexed, so a
        change gathers them all again, one pass). Slots given another study number gather all again.
        ``column`` covers every study number in use (:attr:`State.studies`)."""
        n = st.n
        fresh = kept is None or kept.state() is not st or kept.slots_version != st.slots_version
        changed = None if fresh else st.attrs_changed_since(kept.attrs_version)
        if kept is None:
            kept = _PerSlot(weakref.ref(st), 0, 0, 0, np.empty(0, column.dtype))
        kept.values = _room(kept.values, n, kept.n)
        if changed is not None and changed.size and self.level != "study":
            changed = None
        start = 0 if changed is None else kept.n
        if start < n:
            _gather(column, st.slot_sn[start:n], kept.values[start:n])
        if changed is not None and changed.size:
            changed = changed[changed < st.sn_slot.shape[0]]
            slots = st.sn_slot[changed]
            inside = (slots >= 0) & (slots < start)
            kept.values[slots[inside]] = column[changed[inside]]
        kept.state, kept.attrs_version, kept.slots_version, kept.n = (
            weakref.ref(st), st.attrs_version, st.slots_version, n
        )  # fmt: skip
        return kept

    def slots_of_studies(self, st: State, sns: np.ndarray) -> np.ndarray:
        """Slots (< n) whose study number is in ``sns`` (a short list)."""
        if self.level == "study":
            rows = st.sn_slot[sns]
            return rows[(rows >= 0) & (rows < st.n)]
        return np.flatnonzero(np.isin(st.slot_sn[: st.n], sns))

    def vocabulary(self, field: str, terms: list[str]) -> list[int | None]:
        """Vocabulary numbers, cached: a term's number never changes once given."""
        missing = [t for t in terms if (field, t) not in self._vocab]
        if missing:
            for term, number in zip(missing, self._lookup(field, missing), strict=True):
                if number is not None:
                    self._vocab[(field, term)] = number
        return [self._vocab.get((field, t)) for t in terms]
