"""Checkpoint files: one file carries everything needed to use a model, or to resume its training.

A *model* checkpoint (what :class:`hashing.encoder.Encoder` loads, and what ships in
``hashing/weights/``) is a ``torch.save`` dictionary of plain types, loadable with
``weights_only=True`` (no pickled code is executed when a hospital loads a file it was sent)::

    format         "drh-pacs-model/1"
    version        model version tag stored with every code ("drh64-cxr-v1")
    nbits          code length K
    input_size     square side (px) the images are fitted to, keeping aspect ratio, zero padded
    normalization  {"mean": m, "std": s}: the network sees (pixel01 - m) / s
    preprocessing  how pixels reach [0, 1] (windowing, inversion): documentation for the reader
    drh            {"factory": "DRH", "arch": {...}, "state_dict": {...}}      image codes
    dmih           {"factory": "DMIH", "arch": {...}, "state_dict": {...}} | None   study codes
    route          what the model serves (:class:`hashing.route.Route`): name, modalities, body parts,
                   photometric interpretations, general
    supersedes     (optional) earlier versions of this model that served the same route: an installation
                   still answering with one from before routes existed learns its route from here
    query_variants (optional) true: a stored reference is re-ranked by its query variants
                   (:mod:`hashing.variants`), the way the model was selected and evaluated; workers
                   then store them per image. Absent: re-ranked by the reference's own vector
    training       data set, manifest hash, command, seed, epochs, time, hyper-parameters
    metrics        evaluation figures (mAP...) with the protocol they were measured under

A *training* checkpoint adds ``optimizer``, ``epoch``, ``step`` and RNG states so that
``drh-pacs train --resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from hashing.dmih import DMIH
from hashing.drh import DRH
from hashing.route import LEGACY, Route

FORMAT = "drh-pacs-model/1"


class CheckpointError(ValueError):
    """The file is not a drh-pacs checkpoint, or lacks something needed to use it."""


def save(obj: dict[str, Any], path: str | Path) -> None:
    """Write atomically (temp file + rename) so a crash mid-save never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shipped or shared model must be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing pickled code.

    A missing file raises ``FileNotFoundError`` (workers tell "not deployed here" apart from "damaged");
    anything unreadable or foreign raises :class:`CheckpointError`.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    for key in ("version", "nbits", "input_size", "normalization", "drh"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    return ckpt


def module_entry(model: DRH | DMIH, *, half: bool = False) -> dict[str, Any]:
    """A model's rebuild arguments and weights (float16 weights halve a shipped file's size)."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
    }
    return {"factory": type(model).__name__, "arch": model.arch(), "state_dict": state}


def build_module(entry: dict[str, Any]) -> DRH | DMIH:
    """Rebuild a network from :func:`module_entry`'s dictionary."""
    factories = {"DRH": DRH, "DMIH": DMIH}
    factory = factories.get(entry.get("factory", ""))
    if factory is None:
        raise CheckpointError(f"unknown model factory {entry.get('factory')!r}")
    model = factory(**entry["arch"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in entry["state_dict"].items()}
    model.load_state_dict(state)
    return model


def model_checkpoint(
    *,
    version: str,
    drh: DRH,
    dmih: DMIH | None,
    input_size: int,
    mean: float,
    std: float,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    half: bool = False,
    route: Route | None = None,
    query_variants: bool = False,
) -> dict[str, Any]:
    """Assemble a model checkpoint dictionary (see module docstring)."""
    return {
        "format": FORMAT,
        "version": version,
        "nbits": drh.nbits,
        "input_size": int(input_size),
        "normalization": {"mean": float(mean), "std": float(std)},
        "preprocessing": {
            "pixels": "hashing.preprocess.load_pixels: rescale, VOI LUT/window, MONOCHROME1 inverted, to [0, 1]",
            "fit": "hashing.resize.model_input: keep aspect ratio, zero padding, input_size square, uint8 levels",
        },
        "drh": module_entry(drh, half=half),
        "dmih": module_entry(dmih, half=half) if dmih is not None else None,
        "route": (route or LEGACY).as_dict(),
        "query_variants": bool(query_variants),
        "training": training or {},
        "metrics": metrics or {},
    }


def route_of(ckpt: dict[str, Any]) -> Route:
    """The route a checkpoint declares (one written before routes existed is general)."""
    data = ckpt.get("route")
    return Route.from_dict(data) if data else LEGACY


def query_variants_of(ckpt: dict[str, Any]) -> bool:
    """Whether a checkpoint's references are re-ranked by their query variants (module docstring)."""
    return bool(ckpt.get("query_variants"))


def supersedes_of(ckpt: dict[str, Any]) -> tuple[str, ...]:
    """The earlier versions a checkpoint replaces on its route (none for most)."""
    return tuple(str(v) for v in ckpt.get("supersedes") or ())
