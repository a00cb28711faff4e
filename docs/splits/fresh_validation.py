"""Write the fresh validation split of the v11 candidate (model card, "DRH's objective on validation
images not looked at before").

v6 to v10 were all selected or compared on one validation set: 10 % of the publisher's training
patients, held out by ``drh-pacs train`` with seed 0. A fourth comparison on the same images would
have said more about that set than about the objectives. This draws 10 % of the training patients
again, with seed 1, from those *not* in seed 0's set, so no image of it was ever looked at as a
validation image.

- ``m1.csv``: the data set's manifest with those patients' rows as ``val`` (``drh-pacs train --manifest``
  then holds them out instead of drawing its own);
- ``val-manifest.csv``: the training split only, those rows as ``test`` (``drh-pacs evaluate
  --manifest`` then scores them as queries against the other training images).

Usage: ``python docs/splits/fresh_validation.py ../shared/data/cxr-pneumonia OUT_DIR``.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from hashing.data import patient_split

OLD_SEED, NEW_SEED, FRACTION = 0, 1, 0.1


def main(data: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(data / "manifest.csv")))
    train = [r for r in rows if r["split"] == "train"]
    patients = [r["patient"] for r in train]
    _, old_val = patient_split(patients, FRACTION, OLD_SEED)  # what drh-pacs train held out for v6-v10
    looked_at = {patients[i] for i in old_val}
    fresh = sorted(set(patients) - looked_at)
    random.Random(NEW_SEED).shuffle(fresh)
    held = set(fresh[: round(FRACTION * len(set(patients)))])
    fields = ["path", "label", "patient", "split"]
    with open(out / "m1.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)  # CRLF, as csv writes by default (the manifests digested)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "split": "val" if r["split"] == "train" and r["patient"] in held else r["split"]})
    with open(out / "val-manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)  # CRLF, as csv writes by default (the manifests digested)
        w.writeheader()
        for r in train:
            w.writerow({**r, "split": "test" if r["patient"] in held else "train"})
    images = sum(r["patient"] in held for r in train)
    print(f"{out}: {len(held)} validation patients ({images} images), none of seed {OLD_SEED}'s {len(looked_at)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
