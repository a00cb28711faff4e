"""GDCM as the second decoder (hashing.decode): a 12-bit JPEG Extended image that libjpeg refuses
("misplaced marker segment") is decoded by GDCM in a child process, exactly as DCMTK decodes it,
and indexed by a real worker; a stream neither can read fails with both reasons; a hung decoder is
cut off."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder

from hashing import decode
from hashing.errors import DecodeError
from hashing.preprocess import load_file, read_dataset
from tests.helpers.peers import dcmtk
from tests.helpers.processes import wait_until
from tests.helpers.workers import app_for, indexed_count, send

pytestmark = pytest.mark.slow  # decodes in child processes; one test runs a worker

JPEG_EXTENDED_12BIT = Path(__file__).parent / "fixtures" / "dicom" / "nm_12bit_jpeg_extended.dcm"


def test_libjpeg_refuses_it_gdcm_decodes_it_as_dcmtk_does(tmp_path):
    ds = pydicom.dcmread(JPEG_EXTENDED_12BIT)
    with pytest.raises(RuntimeError, match="misplaced marker segment"):
        get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=0, decoding_plugin="pylibjpeg")

    stored, phot = decode.decode_frame(read_dataset(JPEG_EXTENDED_12BIT), 0)
    reference = tmp_path / "dcmtk.dcm"
    assert dcmtk("dcmdjpeg", str(JPEG_EXTENDED_12BIT), str(reference)).returncode == 0
    assert phot == "MONOCHROME2"
    np.testing.assert_array_equal(stored, pydicom.dcmread(reference).pixel_array)
    image = load_file(JPEG_EXTENDED_12BIT)  # and through the whole pixel path
    assert image.shape == (1024, 256) and float(image.max()) > 0.5


def test_a_plugin_that_fails_before_gdcm_reads_the_image_logs_no_error(caplog):
    """The service log carries no ERROR for a plugin that refused an image another decoder read."""
    import logging

    with caplog.at_level(logging.INFO):
        decode.decode_frame(read_dataset(JPEG_EXTENDED_12BIT), 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_stream_neither_decoder_reads_names_both_reasons(tmp_path):
    data = JPEG_EXTENDED_12BIT.read_bytes()
    start = data.find(b"\xff\xd8")  # the JPEG stream's SOI
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(data[: start + 2] + b"\0" * 200 + data[start + 202 :])
    with pytest.raises(DecodeError) as info:
        decode.decode_frame(read_dataset(broken), 0)
    assert info.value.code == "corrupt_pixel_data"
    assert "pylibjpeg" in info.value.reason and "GDCM" in info.value.reason


def test_a_hung_gdcm_is_cut_off_and_reported(tmp_path, monkeypatch):
    fifo = tmp_path / "never-written.dcm"
    os.mkfifo(fifo)  # opening it blocks the child for ever, as a decoder stuck on a stream would
    monkeypatch.setattr(decode, "GDCM_TIMEOUT_SECONDS", 3.0)
    with pytest.raises(DecodeError, match="GDCM took over 3 s"):
        decode._gdcm_in_child(SimpleNamespace(filename=str(fifo)), 0, first_failure="pylibjpeg: refused")


def test_a_jpeg_extended_12_bit_instance_is_indexed_not_failed(tmp_path, redis_server, redis_client, worker_factory):
    study_dir = tmp_path / "in"
    study_dir.mkdir()
    path = study_dir / "nm.dcm"
    shutil.copy(JPEG_EXTENDED_12BIT, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    study = SimpleNamespace(study_uid=str(ds.StudyInstanceUID), sop_uids=[str(ds.SOPInstanceUID)], files=[path])
    worker_factory()
    send(app_for(redis_server.url, tmp_path / "data"), study)
    wait_until(lambda: indexed_count(redis_client, study.sop_uids) == 1, 90, what="the instance indexed")
