"""``drh-pacs decode-check DIR``: the worker's pixel path on every file of a folder, and what came out."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import UID

from hashing.preprocess import DecodeError, NotAnImage, fit_to_square, load_frames, load_pixels, read_dataset
from hashing.sopclass import UID_RE, number_of_frames


def _iter_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower() in {"dicomdir", "inventory.csv"} or name.startswith("."):
                continue
            yield Path(dirpath) / name


def _describe(ds: Dataset) -> dict[str, str]:
    text = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    return {
        "transfer_syntax": UID(text).name if UID_RE.match(text) else text[:64],
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "modality": str(ds.get("Modality", "") or ""),
        "frames": str(number_of_frames(ds)) if "PixelData" in ds else "",
    }


def _save_png(img: np.ndarray, path: Path, size: int) -> None:
    sq = fit_to_square(img, size) if max(img.shape) > size else img
    Image.fromarray((np.clip(sq, 0, 1) * 255).round().astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs decode-check DIR``: decode every file under DIR, one line each, then counts per outcome."""
    ap = argparse.ArgumentParser(prog="drh-pacs decode-check", description=main.__doc__)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--csv", type=Path, help="write one row per file here")
    ap.add_argument("--png-dir", type=Path, help="save each decoded image as a PNG preview here")
    ap.add_argument("--png-size", type=int, default=512, help="longest side of the previews (default 512)")
    ap.add_argument("--all-frames", action="store_true", help="decode every frame, not only the middle one")
    args = ap.parse_args(argv)
    if not args.directory.is_dir():
        print(f"decode-check: {args.directory} is not a directory", file=sys.stderr)
        return 2
    if args.png_dir:
        args.png_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    counts: Counter[str] = Counter()
    root = args.directory
    for n, path in enumerate(_iter_files(root)):
        rel = str(path.relative_to(root))
        row = {"path": rel, "outcome": "", "code": "", "detail": "", "transfer_syntax": "", "photometric": ""}
        row |= {"modality": "", "frames": ""}
        try:
            ds = read_dataset(path)
            row |= _describe(ds)
            imgs = load_frames(ds) if args.all_frames else [load_pixels(ds)]
            img = imgs[len(imgs) // 2]
            row["outcome"], row["code"] = "ok", "ok"
            row["detail"] = (
                f"{img.shape[0]}x{img.shape[1]} range=[{img.min():.3f},{img.max():.3f}] mean={img.mean():.3f}"
            )
            if args.png_dir:
                _save_png(img, args.png_dir / f"{n:04d}_{path.stem}.png", args.png_size)
        except NotAnImage as exc:
            row["outcome"], row["code"], row["detail"] = "not_an_image", exc.code, exc.reason
        except DecodeError as exc:
            kind = "transient_error" if exc.transient else "decode_error"
            row["outcome"], row["code"], row["detail"] = kind, exc.code, exc.reason
        counts[f"{row['outcome']}:{row['code']}" if row["outcome"] != "ok" else "ok"] += 1
        rows.append(row)
        print(f"{row['outcome']:<15} {row['code']:<28} {rel}  {row['detail']}", flush=True)
    print()
    print(f"{len(rows)} files")
    for key, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:5d}  {key}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["path"])
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
