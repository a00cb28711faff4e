"""``drh-pacs train``: train DRH, DMIH or the CSQ baseline on a data directory with a manifest.

One training loop for every method (so the baselines get the same harness and budget); only the loss
differs. Epochs are selected on a patient-disjoint validation split cut from the training split
(mAP@all of validation queries against the training database); the test split is never read here.

Deterministic for a given seed and device: every epoch draws its shuffling and augmentation from a
generator seeded with ``(seed, epoch)``, so a run resumed from its last epoch checkpoint
(``--resume``) continues exactly as an uninterrupted one would.

Examples::

    drh-pacs train --data ../shared/data/cxr-pneumonia --method drh --bits 64 --epochs 30 --out drh64.pt
    drh-pacs train --data ../shared/data/cxr-pneumonia --method csq --bits 64 --epochs 30 --out csq64.pt
    drh-pacs train --data ../shared/data/cxr-pneumonia --method dmih --init drh64.pt --epochs 8 --lr 1e-3 --out model.pt
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hashing import checkpoint as ckpt_mod
from hashing import losses
from hashing.bits import VALID_NBITS, pack
from hashing.bits import binarize as binarize_np
from hashing.data import ImageSet, estimate_normalization, load_images, patient_split, read_manifest, to_input
from hashing.dmih import DMIH
from hashing.drh import DRH, MODELS
from hashing.encoder import resolve_device
from hashing.metrics import hamming_distances, retrieval_metrics

log = logging.getLogger("hashing.train")

METHODS = ("drh", "csq", "dmih")


@dataclass
class TrainConfig:
    data: str
    out: str
    method: str = "drh"
    manifest: str = ""
    bits: int = 64
    arch: str = "drh_tiny"
    input_size: int = 64
    epochs: int = 30  # the shipped model's (hashing/weights/MODEL_CARD.md); 12 stopped while still improving
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    scale: float = 8.0
    w_quant: float = 0.1
    w_balance: float = 0.1
    csq_w_quant: float = 1e-4
    # DMIH
    init: str = ""
    bags_per_batch: int = 48
    max_bag: int = 8
    inst_weight: float = 1.0
    # harness
    val_fraction: float = 0.1
    val_db: int = 2000
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    work_dir: str = ""
    resume: bool = False
    max_steps: int = 0
    stop_after_epoch: int = 0
    cache_dir: str = ""
    version: str = ""
    progress: bool = True


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # On a GPU, cuDNN's autotuner picks kernels by timing and some are non-deterministic.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def augment(x_u8: torch.Tensor, gen: torch.Generator, mean: float, std: float, shift: int = 4) -> torch.Tensor:
    """Random translation (+/- ``shift`` px, zero fill) and brightness/contrast jitter, then normalise.

    Mild on purpose: radiographs are acquired in a standard position, and flips would mirror
    anatomy (heart side) that a radiologist would not consider similar.
    """
    n, _, h, w = x_u8.shape
    padded = torch.nn.functional.pad(x_u8.float() / 255.0, (shift, shift, shift, shift))
    offs = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
    out = torch.stack([padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offs.tolist())])
    contrast = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    bright = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1
    m = out.mean(dim=(2, 3), keepdim=True)
    out = ((out - m) * contrast + m + bright).clamp(0, 1)
    return (out - mean) / std


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def encode_set(model: DRH | DMIH, images: torch.Tensor, mean: float, std: float, device: torch.device, bs: int = 256):
    """(features, hash-layer pre-activations) of a uint8 image tensor, in eval mode."""
    model.eval()
    feats, heads = [], []
    for s in range(0, len(images), bs):
        x = to_input(images[s : s + bs], mean, std).to(device)
        f = model.forward_features(x)
        feats.append(f.float().cpu())
        if isinstance(model, DRH):
            heads.append(model.forward_head(f).float().cpu())
        else:
            heads.append(model.instance_hash(f).float().cpu())
    return torch.cat(feats), torch.cat(heads)


@torch.no_grad()
def pool_bags(model: DMIH, feats: torch.Tensor, bags: list[list[int]], device: torch.device) -> torch.Tensor:
    """Study-level pre-activations for each bag from instance features (padded + masked batches)."""
    model.eval()
    out = []
    for s in range(0, len(bags), 256):
        chunk = bags[s : s + 256]
        m = max(len(b) for b in chunk)
        x = torch.zeros(len(chunk), m, feats.shape[1])
        mask = torch.zeros(len(chunk), m, dtype=torch.bool)
        for i, b in enumerate(chunk):
            x[i, : len(b)] = feats[b]
            mask[i, : len(b)] = True
        out.append(model.forward_bag(x.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def _codes(h: torch.Tensor) -> np.ndarray:
    return pack(binarize_np(h.numpy()))


def validate(model, cfg: TrainConfig, train_set: ImageSet, val_set: ImageSet, mean, std, device) -> float:
    """Validation mAP@all (Hamming ranking): validation queries against (a seeded sample of) training."""
    g = np.random.default_rng(cfg.seed)
    if isinstance(model, DMIH):
        fq, _ = encode_set(model, val_set.images, mean, std, device)
        fd, _ = encode_set(model, train_set.images, mean, std, device)
        qb, db = val_set.bags(), train_set.bags()
        if len(db) > cfg.val_db:
            db = [db[i] for i in sorted(g.choice(len(db), cfg.val_db, replace=False))]
        hq, hd = pool_bags(model, fq, qb, device), pool_bags(model, fd, db, device)
        ql = np.array([int(val_set.labels[b[0]]) for b in qb])
        dl = np.array([int(train_set.labels[b[0]]) for b in db])
    else:
        dbi = np.arange(len(train_set))
        if len(dbi) > cfg.val_db:
            dbi = np.sort(g.choice(len(dbi), cfg.val_db, replace=False))
        _, hq = encode_set(model, val_set.images, mean, std, device)
        _, hd = encode_set(model, train_set.images[torch.as_tensor(dbi)], mean, std, device)
        ql, dl = val_set.labels.numpy(), train_set.labels.numpy()[dbi]
    dist = hamming_distances(_codes(hq), _codes(hd))
    return retrieval_metrics(dist, ql, dl, hamming=True)["map_all"]


def _batches_instances(n: int, bs: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    nb = n // bs if n >= bs else 1  # drop the ragged last batch (batch-norm and NCA want full batches)
    return [perm[i * bs : (i + 1) * bs] for i in range(nb)]


def _batches_bags(bags: list[list[int]], per_batch: int, max_bag: int, gen: torch.Generator):
    perm = torch.randperm(len(bags), generator=gen).tolist()
    nb = max(1, len(bags) // per_batch)
    out = []
    for i in range(nb):
        chosen = []
        for j in perm[i * per_batch : (i + 1) * per_batch]:
            b = bags[j]
            if len(b) > max_bag:
                sel = torch.randperm(len(b), generator=gen)[:max_bag].tolist()
                b = [b[k] for k in sorted(sel)]
            chosen.append(b)
        out.append(chosen)
    return out


def build_model(cfg: TrainConfig, num_classes: int) -> tuple[DRH | DMIH, DRH | None, dict[str, Any]]:
    """The network to train, the DRH that goes with a DMIH (from ``--init``), and init metadata."""
    if cfg.method in ("drh", "csq"):
        if cfg.arch not in MODELS:
            raise SystemExit(f"unknown --arch {cfg.arch!r}; one of {', '.join(MODELS)}")
        return MODELS[cfg.arch](cfg.bits), None, {}
    if not cfg.init:
        raise SystemExit("--method dmih needs --init DRH_CHECKPOINT (its DRH model ships alongside)")
    init = ckpt_mod.load(cfg.init)
    drh = ckpt_mod.build_module(init["drh"])
    assert isinstance(drh, DRH)
    dmih = DMIH(nbits=drh.nbits, backbone=drh.backbone_args)
    dmih.encoder.load_state_dict(drh.encoder.state_dict())
    # Start both hash arms from DRH's trained hash layer: the instance arm *is* DRH at epoch 0.
    dmih.instance_hash.load_state_dict(drh.hash.state_dict())
    dmih.bag_hash.load_state_dict(drh.hash.state_dict())
    meta = {"init": cfg.init, "init_version": init["version"], "normalization": init["normalization"]}
    meta["input_size"] = init["input_size"]
    return dmih, drh, meta


@dataclass
class _Run:
    """Everything one training holds: data, model, optimiser, schedule and resumable state."""

    cfg: TrainConfig
    device: torch.device
    classes: list[str]
    manifest_digest: str
    model: DRH | DMIH
    companion: DRH | None  # the DRH that ships with a DMIH
    train_set: ImageSet
    val_set: ImageSet
    mean: float
    std: float
    opt: torch.optim.Optimizer
    centers: torch.Tensor | None
    steps_per_epoch: int
    total_steps: int
    warmup: int
    last: Path
    state: dict[str, Any]


def _prepare(cfg: TrainConfig) -> _Run:
    """Read the data, build the model and optimiser, and resume from the last epoch when asked."""
    if cfg.method not in METHODS:
        raise SystemExit(f"--method must be one of {METHODS}")
    if cfg.bits not in VALID_NBITS:
        raise SystemExit(f"--bits must be one of {VALID_NBITS}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    manifest = read_manifest(cfg.data, cfg.manifest or None)
    classes = manifest.classes
    model, companion, init_meta = build_model(cfg, len(classes))
    if init_meta:
        cfg.input_size = int(init_meta["input_size"])
        cfg.bits = model.nbits
    rows = manifest.split("train")
    tr_idx, va_idx = patient_split(rows, cfg.val_fraction, cfg.seed)
    full = load_images(manifest, rows, cfg.input_size, cfg.cache_dir or None)
    train_set, val_set = full.subset(tr_idx), full.subset(va_idx)
    if init_meta:
        mean, std = float(init_meta["normalization"]["mean"]), float(init_meta["normalization"]["std"])
    else:
        mean, std = estimate_normalization(train_set.images)
    log.info(
        "train %d images (%d patients), validation %d images (%d patients), classes %s, device %s",
        len(train_set),
        len(set(train_set.patients)),
        len(val_set),
        len(set(val_set.patients)),
        classes,
        device,
    )
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    centers = losses.csq_centers(len(classes), cfg.bits, cfg.seed).to(device) if cfg.method == "csq" else None
    if cfg.method == "dmih":
        steps_per_epoch = max(1, len(train_set.bags()) // cfg.bags_per_batch)
    else:
        steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    work = Path(cfg.work_dir or (str(cfg.out) + ".work"))
    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "best_val": -1.0,
        "best_epoch": 0,
        "best_state": None,
        "history": [],
    }
    last = work / "last.pt"
    if cfg.resume and last.exists():
        saved = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log.info("resumed from %s at epoch %d (step %d)", last, state["epoch"], state["step"])
    return _Run(
        cfg=cfg,
        device=device,
        classes=classes,
        manifest_digest=manifest.digest,
        model=model,
        companion=companion,
        train_set=train_set,
        val_set=val_set,
        mean=mean,
        std=std,
        opt=opt,
        centers=centers,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=max(1, int(cfg.warmup_epochs * steps_per_epoch)),
        last=last,
        state=state,
    )


def _loss_bags(run: _Run, batch: list[list[int]], gen: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
    """DMIH: the objective on bag codes, plus the instance arm with its decaying weight."""
    cfg, model, ts = run.cfg, run.model, run.train_set
    assert isinstance(model, DMIH)
    flat = [i for b in batch for i in b]
    x = augment(ts.images[torch.as_tensor(flat)], gen, run.mean, run.std).to(run.device)
    m = max(len(b) for b in batch)
    mask = torch.zeros(len(batch), m, dtype=torch.bool)
    for i, b in enumerate(batch):
        mask[i, : len(b)] = True
    mask = mask.to(run.device)
    feats_real = model.forward_features(x)
    feats = feats_real.new_zeros(len(batch), m, feats_real.shape[1])
    feats[mask] = feats_real
    u_bag = torch.tanh(model.forward_bag(feats, mask))
    u_inst = model.forward_instance_head(feats_real)
    y_bag = ts.labels[torch.as_tensor([b[0] for b in batch])].to(run.device)
    y_inst = ts.labels[torch.as_tensor(flat)].to(run.device)
    loss_bag, parts = losses.drh_loss(u_bag, y_bag, scale=cfg.scale, w_quant=cfg.w_quant, w_balance=cfg.w_balance)
    lam = losses.instance_arm_weight(step / run.steps_per_epoch, cfg.epochs, cfg.inst_weight)
    loss_inst, _ = losses.drh_loss(u_inst, y_inst, scale=cfg.scale, w_quant=cfg.w_quant, w_balance=cfg.w_balance)
    return loss_bag + lam * loss_inst, {**parts, "inst": float(loss_inst.detach()), "lam": lam}


def _loss_images(run: _Run, batch: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """DRH (NCA, quantization, bit balance) or the CSQ baseline, on one batch of images."""
    cfg = run.cfg
    x = augment(run.train_set.images[batch], gen, run.mean, run.std).to(run.device)
    y = run.train_set.labels[batch].to(run.device)
    u = run.model(x)
    if cfg.method == "csq":
        return losses.csq_loss(u, y, run.centers, w_quant=cfg.csq_w_quant)
    return losses.drh_loss(u, y, scale=cfg.scale, w_quant=cfg.w_quant, w_balance=cfg.w_balance)


def _run_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One epoch of optimisation from its own seeded generator; returns the mean of each loss part."""
    cfg, state = run.cfg, run.state
    gen = _epoch_generator(cfg.seed, epoch)
    torch.manual_seed(cfg.seed * 7919 + epoch)  # dropout-free nets; keeps any torch RNG use reproducible
    run.model.train()
    if cfg.method == "dmih":
        batches = _batches_bags(run.train_set.bags(), cfg.bags_per_batch, cfg.max_bag, gen)
    else:
        batches = _batches_instances(len(run.train_set), cfg.batch_size, gen)
    bar = tqdm(batches, desc=f"{cfg.method}{cfg.bits} epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress)
    sums: dict[str, float] = {}
    for batch in bar:
        if state["step"] >= run.total_steps:
            break
        for g in run.opt.param_groups:
            g["lr"] = _lr_at(state["step"], run.total_steps, run.warmup, cfg.lr)
        if cfg.method == "dmih":
            loss, parts = _loss_bags(run, batch, gen, state["step"])
        else:
            loss, parts = _loss_images(run, batch, gen)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        state["step"] += 1
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {k: round(v / max(1, len(batches)), 5) for k, v in sums.items()}


def _select(run: _Run, epoch: int, means: dict[str, Any], seconds: float) -> None:
    """Validate the epoch, keep its weights if it is the best so far, save the resumable state."""
    state = run.state
    val = 0.0
    if len(run.val_set):
        val = validate(run.model, run.cfg, run.train_set, run.val_set, run.mean, run.std, run.device)
    record = {"epoch": epoch + 1, "step": state["step"], "val_map": round(val, 5), "seconds": round(seconds, 1)}
    record.update(means)
    state["history"].append(record)
    log.info("epoch %d: %s", epoch + 1, record)
    if val > state["best_val"]:
        state["best_val"], state["best_epoch"] = val, epoch + 1
        state["best_state"] = copy.deepcopy({k: v.cpu() for k, v in run.model.state_dict().items()})
    state["epoch"] = epoch + 1
    ckpt_mod.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "state": state}, run.last)


def _model_checkpoint(run: _Run, command: str, elapsed: float) -> dict[str, Any]:
    """The best epoch's model with everything needed to use it and to know how it was made."""
    cfg, state = run.cfg, run.state
    if state["best_state"] is not None:
        run.model.load_state_dict(state["best_state"])
    model = run.model.cpu().eval()
    training = {
        "method": cfg.method,
        "data": str(cfg.data),
        "dataset": Path(cfg.data).resolve().name,
        "manifest_sha256_16": run.manifest_digest,
        "classes": run.classes,
        "train_images": len(run.train_set),
        "validation_images": len(run.val_set),
        "validation": f"{cfg.val_fraction:.0%} of training patients held out (seed {cfg.seed}), patient-disjoint",
        "selected_epoch": state["best_epoch"],
        "validation_map_all": round(state["best_val"], 5),
        "history": state["history"],
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
        "command": command,
        "seconds": round(elapsed, 1),
        "device": str(run.device),
        "torch": str(torch.__version__),
    }
    version = cfg.version or f"{cfg.method}{cfg.bits}-{training['dataset']}"
    drh, dmih = (run.companion, model) if isinstance(model, DMIH) else (model, None)
    assert isinstance(drh, DRH)
    return ckpt_mod.model_checkpoint(
        version=version, drh=drh, dmih=dmih, input_size=cfg.input_size, mean=run.mean, std=run.std, training=training
    )


def train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Run a training; returns the model checkpoint dictionary it wrote to ``cfg.out``."""
    t_start = time.time()
    run = _prepare(cfg)
    for epoch in range(run.state["epoch"], cfg.epochs):
        if run.state["step"] >= run.total_steps:
            break
        t_epoch = time.time()
        means = _run_epoch(run, epoch)
        _select(run, epoch, means, time.time() - t_epoch)
        if cfg.stop_after_epoch and epoch + 1 >= cfg.stop_after_epoch and epoch + 1 < cfg.epochs:
            log.info("stopping after epoch %d as asked; continue with --resume", epoch + 1)
            return {}
    elapsed = time.time() - t_start
    out = _model_checkpoint(run, command, elapsed)
    ckpt_mod.save(out, cfg.out)
    log.info(
        "wrote %s (version %s, best epoch %d, val mAP %.4f, %.0f s)",
        cfg.out,
        out["version"],
        run.state["best_epoch"],
        run.state["best_val"],
        elapsed,
    )
    return out


def parse_args(argv: list[str]) -> TrainConfig:
    d = TrainConfig(data="", out="")
    p = argparse.ArgumentParser(
        prog="drh-pacs train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="data directory holding the images and manifest.csv")
    p.add_argument(
        "--manifest", default="", help="manifest CSV (default DATA/manifest.csv): path,label[,patient,split]"
    )
    p.add_argument("--out", required=True, help="model checkpoint to write")
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument("--bits", type=int, choices=VALID_NBITS, default=d.bits)
    p.add_argument("--arch", default=d.arch, help=f"one of {', '.join(MODELS)}")
    p.add_argument("--input-size", type=int, default=d.input_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--scale", type=float, default=d.scale, help="NCA scale s (logits = -s d / K)")
    p.add_argument("--w-quant", type=float, default=d.w_quant, help="quantization loss weight")
    p.add_argument("--w-balance", type=float, default=d.w_balance, help="bit-balance loss weight")
    p.add_argument("--init", default=d.init, help="DMIH: DRH checkpoint to start from (ships with it)")
    p.add_argument("--bags-per-batch", type=int, default=d.bags_per_batch)
    p.add_argument("--max-bag", type=int, default=d.max_bag, help="DMIH: instances sampled per bag in training")
    p.add_argument("--inst-weight", type=float, default=d.inst_weight, help="DMIH: initial instance-arm weight")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (GPU when present), cpu, cuda:N")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (0: torch default)")
    p.add_argument("--work-dir", default="", help="where epoch checkpoints go (default OUT.work)")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pt")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke tests)")
    p.add_argument(
        "--stop-after-epoch", type=int, default=0, help="stop after this epoch (split a training into sessions)"
    )
    p.add_argument("--cache-dir", default="", help="cache decoded images here (.npy)")
    p.add_argument("--version", default="", help="model version tag (default METHOD+BITS-DATASET)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return TrainConfig(
        data=a.data,
        out=a.out,
        method=a.method,
        manifest=a.manifest,
        bits=a.bits,
        arch=a.arch,
        input_size=a.input_size,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        scale=a.scale,
        w_quant=a.w_quant,
        w_balance=a.w_balance,
        init=a.init,
        bags_per_batch=a.bags_per_batch,
        max_bag=a.max_bag,
        inst_weight=a.inst_weight,
        val_fraction=a.val_fraction,
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        work_dir=a.work_dir,
        resume=a.resume,
        max_steps=a.max_steps,
        stop_after_epoch=a.stop_after_epoch,
        cache_dir=a.cache_dir,
        version=a.version,
        progress=not a.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DRH_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(args)
    train(cfg, command="drh-pacs train " + " ".join(shlex.quote(a) for a in args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
