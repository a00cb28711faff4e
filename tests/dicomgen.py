"""Make DICOM studies for tests from the fixture radiographs, with pydicom.

Tests must not need ../shared: every study is generated here from `tests/fixtures/cxr/`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

FIXTURES = Path(__file__).parent / "fixtures" / "cxr"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


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
) -> Dataset:
    """One radiograph as a DX/CR dataset with a 12-bit (default) pixel range and a window."""
    pixels = np.asarray(Image.open(image).convert("L")) if isinstance(image, Path) else np.asarray(image)
    scaled = (pixels.astype(np.float32) / 255.0 * (2**bits - 1)).round().astype(np.uint16)
    if monochrome1:
        scaled = (2**bits - 1) - scaled
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = DX_IMAGE_STORAGE if modality == "DX" else CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "20180101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.StudyDescription = "CHEST AP"
    ds.AccessionNumber = "ACC" + study_uid[-8:]
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = scaled.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2 ** (bits - 1)
    ds.WindowWidth = 2**bits
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelData = scaled.tobytes()
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
