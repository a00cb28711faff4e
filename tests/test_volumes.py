"""Volumes and multi-frame objects as bags: a bounded, evenly spaced sample per series is encoded,
whatever the series' size (a real `drh-pacs worker`, real Redis, pydicom's CT and MR files, a
real multi-frame MR and a generated 300-slice CT series); DMIH pools each series' sample into a
series code."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from hashing.preprocess import evenly_spaced, load_frames, read_dataset
from plugin.search import query as q
from plugin.search.routed import RoutedIndex
from tests.helpers.dicomgen import Study, make_instance
from tests.helpers.processes import wait_until
from tests.helpers.workers import app_for, send
from workers.volumes import choose

FIXTURES = Path(__file__).parent / "fixtures" / "dicom"
SAMPLE = 8


def test_evenly_spaced_samples_cover_the_whole_series_and_never_exceed_the_bound():
    assert evenly_spaced(300, 8) == [18, 56, 93, 131, 168, 206, 243, 281]
    assert evenly_spaced(5, 8) == [0, 1, 2, 3, 4]
    assert evenly_spaced(10, 1) == [5]  # one slice: the middle one
    for total in (1, 7, 16, 17, 500, 10_000):
        picked = evenly_spaced(total, 16)
        assert len(picked) == min(total, 16) and picked == sorted(set(picked)) and 0 <= picked[0] <= picked[-1] < total


def test_a_growing_series_keeps_the_slices_already_encoded_that_still_fit():
    first = evenly_spaced(300, 8)
    assert choose(300, 8, set()) == first
    assert choose(301, 8, set(first)) == first  # one late slice: nothing to encode again
    doubled = choose(600, 8, set(first))
    assert len(doubled) == 8 and len(set(doubled) & set(first)) == 4  # twice as long: half of it kept


def test_a_multi_frame_object_is_pooled_from_a_bounded_sample_of_its_frames():
    from hashing.encoder import Encoder
    from workers.batching import Item, encode_items

    ds = read_dataset(FIXTURES / "emri_small.dcm")
    frames = load_frames(ds, limit=4)
    assert len(frames) == 4 and all(f.shape == (64, 64) for f in frames)
    enc = Encoder.random()
    multi = Item("1.2.3", "1.2", "", "", 0.0, frames=frames, pixels=frames[2])
    single = Item("1.2.4", "1.2", "", "", 0.0, pixels=frames[0])
    out = encode_items(enc, [multi, single], batch_size=8)
    assert out.codes.shape == (2, enc.nbits // 8)
    code, rerank = enc.encode_study(enc.encode_images(frames).embeddings)  # DMIH over the frames
    assert bytes(out.codes[0]) == bytes(code) and np.array_equal(out.rerank[0], rerank)
    assert bytes(out.codes[1]) == bytes(enc.encode_images([frames[0]]).codes[0])


def _ct_series(folder: Path, n: int, study_uid: str, start: int = 1, series: str = "") -> Study:
    """A generated CT series of ``n`` 32 x 32 slices (InstanceNumber start, start + 1, ...)."""
    study = Study(study_uid, "VOL1")
    series = series or generate_uid()
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(start, start + n):
        pixels = (rng.random((32, 32)) * 255).astype(np.uint8)
        ds = make_instance(pixels, study_uid=study_uid, series_uid=series, patient_id="VOL1", modality="CT",
                           instance_number=k, body_part="HEAD")  # fmt: skip
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.files.append(path)
        study.sop_uids.append(ds.SOPInstanceUID)
    return study


def _real(tmp: Path, path: Path) -> Study:
    copy = tmp / path.name
    shutil.copy(path, copy)
    ds = pydicom.dcmread(copy, stop_before_pixels=True)
    return Study(ds.StudyInstanceUID, str(ds.PatientID), [copy], [ds.SOPInstanceUID])


@pytest.mark.slow
def test_a_300_slice_series_costs_a_bounded_sample_and_real_ct_mr_and_multi_frame_files_are_indexed(
    redis_server, store, worker_factory, tmp_path
):
    # Pooled once every slice is recorded: one sample per series, evenly spaced. Recording 300 slices
    # takes up to about 20 s on the 2-core machine, far past the tests' 1 s of stability: the study
    # waits for the slices still queued (plugin.store.ingest). Before it did, a pooling while slices
    # were queued re-sampled the series as they came (keeping the slices already encoded near their
    # ideal positions, by design), so the sample was not the evenly spaced one.
    worker_factory("volumes", DRH_MAX_FRAMES_PER_SERIES=str(SAMPLE))
    app = app_for(redis_server.url, tmp_path / "data")
    volume = _ct_series(tmp_path / "ct", 300, generate_uid())
    real = [_real(tmp_path, Path(get_testdata_file(n))) for n in ("CT_small.dcm", "MR_small.dcm")]
    multi = _real(tmp_path, FIXTURES / "emri_small.dcm")
    for study in (volume, *real, multi):
        send(app, study)

    general = None

    def sampled() -> list[str]:
        return [s for s in volume.sop_uids if general and store.codes.has(general, "image", s)]

    def settled() -> bool:
        nonlocal general
        general = store.models.active("general")
        studies = (volume, *real, multi)
        return bool(general) and all(store.codes.has(general, "study", s.study_uid) for s in studies)

    wait_until(settled, 240, what="every study pooled")
    # the volume: exactly SAMPLE evenly spaced slices encoded, the others point to their nearest one
    expected = [volume.sop_uids[i] for i in evenly_spaced(300, SAMPLE)]
    assert sampled() == expected
    records = store.records.instances(volume.sop_uids)
    others = [(s, r) for s, r in zip(volume.sop_uids, records, strict=True) if s not in expected]
    assert len(others) == 300 - SAMPLE and all(r["state"] == "volume-slice" for _, r in others)
    assert all(r["represented_by"] in expected for _, r in others)
    assert store.embeddings.count(general) == SAMPLE + 3  # the sample, CT_small, MR_small, the multi-frame object
    tasks = store.stats.tasks()["index_instance"]
    assert tasks["volume-slice"] == 302  # every slice recorded (300 generated, CT_small, MR_small)...
    assert tasks["done"] == SAMPLE + 3  # ...but only the sample went through the model
    # real single-slice CT and MR series: their one slice is their sample
    for study in real:
        assert store.records.instance(study.sop_uids[0])["state"] == "indexed"
    # the multi-frame MR: one code, from its sampled frames, indexed at once
    assert store.records.instance(multi.sop_uids[0])["state"] == "indexed"

    # DMIH pools each series into a series code: the 300-slice series from its sample alone
    from hashing.encoder import Encoder

    enc = Encoder.load(store.models.details(general)["path"], device="cpu")
    series_uid = pydicom.dcmread(volume.files[0], stop_before_pixels=True).SeriesInstanceUID
    embs = store.embeddings.get_many(general, volume.sop_uids)
    assert sorted(embs) == sorted(expected)
    code, _ = enc.encode_study(np.stack([embs[s] for s in sorted(embs)]).astype(np.float32))
    assert store.codes.get(general, "series", series_uid) == bytes(code)
    assert store.codes.count(general, "series") == 4  # the volume, CT_small, MR_small, the multi-frame MR
    # a series query answers the other series, each with its study, from the reference's route
    indexes = {level: RoutedIndex(store, level) for level in ("study", "series", "image")}
    answer = q.run_similar(q.SimilarQuery("SERIES", series_uid, 10), store, indexes)
    assert answer.route == "general" and len(answer) == 3
    assert {r.study_uid for r in answer} == {s.study_uid for s in (*real, multi)}

    # an image query on a slice outside the sample is answered through its nearest sampled slice
    slice_uid, record = others[0]
    answer = q.run_similar(q.SimilarQuery("IMAGE", slice_uid, 20), store, indexes)
    uids = [r.uid for r in answer]
    assert answer.route == "general" and record["represented_by"] not in uids and slice_uid not in uids
    assert set(uids) >= set(expected) - {record["represented_by"]}

    # a late slice re-samples its series: the encoded slices still fit, so nothing is encoded again
    late = _ct_series(tmp_path / "ct", 1, volume.study_uid, start=301, series=series_uid)
    send(app, late)
    (late_uid,) = late.sop_uids
    wait_until(lambda: store.records.instance(late_uid).get("represented_by"), 60, what="late slice re-sampled")
    assert store.records.instance(late_uid)["represented_by"] == expected[-1]
    assert sampled() == expected and store.stats.tasks()["index_instance"]["done"] == SAMPLE + 3


@pytest.mark.slow
def test_a_slice_whose_decoding_killed_the_worker_at_pooling_is_failed_and_its_series_sampled_without_it(
    redis_server, store, worker_factory, tmp_path
):
    """A slice is only checked to be an image at ingest; its pixels are first decoded when its series
    is sampled. A codec that kills the process there must not kill every worker that takes the
    study's pooling, for ever: after MAX_DECODE_CRASHES deaths (counted as at ingest) the slice is a
    permanent failure, and the study is pooled from its other slices."""
    from workers.batching import MAX_DECODE_CRASHES

    worker_factory("crash", DRH_MAX_FRAMES_PER_SERIES="3", DRH_STUDY_STABLE_SECONDS="15")
    app = app_for(redis_server.url, tmp_path / "data")
    volume = _ct_series(tmp_path / "ct", 6, generate_uid())
    send(app, volume)
    wait_until(
        lambda: all(r.get("state") == "volume-slice" for r in store.records.instances(volume.sop_uids)),
        60,
        what="every slice recorded",
    )
    sample = [volume.sop_uids[i] for i in evenly_spaced(6, 3)]
    crashing = sample[1]
    # as if decoding it had killed the process that held the pooling, MAX_DECODE_CRASHES times
    store.client.hset(store.keys.ingest_decoding(), crashing, MAX_DECODE_CRASHES)
    general = wait_until(lambda: store.models.active("general"), 30, what="the general model")
    wait_until(lambda: store.codes.has(general, "study", volume.study_uid), 90, what="the study pooled")
    entry = store.ledger.get(crashing)
    assert entry and entry["kind"] == "permanent"
    assert f"killed the worker process {MAX_DECODE_CRASHES} times" in entry["reason"]
    assert store.records.instance(crashing)["state"] == "failed"
    assert store.client.hget(store.keys.ingest_decoding(), crashing) is None
    assert sorted(store.embeddings.get_many(general, volume.sop_uids)) == sorted(set(sample) - {crashing})
