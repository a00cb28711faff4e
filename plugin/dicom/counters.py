"""What the DICOM listener has done since its process started: associations (accepted, rejected and
why, aborted), DIMSE requests by service and outcome, and how long each took.

Kept in the memory of the process that runs the SCP (``serve``), not in Redis like the workers'
counters (:mod:`plugin.store.stats`): the listener is one process, its counts cost nothing on the
DIMSE path, and they must keep counting when Redis is down, which is when rejections and failures
pile up. A restart starts them at zero again, which Prometheus counters are made for (``rate`` and
``increase`` handle resets). Every series exists from the start at zero, so an alert on
``increase(...)`` sees the first burst too. ``/metrics`` and the status page read
:meth:`DicomCounters.snapshot` through :func:`plugin.ops.status.gather`.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

OPERATIONS = ("C-ECHO", "C-STORE", "C-FIND", "C-MOVE", "C-GET")
OUTCOMES = ("success", "warning", "failure", "cancel")
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "aborted")
# Why an association was rejected: our checks (handlers.handle_requested), no free association slot
# ("busy": plugin.dicom.admission's limits, or pynetdicom's own), anything else. Connections refused
# before their A-ASSOCIATE-RQ was read (admission control) are counted by plugin.dicom.admission.
REJECT_REASONS = ("called-ae", "calling-ae", "address", "busy", "other")
# Why a proposed SOP class was refused in an accepted association (counted once per class): a
# non-image storage class under non_image_policy "reject", anything else we do not offer (a service,
# a transfer syntax).
CONTEXT_REJECTIONS = ("non-image", "other")
# What came of a C-MOVE forwarded to the PACS that sent the study.
FORWARD_OUTCOMES = ("success", "refused", "unreachable", "cancelled")
# The sub-operations of C-MOVE and C-GET (one C-STORE each), as their final response counts them.
RETRIEVES = {"C_MOVE_RSP": "C-MOVE", "C_GET_RSP": "C-GET"}
SUBOPERATIONS = ("completed", "failed", "warning")
# Seconds: from a C-ECHO (milliseconds) to a C-MOVE of a large study (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_REJECT_ATTRIBUTE = "_drh_reject_reason"
_RETRIEVE_STARTED = "_drh_retrieve_started"
_RETRIEVE_FORWARDED = "_drh_retrieve_forwarded"


def note_rejection(assoc: Any, reason: str) -> None:
    """Say why we are about to reject ``assoc`` (before triggering ``EVT_REJECTED``), for the counts."""
    setattr(assoc, _REJECT_ATTRIBUTE, reason)


def note_forwarded(assoc: Any) -> None:
    """Say that the C-MOVE being answered on ``assoc`` was done by the source PACS (its final response
    counts no local sub-operation)."""
    setattr(assoc, _RETRIEVE_FORWARDED, True)


def outcome_of(status: int) -> str | None:
    """The outcome a DIMSE status means; None for pending (not the end of the request yet)."""
    if status in (0xFF00, 0xFF01):
        return None
    if status == 0x0000:
        return "success"
    if status == 0xFE00:
        return "cancel"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def _status_in(item: Any) -> int | None:
    """The status of one (status, dataset) yield of a handler; None for the other yields of C-MOVE
    and C-GET (the destination, the number of sub-operations)."""
    if not isinstance(item, tuple) or len(item) != 2:
        return None
    first = item[0]
    if first is None and item[1] is None:
        return 0xA801  # C-MOVE: destination unknown
    if isinstance(first, int):
        return first
    status = getattr(first, "Status", None)
    return int(status) if status is not None else None


def _no_admission_refusals() -> dict[str, int]:
    """Every admission refusal reason at zero (counters not attached to a running SCP)."""
    from plugin.dicom.admission import REFUSAL_REASONS

    return dict.fromkeys(REFUSAL_REASONS, 0)


@dataclass(frozen=True)
class Retrieved:
    """The end of a C-MOVE or C-GET as its final response says."""

    operation: str
    status: int
    suboperations: dict[str, int]
    forwarded: bool  # done by the source PACS: no local sub-operation


class DicomCounters:
    """Thread-safe counters of one SCP process; :meth:`snapshot` is what the exporters read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._associations = dict.fromkeys(ASSOCIATION_OUTCOMES, 0)
        self._rejections = dict.fromkeys(REJECT_REASONS, 0)
        self._requests = {(op, outcome): 0 for op in OPERATIONS for outcome in OUTCOMES}
        self._buckets = {op: [0] * (len(LATENCY_BUCKETS) + 1) for op in OPERATIONS}
        self._sums = dict.fromkeys(OPERATIONS, 0.0)
        self._suboperations = {(op, kind): 0 for op in RETRIEVES.values() for kind in SUBOPERATIONS}
        self._forwards = dict.fromkeys(FORWARD_OUTCOMES, 0)
        self._contexts_rejected = dict.fromkeys(CONTEXT_REJECTIONS, 0)
        self.started = time.time()
        # len(active associations), set by the SCP that owns these counters
        self.active: Callable[[], int] = lambda: 0
        # the admission control's refusals by reason (plugin.dicom.admission.Refusals.snapshot), set
        # by the SCP: connections refused before or outside an association's own checks
        self.admission_refusals: Callable[[], dict[str, int]] = _no_admission_refusals
        # files in the spool whose queueing for the workers failed or has not happened yet (the
        # reconciler's), set by the SCP: they grow while the broker is down, and no queue shows them
        self.spool_unqueued: Callable[[], int] = lambda: 0

    # -- recording -------------------------------------------------------------------------------
    def association(self, outcome: str) -> None:
        with self._lock:
            self._associations[outcome] += 1

    def rejected(self, assoc: Any) -> None:
        reason = getattr(assoc, _REJECT_ATTRIBUTE, None)
        if reason is None:
            ae = getattr(assoc, "ae", None)
            acceptors = [a for a in getattr(ae, "active_associations", []) if getattr(a, "is_acceptor", False)]
            reason = "busy" if ae is not None and len(acceptors) > ae.maximum_associations else "other"
        with self._lock:
            self._associations["rejected"] += 1
            self._rejections[reason if reason in self._rejections else "other"] += 1

    def request(self, operation: str, outcome: str, seconds: float) -> None:
        index = next((n for n, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
        with self._lock:
            self._requests[(operation, outcome)] += 1
            self._buckets[operation][index] += 1
            self._sums[operation] += seconds

    def timed(self, operation: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """``handler`` (a pynetdicom event handler) with its requests counted and timed.

        C-MOVE and C-GET are counted when their final response is sent (:meth:`retrieve_answered`):
        what their handler yields is only the files to send, and whether the destination took them
        is known to pynetdicom alone (a move whose every sub-operation failed ends in 0xA702).
        """
        if operation in RETRIEVES.values():

            def retrieve(event: Any, *args: Any) -> Iterator[Any]:
                setattr(event.assoc, _RETRIEVE_STARTED, time.monotonic())
                setattr(event.assoc, _RETRIEVE_FORWARDED, False)
                yield from handler(event, *args)

            retrieve.__name__ = handler.__name__
            return retrieve
        if inspect.isgeneratorfunction(handler):

            def generator(event: Any, *args: Any) -> Iterator[Any]:
                started = time.monotonic()
                outcome = "success"
                try:
                    for item in handler(event, *args):
                        status = _status_in(item)
                        if status is not None:
                            outcome = outcome_of(status) or outcome
                        yield item
                except BaseException:
                    outcome = "failure"  # pynetdicom answers an exception in a handler with a failure
                    raise
                finally:
                    self.request(operation, outcome, time.monotonic() - started)

            generator.__name__ = handler.__name__
            return generator

        def plain(event: Any, *args: Any) -> Any:
            started = time.monotonic()
            outcome = "failure"
            try:
                result = handler(event, *args)
                status = result if isinstance(result, int) else getattr(result, "Status", 0xC000)
                outcome = outcome_of(int(status)) or "success"
                return result
            finally:
                self.request(operation, outcome, time.monotonic() - started)

        plain.__name__ = handler.__name__
        return plain

    def contexts_rejected(self, reason: str, n: int) -> None:
        with self._lock:
            self._contexts_rejected[reason if reason in self._contexts_rejected else "other"] += n

    def forwarded_move(self, outcome: str) -> None:
        """A C-MOVE forwarded to the PACS that sent the study, by what came of it (``refused``: the
        PACS answered with a failure, often a viewer it does not know; ``unreachable``: it did not
        answer; drh-pacs then sends its own copy, if it keeps one. ``cancelled``: the viewer cancelled
        it, and the PACS stopped)."""
        with self._lock:
            self._forwards[outcome] += 1

    def retrieve_answered(self, event: Any) -> Retrieved | None:
        """Count a C-MOVE or C-GET by the final response pynetdicom sends (an ``EVT_DIMSE_SENT``);
        None for any other message."""
        operation = RETRIEVES.get(type(event.message).__name__)
        if operation is None:
            return None
        command = event.message.command_set
        status = int(getattr(command, "Status", 0xC000))
        outcome = outcome_of(status)
        if outcome is None:
            return None  # pending
        started = getattr(event.assoc, _RETRIEVE_STARTED, None)
        seconds = time.monotonic() - started if started is not None else 0.0
        counts = {
            kind: int(getattr(command, f"NumberOf{kind.title()}Suboperations", None) or 0) for kind in SUBOPERATIONS
        }
        forwarded = bool(getattr(event.assoc, _RETRIEVE_FORWARDED, False))
        self.request(operation, outcome, seconds)
        if not forwarded:  # a forwarded move's counts are the source PACS's sub-operations, not ours
            with self._lock:
                for kind, n in counts.items():
                    self._suboperations[(operation, kind)] += n
        return Retrieved(operation, status, counts, forwarded)

    # -- reading ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Every count, with cumulative latency buckets per operation (Prometheus's shape)."""
        with self._lock:
            latency = {}
            for op in OPERATIONS:
                cumulative, buckets = 0, []
                for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self._buckets[op], strict=True):
                    cumulative += n
                    buckets.append((bound, cumulative))
                latency[op] = {"buckets": buckets, "sum": self._sums[op], "count": cumulative}
            return {
                "started": self.started,
                "associations": dict(self._associations),
                "rejections": dict(self._rejections),
                "requests": {f"{op}|{outcome}": n for (op, outcome), n in self._requests.items()},
                "suboperations": {f"{op}|{kind}": n for (op, kind), n in self._suboperations.items()},
                "move_forwards": dict(self._forwards),
                "contexts_rejected": dict(self._contexts_rejected),
                "latency": latency,
                "active_associations": self.active(),
                "admission_refusals": self.admission_refusals(),
                "spool_unqueued": self.spool_unqueued(),
            }
