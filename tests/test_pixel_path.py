"""One pixel path: the same picture, however it arrives, is the same model input and the same code,
whether a worker indexes it, an HTTP upload searches with it, or ``train`` / ``evaluate`` read it.

The picture is one of the fixture radiographs (a JPEG). It arrives as: the JPEG itself; a PNG of its
decoded pixels; an 8-bit DICOM without a window; a 12-bit DICOM whose window maps it onto the same
grey levels; a MONOCHROME1 DICOM of the inverted values. Each displays the same grey levels, so each
must give the same model input and the same code on every path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import generate_uid

from hashing import checkpoint
from hashing.data import load_images, open_source
from hashing.dmih import dmih_tiny
from hashing.drh import drh_tiny
from hashing.encoder import Encoder
from hashing.inference import encode_set
from hashing.preprocess import model_input
from plugin.bench.common import radiograph_dataset
from plugin.core.settings import load_settings
from plugin.http.search import upload_pixels
from tests.helpers.dicomgen import fixture_images
from workers.batching import Item, load_item

SIZE = 64


def _dicom(pixels: np.ndarray, path: Path, *, bits: int, window: tuple[float, float] | None, mono1: bool) -> Path:
    uid = generate_uid()
    ds = radiograph_dataset(
        pixels,
        sop_uid=uid,
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        patient_id="PIX",
        patient_name="Pixel^Path",
        birth_date="20180101",
        study_date="20240101",
        description="CHEST",
        accession="A1",
        study_id="1",
        bits=bits,
        monochrome1=mono1,
    )
    if bits <= 8:
        ds.BitsAllocated = 8
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    if window is None:
        del ds.WindowCenter, ds.WindowWidth
    else:
        ds.WindowCenter, ds.WindowWidth = window
        ds.VOILUTFunction = "LINEAR_EXACT"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("same-picture")
    jpeg = fixture_images("normal")[0]
    p = np.asarray(Image.open(jpeg).convert("L"))  # the grey levels every variant displays
    (folder / "as.jpeg").write_bytes(jpeg.read_bytes())
    Image.fromarray(p).save(folder / "as.png")
    out = {"jpeg": folder / "as.jpeg", "png": folder / "as.png"}
    out["dicom 8-bit, no window"] = _dicom(p, folder / "d8.dcm", bits=8, window=None, mono1=False)
    # 12-bit stored values 16 p; LINEAR_EXACT (v - c) / w + 0.5 with c = 2040, w = 4080 shows p / 255
    out["dicom 12-bit, windowed"] = _dicom(
        p.astype(np.uint16) * 16, folder / "d12.dcm", bits=12, window=(2040, 4080), mono1=False
    )
    out["dicom MONOCHROME1"] = _dicom(255 - p, folder / "m1.dcm", bits=8, window=None, mono1=True)
    manifest = folder / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{v.name}\n" for v in out.values()))
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("model") / "m.pt"
    ck = checkpoint.model_checkpoint(
        version="pix-v1", drh=drh_tiny(64), dmih=dmih_tiny(64), input_size=SIZE, mean=0.45, std=0.25
    )
    checkpoint.save(ck, path)
    return Encoder.load(str(path), device="cpu")


def _worker_pixels(path: Path) -> np.ndarray:
    settings = load_settings(env={}, data_dir=path.parent)
    item = Item("1.2.3", "1.2", str(path), "PACS", 0.0)
    assert load_item(settings, item) == ""
    return item.pixels


def test_every_variant_is_the_same_model_input_on_every_path(variants: dict[str, Path]) -> None:
    first = None
    source = open_source(next(iter(variants.values())).parent)
    train = load_images(source, source.items, SIZE, progress=False)
    by_name = dict(zip([Path(p).name for p in train.paths], train.images[:, 0].numpy(), strict=True))
    for name, path in variants.items():
        inputs = {
            "train/evaluate": by_name[path.name],
            "upload": model_input(upload_pixels(path.read_bytes())[1], SIZE),
        }
        if path.suffix == ".dcm":
            inputs["worker"] = model_input(_worker_pixels(path), SIZE)
        for where, x in inputs.items():
            assert x.dtype == np.uint8 and x.shape == (SIZE, SIZE)
            if first is None:
                first = x
            np.testing.assert_array_equal(x, first, err_msg=f"{name} through {where}")


def test_every_variant_gets_the_same_code_on_every_path(variants: dict[str, Path], encoder: Encoder) -> None:
    names = list(variants)
    dicoms = [n for n in names if variants[n].suffix == ".dcm"]
    worker_codes = encoder.encode_images([_worker_pixels(variants[n]) for n in dicoms]).codes
    upload_codes = encoder.encode_images([upload_pixels(variants[n].read_bytes())[1] for n in names]).codes
    source = open_source(variants[names[0]].parent)
    train = load_images(source, source.items, SIZE, progress=False)
    order = [[Path(p).name for p in train.paths].index(variants[n].name) for n in names]
    _, heads = encode_set(encoder.drh, train.images[order], encoder.mean, encoder.std, torch.device("cpu"))
    train_codes = np.packbits((heads.numpy() >= 0).astype(np.uint8), axis=1)
    expected = upload_codes[0]
    for codes, what in ((worker_codes, "worker"), (upload_codes, "upload"), (train_codes, "train/evaluate")):
        for n, code in enumerate(codes):
            assert bytes(code) == bytes(expected), f"{what}: {(dicoms if what == 'worker' else names)[n]}"


def test_a_deeper_image_without_a_window_is_stretched_not_divided(tmp_path: Path) -> None:
    """Only 8-bit images show as stored: a 12-bit one without a window would be nearly black as v/4095."""
    from hashing.preprocess import load_file

    p = np.asarray(Image.open(fixture_images("viral")[0]).convert("L")).astype(np.uint16)
    path = _dicom(p * 4, tmp_path / "d.dcm", bits=12, window=None, mono1=False)  # values 0..1020 of 4095
    img = load_file(path)
    assert img.max() > 0.95  # percentile stretch, not value / 4095 (which would top out near 0.25)
