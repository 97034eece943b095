"""Integrity checks that mean what they say: a manifest covers exactly the files read and names
no path, images the models cannot read stop prepare, and prepared data whose hash was updated
after it was damaged still fails where it is read, in one line."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from birnn.data import ChecksumError, DataError, read_manifest, verify_manifest
from pipeline import prepared_data
from pipeline_testkit import TINY, error_lines, prepare_into, raw_copy, stage
from test_data import idx_bytes



def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- manifests
def test_a_manifest_that_lists_only_some_files_fails_in_one_line(tmp_path):
    raw = raw_copy(tmp_path)
    manifest = raw / "SHA256SUMS"
    manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines()
                                if "t10k-labels" not in line))
    out = tmp_path / "prepared"

    result = prepare_into(raw, out)

    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {raw / 't10k-labels-idx1-ubyte.gz'}: not listed in {manifest}: every file "
        "read must be (1 unlisted)"]
    assert not out.exists()


def test_a_manifest_must_not_list_files_that_are_not_read(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"alpha")
    (tmp_path / "b.bin").write_bytes(b"beta")
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text("".join(f"{sha256(tmp_path / n)}  {n}\n" for n in ("a.bin", "b.bin")))
    assert verify_manifest(manifest, files=["a.bin", "b.bin"]) == {
        "a.bin": sha256(tmp_path / "a.bin"), "b.bin": sha256(tmp_path / "b.bin")}
    with pytest.raises(ChecksumError, match=r"lists b.bin, which is not read"):
        verify_manifest(manifest, files=["a.bin"])
    with pytest.raises(ChecksumError, match=r"c.bin: not listed in"):
        verify_manifest(manifest, files=["a.bin", "b.bin", "c.bin"])


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/a.bin", "..",
                                  "..\\outside.bin"])
def test_a_manifest_entry_is_a_file_of_the_data_folder_never_a_path(tmp_path, name):
    (tmp_path / "outside.bin").write_bytes(b"x")
    data = tmp_path / "data"
    data.mkdir()
    manifest = data / "SHA256SUMS"
    manifest.write_text(f"{sha256(tmp_path / 'outside.bin')}  {name}\n")
    for check in (read_manifest, verify_manifest):
        with pytest.raises(DataError) as info:
            check(manifest)
        assert str(info.value) == (f"{manifest}: line 1: {name!r} is not a plain file name "
                                   "(entries name files in the data folder itself)")


# ----------------------------------------------------------------------------- raw images
def test_images_of_another_size_stop_prepare_in_one_line(tmp_path):
    """IDX files that are valid but hold 27 x 28 images: the models read 28 steps of 28."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 24), ("t10k", 12)):
        images = rng.integers(0, 256, size=(n, 27, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            (raw / f"{prefix}-{kind}-ubyte.gz").write_bytes(
                gzip.compress(idx_bytes(array), mtime=0))
    (raw / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.name}\n"
                                            for p in sorted(raw.glob("*.gz"))))
    out = tmp_path / "prepared"

    result = prepare_into(raw, out)

    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {raw / 'train-images-idx3-ubyte.gz'}: images are 27x28, expected 28x28"]
    assert not out.exists()


# ----------------------------------------------------------------------------- prepared data
@pytest.fixture
def small_prepared(tmp_path) -> Path:
    """A prepared dataset of 30 / 10 / 10 random images, written as the prepare stage does."""
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, size=n).astype(np.int64))
              for split, n in (("train", 30), ("val", 10), ("test", 10))}
    folder = tmp_path / "prepared"
    folder.mkdir()
    prepared_data.write(folder, splits, {"dataset": "mnist", "source": "synthetic"})
    return folder


def damage(folder: Path, split: str, images=None, labels=None, cut: int = 0) -> None:
    """Rewrite one split (other arrays, or its bytes cut short) and record the new hash in
    meta.json, as a tool that 'fixes' the checksum would."""
    path = folder / f"{split}.npz"
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    else:
        with np.load(path) as archive:
            arrays = {"images": archive["images"], "labels": archive["labels"]}
        arrays.update({k: v for k, v in (("images", images), ("labels", labels)) if v is not None})
        np.savez(path, **arrays)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files_sha256"][path.name] = sha256(path)
    (folder / "meta.json").write_text(json.dumps(meta))


def load(folder: Path, split: str):
    return prepared_data.load(folder, split, prepared_data.read_meta(folder))


def test_intact_prepared_data_loads(small_prepared):
    images, labels = load(small_prepared, "train")
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8 and labels.shape == (30,)


@pytest.mark.parametrize("change, message", [
    ({"labels": np.full(30, 10)}, "label out of range: value 10 at index 0 (expected 0..9"),
    ({"labels": np.full(30, -1)}, "label out of range: value -1"),
    ({"images": np.zeros((30, 28, 28))}, "images are float64 (30, 28, 28), expected uint8"),
    ({"images": np.zeros((30, 27, 28), np.uint8)}, "images are uint8 (30, 27, 28), expected"),
    ({"labels": np.zeros(30) + 0.5}, "labels are float64 (30,), expected integers"),
    ({"images": np.zeros((29, 28, 28), np.uint8), "labels": np.zeros(29, np.int64)},
     "29 samples, meta.json records 30"),
    ({"cut": 1000}, "unreadable"),
], ids=["label 10", "label -1", "float pixels", "27 rows", "float labels", "count", "truncated"])
def test_damaged_prepared_data_with_an_updated_hash_fails_where_it_is_read(small_prepared,
                                                                          change, message):
    damage(small_prepared, "train", **change)
    with pytest.raises(DataError) as info:
        load(small_prepared, "train")
    text = str(info.value)
    assert text.startswith(f"{small_prepared / 'train.npz'}: ") and message in text, text
    assert "\n" not in text


def test_a_truncated_prepared_file_stops_training_in_one_line(small_prepared, tmp_path):
    damage(small_prepared, "train", cut=1000)
    result = stage("train", *TINY, f"paths.prepared_dir={small_prepared}",
                   f"paths.models_dir={tmp_path / 'models'}",
                   f"paths.metrics_dir={tmp_path / 'metrics'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", timeout=120)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith(f"error: {small_prepared / 'train.npz'}: unreadable: "), line
    assert line.endswith("rerun the prepare stage")
    assert not (tmp_path / "models").exists()
