"""hashing.preprocess on pydicom's own test files, our HTJ2K fixture and datasets built here.

Lossless transfer syntaxes are checked bit for bit against the uncompressed version of the same
image; windowing against the formulas of PS3.3 C.11.2.1.2 computed independently here.
"""

from __future__ import annotations

import csv
import io
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from hashing import decode, decode_check, display
from hashing import preprocess as pp
from hashing.preprocess import DecodeError, NotAnImage
from tests.helpers.dicomgen import fixture_images, make_instance

FIXTURES = Path(__file__).parent / "fixtures" / "dicom"


def wheel(name: str) -> str:
    """A file shipped inside pydicom's wheel (never downloaded: the suite runs offline)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in pydicom's wheel"
    return str(path)


def assert_sane(img: np.ndarray) -> None:
    assert img.dtype == np.float32 and img.ndim == 2
    assert np.all(np.isfinite(img))
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img.max() - img.min() > 0.1


def mono_dataset(pixels: np.ndarray, *, bits: int = 12, signed: bool = False, **attrs) -> Dataset:
    """A minimal MONOCHROME2 CR dataset around ``pixels`` (2-D, or 3-D for multi-frame)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def ramp(rows: int = 64, cols: int = 48, top: int = 4095) -> np.ndarray:
    return np.linspace(0, top, rows * cols).reshape(rows, cols).round().astype(np.uint16)


# -- transfer syntaxes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",  # implicit VR little endian
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",  # RLE lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "MR_small_padded.dcm",
    ],
)
def test_lossless_syntaxes_match_uncompressed(name: str) -> None:
    reference = pp.load_file(wheel("MR_small.dcm"))
    img = pp.load_file(wheel(name))
    assert_sane(img)
    np.testing.assert_array_equal(img, reference)


def test_htj2k_lossless_matches_uncompressed() -> None:
    ds = pp.read_dataset(FIXTURES / "cxr_12bit_htj2k_lossless.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.201"
    img = pp.load_pixels(ds)
    reference = pp.load_file(FIXTURES / "cxr_12bit_explicit_le.dcm")
    assert img.shape == (96, 64)
    assert_sane(img)
    np.testing.assert_array_equal(img, reference)


@pytest.mark.parametrize(
    "name",
    [
        "image_dfl.dcm",  # deflated explicit VR little endian
        "JPGExtended.dcm",  # JPEG extended, 12 bit
        "JPEG2000.dcm",  # JPEG 2000 lossy
        "693_J2KI.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline YBR_FULL
        "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 YBR_RCT
        "examples_palette.dcm",  # palette colour
        "examples_ybr_color.dcm",  # JPEG baseline YBR_FULL_422, 30 frames
        "J2K_pixelrep_mismatch.dcm",  # codestream signedness disagrees with the header
        "ExplVR_BigEnd.dcm",  # big endian RGB
    ],
)
def test_other_syntaxes_decode_to_sane_images(name: str) -> None:
    assert_sane(pp.load_file(wheel(name)))


def test_two_lossy_versions_of_one_image_agree() -> None:
    # JPEG2000.dcm and JPGExtended.dcm are the same NM image, each lossy in its own way: a byte
    # order, sign or bit-depth mistake in either decoder would leave them uncorrelated.
    a = pp.load_file(wheel("JPEG2000.dcm"))
    b = pp.load_file(wheel("JPGExtended.dcm"))
    assert a.shape == b.shape
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_deflated_image_frame_compression_is_inflated(tmp_path: Path) -> None:
    # pydicom 3.0 has no decoder for 1.2.840.10008.1.2.8.1; we inflate frames ourselves.
    ds = pydicom.dcmread(wheel("MR_small.dcm"))
    reference = pp.load_pixels(ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    frame = deflater.compress(ds.PixelData) + deflater.flush()
    ds.file_meta.TransferSyntaxUID = decode.DEFLATED_IMAGE_FRAME
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    np.testing.assert_array_equal(pp.load_pixels(ds), reference)


def test_corrupt_codestream_reason_names_the_codec_error() -> None:
    with open(wheel("JPEG-lossy.dcm"), "rb") as fh:  # a 12-bit JPEG (GDCM reads it; libjpeg does not)
        data = fh.read()
    start = data.find(b"\xff\xd8")
    ds = pydicom.dcmread(io.BytesIO(data[: start + 2] + b"\0" * 200 + data[start + 202 :]))  # now unreadable
    with pytest.raises(DecodeError) as err:
        pp.load_pixels(ds)
    assert err.value.code == "corrupt_pixel_data" and not err.value.transient
    assert "marker" in err.value.reason and "Unable to decode" not in err.value.reason


def test_unsupported_transfer_syntax_is_refused_with_its_name() -> None:
    ds = pydicom.dcmread(wheel("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    with pytest.raises(DecodeError) as err:
        pp.load_pixels(ds)
    assert err.value.code == "unsupported_transfer_syntax"
    assert not err.value.transient
    assert "MPEG2" in err.value.reason


# -- reading files -------------------------------------------------------------------------------


def test_read_without_preamble_and_meta_header() -> None:
    ds = pydicom.dcmread(wheel("CT_small.dcm"))
    reference = pp.load_pixels(ds)
    bare = io.BytesIO()
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True)
    raw = bare.getvalue()
    assert raw[128:132] != b"DICM" and not raw.startswith(b"\x02\x00")
    again = pp.read_dataset(raw)
    assert again.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    np.testing.assert_array_equal(pp.load_pixels(again), reference)


def test_read_from_bytes_path_and_file_object_agree() -> None:
    path = wheel("MR_small_RLE.dcm")
    data = Path(path).read_bytes()
    a = pp.load_pixels(pp.read_dataset(path))
    b = pp.load_pixels(pp.read_dataset(data))
    c = pp.load_pixels(pp.read_dataset(io.BytesIO(data)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_dataset_built_in_memory_without_file_meta() -> None:
    ds = mono_dataset(ramp())
    del ds.file_meta
    img = pp.load_pixels(ds)
    np.testing.assert_array_equal(img, pp.load_pixels(mono_dataset(ramp())))


def test_compressed_pixels_without_transfer_syntax_are_refused() -> None:
    ds = pydicom.dcmread(wheel("MR_small_RLE.dcm"))
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(DecodeError) as err:
        pp.load_pixels(ds)
    assert err.value.code == "missing_transfer_syntax"


def test_file_without_meta_header_but_no_pixels_reads() -> None:
    ds = pp.read_dataset(wheel("ExplVR_LitEndNoMeta.dcm"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    ds = pp.read_dataset(wheel("ExplVR_BigEndNoMeta.dcm"))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"


@pytest.mark.parametrize("payload", [b"", b"hello", b"\xff\xd8\xff\xe0" + bytes(300), b"%PDF-1.4\n" * 40])
def test_not_dicom(payload: bytes) -> None:
    with pytest.raises(DecodeError) as err:
        pp.read_dataset(payload)
    assert err.value.code == "not_dicom"
    assert not err.value.transient


def test_truncated_pixel_data_is_permanent() -> None:
    ds = pp.read_dataset(wheel("MR_truncated.dcm"))
    with pytest.raises(DecodeError) as err:
        pp.load_pixels(ds)
    assert err.value.code == "truncated_pixel_data"
    assert not err.value.transient


@pytest.mark.parametrize("keep", [0.25, 0.6, 0.97])
def test_truncated_files_are_refused(keep: float) -> None:
    data = Path(wheel("CT_small.dcm")).read_bytes()
    cut = data[: int(len(data) * keep)]
    with pytest.raises(DecodeError) as err:
        pp.load_file(cut)
    assert err.value.code in {"truncated_file", "truncated_pixel_data", "malformed_dataset"}
    assert not err.value.transient


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"])
def test_every_cut_of_a_file_is_a_permanent_decode_error(name: str) -> None:
    # Whatever byte a transfer stops at, the answer is a permanent DecodeError with a code: never
    # a crash, never "not an image" (which would be silently ignored), never a pointless retry.
    # A cut inside trailing elements or padding after complete pixel data may still decode: then
    # it must be exactly the full image.
    data = Path(wheel(name)).read_bytes()
    full = pp.load_file(data)
    for cut in range(0, len(data) - 1, max(1, len(data) // 150)):
        try:
            img = pp.load_file(data[:cut])
        except DecodeError as err:
            assert not err.transient, (cut, err)
            assert err.code and err.reason
        else:
            np.testing.assert_array_equal(img, full, err_msg=f"cut at {cut}")


def test_corrupted_bytes_never_escape_as_other_exceptions() -> None:
    rng = np.random.default_rng(7)
    for name in ("MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm"):
        data = Path(wheel(name)).read_bytes()
        for _ in range(25):
            buf = bytearray(data)
            for pos in rng.integers(0, len(buf), size=6):
                buf[int(pos)] = int(rng.integers(0, 256))
            try:
                img = pp.load_file(bytes(buf))
            except (DecodeError, NotAnImage) as exc:
                assert exc.code and exc.reason
            else:
                assert_sane(img)


def rle_with_corrupt_segments() -> bytes:
    """MR_small_RLE.dcm with 3 bytes of its RLE segments overwritten (seeded).

    With pylibjpeg-rle 2.2 this exact stream makes the Rust decoder panic (index out of bounds),
    which surfaces as a BaseException that pydicom does not catch.
    """
    data = Path(wheel("MR_small_RLE.dcm")).read_bytes()
    start = data.find(bytes(pydicom.dcmread(wheel("MR_small_RLE.dcm")).PixelData[:16])) + 16
    rng = np.random.default_rng(0)
    for _ in range(13):
        buf = bytearray(data)
        for _ in range(3):
            pos = int(rng.integers(start, len(buf)))
            buf[pos] = int(rng.integers(0, 256))
    return bytes(buf)


def test_a_panicking_codec_is_a_decode_error() -> None:
    try:
        img = pp.load_file(rle_with_corrupt_segments())
    except DecodeError as err:
        assert err.code in {"corrupt_pixel_data", "truncated_pixel_data"} and not err.transient
    else:  # pydicom's own RLE decoder may get through a corrupt segment: then the image must be sane
        assert_sane(img)


def test_run_decoder_falls_back_past_a_base_exception() -> None:
    class Panic(BaseException):
        pass

    class FakeDecoder:
        available_plugins = ("gdcm", "pydicom", "pylibjpeg")

        def __init__(self) -> None:
            self.tried: list[str] = []

        def as_array(self, ds, *, index, raw, decoding_plugin):
            self.tried.append(decoding_plugin)
            if decoding_plugin == "pylibjpeg":
                raise Panic("index out of bounds")
            return np.zeros((4, 4)), {}

    fake = FakeDecoder()
    arr, _ = decode._run_decoder(fake, Dataset(), 0)
    assert arr.shape == (4, 4)
    assert fake.tried == ["pylibjpeg", "pydicom"]  # preferred first, then the next; never gdcm


def test_file_cut_right_after_its_meta_header() -> None:
    data = Path(wheel("CT_small.dcm")).read_bytes()
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL value after the preamble
    with pytest.raises(DecodeError) as err:
        pp.read_dataset(data[: 144 + meta_length])
    assert err.value.code == "truncated_file"


def test_io_errors_are_transient(tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as err:
        pp.read_dataset(tmp_path / "gone.dcm")
    assert err.value.transient and err.value.code == "file_not_found"
    with pytest.raises(DecodeError) as err:
        pp.read_dataset(tmp_path)  # a directory: IsADirectoryError
    assert err.value.transient and err.value.code == "io_error"


# -- objects that are not images -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("test-SR.dcm", "structured_report"),
        ("reportsi.dcm", "structured_report"),
        ("rtplan.dcm", "rt_object"),
        ("rtstruct.dcm", "rt_object"),
        ("rtdose.dcm", "rt_dose"),
        ("liver_1frame.dcm", "segmentation"),
        ("waveform_ecg.dcm", "waveform"),
        ("SC_rgb_small_odd.dcm", "too_small"),
    ],
)
def test_non_images_are_refused_with_a_code(name: str, code: str) -> None:
    ds = pp.read_dataset(wheel(name))
    with pytest.raises(NotAnImage) as err:
        pp.load_pixels(ds)
    assert err.value.code == code
    assert err.value.reason


def test_for_processing_images_are_not_indexed() -> None:
    image = fixture_images("normal")[0]
    ds = make_instance(image, study_uid=generate_uid(), series_uid=generate_uid())
    assert_sane(pp.load_pixels(ds))  # the FOR PRESENTATION original is indexed
    ds.PresentationIntentType = "FOR PROCESSING"
    with pytest.raises(NotAnImage) as err:
        pp.load_pixels(ds)
    assert err.value.code == "for_processing"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2.1"  # Digital Mammography - For Processing
    with pytest.raises(NotAnImage) as err:
        pp.load_pixels(ds)
    assert err.value.code == "for_processing"


def test_key_object_and_presentation_state_by_sop_class() -> None:
    for sop, code in (
        ("1.2.840.10008.5.1.4.1.1.88.59", "key_object_selection"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "presentation_state"),
        ("1.2.840.10008.5.1.4.1.1.77.1.6", "whole_slide_microscopy"),
        ("1.2.840.10008.5.1.4.1.1.104.1", "encapsulated_document"),
    ):
        ds = Dataset()
        ds.SOPClassUID = sop
        ds.SOPInstanceUID = generate_uid()
        with pytest.raises(NotAnImage) as err:
            pp.load_pixels(ds)
        assert err.value.code == code


def test_image_without_pixel_data_is_a_failure_not_ignored() -> None:
    # A CT with its pixels cut off or stripped must show up as a failure, never be silently skipped.
    ds = pydicom.dcmread(wheel("CT_small.dcm"))
    name, pid = str(ds.PatientName), str(ds.PatientID)
    del ds.PixelData
    with pytest.raises(DecodeError) as err:
        pp.load_pixels(ds)
    assert err.value.code == "missing_pixel_data" and not err.value.transient
    assert name not in str(err.value) and pid not in str(err.value)


def test_non_image_sop_class_without_pixel_data() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.78.1"  # Lensometry Measurements
    ds.SOPInstanceUID = generate_uid()
    with pytest.raises(NotAnImage) as err:
        pp.load_pixels(ds)
    assert err.value.code == "no_pixel_data"


def test_float_pixel_data_is_not_an_image() -> None:
    ds = mono_dataset(ramp())
    del ds.PixelData
    ds.FloatPixelData = np.zeros(64 * 48, np.float32).tobytes()
    with pytest.raises(NotAnImage) as err:
        pp.load_pixels(ds)
    assert err.value.code == "float_pixel_data"


def test_refusals_survive_pickling() -> None:
    # Celery moves exceptions between processes by pickling them.
    import pickle

    err = pickle.loads(pickle.dumps(DecodeError("read failed", transient=True, code="io_error")))
    assert (err.code, err.reason, err.transient) == ("io_error", "read failed", True)
    nai = pickle.loads(pickle.dumps(NotAnImage("structured report", code="structured_report")))
    assert (nai.code, nai.reason) == ("structured_report", "structured report")


def test_reading_does_not_log_invalid_values(caplog: pytest.LogCaptureFixture) -> None:
    # pydicom's value validation logs "Invalid value for VR UI: '<the value>'", quoting the value;
    # reading skips it (leaving the global setting as it was), so no header value is logged.
    ds = pydicom.dcmread(wheel("CT_small.dcm"))
    with pydicom.config.disable_value_validation():
        ds.StudyInstanceUID = "1.2.SECRET"
    buf = io.BytesIO()
    ds.save_as(buf)
    before = pydicom.config.settings.reading_validation_mode
    with caplog.at_level("DEBUG"):
        got = pp.read_dataset(buf.getvalue())
        assert str(got.StudyInstanceUID) == "1.2.SECRET"
    assert "SECRET" not in caplog.text
    assert pydicom.config.settings.reading_validation_mode == before


def test_decode_errors_never_carry_patient_data() -> None:
    ds = pydicom.dcmread(wheel("MR_truncated.dcm"))
    with pytest.raises(DecodeError) as err:
        pp.load_pixels(ds)
    for value in (str(ds.PatientName), str(ds.PatientID)):
        if value:
            assert value not in err.value.reason


# -- grey levels: rescale, window, VOI LUT, MONOCHROME1 ---------------------------------------------


def expected_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out again here: x <= c-0.5-(w-1)/2 -> 0, above c-0.5+(w-1)/2 -> 1."""
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    out[values <= low] = 0
    out[values > high] = 1
    return out


def test_rescale_then_window_follows_the_standard() -> None:
    raw = (ramp(64, 64, 3000).astype(np.int32) - 1000).astype(np.int16)  # stored -1000..2000
    ds = mono_dataset(raw, bits=16, signed=True, RescaleSlope=2, RescaleIntercept=-1024)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    img = pp.load_pixels(ds)
    hu = raw.astype(np.float64) * 2 - 1024
    np.testing.assert_allclose(img, expected_linear(hu, 40, 400), atol=1e-6)


def test_first_window_is_used_when_several() -> None:
    ds = mono_dataset(ramp())
    ds.WindowCenter = [1000, 3000]
    ds.WindowWidth = [1000, 200]
    np.testing.assert_allclose(pp.load_pixels(ds), expected_linear(ramp().astype(np.float64), 1000, 1000), atol=1e-6)


def test_window_functions() -> None:
    values = np.tile(np.array([0.0, 50.0, 100.0]), (16, 16))
    np.testing.assert_allclose(display._window(values, 50, 100, "LINEAR_EXACT")[0, :3], [0.0, 0.5, 1.0])
    sig = display._window(values, 50, 100, "SIGMOID")[0]
    assert sig[1] == pytest.approx(0.5) and 0 < sig[0] < 0.5 < sig[2] < 1


def test_without_window_the_full_range_is_used() -> None:
    img = pp.load_pixels(mono_dataset(ramp()))
    assert img.min() == 0.0 and img.max() == 1.0
    assert np.all(np.diff(img.ravel()) >= 0)  # monotonic: no inversion, no folding
    assert 0.45 < float(img.mean()) < 0.55


def test_a_window_that_does_not_fit_the_pixels_falls_back() -> None:
    # All stored values are far above the window: the header's window would give a white page.
    # (A CT: for radiographs this is refused instead, see the next test.)
    ds = mono_dataset(ramp() + 8000, bits=16, WindowCenter=100, WindowWidth=50, Modality="CT")
    img = pp.load_pixels(ds)
    assert_sane(img)
    assert 0.3 < float(img.mean()) < 0.7


def test_radiograph_whose_window_misses_its_pixels_is_refused() -> None:
    # A DX header whose window lies wholly below the pixel values (seen in a vendor sample whose
    # pixels were also inverted against the declared MONOCHROME2): polarity cannot be trusted.
    ds = mono_dataset(ramp() + 30000, bits=16, WindowCenter=2725, WindowWidth=5310)
    ds.Modality = "DX"
    with pytest.raises(DecodeError) as err:
        pp.load_pixels(ds)
    assert err.value.code == "window_outside_data" and not err.value.transient
    # A CT with the same contradiction keeps its (unambiguous) polarity: full-range fallback.
    ds.Modality = "CT"
    assert_sane(pp.load_pixels(ds))


def test_voi_lut_sequence_wins_over_window_and_is_normalised_by_its_span() -> None:
    px = ramp(32, 32, 4095)
    ds = mono_dataset(px, WindowCenter=100, WindowWidth=10)
    item = Dataset()
    # 4096 entries starting at 0, claimed 16 bits but holding 12-bit values (a common quirk):
    # a gamma curve, so the result must differ from any linear window.
    table = (4095 * (np.arange(4096) / 4095) ** 0.5).round().astype(np.uint16)
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = table.tolist()
    ds.VOILUTSequence = [item]
    img = pp.load_pixels(ds)
    np.testing.assert_allclose(img, table[px] / 4095.0, atol=1e-6)


def test_modality_lut_sequence() -> None:
    px = ramp(32, 32, 255).astype(np.uint16)
    ds = mono_dataset(px, bits=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = (255 - np.arange(256)).astype(np.uint16).tolist()  # a reversing modality LUT
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    img = pp.load_pixels(ds)
    assert img[0, 0] == 1.0 and img[-1, -1] == 0.0


def test_empty_lut_items_are_ignored() -> None:
    ds = mono_dataset(ramp())
    empty = Dataset()
    empty.LUTDescriptor = None
    empty.LUTData = None
    ds.VOILUTSequence = [empty]
    ds.ModalityLUTSequence = [empty]
    np.testing.assert_array_equal(pp.load_pixels(ds), pp.load_pixels(mono_dataset(ramp())))


def test_monochrome1_is_inverted_so_that_higher_is_brighter() -> None:
    image = fixture_images("normal")[0]
    kw = {"study_uid": generate_uid(), "series_uid": generate_uid()}
    m2 = pp.load_pixels(make_instance(image, **kw))
    m1 = pp.load_pixels(make_instance(image, monochrome1=True, **kw))
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    # A chest radiograph: the lungs (centre-left and centre-right) are darker than the spine.
    h, w = m2.shape
    rows = slice(h // 3, 2 * h // 3)
    lungs = (m2[rows, w // 5 : 2 * w // 5].mean() + m2[rows, 3 * w // 5 : 4 * w // 5].mean()) / 2
    spine = m2[rows, 9 * w // 20 : 11 * w // 20].mean()
    assert lungs < spine


def test_presentation_lut_inverse_on_monochrome2() -> None:
    plain = pp.load_pixels(mono_dataset(ramp()))
    inverse = pp.load_pixels(mono_dataset(ramp(), PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(inverse, 1.0 - plain, atol=1e-6)


def test_rle_and_12bit_from_the_fixture_generator() -> None:
    image = fixture_images("viral")[0]
    kw = {"study_uid": generate_uid(), "series_uid": generate_uid()}
    plain = pp.load_pixels(make_instance(image, **kw))
    rle = make_instance(image, rle=True, **kw)
    assert rle.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    np.testing.assert_array_equal(pp.load_pixels(rle), plain)


# -- colour ------------------------------------------------------------------------------------------


def test_rgb_becomes_bt601_luminance() -> None:
    # SC_rgb_rle.dcm: horizontal bars of 10 rows: red, pink, green, light green, blue, ..., white.
    img = pp.load_file(wheel("SC_rgb_rle.dcm"))
    assert img[2, 50] == pytest.approx(0.299, abs=1e-3)  # (255, 0, 0)
    assert img[22, 50] == pytest.approx(0.587, abs=1e-3)  # (0, 255, 0)
    assert img[42, 50] == pytest.approx(0.114, abs=1e-3)  # (0, 0, 255)
    assert img[72, 50] == pytest.approx(64 / 255, abs=1e-3)  # grey stays grey
    assert img[92, 50] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("scale", [257, 1])  # true 16-bit entries; 8-bit entries under a 16-bit descriptor
def test_palette_colour_luminance(scale: int) -> None:
    idx = np.tile(np.arange(256, dtype=np.uint8), (32, 1))
    ds = mono_dataset(ramp(32, 256))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = idx.tobytes()
    entries = (np.arange(256) * scale).astype(np.uint16)
    for colour, data in (("Red", entries), ("Green", np.zeros(256, np.uint16)), ("Blue", np.zeros(256, np.uint16))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", data.tobytes())
    img = pp.load_pixels(ds)
    np.testing.assert_allclose(img[0], 0.299 * np.arange(256) / 255, atol=1e-5)


def test_rgb_and_its_jpeg_ybr_versions_agree() -> None:
    rgb = pp.load_file(wheel("SC_rgb_rle.dcm"))
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm"):
        other = pp.load_file(wheel(name))
        assert float(np.abs(other - rgb).mean()) < 0.02, name


# -- multi-frame -------------------------------------------------------------------------------------


def test_multiframe_middle_frame_by_default_and_all_frames() -> None:
    ds = pp.read_dataset(wheel("SC_rgb_rle_2frame.dcm"))
    frames = pp.load_frames(ds)
    assert len(frames) == 2
    assert not np.array_equal(frames[0], frames[1])
    np.testing.assert_array_equal(pp.load_pixels(ds), frames[1])
    np.testing.assert_array_equal(pp.load_pixels(ds, frame=0), frames[0])
    with pytest.raises(ValueError):
        pp.load_pixels(ds, frame=2)


def test_enhanced_multiframe_uses_each_frames_functional_groups() -> None:
    px = np.stack([ramp(), ramp()])
    ds = mono_dataset(px)
    groups = []
    for center, width in ((1000, 500), (3000, 500)):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, 0, "US"
        item = Dataset()
        item.FrameVOILUTSequence = [voi]
        item.PixelValueTransformationSequence = [transform]
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = groups
    first, second = pp.load_frames(ds)
    values = ramp().astype(np.float64)
    np.testing.assert_allclose(first, expected_linear(values, 1000, 500), atol=1e-6)
    np.testing.assert_allclose(second, expected_linear(values, 3000, 500), atol=1e-6)


# -- sanity ------------------------------------------------------------------------------------------


def test_blank_and_non_finite_images_are_refused() -> None:
    with pytest.raises(DecodeError) as err:
        pp.load_pixels(mono_dataset(np.full((64, 64), 700, np.uint16)))
    assert err.value.code == "blank_image" and not err.value.transient
    bad = np.ones((32, 32), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(DecodeError) as err:
        pp.check_sane(bad)
    assert err.value.code == "non_finite"
    with pytest.raises(DecodeError) as err:
        pp.check_sane(np.zeros((2, 32, 32), np.float32))
    assert err.value.code == "bad_shape"


# -- fit_to_square -----------------------------------------------------------------------------------


def test_fit_to_square_keeps_aspect_and_pads() -> None:
    img = np.ones((200, 100), np.float32)
    out = pp.fit_to_square(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    cols = np.flatnonzero(out.max(axis=0) > 0.5)
    assert cols[0] == 16 and cols[-1] == 47  # 32 columns of content, centred
    assert np.all(out[:, :16] == 0) and np.all(out[:, 48:] == 0)
    np.testing.assert_allclose(out[:, 17:47], 1.0, atol=1e-5)


def test_fit_to_square_upscales_small_images_and_keeps_range() -> None:
    img = pp.load_file(FIXTURES / "cxr_12bit_explicit_le.dcm")  # 96 x 64
    out = pp.fit_to_square(img, 224)
    assert out.shape == (224, 224)
    assert out.min() >= 0.0 and out.max() <= 1.0
    content = out[:, np.flatnonzero(out.max(axis=0) > 0)]
    assert content.shape[1] in (149, 150, 151)  # 64 * 224 / 96 = 149.3


# -- the decode-check command ------------------------------------------------------------------------


def test_decode_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("MR_small_RLE.dcm", "test-SR.dcm", "MR_truncated.dcm"):
        (folder / name).write_bytes(Path(wheel(name)).read_bytes())
    (folder / "sub" / "htj2k.dcm").write_bytes((FIXTURES / "cxr_12bit_htj2k_lossless.dcm").read_bytes())
    (folder / "sub" / "notes.txt").write_text("not dicom at all\n")
    out_csv = tmp_path / "out.csv"
    png_dir = tmp_path / "png"
    rc = decode_check.main([str(folder), "--csv", str(out_csv), "--png-dir", str(png_dir)])
    assert rc == 0
    rows = {r["path"]: r for r in csv.DictReader(out_csv.open())}
    assert rows["MR_small_RLE.dcm"]["outcome"] == "ok"
    assert rows["sub/htj2k.dcm"]["outcome"] == "ok"
    assert rows["test-SR.dcm"]["code"] == "structured_report"
    assert rows["MR_truncated.dcm"]["code"] == "truncated_pixel_data"
    assert rows["sub/notes.txt"]["code"] == "not_dicom"
    assert len(list(png_dir.glob("*.png"))) == 2
    printed = capsys.readouterr().out
    assert "5 files" in printed and "2  ok" in printed
    assert "1  not_an_image:structured_report" in printed


def test_decode_check_via_cli(tmp_path: Path) -> None:
    from plugin.cli import main as cli

    assert cli(["decode-check", str(tmp_path / "missing")]) == 2
