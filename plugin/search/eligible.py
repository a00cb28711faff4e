"""Which slots of a replica a filtered search may return, computed from the study filter records.

Filters restrict the *study* attributes (:class:`plugin.search.filters.Filters`); each slot points at its
study's record. The answer comes in the cheapest form for the search that follows:

- a broad filter (a modality, a date range): a byte per study, which the scan ORs in with each
  slot's distance through the slot's study number (``groups``), so no per-slot mask is built;
- a selective one (one patient, a rare body part: at most 1/:data:`FEW` of all studies pass): the
  short list of eligible slots, so that only those need a distance (at image level, where a study
  has many slots, through a mask over the slots);
- the reference patient's exclusion alone, when at most 1/64 of the studies fail it: the deletion
  mask with the few excluded slots set.

A study without a record (metadata not written yet, or an image not yet linked to its study: study
number 0) passes no filter, not even an exclusion: it cannot be shown not to be the excluded
patient's.

Speed. Done as numpy steps (a pass per test, a gather of the study's result for every slot, a
subtraction, an OR), a search at a million studies with a modality and a date range took p50 / p99
7.0 / 8.0 ms (README, release note "filtered search at 1M"), over the 5 ms that unfiltered search
keeps. Now one compiled function tests the records (a vectorised loop per test asked,
:func:`_test_studies`), and the scan ORs each slot's study byte in with its distance
(:func:`hashing.kernels.hamming_first_masked`). The result per study of the last few filters is
kept and brought up to date from the records that change (:meth:`Eligibility._tested`): a filter
asked again skips the test pass. A filter with a date range also keeps its result without the range,
so that the same modality with a range new to the query reads only the dates (:func:`_test_dates`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hashing.kernels import jit, or_masked, rows_at_most
from hashing.search import Groups
from plugin.search.filters import Filters
from plugin.search.state import NEVER, State
from plugin.store import FLAG_KNOWN, patient_key
from plugin.store.attributes import modality_mask

# Which tests a filter asks of the records (bits of `_test_studies`'s `tests`); every filter also
# asks that the study has a record.
DATE, BODY, MODALITY, PATIENT, NOT_PATIENT = 1, 2, 4, 8, 16
# When at most 1/FEW of all studies pass, only their slots get a distance (hashing.search.knn_rows);
# otherwise the scan of every slot ORs in the studies' bytes. At 1M studies the scan costs about
# 1.2 ms whatever passes, while listing the passing studies, sorting their slots and gathering their
# codes grows with their number: about 0.3 ms for 4,000 (1 in 256), 1.5-2 ms for 32,000 (1 in 32).
FEW = 256


@jit
def _test_studies(
    flags: np.ndarray,
    date: np.ndarray,
    body: np.ndarray,
    modmask: np.ndarray,
    patient: np.ndarray,
    tests: int,
    lo: int,
    hi: int,
    body_id: int,
    modalities: np.uint64,
    patient_in: np.uint64,
    patient_out: np.uint64,
    fail: np.ndarray,
) -> int:
    """``fail[i]`` = 0 where record i is known and passes every test in ``tests``, 255 where not.
    Returns how many pass.

    One loop per test asked, each branch-free over one column (ANDing a 0/1 byte per record), so
    that each vectorises: about 1 ms at a million records for a modality and a date range. One loop
    testing every field (its tests chosen inside) vectorised only for some choices, and collecting the
    passing numbers in it made it six times slower; the caller collects them when they are few.
    """
    n = flags.shape[0]
    for i in range(n):
        fail[i] = np.uint8((flags[i] & FLAG_KNOWN) != 0)  # 1: passes so far
    if tests & DATE:
        for i in range(n):
            fail[i] &= np.uint8(date[i] >= lo) & np.uint8(date[i] <= hi)
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
def _test_dates(rest: np.ndarray, date: np.ndarray, lo: int, hi: int, fail: np.ndarray) -> int:
    """``fail[i]`` = 0 where ``rest[i]`` is 0 (the rest of the filter passes) and ``date[i]`` is in
    [lo, hi], 255 where not; returns how many pass. One pass over 5 bytes a study, where the whole
    filter's reads 13 (0.35-0.4 ms at a million, against 1.7-1.9 for CT and a range)."""
    count = 0
    for i in range(fail.shape[0]):
        inside = np.uint8(date[i] >= lo) & np.uint8(date[i] <= hi)
        v = rest[i] | np.uint8(inside - np.uint8(1))  # 1 -> 0, 0 -> 255
        fail[i] = v
        count += v == 0
    return count


def warm_up() -> None:
    """Compile (or load from the cache) the filter passes now, on a few records of the replica's
    column types (:class:`plugin.search.state.Columns`)."""
    cols = State("warm-up", "study", 64, 0).attrs
    fail, none = np.zeros(cols.size, np.uint8), np.uint64(0)
    _test_studies(
        cols["flags"], cols["date"], cols["body"], cols["modmask"], cols["patient"],
        DATE | BODY | MODALITY | PATIENT | NOT_PATIENT, 1, 2, 1, none, none, none, fail,
    )  # fmt: skip
    _test_dates(fail, cols["date"], 1, 2, fail)


@dataclass
class _Tested:
    """A filter's per-study result (0 passes, 255 fails) for one replica state, as of a version of
    its records."""

    state: weakref.ref
    version: int  # State.attrs_version it reflects
    fail: np.ndarray  # capacity >= size
    size: int  # study numbers covered
    passed: int


def _columns(columns: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, ...]:
    """The record columns :func:`_test_studies` reads, in its order, the first ``size`` of each."""
    return tuple(columns[field][:size] for field in ("flags", "date", "body", "modmask", "patient"))


class Eligibility:
    """Filter evaluation over one replica's records; caches the vocabulary numbers it looks up, and
    the per-study result of the last :attr:`CACHED` filters (or parts of filters).

    Keeps its per-study and per-slot byte arrays between searches (fresh pages cost page faults at
    every query): what :meth:`rows` returns is valid until its next call, which the replica's lock
    serialises (as it serialises the record changes the cached results follow).
    """

    # Filter results kept per study (a megabyte each at a million studies). A filter with a date
    # range and other tests keeps two: the whole filter, and the filter without its range.
    CACHED = 16

    def __init__(self, level: str, vocabulary: Callable[[str, list[str]], list[int | None]]) -> None:
        self.level = level
        self._lookup = vocabulary
        self._vocab: dict[tuple[str, str], int] = {}
        self._cache: OrderedDict[tuple, _Tested] = OrderedDict()  # least recently used first
        self._mask = np.empty(0, np.uint8)  # per slot: 0 eligible, 255 never

    def rows(
        self, st: State, filters: Filters | None, exclude_patient: str | None = None
    ) -> tuple[np.ndarray | None, np.ndarray | None, Groups | None]:
        """(exclude, rows, groups) for a search.

        - ``exclude``: uint8 per slot, 0 where a slot may be returned (None: every slot may);
        - ``groups``, when not None: each slot's study number and a byte per study, 0 where the
          study passes; a slot may be returned only where both bytes are 0 (the scan ORs them in
          with its distances, :func:`hashing.search.masked_distances`);
        - ``rows``, when not None, lists every eligible slot (ascending): the filter is selective
          and only those rows need a distance.
        """
        n = st.n
        restricts = filters is not None and filters.restricts()
        if not restricts and not exclude_patient:
            # No filter: only deleted slots are left out (no mask at all while none is).
            return (st.exclude[:n] if st.live < n else None), None, None
        kind, studies, fail = self._passing_studies(st, filters or Filters(), exclude_patient)
        if kind == "but":
            # Every study but a few (the reference patient's left out): mark the slots of those few.
            exclude = st.exclude[:n].copy()
            exclude[self.slots_of_studies(st, studies)] = NEVER
            return exclude, None, None
        if kind == "mask":
            return st.exclude[:n], None, (st.slot_sn[:n], fail)
        if self.level == "study":
            rows = self.slots_of_studies(st, studies)
            return st.exclude[:n], np.sort(rows[st.exclude[rows] == 0]), None
        # Few studies pass, but their images may be many: a mask over the slots, and their list if short.
        if self._mask.shape[0] < n:
            self._mask = np.empty(max(n, 2 * self._mask.shape[0]), np.uint8)
        mask = self._mask[:n]
        mask.fill(0)
        or_masked(mask, st.exclude[:n], st.slot_sn[:n], fail)  # the scan's own mask pass
        if n - np.count_nonzero(mask) <= n // 16:
            return mask, np.flatnonzero(mask == 0), None
        return mask, None, None

    @property
    def nbytes(self) -> int:
        """Memory held by the cached filter results and the slot mask."""
        return sum(t.fail.nbytes for t in self._cache.values()) + self._mask.nbytes

    def _tested(
        self,
        st: State,
        key: tuple,
        columns: dict[str, np.ndarray],
        compute: Callable[[np.ndarray], int] | None = None,
    ) -> _Tested:
        """The per-study result of the filter ``key`` (the arguments of :func:`_test_studies`) on
        ``st``'s records, from the cache when it holds one for this state.

        Why a cache: testing every record is a pass over 13 bytes per study (1.0-1.8 ms at a
        million), the largest part of a filtered search, and a viewer asks the same filter again
        and again (a modality, "the last five years"). A cached result is brought up to date by
        testing again only the records that changed since (:meth:`State.attrs_changed_since`), so it
        is always the result a full pass would give; studies numbered since are unknown (255)
        until their record comes, which is itself a change.

        ``compute(fail)``, when given, fills a result not cached and returns how many pass, instead of
        the pass over every field of the records (a filter from the kept result of its other part).
        """
        size = st.studies
        tested = self._cache.pop(key, None)
        changed = None
        if tested is not None and tested.state() is st:
            changed = st.attrs_changed_since(tested.version)
        if tested is None and len(self._cache) >= self.CACHED:
            _, tested = self._cache.popitem(last=False)  # its buffer is reused: no fresh pages
        if tested is None:
            tested = _Tested(weakref.ref(st), 0, np.empty(0, np.uint8), 0, 0)
        if tested.fail.shape[0] < size:
            grown = np.empty(max(size, 2 * tested.fail.shape[0]), np.uint8)
            grown[: tested.size] = tested.fail[: tested.size]
            tested.fail = grown
        if changed is None:  # not cached for this state (or the journal no longer reaches back)
            if compute is not None:
                tested.passed = compute(tested.fail[:size])
            else:
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

    def _passing_studies(
        self, st: State, f: Filters, exclude_patient: str | None
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """The studies whose record satisfies every filter, in the cheapest form, and the fail
        byte per study number (0 passes, 255 fails):

        - ``("only", sns, fail)``: few pass (at most one in :data:`FEW`), their study numbers;
        - ``("but", sns, fail)``: all pass except a few (only the patient exclusion), those few;
        - ``("mask", empty, fail)`` otherwise.
        """
        size = st.studies
        a = {field: column[:size] for field, column in st.attrs.cols.items()}
        key_out = np.uint64(patient_key(exclude_patient)) if exclude_patient else np.uint64(0)
        tests, lo, hi, body_id, modalities, key_in = 0, 0, 0, 0, np.uint64(0), np.uint64(0)
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
        if f.date_from or f.date_to:
            tests |= DATE
            # Unknown dates are 0 and fall outside every range. Filters checked both are dates.
            lo = int(f.date_from) if f.date_from else 1
            hi = int(f.date_to) if f.date_to else 99991231
        if exclude_patient:
            tests |= NOT_PATIENT
        # numpy's uint64 in the key too: they are _test_studies's arguments (as Python ints they would
        # compile another version of it).
        key = (tests, lo, hi, body_id, modalities, key_in, key_out)
        compute = None
        if tests & DATE and tests != DATE:
            # The filter without its date range is kept as well: a viewer asks the same modality or
            # patient with a range new to the query ("before this study"), and then only the date
            # column is read beside that kept result (5 bytes a study instead of 13).
            rest = (tests & ~DATE, 0, 0, body_id, modalities, key_in, key_out)

            def compute(out: np.ndarray) -> int:
                return _test_dates(self._tested(st, rest, a).fail[:size], a["date"], lo, hi, out)

        tested = self._tested(st, key, a, compute)
        fail, passed = tested.fail[:size], tested.passed
        if tests == NOT_PATIENT and size - passed <= size // 64:
            # Exclusion only: the failing few are the excluded patient's studies and the unknown ones.
            return "but", np.flatnonzero(fail), fail
        if passed <= size // FEW:
            # Collected by skipping the blocks where none passes: 0.1 ms for a patient's few studies
            # at 1M, where np.flatnonzero reads every byte (0.6 ms).
            sns = np.empty(passed, np.int64)
            rows_at_most(fail, np.uint8(0), sns)
            return "only", sns, fail
        return "mask", np.empty(0, np.int64), fail
