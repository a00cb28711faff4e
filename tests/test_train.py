"""``drh-pacs train`` on the tiny fixture set: a few steps, real files, resumable, deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hashing import checkpoint
from hashing.encoder import Encoder
from hashing.train import main as train_main
from tests.helpers.datasets import FIXTURES, fixture_args, make_fixture_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fixture_dataset(tmp_path_factory.mktemp("cxr"))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["drh"]["state_dict"]


def test_train_drh_writes_a_complete_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "drh.pt"
    assert train_main(fixture_args(data_dir, out)) == 0
    ck = checkpoint.load(out)
    assert ck["nbits"] == 16 and ck["input_size"] == 32 and ck["version"] == f"drh16-{data_dir.name}"
    tr = ck["training"]
    assert tr["method"] == "drh" and tr["classes"] == ["bacterial", "normal", "viral"]
    assert len(tr["history"]) == 2 and 1 <= tr["selected_epoch"] <= 2
    assert tr["train_images"] + tr["validation_images"] == 9
    assert tr["command"].startswith("drh-pacs train --data ") and tr["seconds"] > 0
    assert 0 < ck["normalization"]["std"] < 1
    enc = Encoder.load(str(out), device="cpu")
    img = np.asarray(Image.open(FIXTURES / "normal-IM-0001-0001.jpeg").convert("L"), np.float32) / 255
    codes, _ = enc.encode_images([img])
    assert codes.shape == (1, 2)
    assert (tmp_path / "drh.pt.work" / "last.pt").exists()


def test_resume_equals_uninterrupted_and_seed_matters(data_dir: Path, tmp_path: Path) -> None:
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    train_main(fixture_args(data_dir, full, "--epochs", "3"))
    train_main(fixture_args(data_dir, part, "--epochs", "3", "--stop-after-epoch", "1"))
    assert not part.exists()
    train_main(fixture_args(data_dir, part, "--epochs", "3", "--resume"))
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other.pt"
    train_main(fixture_args(data_dir, other, "--epochs", "3", "--seed", "6"))
    c = _weights(other)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_csq_baseline(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "csq.pt"
    train_main(fixture_args(data_dir, out, "--method", "csq", "--epochs", "1"))
    ck = checkpoint.load(out)
    assert ck["training"]["method"] == "csq" and ck["version"].startswith("csq16")


def test_train_dmih_from_drh(data_dir: Path, tmp_path: Path) -> None:
    drh = tmp_path / "drh.pt"
    train_main(fixture_args(data_dir, drh, "--epochs", "1"))
    out = tmp_path / "model.pt"
    train_main(fixture_args(data_dir, out, "--method", "dmih", "--init", str(drh), "--bags-per-batch", "3"))
    ck = checkpoint.load(out)
    assert ck["dmih"] is not None and ck["training"]["method"] == "dmih"
    # The DRH part ships unchanged; the DMIH encoder started from it and was trained.
    a, b = _weights(drh), ck["drh"]["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lam = [h["lam"] for h in ck["training"]["history"]]
    assert lam[0] > lam[-1]
    enc = Encoder.load(str(out), device="cpu")
    imgs = [np.asarray(Image.open(p).convert("L"), np.float32) / 255 for p in sorted(FIXTURES.glob("*.jpeg"))[:3]]
    _, emb = enc.encode_images(imgs)
    assert enc.encode_study(emb).shape == (2,)
    assert enc.encode_study(emb[:1]).shape == (2,)


def test_bad_arguments(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train_main(fixture_args(data_dir, tmp_path / "x.pt", "--method", "dmih"))  # no --init
    with pytest.raises(SystemExit):
        train_main(fixture_args(data_dir, tmp_path / "x.pt", "--bits", "24"))
