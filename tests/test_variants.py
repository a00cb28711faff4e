"""Query variants (hashing.variants): what the tolerant re-ranking compares, and its arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hashing.bits import Reranker, pooled_variants, quantize_rerank, rerank_similarity
from hashing.encoder import Encoder
from hashing.variants import VARIANTS, transformed, variant_keys

FIXTURES = Path(__file__).parent / "fixtures" / "cxr"
IDENTITY = VARIANTS.index((0.0, 0.0, 1.0))


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.load(device="cpu")  # the shipped default: a model with a layout path


def _films() -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("L"), np.float32) / 255.0 for p in sorted(FIXTURES.glob("*.jpeg"))][:6]


def test_every_image_gets_its_variants_and_the_untransformed_one_is_its_own_key(encoder: Encoder) -> None:
    out = encoder.encode_images(_films())
    assert len(VARIANTS) == 27 and encoder.n_variants == 27
    assert out.variants.shape == (6, 27, encoder.rerank_dim) and out.variants.dtype == np.int8
    own = rerank_similarity(out.rerank[0], out.variants[0:1, IDENTITY])[0]
    assert own > 0.999
    # the variants differ from the image's own key, and from each other
    assert len({bytes(v) for v in out.variants[0]}) == 27


def test_a_shifted_and_zoomed_film_is_found_by_a_variant(encoder: Encoder) -> None:
    """The same film, moved 4 pixels and enlarged by 8 % (a child positioned differently, and grown):
    its key is nearer to one of the original's variants than to the original's own key."""
    x = encoder.prepare(_films())
    moved = transformed(x, 4 / 128, -4 / 128, 1.08)
    original, shifted = encoder.encode_tensor(x), encoder.encode_tensor(moved)
    for n in range(len(x)):
        plain = rerank_similarity(original.rerank[n], shifted.rerank[n : n + 1])[0]
        tolerant = rerank_similarity(original.variants[n], shifted.rerank[n : n + 1])[0]
        assert tolerant > plain + 0.05, (n, plain, tolerant)
        assert tolerant > 0.95


def test_only_a_model_evaluated_with_variants_gets_them() -> None:
    """The breast-ultrasound model has a layout path but was never scored re-ranked by its variants:
    its checkpoint does not declare them, so its references keep the plain re-ranking."""
    us = Encoder.load("shipped:us-breast", device="cpu")
    assert us.layout_dims == 128 and us.n_variants == 0
    assert us.encode_images(_films()[:2]).variants.shape == (2, 0, us.rerank_dim)
    enc = Encoder.random("cpu")
    assert enc.n_variants == 0
    assert enc.encode_images(_films()[:2]).variants.shape == (2, 0, enc.rerank_dim)
    assert variant_keys(enc.drh, torch.zeros(2, 1, 64, 64)).shape == (2, 0, 0)


def test_best_cosine_over_variants_and_pooling() -> None:
    rng = np.random.default_rng(0)
    q = quantize_rerank(rng.standard_normal((5, 16)))
    db = quantize_rerank(rng.standard_normal((600, 16)))
    db[[3, 400]] = 0  # a candidate stored without a vector scores 0
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    each = unit(q.astype(np.float64)) @ unit(db.astype(np.float64) + 1e-30).T
    each[:, [3, 400]] = 0.0
    np.testing.assert_allclose(rerank_similarity(q, db), each.max(axis=0), atol=1e-6)
    np.testing.assert_allclose(rerank_similarity(q[1], db), each[1], atol=1e-6)
    assert rerank_similarity(q, db)[3] == rerank_similarity(q, db)[400] == 0.0
    # a kept Reranker scores a shortlist by row numbers, in passes, whatever it scored before
    reranker = Reranker()
    reranker.BLOCK = 256  # passes of 256 rows: two over the 450 rows, three over all 600
    rows = rng.permutation(600)[:450]
    np.testing.assert_allclose(reranker.similarity(q, db, rows), each.max(axis=0)[rows], atol=1e-6)
    np.testing.assert_allclose(reranker.similarity(q[1, :8], db[:, :8]), rerank_similarity(q[1, :8], db[:, :8]), atol=0)
    np.testing.assert_allclose(reranker.similarity(q[2], db, rows[:10]), each[2, rows[:10]], atol=1e-6)
    # a study of one image has exactly its image's variants; of two, each variant's mean direction
    one = quantize_rerank(rng.standard_normal((1, 5, 16)))
    np.testing.assert_array_equal(pooled_variants(one), one[0])
    two = quantize_rerank(rng.standard_normal((2, 5, 16)))
    unit = two / np.linalg.norm(two.astype(np.float64), axis=-1, keepdims=True)
    expect = unit.mean(axis=0)
    got = pooled_variants(two).astype(np.float64)
    cos = (got * expect).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expect, axis=-1)
    assert (cos > 0.999).all()
    with pytest.raises(ValueError, match="variants"):
        pooled_variants(np.zeros((0, 5, 16), np.int8))
