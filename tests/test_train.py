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
    assert tr["selected_by"] in ("recall", "map", "loss") and "val_map" in tr["history"][0]
    assert any("step(s) per epoch" in w for w in tr["warnings"])  # 6 training images in batches of 4
    assert 0 < ck["normalization"]["std"] < 1
    enc = Encoder.load(str(out), device="cpu")
    img = np.asarray(Image.open(FIXTURES / "normal-IM-0001-0001.jpeg").convert("L"), np.float32) / 255
    encoded = enc.encode_images([img])
    assert encoded.codes.shape == (1, 2)
    # The default network keeps 128 dimensions of the whitened 16 x 16 layout, as the shipped model;
    # they are what the store keeps per image to re-rank by.
    assert ck["drh"]["arch"]["backbone"]["layout"] == 128 and encoded.rerank.shape == (1, 128)
    assert (tmp_path / "drh.pt.work" / "last.pt").exists()
    curves = tmp_path / "drh.pt.curves.png"  # the training curves, drawn beside the checkpoint
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 5000


def test_the_layout_path_can_keep_fewer_dimensions(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "narrow.pt"
    assert train_main(fixture_args(data_dir, out, "--layout-dims", "24")) == 0
    ck = checkpoint.load(out)
    assert ck["drh"]["arch"]["backbone"]["layout"] == 24
    assert ck["training"]["config"]["layout_dims"] == 24
    enc = Encoder.load(str(out), device="cpu")
    assert enc.rerank_dim == 24
    img = np.asarray(Image.open(FIXTURES / "normal-IM-0001-0001.jpeg").convert("L"), np.float32) / 255
    assert enc.encode_images([img]).rerank.shape == (1, 24)


def test_a_split_code_learns_some_bits_and_fits_the_rest_on_the_layout(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "split.pt"
    assert train_main(fixture_args(data_dir, out, "--layout-bits", "8")) == 0
    ck = checkpoint.load(out)
    assert ck["drh"]["arch"]["layout_bits"] == 8 and ck["training"]["config"]["layout_bits"] == 8
    state = ck["drh"]["state_dict"]
    assert state["hash.weight"].shape[0] == 8 and state["layout_hash.projection"].shape == (128, 8)
    assert state["layout_hash.projection"].abs().sum() > 0  # fitted on the training images
    enc = Encoder.load(str(out), device="cpu")
    img = np.asarray(Image.open(FIXTURES / "normal-IM-0001-0001.jpeg").convert("L"), np.float32) / 255
    assert enc.encode_images([img]).codes.shape == (1, 2)
    # A DMIH started from it keeps the split, and a study gets its fitted bits from its pooled layout.
    dmih = tmp_path / "split-dmih.pt"
    args = ("--method", "dmih", "--init", str(out), "--epochs", "1", "--bags-per-batch", "3")
    assert train_main(fixture_args(data_dir, dmih, *args)) == 0
    assert checkpoint.load(dmih)["dmih"]["arch"]["layout_bits"] == 8
    study = Encoder.load(str(dmih), device="cpu")
    assert study.encode_study(study.encode_images([img, img[::-1]]).embeddings)[0].shape == (2,)
    # CSQ's hash centers then span the learned bits only.
    csq = tmp_path / "csq.pt"
    assert train_main(fixture_args(data_dir, csq, "--method", "csq", "--epochs", "1", "--layout-bits", "8")) == 0
    assert checkpoint.load(csq)["drh"]["arch"]["layout_bits"] == 8


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
    emb = enc.encode_images(imgs).embeddings
    assert enc.encode_study(emb)[0].shape == (2,)
    assert enc.encode_study(emb[:1])[0].shape == (2,)


def test_help_shows_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0)" in text and "(default: drh_resnet18_layout)" in text
    assert "(default: )" not in text and "(default: None)" not in text and "(default: False)" not in text
    assert "(default DATA/manifest.csv)" in text  # an empty default: its help says what takes its place


def test_bad_arguments(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train_main(fixture_args(data_dir, tmp_path / "x.pt", "--method", "dmih"))  # no --init
    with pytest.raises(SystemExit):
        train_main(fixture_args(data_dir, tmp_path / "x.pt", "--bits", "24"))
    for dims in ("300", "-5"):  # a 16 x 16 layout has 256 values
        with pytest.raises(SystemExit, match="--layout-dims must be between 1 and 256"):
            train_main(fixture_args(data_dir, tmp_path / "x.pt", "--layout-dims", dims))
    with pytest.raises(SystemExit, match="--layout-bits 16: layout bits must leave"):
        train_main(fixture_args(data_dir, tmp_path / "x.pt", "--layout-bits", "16"))
    with pytest.raises(SystemExit, match="--layout-bits is for drh and csq"):
        train_main(
            fixture_args(data_dir, tmp_path / "x.pt", "--method", "dmih", "--init", "x.pt", "--layout-bits", "8")
        )
    with pytest.raises(SystemExit, match="need a network with a layout path"):
        train_main(fixture_args(data_dir, tmp_path / "x.pt", "--layout-bits", "8", "--arch", "drh_tiny"))


def test_a_loss_that_does_not_move_and_collapsing_codes_are_warned_and_recorded(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "still.pt"
    # Without the distillation term, whose batch-of-4 teacher varies more from epoch to epoch than
    # the 2 % the check allows for a loss that does not move.
    train_main(fixture_args(data_dir, out, "--lr", "0", "--epochs", "3", "--w-distill", "0"))
    warnings = checkpoint.load(out)["training"]["warnings"]
    assert any("loss stayed at its initial value" in w for w in warnings), warnings

    from hashing.train import TrainConfig, _final_checks, _prepare

    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "c.pt"), input_size=32, bits=16, progress=False)
    run = _prepare(cfg)
    with torch.no_grad():  # every image gets the same code
        run.model.hash.weight.zero_()
        run.model.hash.bias.fill_(0.5)
    checks = _final_checks(run)
    assert checks["train_distinct_codes"] == 1
    assert any("codes collapse" in w for w in run.warnings)


def test_unlabelled_dicom_folder_trains_from_the_images_alone(tmp_path: Path) -> None:
    from tests.helpers.dicomgen import fixture_images, make_study

    archive = tmp_path / "archive"
    images = fixture_images()
    for n in range(6):  # six patients, two films each, plus a structured report nobody can index
        make_study(archive / f"p{n}", images[2 * n : 2 * n + 2], patient_id=f"PAT{n}")
    (archive / "notes.txt").write_text("not DICOM")
    out = tmp_path / "mg.pt"
    args = ["--data", str(archive), "--out", str(out), "--input-size", "32", "--batch-size", "4", "--epochs", "2"]
    assert train_main([*args, "--bits", "16", "--threads", "1", "--no-progress", "--val-fraction", "0.34"]) == 0
    tr = checkpoint.load(out)["training"]
    assert tr["source"] == "dicom" and tr["classes"] == [] and tr["left_out"] == {"not DICOM": 1}
    assert tr["train_images"] + tr["validation_images"] == 12
    assert "distill" in tr["history"][0] and "nca" not in tr["history"][0]
    assert tr["selected_by"] == "loss"  # two validation patients: too few for a recall
    # The contrast term (off by default) trains from the images alone too, with the patient's other
    # film as a positive.
    out = tmp_path / "contrast.pt"
    more = ["--w-distill", "0", "--w-contrast", "1", "--positives", "patient"]
    assert train_main([*args[:3], str(out), *args[4:], "--bits", "16", "--threads", "1", "--no-progress", *more]) == 0
    history = checkpoint.load(out)["training"]["history"]
    assert "contrast" in history[0] and "distill" not in history[0]


def test_a_bad_manifest_stops_before_training_and_names_its_rows(tmp_path: Path) -> None:
    data = make_fixture_dataset(tmp_path / "cxr")
    rows = (data / "manifest.csv").read_text().splitlines()
    rows[3] = rows[3].replace(".jpeg", ".missing")
    rows[5] = rows[5].rsplit(",", 1)[0] + ",holdout"
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as info:
        train_main(fixture_args(data, tmp_path / "x.pt"))
    message = str(info.value)
    assert "row 4:" in message and "not found" in message
    assert "row 6: unknown split 'holdout'" in message
    assert not (tmp_path / "x.pt.work").exists()


def test_a_tie_in_recall_goes_to_the_epoch_with_the_higher_map() -> None:
    from hashing.train import _better

    state = {"best": 0.2, "best_map": 0.69}
    assert _better(state, 0.2, tie_map=0.72)  # same recall, better labels: the later epoch
    assert not _better(state, 0.2, tie_map=0.65)
    assert not _better(state, 0.19, tie_map=0.99)  # recall decides first
    assert _better(state, 0.21, tie_map=0.10)
    assert not _better(state, 0.2, tie_map=None)  # selected by mAP or loss: no tie-break
    assert _better({"best": None}, 0.0, tie_map=None)
