"""Data sets for train/evaluate (hashing.data): manifests as people save them, and their mistakes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hashing.data import DataError, load_images, open_source, patient_split, read_manifest
from tests.helpers.dicomgen import fixture_images


def _folder(tmp_path: Path, n: int = 4) -> tuple[Path, list[str]]:
    names = []
    for f in fixture_images()[:n]:
        shutil.copy(f, tmp_path / f.name)
        names.append(f.name)
    return tmp_path, names


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_a_spreadsheet_manifest_with_a_bom_and_any_separator_is_read(tmp_path: Path, sep: str) -> None:
    root, names = _folder(tmp_path)
    lines = [sep.join(["Path", "Label", "Split"])]
    lines += [
        sep.join([n, "normal" if i % 2 else "viral", ["TRAIN", "Val", "test", ""][i]]) for i, n in enumerate(names)
    ]
    (root / "manifest.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    source = read_manifest(root)
    assert [it.split for it in source.items] == ["train", "val", "test", "train"]
    assert source.classes == ["normal", "viral"]


def test_path_is_the_only_required_column(tmp_path: Path) -> None:
    root, names = _folder(tmp_path)
    (root / "manifest.csv").write_text("path\n" + "\n".join(names) + "\n")
    source = open_source(root)
    assert source.classes == [] and {it.split for it in source.items} == {"train"}
    assert len({it.patient for it in source.items}) == 4 and len({it.study for it in source.items}) == 4
    images = load_images(source, source.items, 32, progress=False)
    assert images.labels.tolist() == [-1, -1, -1, -1] and not images.labelled


def test_an_empty_label_is_unlabelled_not_a_class(tmp_path: Path) -> None:
    root, names = _folder(tmp_path)
    (root / "m.csv").write_text("path,label\n" + "\n".join(f"{n},{'normal' if i else ''}" for i, n in enumerate(names)))
    source = read_manifest(root, root / "m.csv")
    assert source.classes == ["normal"]
    assert load_images(source, source.items, 32, progress=False).labels.tolist() == [-1, 0, 0, 0]


def test_bad_rows_are_all_reported_with_their_row_number(tmp_path: Path) -> None:
    root, names = _folder(tmp_path)
    body = [f"{names[0]},train", f"{names[1]},holdout", ",train", "gone.png,test", f"{names[2]},TEST"]
    (root / "manifest.csv").write_text("path,split\n" + "\n".join(body) + "\n")
    with pytest.raises(DataError) as info:
        read_manifest(root)
    message = str(info.value)
    assert "3 row(s) cannot be used" in message
    assert "row 3: unknown split 'holdout'" in message and "row 4: empty path" in message
    assert "row 5: gone.png not found" in message


def test_a_row_that_does_not_decode_is_named(tmp_path: Path) -> None:
    root, names = _folder(tmp_path, 2)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "manifest.csv").write_text("path\n" + "\n".join([*names, "broken.png"]) + "\n")
    source = read_manifest(root)
    with pytest.raises(DataError, match=r"row 4: broken.png does not decode"):
        load_images(source, source.items, 32, progress=False)


def test_a_manifest_without_path_says_which_columns_it_has(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(DataError, match="no 'path' column.*file, label"):
        read_manifest(tmp_path)


def test_patient_split_keeps_each_patient_on_one_side() -> None:
    patients = [f"p{i // 3}" for i in range(60)]
    train, val = patient_split(patients, 0.25, seed=1)
    assert sorted(train + val) == list(range(60))
    assert not {patients[i] for i in train} & {patients[i] for i in val}
    assert len({patients[i] for i in val}) == 5
