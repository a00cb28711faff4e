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

    def move_unknown_destination(event):
        yield None, None

    def get_refused(event):
        yield 1
        failure = Dataset()
        failure.Status = 0xC000
        yield failure, None

    def broken(event):
        raise RuntimeError("a bug")
        yield  # a generator

    assert counters.timed("C-ECHO", echo)(None) == 0
    counters.timed("C-STORE", store)(None)
    assert len(list(counters.timed("C-FIND", find)(None))) == 2
    list(counters.timed("C-FIND", cancelled)(None))
    list(counters.timed("C-MOVE", move_unknown_destination)(None))
    list(counters.timed("C-GET", get_refused)(None))
    try:
        list(counters.timed("C-GET", broken)(None))
    except RuntimeError:
        pass
    requests = counters.snapshot()["requests"]
    assert requests["C-ECHO|success"] == 1 and requests["C-STORE|failure"] == 1
    assert requests["C-FIND|success"] == 1 and requests["C-FIND|cancel"] == 1
    assert requests["C-MOVE|failure"] == 1 and requests["C-GET|failure"] == 2
    latency = counters.snapshot()["latency"]["C-FIND"]
    assert latency["count"] == 2 and latency["buckets"][-1] == (float("inf"), 2)


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
