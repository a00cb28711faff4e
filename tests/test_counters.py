"""The DICOM listener's counters (plugin.dicom.counters) and what /metrics makes of them; the SCP
itself is exercised against DCMTK in test_status.py."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset

from plugin.dicom.admission import REFUSAL_REASONS, Refusals
from plugin.dicom.counters import OPERATIONS, OUTCOMES, DicomCounters, note_rejection
from plugin.ops import metrics


def _samples(figures: dict) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(metrics.render(figures).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_series_exists_at_zero_before_the_first_event():
    samples = _samples({"time": 0, "redis_ok": False, "namespace": "drh", "dicom": DicomCounters().snapshot()})
    for op in OPERATIONS:
        for outcome in OUTCOMES:
            assert samples[("drh_dicom_requests_total", (("operation", op), ("outcome", outcome)))] == 0
        assert samples[("drh_dicom_request_duration_seconds_count", (("operation", op),))] == 0
    for reason in ("called-ae", "calling-ae", "address", "busy", "other"):
        assert samples[("drh_dicom_association_rejections_total", (("reason", reason),))] == 0
    assert samples[("drh_dicom_associations_total", (("outcome", "accepted"),))] == 0
    for reason in REFUSAL_REASONS:  # admission control's refusals (plugin.dicom.admission)
        assert samples[("drh_dicom_admission_refusals_total", (("reason", reason),))] == 0
    for op in ("C-MOVE", "C-GET"):
        for outcome in ("completed", "failed", "warning"):
            assert samples[("drh_dicom_retrieve_suboperations_total", (("operation", op), ("outcome", outcome)))] == 0
    for outcome in ("success", "refused", "unreachable", "cancelled"):
        assert samples[("drh_dicom_move_forwards_total", (("outcome", outcome),))] == 0
    for reason in ("non-image", "other"):
        assert samples[("drh_dicom_presentation_contexts_rejected_total", (("reason", reason),))] == 0


def test_admission_refusals_are_exported_next_to_the_dicom_counters():
    refusals = Refusals()
    counters = DicomCounters()
    counters.admission_refusals = refusals.snapshot  # as the SCP wires them
    refusals.count("request-timeout", "10.0.0.1", "A-ASSOCIATE-RQ not complete in time")
    refusals.count("request-timeout", "10.0.0.1", "A-ASSOCIATE-RQ not complete in time")
    refusals.count("dataset-too-large", "10.0.0.2", "dataset over max_dataset_size")
    samples = _samples({"time": 0, "redis_ok": False, "namespace": "drh", "dicom": counters.snapshot()})
    assert samples[("drh_dicom_admission_refusals_total", (("reason", "request-timeout"),))] == 2
    assert samples[("drh_dicom_admission_refusals_total", (("reason", "dataset-too-large"),))] == 1
    assert samples[("drh_dicom_admission_refusals_total", (("reason", "busy"),))] == 0


def test_handlers_are_counted_by_their_final_status():
    counters = DicomCounters()

    def echo(event):
        return 0x0000

    def store(event):
        ds = Dataset()
        ds.Status = 0xC000
        return ds

    def find(event):
        yield 0xFF00, Dataset()
        yield 0xFF00, Dataset()

    def cancelled(event):
        yield 0xFF00, Dataset()
        yield 0xFE00, None

    def broken(event):
        raise RuntimeError("a bug")
        yield  # a generator

    assert counters.timed("C-ECHO", echo)(None) == 0
    counters.timed("C-STORE", store)(None)
    assert len(list(counters.timed("C-FIND", find)(None))) == 2
    list(counters.timed("C-FIND", cancelled)(None))
    try:
        list(counters.timed("C-FIND", broken)(None))
    except RuntimeError:
        pass
    requests = counters.snapshot()["requests"]
    assert requests["C-ECHO|success"] == 1 and requests["C-STORE|failure"] == 1
    assert requests["C-FIND|success"] == 1 and requests["C-FIND|cancel"] == 1 and requests["C-FIND|failure"] == 1
    latency = counters.snapshot()["latency"]["C-FIND"]
    assert latency["count"] == 3 and latency["buckets"][-1] == (float("inf"), 3)


def test_rejections_are_counted_by_reason():
    counters = DicomCounters()
    ours = SimpleNamespace()
    note_rejection(ours, "calling-ae")
    counters.rejected(ours)
    acceptors = [SimpleNamespace(is_acceptor=True) for _ in range(3)]
    busy = SimpleNamespace(ae=SimpleNamespace(active_associations=acceptors, maximum_associations=2))
    counters.rejected(busy)  # pynetdicom's own refusal over the association limit
    snap = counters.snapshot()
    assert snap["associations"]["rejected"] == 2
    assert snap["rejections"]["calling-ae"] == 1 and snap["rejections"]["busy"] == 1


def _sent(message_class, assoc, **command):  # an EVT_DIMSE_SENT, as pynetdicom passes it
    message = message_class()
    for keyword, value in command.items():
        setattr(message.command_set, keyword, value)
    return SimpleNamespace(message=message, assoc=assoc)


def test_a_move_or_get_is_counted_by_its_final_response_with_its_sub_operations():
    """What a C-MOVE or C-GET handler yields is only what it offers; the final response says what the
    destination took (a move whose every file was refused ends 0xA702, not a success)."""
    from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP

    counters = DicomCounters()
    assoc = SimpleNamespace()

    def offers(event):
        yield ("127.0.0.1", 104)
        yield 2
        yield 0xFF00, Dataset()
        yield 0xFF00, Dataset()

    assert len(list(counters.timed("C-MOVE", offers)(SimpleNamespace(assoc=assoc)))) == 4
    assert counters.snapshot()["requests"]["C-MOVE|success"] == 0  # not counted from what was offered
    assert counters.retrieve_answered(_sent(C_MOVE_RSP, assoc, Status=0xFF00, NumberOfCompletedSuboperations=1)) is None
    assert counters.retrieve_answered(_sent(C_FIND_RSP, assoc, Status=0x0000)) is None
    done = counters.retrieve_answered(
        _sent(C_MOVE_RSP, assoc, Status=0xA702, NumberOfCompletedSuboperations=0, NumberOfFailedSuboperations=2)
    )
    assert done is not None and (done.operation, done.status, done.forwarded) == ("C-MOVE", 0xA702, False)
    counters.retrieve_answered(_sent(C_GET_RSP, assoc, Status=0xB000, NumberOfCompletedSuboperations=3,
                                     NumberOfFailedSuboperations=1, NumberOfWarningSuboperations=0))  # fmt: skip
    counters.retrieve_answered(_sent(C_MOVE_RSP, assoc, Status=0xA801))  # destination unknown
    snap = counters.snapshot()
    assert snap["requests"]["C-MOVE|failure"] == 2 and snap["requests"]["C-GET|warning"] == 1
    assert snap["suboperations"] == {
        "C-MOVE|completed": 0, "C-MOVE|failed": 2, "C-MOVE|warning": 0,
        "C-GET|completed": 3, "C-GET|failed": 1, "C-GET|warning": 0,
    }  # fmt: skip
    assert snap["latency"]["C-MOVE"]["count"] == 2
    samples = _samples({"time": 0, "redis_ok": False, "namespace": "drh", "dicom": snap})
    key = ("drh_dicom_retrieve_suboperations_total", (("operation", "C-GET"), ("outcome", "completed")))
    assert samples[key] == 3
