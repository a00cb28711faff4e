"""Small labelled data directories for ``drh-pacs train`` / ``evaluate`` tests, from tests/fixtures/cxr."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

FIXTURES = Path(__file__).parents[1] / "fixtures" / "cxr"


def make_fixture_dataset(root: Path) -> Path:
    """A data directory in the project's layout from tests/fixtures/cxr: per class 3 train, 1 test.

    person100 (bacterial) has several images: one patient and one study of three in training, so
    that DMIH has a bag of more than one image and same-patient recall has a pair.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in ("bacterial", "normal", "viral"):
        files = sorted(FIXTURES.glob(f"{label}-*.jpeg"))
        for i, f in enumerate(files):
            split = "test" if i == len(files) - 1 else "train"
            shutil.copy(f, root / f.name)
            patient = f.stem.split("_")[0] if label == "bacterial" else f.stem
            study = f"{split}-{patient}-study" if label == "bacterial" else ""
            rows.append(
                {"path": f.name, "label": label, "patient": f"{split}-{patient}", "study": study, "split": split}
            )
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "patient", "study", "split"])
        w.writeheader()
        w.writerows(rows)
    return root


def fixture_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--input-size", "32", "--batch-size", "4", "--epochs", "2",
        "--val-fraction", "0.3", "--bits", "16", "--threads", "1", "--no-progress", "--seed", "5", *extra,
    ]  # fmt: skip
