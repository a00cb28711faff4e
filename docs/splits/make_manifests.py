"""Write the manifests the routed models were trained and evaluated with, from ``../shared/data``.

- ``us-breast.csv``: BUSI has no patient ids, so its split is random with a fixed seed (70 % train,
  10 % validation, 20 % test). Images of one patient may fall on both sides: test figures are
  optimistic by an amount this data cannot measure.
- ``general.csv``: every image of ``../shared/data`` without labels: cxr-pneumonia (its publisher's
  train/test split, patients kept), us-breast (the split above; its validation rows become training
  rows, so that ``train`` holds out whole chest patients and selects on same-patient recall), and the
  files of dicom-samples that decode (the others are listed with their reason by ``drh-pacs
  decode-check``).

Usage: ``python docs/splits/make_manifests.py ../shared/data OUT_DIR``; then, e.g.,
``drh-pacs train --data ../shared/data/us-breast --manifest OUT_DIR/us-breast.csv ...``.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from hashing.data import Item, _load_one

SEED = 12


def main(data: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(data / "us-breast" / "manifest.csv")))
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    split = {}
    for rank, i in enumerate(order):
        split[i] = "test" if rank < len(rows) * 0.2 else "val" if rank < len(rows) * 0.3 else "train"
    with open(out / "us-breast.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "label", "split"])
        for i, r in enumerate(rows):
            w.writerow([r["path"], r["label"], split[i]])

    general = []
    for r in csv.DictReader(open(data / "cxr-pneumonia" / "manifest.csv")):
        general.append(("cxr-pneumonia/" + r["path"], "cxr-" + r["patient"], r["split"]))
    for i, r in enumerate(rows):
        general.append(("us-breast/" + r["path"], f"usb-{i}", "test" if split[i] == "test" else "train"))
    left_out = 0
    for r in csv.DictReader(open(data / "dicom-samples" / "inventory.csv")):
        path = "dicom-samples/" + r["path"]
        if isinstance(_load_one(data, Item(path, "", "", "", "train", 0), 64), str):
            left_out += 1
            continue
        general.append((path, "dcm-" + r["path"], "train"))
    with open(out / "general.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "patient", "split"])
        w.writerows(general)
    print(
        f"{out / 'us-breast.csv'}: {len(rows)} rows; {out / 'general.csv'}: {len(general)} rows"
        f" ({left_out} dicom-samples files left out: they do not decode)"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
