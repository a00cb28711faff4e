"""Encoder: the contract workers rely on (shapes, dtypes, determinism, checkpoint round trip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hashing import bits, checkpoint
from hashing.dmih import dmih_tiny
from hashing.drh import drh_tiny
from hashing.encoder import Encoder

FIXTURES = Path(__file__).parent / "fixtures" / "cxr"


def _fixture_images() -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in sorted(FIXTURES.glob("*.jpeg"))]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.load(device="cpu")


def test_default_model_loads(encoder: Encoder) -> None:
    assert encoder.nbits in bits.VALID_NBITS
    assert encoder.version
    assert encoder.emb_dim > 0
    assert str(encoder.device) == "cpu"


def test_shipped_model_is_trained_and_groups_classes(encoder: Encoder) -> None:
    assert encoder.version == "drh64-cxr-pneumonia-v7" and encoder.input_size == 128
    assert encoder.layout_dims == 128 and encoder.rerank_dim == 128  # re-ranked by the whitened layout
    assert encoder.n_variants == 27  # ...at its best over the reference's variants
    rows: dict = {}
    for r in encoder.info["metrics"]["results"]:
        rows.setdefault(r["kind"], r)  # the first row of each kind: chance, thumbnails, the model
    chance, thumbnail = rows["chance"], rows["cosine"]
    (served,) = [r for r in encoder.info["metrics"]["results"] if r.get("shortlist") == 1000 and "v7" in r["name"]]
    assert served["map_all"] > chance["map_all"] + 0.1  # its recorded test figures beat chance...
    assert served["r@10"] > thumbnail["r@10"]  # ...and the 32x32 thumbnails at finding the patient
    names = sorted(FIXTURES.glob("*.jpeg"))
    normal = np.array([p.name.startswith("normal") for p in names])
    codes = encoder.encode_images(_fixture_images()).codes
    d = bits.hamming(codes, codes).astype(float)
    same = d[normal][:, normal].mean() + d[~normal][:, ~normal].mean()
    across = 2 * d[normal][:, ~normal].mean()
    assert same < across  # normal and pneumonia radiographs get codes far apart


def test_missing_file_is_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        Encoder.load("/nonexistent/model.pt", device="cpu")


def test_encode_images_any_size(encoder: Encoder) -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((37, 200), dtype=np.float32), rng.random((300, 90), dtype=np.float32)] + _fixture_images()
    codes, embs, reranks, _ = encoder.encode_images(images, batch_size=5)
    assert codes.dtype == np.uint8 and codes.shape == (len(images), encoder.nbits // 8)
    assert embs.dtype == np.float32 and embs.shape == (len(images), encoder.emb_dim)
    assert np.isfinite(embs).all()
    # Batching must not change results (eval-mode batch norm).
    c1, e1, _, _ = encoder.encode_images(images[2:4])
    np.testing.assert_array_equal(c1, codes[2:4])
    np.testing.assert_allclose(e1, embs[2:4], rtol=1e-4, atol=1e-5)


def test_empty_batch(encoder: Encoder) -> None:
    codes, embs, _, _ = encoder.encode_images([])
    assert codes.shape == (0, encoder.nbits // 8) and embs.shape == (0, encoder.emb_dim)


def test_rejects_non_2d(encoder: Encoder) -> None:
    with pytest.raises(ValueError):
        encoder.encode_images([np.zeros((4, 4, 3), np.float32)])


def test_encode_study_from_stored_embeddings(encoder: Encoder) -> None:
    embs = encoder.encode_images(_fixture_images()[:4]).embeddings
    study, study_rerank = encoder.encode_study(embs)
    assert study_rerank.dtype == np.int8 and study_rerank.shape == (encoder.rerank_dim,)
    assert study.dtype == np.uint8 and study.shape == (encoder.nbits // 8,)
    # Permutation invariant (a study's instances arrive in any order).
    np.testing.assert_array_equal(encoder.encode_study(embs[::-1])[0], study)
    # The store keeps embeddings as float16: the study code must barely move.
    assert int(bits.hamming(encoder.encode_study(embs.astype(np.float16))[0], study)[0, 0]) <= 2
    one = encoder.encode_study(embs[:1])[0]
    assert one.shape == study.shape
    with pytest.raises(ValueError):
        encoder.encode_study(np.zeros((0, encoder.emb_dim), np.float32))


def test_checkpoint_round_trip_and_binarization(tmp_path: Path) -> None:
    torch.manual_seed(3)
    drh, dmih = drh_tiny(32), dmih_tiny(32)
    path = tmp_path / "m.pt"
    checkpoint.save(
        checkpoint.model_checkpoint(version="t-v1", drh=drh, dmih=dmih, input_size=48, mean=0.4, std=0.3), path
    )
    enc = Encoder.load(str(path), device="cpu")
    assert (enc.version, enc.nbits, enc.input_size) == ("t-v1", 32, 48)
    images = _fixture_images()[:3]
    codes, embs, _, _ = enc.encode_images(images)
    # Codes are the x >= 0 bits of the DRH hash layer on the prepared input.
    with torch.no_grad():
        h = drh.eval().forward_head(drh.forward_features(enc.prepare(images)))
    np.testing.assert_array_equal(codes, bits.pack(bits.binarize(h.numpy())))
    np.testing.assert_allclose(embs, dmih.eval().forward_features(enc.prepare(images)).detach().numpy(), atol=1e-5)
    # Loading again gives the same codes (no hidden randomness).
    np.testing.assert_array_equal(Encoder.load(str(path), device="cpu").encode_images(images)[0], codes)


def test_random_fallback_is_seeded() -> None:
    a, b = Encoder.random("cpu"), Encoder.random("cpu")
    images = _fixture_images()[:2]
    np.testing.assert_array_equal(a.encode_images(images)[0], b.encode_images(images)[0])
    assert a.version == "drh-random-v0"


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(checkpoint.CheckpointError):
        Encoder.load(str(bad), device="cpu")
