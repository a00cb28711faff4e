"""``drh-pacs train``: train DRH, DMIH or the CSQ baseline on a manifest or a folder of DICOM files.

One training loop for every method (so the baselines get the same harness and budget); only the loss
differs. The DRH objective (:func:`hashing.losses.drh_loss`) combines a term learned from the images
alone with NCA where labels exist, plus quantization and bit balance: an unlabelled archive trains the
model, and labels, when given, add NCA. The term from the images alone is the distillation of the
whitened layout's neighbourhoods into the codes (``--w-distill``, on by default: the layout path is
fitted on the training images first); contrast of two random views (``--w-contrast``, with the
patient's other films as positives) is there too, off by default (the ablation in the model card).

Epochs are selected on a patient-disjoint validation set (the manifest's ``val`` rows, else a share of
the training patients held out); the test split is never read here. The selection measure is the
served ranking's same-patient recall@10 (a Hamming shortlist re-ranked by the model's re-ranking
keys) when the validation set has enough patients with several images, else label mAP, else the
loss (``--select``).

Deterministic for a given seed and device: every epoch draws its shuffling and views from a generator
seeded with ``(seed, epoch)``, so a run resumed from its last epoch (``--resume``) continues exactly
as an uninterrupted one would. The checkpoint records the data, the command, the history, the
selection and every warning (too few steps per epoch, a loss that does not move, collapsing codes).

Examples::

    drh-pacs train --data ../shared/data/cxr-pneumonia --out drh64.pt
    drh-pacs train --data /archive/mammo-dicom --out mg.pt          # a DICOM folder, no labels
    drh-pacs train --data ../shared/data/cxr-pneumonia --method csq --out csq64.pt
    drh-pacs train --data ../shared/data/cxr-pneumonia --method csq --layout-bits 32 --select map --out v7.pt
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hashing import checkpoint as ckpt_mod
from hashing import losses
from hashing.augment import light_view, random_views
from hashing.bits import VALID_NBITS, binarize, pack, quantize_rerank
from hashing.data import DataError, ImageSet, Source, estimate_normalization, load_images, open_source, patient_split
from hashing.dmih import DMIH
from hashing.drh import DRH, MODELS, layout_dims
from hashing.encoder import dmih_from_drh, resolve_device
from hashing.inference import encode_set, image_keys, pool_bags, variant_set
from hashing.metrics import distinct_codes, hamming_distances, ties_at
from hashing.resnet import LAYOUT_DIMS, LayoutPath
from hashing.route import Route
from hashing.scoring import Protocol, Rep, score

log = logging.getLogger("hashing.train")

METHODS = ("drh", "csq", "dmih")
SELECT = ("auto", "recall", "map", "loss")
POSITIVES = ("patient", "views")
# Below this many steps an epoch is mostly noise; below this many patients with several images a
# validation recall is too.
MIN_STEPS_PER_EPOCH = 10
MIN_RECALL_QUERIES = 20


@dataclass
class TrainConfig:
    data: str
    out: str
    method: str = "drh"
    manifest: str = ""
    bits: int = 64
    arch: str = "drh_resnet18_layout"
    layout_dims: int = 0
    layout_bits: int = 0
    input_size: int = 128
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    scale: float = 8.0
    w_nca: float = 1.0
    w_centre: float = 0.0
    w_contrast: float = 0.0
    w_distill: float = 0.25
    temperature: float = 0.2
    teacher_temperature: float = 0.05
    positives: str = "patient"
    w_quant: float = 0.1
    w_balance: float = 0.1
    csq_w_quant: float = 1e-4
    # what the model serves (hashing.route.Route); the registration can override it
    route: str = ""
    route_modalities: str = ""
    route_body_parts: str = ""
    route_photometric: str = ""
    general: bool = False
    # DMIH
    init: str = ""
    bags_per_batch: int = 32
    max_bag: int = 8
    inst_weight: float = 1.0
    # harness
    select: str = "auto"
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


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _batches_instances(n: int, bs: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    nb = n // bs if n >= bs else 1  # full batches (batch-norm and the contrast want them)
    return [perm[i * bs : (i + 1) * bs] for i in range(nb)]


def _batches_patients(patients: list[str], bs: int, gen: torch.Generator, per_patient: int = 2) -> list[torch.Tensor]:
    """Batches in which patients come with up to ``per_patient`` of their images, so that the
    contrast term sees films of one patient side by side; which images a patient brings changes
    from epoch to epoch."""
    by_patient: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        by_patient.setdefault(p, []).append(i)
    names = sorted(by_patient)
    stream: list[int] = []
    for j in torch.randperm(len(names), generator=gen).tolist():
        images = by_patient[names[j]]
        pick = torch.randperm(len(images), generator=gen)[:per_patient].tolist()
        stream += [images[i] for i in pick]
    n = len(stream)
    nb = n // bs if n >= bs else 1
    return [torch.as_tensor(stream[i * bs : (i + 1) * bs]) for i in range(nb)]


def _batches_bags(bags: list[list[int]], per_batch: int, max_bag: int, gen: torch.Generator) -> list:
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


def build_model(cfg: TrainConfig) -> tuple[DRH | DMIH, DRH | None, dict[str, Any]]:
    """The network to train, the DRH that goes with a DMIH (from ``--init``), and init metadata."""
    if cfg.method in ("drh", "csq"):
        if cfg.arch not in MODELS:
            raise SystemExit(f"unknown --arch {cfg.arch!r}; one of {', '.join(MODELS)}")
        backbone = {"layout": cfg.layout_dims} if cfg.layout_dims else {}
        model = MODELS[cfg.arch](cfg.bits, **backbone)
        if cfg.layout_bits:
            try:
                model = DRH(nbits=cfg.bits, backbone=model.backbone_args, layout_bits=cfg.layout_bits)
            except ValueError as e:
                raise SystemExit(f"--layout-bits {cfg.layout_bits}: {e}") from None
        return model, None, {}
    if not cfg.init:
        raise SystemExit("--method dmih needs --init DRH_CHECKPOINT (its DRH model ships alongside)")
    init = ckpt_mod.load(cfg.init)
    drh = ckpt_mod.build_module(init["drh"])
    assert isinstance(drh, DRH)
    # Both hash arms start from DRH's trained hash layer: the instance arm *is* DRH at epoch 0.
    dmih = dmih_from_drh(drh, cfg.seed)
    meta = {"init": cfg.init, "init_version": init["version"], "normalization": init["normalization"]}
    meta["input_size"] = init["input_size"]
    return dmih, drh, meta


# -- one training run ------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one training holds: data, model, optimiser, schedule and resumable state."""

    cfg: TrainConfig
    device: torch.device
    source: Source
    model: DRH | DMIH
    companion: DRH | None  # the DRH that ships with a DMIH
    train_set: ImageSet
    val_set: ImageSet
    mean: float
    std: float
    opt: torch.optim.Optimizer
    centers: torch.Tensor | None
    teacher: LayoutPath | None  # the neighbourhood structure the distillation term keeps
    steps_per_epoch: int
    total_steps: int
    warmup: int
    last: Path
    state: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            log.warning(message)
            self.warnings.append(message)


def _split(source: Source, full: ImageSet, items_split: list[str], cfg: TrainConfig) -> tuple[ImageSet, ImageSet]:
    """Training and validation sets: the manifest's ``val`` rows, else held-out training patients."""
    if "val" in items_split:
        tr = [i for i, s in enumerate(items_split) if s == "train"]
        va = [i for i, s in enumerate(items_split) if s == "val"]
        return full.subset(tr), full.subset(va)
    tr, va = patient_split(full.patients, cfg.val_fraction, cfg.seed)
    return full.subset(tr), full.subset(va)


def _check_labels(run_cfg: TrainConfig, train_set: ImageSet, warn: Any) -> None:
    classes = {int(y) for y in train_set.labels.tolist() if y >= 0}
    if run_cfg.method == "csq" and len(classes) < 2:
        raise SystemExit("--method csq needs labels of at least two classes")
    if len(classes) == 1:
        warn("the labels name one class only: they add nothing, training uses the images alone")
    if len(classes) < 2 and run_cfg.w_contrast <= 0 and run_cfg.w_distill <= 0:
        raise SystemExit("no labels of two classes, --w-contrast 0 and --w-distill 0: nothing to learn from")


def _prepare(cfg: TrainConfig) -> _Run:
    """Read the data, build the model and optimiser, and resume from the last epoch when asked."""
    if cfg.method not in METHODS:
        raise SystemExit(f"--method must be one of {METHODS}")
    if cfg.bits not in VALID_NBITS:
        raise SystemExit(f"--bits must be one of {VALID_NBITS}")
    if cfg.select not in SELECT:
        raise SystemExit(f"--select must be one of {SELECT}")
    if cfg.positives not in POSITIVES:
        raise SystemExit(f"--positives must be one of {POSITIVES}")
    if not 0 <= cfg.layout_dims <= 256:  # a 16 x 16 layout has 256 values
        raise SystemExit("--layout-dims must be between 1 and 256 (0: the architecture's own)")
    if cfg.layout_bits and cfg.method == "dmih":
        raise SystemExit("--layout-bits is for drh and csq: a DMIH keeps the split of the DRH it starts from (--init)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    source = open_source(cfg.data, cfg.manifest or None)
    model, companion, init_meta = build_model(cfg)
    if init_meta:
        cfg.input_size = int(init_meta["input_size"])
        cfg.bits = model.nbits
    items = [it for it in source.items if it.split in ("train", "val")]
    if not items:
        raise SystemExit(f"{cfg.data}: no training rows (every row is in the test split)")
    full = load_images(source, items, cfg.input_size, cfg.cache_dir or None, progress=cfg.progress)
    kept = set(full.paths)  # a DICOM folder may have left some files out
    kept_splits = [it.split for it in items if it.path in kept]
    train_set, val_set = _split(source, full, kept_splits, cfg)
    if init_meta:
        mean, std = float(init_meta["normalization"]["mean"]), float(init_meta["normalization"]["std"])
    else:
        mean, std = estimate_normalization(train_set.images)
    log.info(
        "train %d images (%d patients, %d studies), validation %d images (%d patients), classes %s, device %s",
        len(train_set),
        len(set(train_set.patients)),
        len(set(train_set.studies)),
        len(val_set),
        len(set(val_set.patients)),
        source.classes or "none (unlabelled)",
        device,
    )
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_classes = len(source.classes)
    # A split code's hash centres span its learned bits only.
    centers = None
    if cfg.method == "csq":
        centers = losses.csq_centers(n_classes, model.learned_bits, cfg.seed).to(device)
    elif cfg.w_centre > 0 and n_classes >= 2:
        centers = losses.balanced_centres(n_classes, model.learned_bits, cfg.seed).to(device)
    if cfg.method == "dmih":
        steps_per_epoch = max(1, len(train_set.bags()) // cfg.bags_per_batch)
    elif _patient_batches(cfg):
        counts: dict[str, int] = {}
        for p in train_set.patients:
            counts[p] = counts.get(p, 0) + 1
        steps_per_epoch = max(1, sum(min(2, c) for c in counts.values()) // cfg.batch_size)
    else:
        steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    work = Path(cfg.work_dir or (str(cfg.out) + ".work"))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": 0, "best_state": None, "history": []}
    last = work / "last.pt"
    if cfg.resume and last.exists():
        saved = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log.info("resumed from %s at epoch %d (step %d)", last, state["epoch"], state["step"])
    run = _Run(
        cfg=cfg,
        device=device,
        source=source,
        model=model,
        companion=companion,
        train_set=train_set,
        val_set=val_set,
        mean=mean,
        std=std,
        opt=opt,
        centers=centers,
        teacher=None,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=max(1, int(cfg.warmup_epochs * steps_per_epoch)),
        last=last,
        state=state,
    )
    _check_labels(cfg, train_set, run.warn)
    _warn_about_batches(run)
    run.teacher = _fit_layout(run, resumed=cfg.resume and last.exists())
    return run


def _fit_layout(run: _Run, *, resumed: bool) -> LayoutPath | None:
    """Fit the model's layout path on the training images (a DMIH inherits DRH's; a resumed run has it
    in its state) and return the distillation teacher: that path, or for a network without one a
    path fitted here for training only."""
    cfg = run.cfg
    layout = run.model.encoder.layout
    images = run.train_set.images

    def batches() -> Any:
        for i in range(0, len(images), 512):
            yield _normalised(run, images[i : i + 512].float() / 255.0)

    if layout is not None and cfg.method != "dmih" and not resumed:
        layout.fit(batches())
        fitted = getattr(run.model, "layout_hash", None)
        if fitted is not None:
            # ITQ on what the fitted bits will see: the fitted layout of the same images.
            with torch.no_grad():
                fitted.fit(torch.cat([layout(b) for b in batches()]), seed=cfg.seed)
            log.info("split code: %d bits learned, %d fitted on the layout (ITQ)", run.model.learned_bits, fitted.bits)
    if cfg.w_distill <= 0 or cfg.method == "csq":
        return None
    if layout is not None:
        return layout
    teacher = LayoutPath(dims=LAYOUT_DIMS).to(run.device)  # (--layout-dims gives the network its own)
    teacher.fit(batches())
    return teacher


def _patient_batches(cfg: TrainConfig) -> bool:
    """Whether DRH batches bring films of one patient together (for the contrast's patient positives).
    The distillation does without: on validation, instance batches did as well for same-patient
    recall (0.210 against 0.194 after one epoch)."""
    return cfg.method == "drh" and cfg.positives == "patient" and cfg.w_contrast > 0


def _warn_about_batches(run: _Run) -> None:
    cfg = run.cfg
    if run.steps_per_epoch < MIN_STEPS_PER_EPOCH:
        run.warn(
            f"only {run.steps_per_epoch} step(s) per epoch ({len(run.train_set)} training images, batch"
            f" {cfg.batch_size if cfg.method != 'dmih' else cfg.bags_per_batch}): lower --batch-size"
        )
    if cfg.method != "dmih" and len(run.train_set) >= cfg.batch_size:
        left = len(run.train_set) % cfg.batch_size
        if left > 0.1 * len(run.train_set):
            run.warn(f"{left} training images are left out of each epoch (partial batch); lower --batch-size")


def _normalised(run: _Run, x01: torch.Tensor) -> torch.Tensor:
    return ((x01 - run.mean) / run.std).to(run.device)


def _learned(run: _Run, u: torch.Tensor) -> torch.Tensor:
    """The bits the objective trains: all of them, or a split code's learned part (its layout bits are
    fitted, :class:`hashing.resnet.LayoutBits`, and take no loss)."""
    return u[..., : run.model.learned_bits]


def _loss_images(run: _Run, batch: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """DRH (NCA, distilled layout neighbourhoods, contrast of two views, quantization, bit balance) or
    CSQ, on one batch of images."""
    cfg, ts = run.cfg, run.train_set
    x = ts.images[batch]
    y = ts.labels[batch].to(run.device)
    if cfg.method == "csq":
        u = _learned(run, run.model(_normalised(run, light_view(x, gen))))
        return losses.csq_loss(u, y, run.centers, w_quant=cfg.csq_w_quant)
    groups = teacher = v = None
    # The contrast term needs strong views; NCA and the distillation (whose teacher sees the same
    # view) learn on light ones: under strong views NCA stayed at chance for a whole epoch.
    first = _normalised(run, random_views(x, gen) if cfg.w_contrast > 0 else light_view(x, gen))
    u = _learned(run, run.model(first))
    if run.teacher is not None:
        with torch.no_grad():
            teacher = run.teacher(first)
    if cfg.w_contrast > 0:
        v = _learned(run, run.model(_normalised(run, random_views(x, gen))))
        if cfg.positives == "patient":
            names = [ts.patients[i] for i in batch.tolist()]
            groups = torch.as_tensor([names.index(p) for p in names])
    return losses.drh_loss(u, y, v=v, groups=groups, teacher=teacher, centres=run.centers, **_loss_weights(cfg))


def _loss_weights(cfg: TrainConfig) -> dict[str, float]:
    return {
        "scale": cfg.scale,
        "w_nca": cfg.w_nca,
        "w_centre": cfg.w_centre,
        "w_contrast": cfg.w_contrast,
        "w_distill": cfg.w_distill,
        "temperature": cfg.temperature,
        "teacher_temperature": cfg.teacher_temperature,
        "w_quant": cfg.w_quant,
        "w_balance": cfg.w_balance,
    }


def _bag_codes(
    run: _Run, batch: list[list[int]], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Relaxed study codes of a batch of bags (each instance one random view), instance codes, and the
    studies' teacher vectors (the mean of their images' layouts) when distilling."""
    model = run.model
    assert isinstance(model, DMIH)
    flat = [i for b in batch for i in b]
    x = run.train_set.images[torch.as_tensor(flat)]
    view = _normalised(run, random_views(x, gen) if run.cfg.w_contrast > 0 else light_view(x, gen))
    teacher = None
    if run.teacher is not None:
        with torch.no_grad():
            per_image = run.teacher(view)
        teacher = torch.stack([part.mean(dim=0) for part in per_image.split([len(b) for b in batch])])
    feats_real = model.forward_features(view)
    m = max(len(b) for b in batch)
    mask = torch.zeros(len(batch), m, dtype=torch.bool)
    for i, b in enumerate(batch):
        mask[i, : len(b)] = True
    mask = mask.to(run.device)
    feats = feats_real.new_zeros(len(batch), m, feats_real.shape[1])
    feats[mask] = feats_real
    return (
        _learned(run, torch.tanh(model.forward_bag(feats, mask))),
        _learned(run, model.forward_instance_head(feats_real)),
        teacher,
    )


def _loss_bags(run: _Run, batch: list[list[int]], gen: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
    """DMIH: the objective on study codes (two views of each study), plus the decaying instance arm."""
    cfg, ts = run.cfg, run.train_set
    u_bag, u_inst, teacher = _bag_codes(run, batch, gen)
    v_bag = _bag_codes(run, batch, gen)[0] if cfg.w_contrast > 0 else None
    y_bag = ts.labels[torch.as_tensor([b[0] for b in batch])].to(run.device)
    y_inst = ts.labels[torch.as_tensor([i for b in batch for i in b])].to(run.device)
    weights = _loss_weights(cfg)
    loss_bag, parts = losses.drh_loss(u_bag, y_bag, v=v_bag, teacher=teacher, centres=run.centers, **weights)
    lam = losses.instance_arm_weight(step / run.steps_per_epoch, cfg.epochs, cfg.inst_weight)
    loss_inst, _ = losses.drh_loss(u_inst, y_inst, centres=run.centers, **{**weights, "w_contrast": 0.0})
    return loss_bag + lam * loss_inst, {**parts, "inst": float(loss_inst.detach()), "lam": lam}


def _run_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One epoch of optimisation from its own seeded generator; returns the mean of each loss part."""
    cfg, state = run.cfg, run.state
    gen = _epoch_generator(cfg.seed, epoch)
    torch.manual_seed(cfg.seed * 7919 + epoch)  # dropout-free nets; keeps any torch RNG use reproducible
    run.model.train()
    if cfg.method == "dmih":
        batches: list = _batches_bags(run.train_set.bags(), cfg.bags_per_batch, cfg.max_bag, gen)
    elif _patient_batches(cfg):
        batches = _batches_patients(run.train_set.patients, cfg.batch_size, gen)
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


# -- validation and selection ------------------------------------------------------------------------------


def validate(run: _Run) -> dict[str, Any]:
    """Validation figures of the current weights: validation queries against the validation images
    and a seeded sample of the training images, under the evaluation protocol (:mod:`hashing.scoring`)."""
    cfg = run.cfg
    g = np.random.default_rng(cfg.seed)
    ts, vs = run.train_set, run.val_set
    sample = np.sort(g.choice(len(ts), min(cfg.val_db, len(ts)), replace=False))
    both = ImageSet(
        torch.cat([vs.images, ts.images[torch.as_tensor(sample)]]),
        torch.cat([vs.labels, ts.labels[torch.as_tensor(sample)]]),
        vs.patients + [ts.patients[i] for i in sample],
        vs.studies + [ts.studies[i] for i in sample],
        vs.paths + [ts.paths[i] for i in sample],
        ts.classes,
    )
    feats, heads = encode_set(run.model, both.images, run.mean, run.std, run.device)
    if isinstance(run.model, DMIH):  # study level: bags of the images
        bags = both.bags()
        heads, keys = pool_bags(run.model, feats, bags, run.device)
        labels = np.array([int(both.labels[b[0]]) for b in bags])
        patients = np.array([both.patients[b[0]] for b in bags], dtype=object)
        n_val = sum(1 for b in bags if b[0] < len(vs))
        order = np.argsort([b[0] >= len(vs) for b in bags], kind="stable")
        heads, keys, labels, patients = heads[order], keys[order], labels[order], patients[order]
    else:
        labels, patients, n_val = both.labels.numpy(), np.array(both.patients, dtype=object), len(vs)
        keys = image_keys(run.model, feats, heads)
    relaxed = quantize_rerank(keys.numpy()).astype(np.float32)
    codes = pack(binarize(heads.numpy()))
    everything = np.arange(len(codes))
    proto = Protocol(
        labels=labels,
        patients=patients,
        label_queries=everything[:n_val],
        label_database=everything[n_val:],
        same_queries=everything[:n_val],
        same_database=everything,
    )
    rep = Rep("validation", "served", codes=codes, vectors=relaxed, nbits=run.model.nbits)
    plain = None
    if isinstance(run.model, DRH):  # served as a stored reference is: re-ranked by its variants
        variants = variant_set(run.model, both.images, run.mean, run.std, run.device).numpy()
        if variants.size:
            plain = score(rep, proto, cfg.seed, 200).get("r@10")
            rep.variants = quantize_rerank(variants).astype(np.float32)
    row = score(rep, proto, cfg.seed, 200)
    return {
        "val_map": row.get("map_all"),
        "val_recall@10": row.get("r@10"),
        "val_recall@10_plain": plain,
        "val_recall_queries": row.get("r@10_n", 0),
        "val_ties@10": row.get("ties@10"),
        "val_distinct": row.get("distinct_codes"),
    }


def _selection_measure(run: _Run, figures: dict[str, Any]) -> str:
    cfg = run.cfg
    if cfg.select != "auto":
        return cfg.select
    if (figures.get("val_recall_queries") or 0) >= MIN_RECALL_QUERIES:
        return "recall"
    if figures.get("val_map") is not None:
        return "map"
    return "loss"


def _better(state: dict[str, Any], value: float, tie_map: float | None) -> bool:
    """Whether an epoch beats the best so far. Same-patient recall over a few hundred queries moves in
    steps of 1/n and ties often; a tie goes to the higher label mAP, so noise in the first measure
    does not keep an earlier, less trained epoch (v3's run kept epoch 4 over an equal-recall epoch 11
    with mAP 0.719 against 0.693)."""
    best = state["best"]
    if best is None or value > best:
        return True
    return value == best and tie_map is not None and tie_map > (state.get("best_map") or float("-inf"))


def _select(run: _Run, epoch: int, means: dict[str, Any], seconds: float) -> None:
    """Validate the epoch, keep its weights if it is the best so far, save the resumable state."""
    state = run.state
    figures = validate(run) if len(run.val_set) else {}
    measure = state.get("measure") or _selection_measure(run, figures)
    state["measure"] = measure
    value = {
        "recall": figures.get("val_recall@10"),
        "map": figures.get("val_map"),
        "loss": -means.get("loss", 0.0),
    }[measure]
    if value is None:
        raise SystemExit(f"--select {measure}: the validation set cannot measure it")
    record = {"epoch": epoch + 1, "step": state["step"], "seconds": round(seconds, 1), **means}
    record.update({k: (round(v, 5) if isinstance(v, float) else v) for k, v in figures.items()})
    state["history"].append(record)
    log.info("epoch %d: %s", epoch + 1, record)
    if _better(state, value, figures.get("val_map") if measure == "recall" else None):
        state["best"], state["best_epoch"] = value, epoch + 1
        state["best_map"] = figures.get("val_map")
        state["best_state"] = copy.deepcopy({k: v.cpu() for k, v in run.model.state_dict().items()})
    state["epoch"] = epoch + 1
    ckpt_mod.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "state": state}, run.last)


def _final_checks(run: _Run) -> dict[str, Any]:
    """What the selected model does with the training images; warns about a loss that did not move
    and about codes that collapse."""
    history = run.state["history"]
    if len(history) >= 2:
        first, best = history[0]["loss"], min(h["loss"] for h in history)
        if abs(first) > 1e-9 and (first - best) / abs(first) < 0.02:
            run.warn(f"the loss stayed at its initial value ({first:.4f} -> best {best:.4f}): nothing was learnt")
    _, heads = encode_set(run.model, run.train_set.images, run.mean, run.std, run.device)
    codes = pack(binarize(heads.numpy()))
    n = len(codes)
    distinct = distinct_codes(codes)
    sample = codes[: min(n, 1000)]
    ties = ties_at(hamming_distances(sample, codes), 10) if n > 10 else 0.0
    if distinct < max(2.0, 0.1 * n):  # one code for everything is a collapse at any size
        run.warn(f"the codes collapse: {distinct} distinct codes for {n} training images")
    val_ties = next((h.get("val_ties@10") for h in history if h["epoch"] == run.state["best_epoch"]), None)
    if val_ties is not None and val_ties > 50:
        run.warn(f"the codes collapse: ties@10 on validation is {val_ties:.0f} (more than 50)")
    return {"train_distinct_codes": distinct, "train_images": n, "train_ties@10": ties}


def _model_checkpoint(run: _Run, command: str, elapsed: float, checks: dict[str, Any]) -> dict[str, Any]:
    """The best epoch's model with everything needed to use it and to know how it was made."""
    cfg, state = run.cfg, run.state
    model = run.model.cpu().eval()
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    training = {
        "method": cfg.method,
        "data": str(cfg.data),
        "dataset": Path(cfg.data).resolve().name,
        "source": run.source.kind,
        "manifest_sha256_16": run.source.digest,
        "classes": run.source.classes,
        "left_out": run.source.skipped,
        "train_images": len(run.train_set),
        "validation_images": len(run.val_set),
        "validation": "the manifest's val rows"
        if run.source.splits >= {"val"}
        else f"{cfg.val_fraction:.0%} of training patients held out (seed {cfg.seed}), patient-disjoint",
        "selected_by": state.get("measure"),
        "selected_epoch": state["best_epoch"],
        "selected": {k: v for k, v in best.items() if k.startswith("val_")},
        "history": state["history"],
        "checks": checks,
        "warnings": run.warnings,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
        "command": command,
        "seconds": round(elapsed, 1),
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }
    version = cfg.version or f"{cfg.method}{cfg.bits}-{training['dataset']}"
    drh, dmih = (run.companion, model) if isinstance(model, DMIH) else (model, None)
    assert isinstance(drh, DRH)
    return ckpt_mod.model_checkpoint(
        version=version,
        drh=drh,
        dmih=dmih,
        input_size=cfg.input_size,
        mean=run.mean,
        std=run.std,
        training=training,
        route=route_for(cfg),
        query_variants=layout_dims(drh) > 0,  # validation selected it re-ranked by them (validate)
    )


def route_for(cfg: TrainConfig) -> Route:
    """The route the checkpoint declares: as given, else named after the data set (any image)."""
    if cfg.init:
        init_route = ckpt_mod.route_of(ckpt_mod.load(cfg.init))
        if not (cfg.route or cfg.route_modalities or cfg.route_body_parts or cfg.general):
            return init_route  # a DMIH serves what its DRH serves
    name = cfg.route or re.sub(r"[^a-z0-9-]+", "-", Path(cfg.data).resolve().name.lower()).strip("-")[:32] or "model"
    return Route(
        name=name,
        modalities=tuple(cfg.route_modalities.split(",")),
        body_parts=tuple(cfg.route_body_parts.split(",")),
        photometric=tuple(cfg.route_photometric.split(",")),
        general=cfg.general,
    )


def curves_path(out: str | Path) -> Path:
    """Where the training curves of the checkpoint ``out`` are drawn: beside it, ``<out>.curves.png``."""
    return Path(str(out) + ".curves.png")


def plot_history(history: list[dict[str, Any]], path: Path, title: str, selected: int = 0) -> None:
    """The loss and the validation figures by epoch, the selected epoch marked: whether a run was
    still learning, overfitting or collapsing is seen at a glance, not read from a log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h.get("loss") for h in history], "o-", label="training loss")
    for part in ("nca", "distill", "contrast", "center"):
        if any(part in h for h in history):
            left.plot(epochs, [h.get(part) for h in history], ".--", label=part)
    left.set_xlabel("epoch")
    left.legend(fontsize=8)
    for key, label in (
        ("val_map", "val mAP@all"),
        ("val_recall@10", "val same-patient R@10 (served)"),
        ("val_recall@10_plain", "the same, re-ranked by the reference alone"),
    ):
        if any(h.get(key) is not None for h in history):
            right.plot(epochs, [h.get(key) for h in history], "o-", label=label)
    if selected:
        right.axvline(selected, color="grey", lw=0.8, ls=":", label=f"selected (epoch {selected})")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Run a training; returns the model checkpoint dictionary it wrote to ``cfg.out``."""
    t_start = time.time()
    try:
        run = _prepare(cfg)
    except DataError as exc:
        raise SystemExit(f"drh-pacs train: {exc}") from None
    for epoch in range(run.state["epoch"], cfg.epochs):
        if run.state["step"] >= run.total_steps:
            break
        t_epoch = time.time()
        means = _run_epoch(run, epoch)
        _select(run, epoch, means, time.time() - t_epoch)
        if cfg.stop_after_epoch and epoch + 1 >= cfg.stop_after_epoch and epoch + 1 < cfg.epochs:
            log.info("stopping after epoch %d as asked; continue with --resume", epoch + 1)
            return {}
    if run.state["best_state"] is not None:
        run.model.load_state_dict(run.state["best_state"])
    checks = _final_checks(run)
    elapsed = time.time() - t_start
    out = _model_checkpoint(run, command, elapsed, checks)
    ckpt_mod.save(out, cfg.out)
    curves = curves_path(cfg.out)
    title = f"{out['version']}: training and validation by epoch"
    plot_history(run.state["history"], curves, title, selected=run.state["best_epoch"])
    log.info(
        "wrote %s and %s (version %s, epoch %d selected by %s, %.0f s)%s",
        cfg.out,
        curves,
        out["version"],
        run.state["best_epoch"],
        run.state.get("measure"),
        elapsed,
        "".join(f"\n  warning: {w}" for w in run.warnings),
    )
    return out


# -- command line --------------------------------------------------------------------------------------------

_HELP = {
    "data": "a folder with manifest.csv, a manifest CSV, or a folder of DICOM files",
    "manifest": "manifest CSV (default DATA/manifest.csv): path[,label,patient,study,split]",
    "out": "model checkpoint to write",
    "method": "drh (image codes), csq (CSQ's hash centres on the labels: the label-only baseline, or with"
    " --layout-bits the labelled half of the shipped chest model), dmih (study codes, from --init)",
    "bits": "code length",
    "input_size": "side (px) of the square model input; images keep their aspect, zero padded",
    "epochs": "epochs of the schedule (warm-up, then cosine decay to its end)",
    "batch_size": "images per step",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "csq_w_quant": "CSQ: quantization loss weight",
    "bags_per_batch": "DMIH: studies per step",
    "val_fraction": "fraction of the training patients held out for validation (epoch selection)",
    "val_db": "training images sampled into the validation database (with the validation images)",
    "seed": "seed of the split, the initialisation, the batches and the views",
    "arch": f"one of {', '.join(MODELS)}",
    "layout_dims": "dimensions kept of the whitened 16 x 16 layout path, 1-256 (0: the architecture's own:"
    f" {LAYOUT_DIMS} for drh_resnet18_layout, none for the others; a number gives any architecture a layout path"
    " of that size). Each is a byte per image in the store's re-ranking vectors",
    "layout_bits": "bits of the code fitted on the whitened layout instead of learned (ITQ; 0: all learned)."
    " The objective trains the others (NCA where labels exist, the distillation unless its weight is 0)."
    " The network needs a layout path",
    "scale": "NCA scale s (logits = -s d / K)",
    "w_nca": "weight of NCA (used where labels exist)",
    "w_centre": "weight of the hash-centre term (CSQ's central similarity, used where labels exist; 0: off)."
    " NCA ranks classes within a batch, the centres keep them apart across the database",
    "w_contrast": "weight of the contrast of two random views (images alone; 0: off)",
    "w_distill": "weight of the distilled neighbourhoods of the whitened layout (images alone; 0: off)",
    "temperature": "temperature of the codes' similarities in the contrast and distillation terms",
    "teacher_temperature": "temperature of the layout's similarities (the distillation's teacher)",
    "positives": "the contrast term's positives: patient (two views of an image, and the other films of its"
    " patient in the batch) or views (two views of an image only)",
    "w_quant": "quantization loss weight",
    "w_balance": "bit-balance loss weight",
    "init": "DMIH: DRH checkpoint to start from (ships with it)",
    "max_bag": "DMIH: instances sampled per study in training",
    "inst_weight": "DMIH: initial instance-arm weight",
    "select": "what picks the epoch: auto (same-patient recall, else label mAP, else loss), recall, map, loss",
    "device": "auto (GPU when present), cpu, cuda:N",
    "threads": "CPU threads (0: torch default)",
    "work_dir": "where epoch checkpoints go (default OUT.work)",
    "resume": "continue from WORK_DIR/last.pt",
    "max_steps": "stop after this many steps (smoke tests)",
    "stop_after_epoch": "stop after this epoch (split a training into sessions)",
    "cache_dir": "cache the decoded model inputs here (.npz)",
    "version": "model version tag (default METHOD+BITS-DATASET)",
    "route": "name of the route the model serves (default: the data set's folder name)",
    "route_modalities": "modalities the model serves, comma separated (e.g. DX,CR; empty: any)",
    "route_body_parts": "body parts the model serves, comma separated (e.g. CHEST; empty: any)",
    "route_photometric": "photometric interpretations the model serves (empty: any)",
    "general": "declare a general model: it takes every image no other route takes",
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in its help: except an empty one,
    whose help says what takes its place (``(default DATA/manifest.csv)``, not ``(default: )``), and
    a switch's (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is False or action.default in ("", None):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser(prog="drh-pacs train", description=__doc__, formatter_class=_Formatter)
    defaults = TrainConfig(data="", out="")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("data", "out"):
            p.add_argument(flag, required=True, help=_HELP[f.name])
        elif f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false")
        elif f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=_HELP.get(f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            choices = {"method": METHODS, "bits": VALID_NBITS, "select": SELECT, "positives": POSITIVES}.get(f.name)
            p.add_argument(flag, type=kind, default=getattr(defaults, f.name), choices=choices, help=_HELP.get(f.name))
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DRH_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(args)
    train(cfg, command="drh-pacs train " + " ".join(shlex.quote(a) for a in args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
