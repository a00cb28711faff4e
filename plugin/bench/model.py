"""``drh-pacs bench model``: model throughput in images per second, by device and batch size.

What a worker does per batch, timed end to end: resize and normalise the [0, 1] images
(``Encoder.prepare``), forward pass, binarise and pack the codes, copy codes and embeddings back to
the host. Decoding DICOM is not included (``drh-pacs decode-check`` times that).

Method (STYLE.md, benchmarks): fixed seed for the synthetic radiograph-sized images, fixed CPU
threads, warm-up batches discarded, ``--repeats`` timed runs per cell, median and spread reported.
The side-by-side reference is batch size 1 on the same device (how the workers would run without
batching) and, for a GPU, the CPU at the same batch size: both printed as ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Smooth random images (a radiograph's spatial scale, not white noise) in [0, 1]."""
    rng = np.random.default_rng(seed)
    small = rng.random((n, size // 16, size // 16), dtype=np.float32)
    big = small.repeat(16, axis=1).repeat(16, axis=2)
    noise = rng.normal(0.0, 0.05, size=big.shape).astype(np.float32)
    return list(np.clip(big + noise, 0.0, 1.0))


def measure(encoder: Any, images: list[np.ndarray], batch_size: int, repeats: int, warmup: int = 2) -> list[float]:
    """Images per second of ``repeats`` timed runs over ``images`` (warm-up runs discarded)."""
    head = images[: max(batch_size, 1)]
    for _ in range(warmup):
        encoder.encode_images(head, batch_size=batch_size)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoder.encode_images(images, batch_size=batch_size)
        rates.append(len(images) / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drh-pacs bench model", description="model images/s by device and batch")
    parser.add_argument("--model", default="", help="checkpoint (default: DRH_MODEL_PATH, else the shipped model)")
    parser.add_argument("--devices", default="", help="comma separated (default: cpu, plus cuda:0 when present)")
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="comma separated")
    parser.add_argument("--images", type=int, default=256, help="images per timed run")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic input images, pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from hashing.encoder import Encoder
    from plugin.core.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"drh-pacs bench model: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not devices:
        devices = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    images = _images(args.images, args.size, args.seed)
    model_path = args.model or settings.model_path
    print(
        f"drh-pacs bench model: {args.images} images of {args.size}x{args.size}, batch sizes {sizes},"
        f" {args.repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    results: dict[tuple[str, int], float] = {}
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{device}: not available, skipped")
            continue
        enc = Encoder.load(model_path or None, device=device)
        name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
        print(
            f"\nmodel {enc.version} ({enc.nbits} bits, input {getattr(enc, 'input_size', '?')} px) on {device} ({name})"
        )
        print(f"{'batch':>6} {'median img/s':>13} {'min':>9} {'max':>9} {'x batch 1':>10} {'x cpu':>7}")
        for bs in sizes:
            rates = measure(enc, images, bs, args.repeats)
            med = statistics.median(rates)
            results[(device, bs)] = med
            base = results.get((device, sizes[0]))
            vs_b1 = f"{med / base:.2f}" if base and sizes[0] == 1 else "-"
            cpu = results.get(("cpu", bs))
            vs_cpu = f"{med / cpu:.2f}" if cpu and device != "cpu" else "-"
            print(f"{bs:>6} {med:>13.1f} {min(rates):>9.1f} {max(rates):>9.1f} {vs_b1:>10} {vs_cpu:>7}", flush=True)
    return 0
