"""Labelled image sets from a manifest, loaded into memory once.

A data directory holds ``manifest.csv`` with columns ``path,label,patient,split`` (``patient`` and
``split`` optional): the layout of the project's data sets. Images are decoded once, fitted to the
model's square input with the same function the serving encoder uses
(:func:`hashing.resize.fit_to_square`), and kept as one ``uint8`` tensor: the 5,808 chest
radiographs at 64 px take 24 MB, so an epoch never touches the disk.

The validation split is cut from the training split *by patient* (no patient on both sides) so
that epochs and hyper-parameters are chosen without ever looking at the test split.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hashing.resize import fit_to_square


@dataclass
class ImageSet:
    """Images ``(N, 1, S, S)`` uint8, integer labels, patient ids and paths, all index-aligned."""

    images: torch.Tensor
    labels: torch.Tensor
    patients: list[str]
    paths: list[str]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: list[int] | np.ndarray) -> ImageSet:
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return ImageSet(
            self.images[idx_t],
            self.labels[idx_t],
            [self.patients[i] for i in idx_t.tolist()],
            [self.paths[i] for i in idx_t.tolist()],
            self.classes,
        )

    def bags(self) -> list[list[int]]:
        """Index lists of the bags (studies): a patient's images of one label.

        The public set mixes visits under one patient id (808 training patients have bacterial and
        viral images from different visits); a visit is what a PACS study is, and its images share
        one diagnosis, so a bag is (patient, label). A patient with one label is one bag.
        """
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, (p, y) in enumerate(zip(self.patients, self.labels.tolist(), strict=True)):
            groups[(p, y)].append(i)
        return [groups[k] for k in sorted(groups)]


@dataclass
class Manifest:
    rows: list[dict[str, str]]
    root: Path
    digest: str

    def split(self, name: str) -> list[dict[str, str]]:
        return [r for r in self.rows if r.get("split", "train") == name]

    @property
    def classes(self) -> list[str]:
        return sorted({r["label"] for r in self.rows})


def read_manifest(data_dir: str | Path, manifest: str | Path | None = None) -> Manifest:
    root = Path(data_dir)
    path = Path(manifest) if manifest else root / "manifest.csv"
    raw = path.read_bytes()
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with at least path,label columns")
    for i, r in enumerate(rows):
        r.setdefault("patient", f"row-{i}")
        if not r.get("patient"):
            r["patient"] = f"row-{i}"
    return Manifest(rows, root, hashlib.sha256(raw).hexdigest()[:16])


def load_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return np.round(fit_to_square(arr, size) * 255.0).astype(np.uint8)


def _fit_source() -> str:
    return inspect.getsource(fit_to_square)


def load_images(
    manifest: Manifest, rows: list[dict[str, str]], size: int, cache_dir: str | Path | None = None
) -> ImageSet:
    """Decode ``rows`` (cached as .npy in ``cache_dir`` keyed by manifest digest, size and rows)."""
    classes = manifest.classes
    # The key covers the resize code too: a changed fit_to_square must not reuse stale pixels.
    text = "|".join(r["path"] for r in rows) + f"|{size}|{manifest.digest}|{_fit_source()}"
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"images-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        arr = np.load(cache)
    else:
        arr = (
            np.stack([load_image(manifest.root / r["path"], size) for r in rows])
            if rows
            else np.zeros((0, size, size), np.uint8)
        )
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, arr)
    return ImageSet(
        torch.from_numpy(arr)[:, None].contiguous(),
        torch.tensor([classes.index(r["label"]) for r in rows], dtype=torch.long),
        [r["patient"] for r in rows],
        [r["path"] for r in rows],
        classes,
    )


def patient_split(rows: list[dict[str, str]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation) with ``fraction`` of the patients held out, seeded."""
    patients = sorted({r["patient"] for r in rows})
    rng = random.Random(seed)
    rng.shuffle(patients)
    held = set(patients[: max(1, round(fraction * len(patients)))]) if fraction > 0 else set()
    train = [i for i, r in enumerate(rows) if r["patient"] not in held]
    val = [i for i, r in enumerate(rows) if r["patient"] in held]
    return train, val


def estimate_normalization(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of training pixels in [0, 1] (stored in the checkpoint, used at serving)."""
    x = images.float() / 255.0
    return float(x.mean()), float(x.std().clamp_min(1e-3))


def to_input(images_u8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (images_u8.float() / 255.0 - mean) / std
