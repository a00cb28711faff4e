"""The one object workers use to turn images into codes: :class:`Encoder`.

``Encoder.load()`` reads a model checkpoint (:mod:`hashing.checkpoint`); with no path, the default
model shipped in ``hashing/weights/``. While no trained model is shipped, it builds a seeded,
randomly initialised DRH + DMIH pair (version ``drh-random-v0``) so that the pipeline can be built
and tested end to end; it says so in a warning.

What workers store per instance (``embeddings``): the DMIH instance-encoder features, float32
``(emb_dim,)``. The study code is DMIH pooling over exactly those vectors, so a study code can be
(re)computed later from stored embeddings alone, without the pixels (late instances, re-pooling).
The image code comes from DRH, whose hash layer is trained for image-to-image search.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from hashing import bits as bitcodes
from hashing import checkpoint as ckpt_mod
from hashing.dmih import DMIH, dmih_tiny
from hashing.drh import DRH, drh_tiny, layout_dims, rerank_dim, rerank_key
from hashing.resize import model_input
from hashing.route import LEGACY, Route
from hashing.variants import VARIANTS, variant_keys

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "default.pt"
RANDOM_VERSION = "drh-random-v0"


# A model path "shipped:NAME" names ``hashing/weights/NAME.pt`` of the installed package: recorded
# with a registered version, it stays right when the package moves (a new virtual environment).
SHIPPED_PREFIX = "shipped:"


def default_weights_path() -> Path:
    """The shipped default model inside the installed package."""
    return Path(str(resources.files("hashing") / "weights" / DEFAULT_WEIGHTS))


def resolve_model_path(path: str | None) -> str | None:
    """A checkpoint path as given in settings: "" or None is the shipped default model (None
    returned), "shipped:NAME" a model shipped in the package, anything else a file."""
    if not path:
        return None
    if path.startswith(SHIPPED_PREFIX):
        name = path[len(SHIPPED_PREFIX) :]
        if name in ("", "default"):
            return None
        shipped = Path(str(resources.files("hashing") / "weights" / f"{name}.pt"))
        if not shipped.is_file():
            raise FileNotFoundError(f"no shipped model {name!r} in {shipped.parent}")
        return str(shipped)
    return path


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoded(NamedTuple):
    """What a worker stores per image: the code, the embedding DMIH pools, the re-ranking vector, and
    the re-ranking vectors of its variants, for when it is a query's reference (:mod:`hashing.variants`)."""

    codes: np.ndarray  # uint8 (n, nbits // 8)
    embeddings: np.ndarray  # float32 (n, emb_dim)
    rerank: np.ndarray  # int8 (n, rerank_dim)
    variants: np.ndarray  # int8 (n, n_variants, rerank_dim); n_variants 0 without a layout path


def to_input(images_u8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Model inputs (uint8 grey levels from :func:`hashing.resize.model_input`) -> the network's input,
    ``(x / 255 - mean) / std`` with the checkpoint's normalisation; training and serving alike."""
    return (images_u8.float() / 255.0 - mean) / std


class Encoder:
    """A loaded model: images -> (DRH image codes, DMIH instance embeddings); embeddings -> study code."""

    def __init__(
        self,
        *,
        drh: DRH,
        dmih: DMIH,
        version: str,
        input_size: int,
        mean: float,
        std: float,
        device: torch.device,
        info: dict[str, Any] | None = None,
        route: Route = LEGACY,
        supersedes: tuple[str, ...] = (),
        query_variants: bool = False,
    ) -> None:
        if drh.nbits != dmih.nbits:
            raise ValueError(f"DRH has {drh.nbits} bits but DMIH {dmih.nbits}")
        self.drh = drh.to(device).eval()
        self.dmih = dmih.to(device).eval()
        self.version = version
        self.nbits = drh.nbits
        self.emb_dim = dmih.num_features
        self.layout_dims = layout_dims(drh)
        if layout_dims(dmih) != self.layout_dims:
            raise ValueError(f"DRH has a {self.layout_dims}-value layout path but DMIH {layout_dims(dmih)}")
        # values per re-ranking vector (images and studies alike)
        self.rerank_dim = rerank_dim(self.nbits, self.layout_dims)
        # Query variants per image (hashing.variants), for a model selected and evaluated with them
        # (its checkpoint says so); only a layout has a position to tolerate.
        self.n_variants = len(VARIANTS) if query_variants and self.layout_dims else 0
        self.input_size = input_size
        self.mean = mean
        self.std = std
        self.device = device
        self.info = info or {}
        self.route = route
        # Earlier versions of this model on the same route (hashing.checkpoint.supersedes_of).
        self.supersedes = supersedes
        # One encoder when DMIH shares DRH's weights: skip the second forward pass.
        self._shared = _same_weights(drh.encoder, dmih.encoder)

    @classmethod
    def load(cls, path: str | None = None, device: str = "auto") -> Encoder:
        """Load a checkpoint (``None``: the shipped default model; "shipped:NAME": another shipped one)."""
        dev = resolve_device(device)
        path = resolve_model_path(path)
        if path is None:
            default = default_weights_path()
            if not default.exists():
                return cls.random(dev)
            path = str(default)
        ckpt = ckpt_mod.load(path)
        drh = ckpt_mod.build_module(ckpt["drh"])
        if ckpt.get("dmih") is not None:
            dmih = ckpt_mod.build_module(ckpt["dmih"])
        else:
            log.warning(
                "checkpoint %s has no trained DMIH part: series and study codes are its hash layer over an"
                " attention-weighted mean of the images' features, the attention untrained (a one-image bag"
                " gets its image's code; the model card's 'Study level' says what was measured)",
                path,
            )
            dmih = dmih_from_drh(drh)
        if not isinstance(drh, DRH) or not isinstance(dmih, DMIH):
            raise ckpt_mod.CheckpointError(f"{path}: 'drh' and 'dmih' entries hold the wrong model types")
        norm = ckpt["normalization"]
        enc = cls(
            drh=drh,
            dmih=dmih,
            version=str(ckpt["version"]),
            input_size=int(ckpt["input_size"]),
            mean=float(norm["mean"]),
            std=float(norm["std"]),
            device=dev,
            info={k: ckpt.get(k) for k in ("training", "metrics", "preprocessing")},
            route=ckpt_mod.route_of(ckpt),
            supersedes=ckpt_mod.supersedes_of(ckpt),
            query_variants=ckpt_mod.query_variants_of(ckpt),
        )
        log.info(
            "loaded model %s (%d bits, input %d px) from %s on %s", enc.version, enc.nbits, enc.input_size, path, dev
        )
        return enc

    @classmethod
    def random(cls, device: torch.device | str = "cpu", nbits: int = 64, seed: int = 0) -> Encoder:
        """A seeded random-initialised model: same codes on every machine, meaningless similarity."""
        log.warning(
            "no trained model shipped in %s: using randomly initialised %s", default_weights_path(), RANDOM_VERSION
        )
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        drh, dmih = drh_tiny(nbits), dmih_tiny(nbits)
        torch.random.set_rng_state(gen_state)
        return cls(
            drh=drh, dmih=dmih, version=RANDOM_VERSION, input_size=64, mean=0.5, std=0.25, device=torch.device(device)
        )

    # -- encoding --------------------------------------------------------------------------------
    def prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        """2-D [0, 1] images of any size -> normalised ``(n, 1, S, S)`` tensor on the model's device.

        Through :func:`hashing.resize.model_input`, the function training uses too.
        """
        arrs = []
        for img in images:
            a = np.asarray(img, dtype=np.float32)
            if a.ndim != 2:
                raise ValueError(f"expected a 2-D image, got shape {a.shape}")
            arrs.append(model_input(a, self.input_size))
        if not arrs:
            return torch.zeros(0, 1, self.input_size, self.input_size, device=self.device)
        return self.normalize(torch.from_numpy(np.stack(arrs))[:, None])

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        """Model inputs (uint8 grey levels) -> the network's input (:func:`to_input`)."""
        return to_input(x_u8, self.mean, self.std).to(self.device)

    @torch.inference_mode()
    def encode_tensor(self, x: torch.Tensor) -> Encoded:
        """Already prepared ``(n, 1, S, S)`` -> codes, embeddings, re-ranking vectors and variants."""
        feats = self.drh.forward_features(x)
        h_t = self.drh.forward_head(feats)
        key = rerank_key(h_t, feats, self.layout_dims).float().cpu().numpy()
        h = h_t.float().cpu().numpy()
        emb = feats if self._shared else self.dmih.forward_features(x)
        codes = bitcodes.pack(bitcodes.binarize(h)).reshape(len(x), self.nbits // 8)
        variants = np.zeros((len(x), 0, self.rerank_dim), np.int8)
        if self.n_variants:
            variants = bitcodes.quantize_rerank(variant_keys(self.drh, x).cpu().numpy())
        return Encoded(codes, emb.float().cpu().numpy().astype(np.float32), bitcodes.quantize_rerank(key), variants)

    def encode_images(self, images: list[np.ndarray], batch_size: int = 64) -> Encoded:
        """2-D float32 images in [0, 1] -> codes ``(n, nbits // 8)``, embeddings ``(n, emb_dim)``,
        re-ranking vectors ``(n, rerank_dim)`` and variants ``(n, n_variants, rerank_dim)``."""
        out = Encoded(
            np.zeros((len(images), self.nbits // 8), dtype=np.uint8),
            np.zeros((len(images), self.emb_dim), dtype=np.float32),
            np.zeros((len(images), self.rerank_dim), dtype=np.int8),
            np.zeros((len(images), self.n_variants, self.rerank_dim), dtype=np.int8),
        )
        for start in range(0, len(images), batch_size):
            part = self.encode_tensor(self.prepare(images[start : start + batch_size]))
            for whole, piece in zip(out, part, strict=True):
                whole[start : start + len(piece)] = piece
        return out

    @torch.inference_mode()
    def encode_study(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Instance embeddings of one study ``(m, emb_dim)``, any m >= 1 -> (study code uint8
        ``(nbits // 8,)``, its re-ranking vector int8 ``(rerank_dim,)``)."""
        e = np.ascontiguousarray(embeddings, dtype=np.float32)
        if e.ndim == 1:
            e = e[None, :]
        if e.ndim != 2 or e.shape[1] != self.emb_dim or len(e) == 0:
            raise ValueError(f"expected (m >= 1, {self.emb_dim}) embeddings, got shape {e.shape}")
        feats = torch.from_numpy(e).to(self.device)[None]
        h_t, pooled = self.dmih.forward_bag_pooled(feats, torch.ones(1, len(e), dtype=torch.bool, device=self.device))
        key = rerank_key(h_t, pooled, self.layout_dims).float().cpu().numpy()
        h = h_t.float().cpu().numpy()
        return bitcodes.pack(bitcodes.binarize(h))[0], bitcodes.quantize_rerank(key)[0]


def dmih_from_drh(drh: DRH, seed: int = 0) -> DMIH:
    """A DMIH on DRH's encoder whose study hash layer is DRH's: a one-image study gets its image's
    code, and a larger study the code of an attention-weighted mean of its images' features (the
    attention itself untrained, seeded). What a DRH-only checkpoint serves studies with, and where
    DMIH training starts."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    dmih = DMIH(nbits=drh.nbits, backbone=drh.backbone_args, layout_bits=drh.layout_bits)
    torch.random.set_rng_state(gen_state)
    dmih.encoder.load_state_dict(drh.encoder.state_dict())
    dmih.instance_hash.load_state_dict(drh.hash.state_dict())
    dmih.bag_hash.load_state_dict(drh.hash.state_dict())
    if drh.layout_hash is not None:
        dmih.layout_hash.load_state_dict(drh.layout_hash.state_dict())
    return dmih


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
