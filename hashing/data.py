"""Training and evaluation sets: a manifest of image files, or a folder of DICOM files, read through
the workers' own pixel path.

Two ways to give data (``--data``):

- a **manifest** (``DATA/manifest.csv``, or ``--manifest FILE``): a CSV whose only required column is
  ``path`` (relative to the data directory; PNG, JPEG or DICOM); ``label``, ``patient``, ``study`` and
  ``split`` (``train``, ``val``, ``test``, any case) are optional, so an unlabelled archive can be used.
  A byte-order mark and ``,`` ``;`` or tab separators are accepted. Rows that cannot be used (no
  path, an unknown split, a missing file) are all reported with their row number and nothing starts;
- a **folder of DICOM files** (no manifest in it): walked recursively; patient, study and series come
  from each header (PatientID, StudyInstanceUID, SeriesInstanceUID); non-images (SR, PR, KO...) and
  files that do not decode are skipped and counted, never silently.

Every image becomes model input through :func:`hashing.resize.model_input` after
:func:`hashing.preprocess.load_image`, the functions the workers use, and is kept in memory as one
``uint8`` tensor (5,808 radiographs at 224 px take 290 MB), optionally cached on disk.

Without a patient the row is its own patient; without a study the image is its own study; without
a label it is unlabelled (``-1``): an empty label is not a class.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import logging
import os
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hashing import display, pictures, resize
from hashing.errors import DecodeError, NotAnImage
from hashing.preprocess import load_image, model_input

log = logging.getLogger("hashing.data")

SPLITS = {
    "": "train",
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


class DataError(ValueError):
    """The data cannot be used as given; the message lists what is wrong, row by row."""


@dataclass(frozen=True)
class Item:
    """One image of a data set. ``row`` is its manifest line (the header is line 1), 0 for a folder."""

    path: str
    label: str
    patient: str
    study: str
    split: str
    row: int = 0


@dataclass
class Source:
    """Where a data set comes from and what it holds (before any pixel is read)."""

    root: Path
    items: list[Item]
    digest: str
    kind: str  # "manifest" or "dicom"
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files left out

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    @property
    def classes(self) -> list[str]:
        return sorted({it.label for it in self.items if it.label})

    @property
    def splits(self) -> set[str]:
        return {it.split for it in self.items}


@dataclass
class ImageSet:
    """Model inputs ``(N, 1, S, S)`` uint8, integer labels (-1: none), patients, studies and paths."""

    images: torch.Tensor
    labels: torch.Tensor
    patients: list[str]
    studies: list[str]
    paths: list[str]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: list[int] | np.ndarray) -> ImageSet:
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        picks = idx_t.tolist()
        return ImageSet(
            self.images[idx_t],
            self.labels[idx_t],
            [self.patients[i] for i in picks],
            [self.studies[i] for i in picks],
            [self.paths[i] for i in picks],
            self.classes,
        )

    @property
    def labelled(self) -> bool:
        """Whether labels exist for at least two classes (NCA and label measures need both)."""
        return len({int(y) for y in self.labels.tolist() if y >= 0}) >= 2

    def bags(self) -> list[list[int]]:
        """Index lists of the studies, in a stable order (a PACS study is a bag for DMIH)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(self.studies):
            groups[s].append(i)
        return [groups[k] for k in sorted(groups)]


# -- reading what a data set holds ---------------------------------------------------------------------


def open_source(data: str | Path, manifest: str | Path | None = None) -> Source:
    """A manifest (given, or ``DATA/manifest.csv``), else the DICOM files under ``DATA``."""
    root = Path(data)
    if manifest:
        return read_manifest(root, manifest)
    if root.is_file() and root.suffix.lower() in (".csv", ".tsv", ".txt"):
        return read_manifest(root.parent, root)
    if (root / "manifest.csv").is_file():
        return read_manifest(root, root / "manifest.csv")
    if root.is_dir():
        return scan_dicom_folder(root)
    raise DataError(f"{root}: neither a folder nor a manifest")


def _dialect(sample: str) -> str:
    for sep in ("\t", ";", ","):
        header = sample.splitlines()[0] if sample else ""
        if sep in header:
            return sep
    return ","


def read_manifest(root: str | Path, manifest: str | Path | None = None) -> Source:
    """Read and check every row of a manifest; raise :class:`DataError` listing the bad ones."""
    root = Path(root)
    path = Path(manifest) if manifest else root / "manifest.csv"
    raw = path.read_bytes()
    text = raw.decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text), delimiter=_dialect(text))
    rows = list(reader)
    if not rows:
        raise DataError(f"{path}: empty manifest")
    header = [h.strip().lower() for h in rows[0]]
    if "path" not in header:
        raise DataError(f"{path}: no 'path' column (columns: {', '.join(header) or 'none'})")
    col = {name: header.index(name) for name in ("path", "label", "patient", "study", "split") if name in header}
    items, problems = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue

        def get(name: str, row: list[str] = row) -> str:
            i = col.get(name)
            return row[i].strip() if i is not None and i < len(row) else ""

        rel = get("path")
        split_name = get("split").lower()
        if not rel:
            problems.append(f"row {line}: empty path")
            continue
        if split_name not in SPLITS:
            problems.append(f"row {line}: unknown split {get('split')!r} (use train, val or test)")
            continue
        if not (root / rel).is_file():
            problems.append(f"row {line}: {rel} not found")
            continue
        patient = get("patient") or f"row-{line}"
        study = get("study") or f"{patient}/row-{line}"
        items.append(Item(rel, get("label"), patient, study, SPLITS[split_name], line))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{path}: {len(problems)} row(s) cannot be used:\n  {shown}{more}")
    if not items:
        raise DataError(f"{path}: no rows")
    return Source(root, items, hashlib.sha256(raw).hexdigest()[:16], "manifest")


def scan_dicom_folder(root: str | Path) -> Source:
    """Every DICOM file under ``root``, with its patient, study and series from the header."""
    import pydicom

    root = Path(root)
    items: list[Item] = []
    skipped: dict[str, int] = defaultdict(int)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            path = Path(dirpath) / name
            try:
                ds = pydicom.dcmread(
                    path,
                    stop_before_pixels=True,
                    specific_tags=["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
                )
            except Exception:  # noqa: BLE001 - not DICOM (a README, a JPEG...): counted
                skipped["not DICOM"] += 1
                continue
            study = str(ds.get("StudyInstanceUID", "") or "")
            if not study:
                skipped["no StudyInstanceUID"] += 1
                continue
            rel = str(path.relative_to(root))
            patient = str(ds.get("PatientID", "") or "") or f"study-{study}"
            items.append(Item(rel, "", patient, study, "train"))
            digest.update(f"{rel}|{path.stat().st_size}|{int(path.stat().st_mtime)}\n".encode())
    if not items:
        raise DataError(f"{root}: no DICOM file found (and no manifest.csv)")
    return Source(root, items, digest.hexdigest()[:16], "dicom", dict(skipped))


# -- reading pixels --------------------------------------------------------------------------------------


def _pixel_path_source() -> str:
    """The code between a file and the model input: a change to it must not reuse cached pixels."""
    return "".join(inspect.getsource(m) for m in (display, pictures, resize))


def _load_one(root: Path, item: Item, size: int) -> np.ndarray | str:
    try:
        return model_input(load_image(root / item.path), size)
    except NotAnImage as exc:
        return f"not an image ({exc.code})"
    except DecodeError as exc:
        return f"does not decode ({exc.code})"


def load_images(
    source: Source,
    items: list[Item],
    size: int,
    cache_dir: str | Path | None = None,
    *,
    threads: int = 2,
    progress: bool = True,
) -> ImageSet:
    """The model inputs of ``items`` (cached as .npy in ``cache_dir``, keyed by data, size and code).

    A manifest row that does not decode stops everything (it was listed on purpose); a file of a
    DICOM folder that does not is left out and counted in ``source.skipped``.
    """
    from tqdm import tqdm

    classes = source.classes
    text = "|".join(it.path for it in items) + f"|{size}|{source.digest}|{_pixel_path_source()}"
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"images-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        saved = np.load(cache)
        arr, keep = saved["images"], saved["keep"].tolist()
    else:
        arr, keep = _decode_all(source, items, size, threads, progress, tqdm)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, images=arr, keep=np.asarray(keep, np.int64))
    kept = [items[i] for i in keep]
    return ImageSet(
        torch.from_numpy(arr)[:, None].contiguous(),
        torch.tensor([classes.index(it.label) if it.label else -1 for it in kept], dtype=torch.long),
        [it.patient for it in kept],
        [it.study for it in kept],
        [it.path for it in kept],
        classes,
    )


def _decode_all(source: Source, items: list[Item], size: int, threads: int, progress: bool, tqdm) -> tuple:  # noqa: ANN001
    out = np.zeros((len(items), size, size), np.uint8)
    keep: list[int] = []
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = pool.map(lambda it: _load_one(source.root, it, size), items)
        bar = tqdm(results, total=len(items), desc="reading images", unit="img", disable=not progress)
        for i, res in enumerate(bar):
            if isinstance(res, str):
                it = items[i]
                if source.kind == "dicom":
                    source.skipped[res] = source.skipped.get(res, 0) + 1
                else:
                    problems.append(f"row {it.row}: {it.path} {res}")
                continue
            out[len(keep)] = res
            keep.append(i)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} manifest row(s) cannot be used:\n  {shown}{more}")
    if source.skipped:
        log.warning("left out: %s", ", ".join(f"{n} {why}" for why, n in sorted(source.skipped.items())))
    return out[: len(keep)], keep


# -- splits and normalisation ----------------------------------------------------------------------------


def patient_split(patients: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation) with ``fraction`` of the patients held out, seeded."""
    unique = sorted(set(patients))
    rng = random.Random(seed)
    rng.shuffle(unique)
    held = set(unique[: max(1, round(fraction * len(unique)))]) if fraction > 0 and len(unique) > 1 else set()
    train = [i for i, p in enumerate(patients) if p not in held]
    val = [i for i, p in enumerate(patients) if p in held]
    return train, val


def estimate_normalization(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of training pixels in [0, 1] (stored in the checkpoint, used at serving)."""
    x = images.float() / 255.0
    return float(x.mean()), float(x.std().clamp_min(1e-3))
