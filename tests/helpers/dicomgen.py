"""Make DICOM studies for tests from the fixture radiographs, with pydicom.

Tests must not need ../shared: every study is generated here from `tests/fixtures/cxr/`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

from plugin.bench.common import CR_IMAGE_STORAGE, DX_IMAGE_STORAGE, radiograph_dataset

FIXTURES = Path(__file__).parents[1] / "fixtures" / "cxr"


def fixture_images(label: str | None = None) -> list[Path]:
    """Fixture files, optionally of one label (normal, bacterial, viral), in a stable order."""
    paths = sorted(FIXTURES.glob("*.jpeg"))
    return [p for p in paths if label is None or p.name.startswith(label + "-")]


@dataclass
class Study:
    study_uid: str
    patient_id: str
    files: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)


# Storage SOP class of a generated image by modality (anything else: CR).
SOP_CLASSES = {
    "DX": DX_IMAGE_STORAGE,
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
}


def make_instance(
    image: Path | np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    patient_id: str = "TEST001",
    patient_name: str = "Test^Patient",
    modality: str = "DX",
    study_date: str = "20240115",
    instance_number: int = 1,
    bits: int = 12,
    monochrome1: bool = False,
    rle: bool = False,
    body_part: str = "CHEST",
) -> Dataset:
    """One radiograph as a DX/CR dataset with a 12-bit (default) pixel range and a window (other
    modalities get their storage SOP class: US, MG, OT)."""
    pixels = np.asarray(Image.open(image).convert("L")) if isinstance(image, Path) else np.asarray(image)
    scaled = (pixels.astype(np.float32) / 255.0 * (2**bits - 1)).round().astype(np.uint16)
    if monochrome1:
        scaled = (2**bits - 1) - scaled
    ds = radiograph_dataset(
        scaled,
        sop_uid=sop_uid or generate_uid(),
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        birth_date="20180101",
        study_date=study_date,
        description="CHEST AP",
        accession="ACC" + study_uid[-8:],
        study_id="1",
        modality=modality,
        sop_class=SOP_CLASSES.get(modality, CR_IMAGE_STORAGE),
        instance_number=instance_number,
        bits=bits,
        monochrome1=monochrome1,
        body_part=body_part,
    )
    if rle:
        ds.compress(RLELossless)
    return ds


def make_study(
    out_dir: Path,
    images: list[Path],
    *,
    patient_id: str = "TEST001",
    study_uid: str | None = None,
    modality: str = "DX",
    study_date: str | None = None,
    **kwargs,
) -> Study:
    """Write one study (one series, an instance per image) under ``out_dir/<study uid>/``."""
    study = Study(study_uid or generate_uid(), patient_id)
    series_uid = generate_uid()
    folder = out_dir / study.study_uid
    folder.mkdir(parents=True, exist_ok=True)
    date = study_date or datetime.date(2024, 1, 15).strftime("%Y%m%d")
    for n, image in enumerate(images, start=1):
        ds = make_instance(
            image,
            study_uid=study.study_uid,
            series_uid=series_uid,
            patient_id=patient_id,
            modality=modality,
            study_date=date,
            instance_number=n,
            **kwargs,
        )
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.files.append(path)
        study.sop_uids.append(ds.SOPInstanceUID)
    return study
