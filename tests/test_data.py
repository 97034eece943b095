"""Tests of birnn.data: the shipped MNIST files, malformed inputs, manifests, scaling, splits."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from birnn.data import (
    ChecksumError,
    DataError,
    IDXFormatError,
    load_idx_pair,
    load_mnist,
    one_hot,
    read_idx,
    read_manifest,
    scale_pixels,
    sha256_file,
    shuffle_split,
    verify_manifest,
)

MNIST = Path(__file__).resolve().parent.parent / "data" / "raw" / "mnist"


# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, magic: int | None = None, dims: tuple[int, ...] | None = None,
              extra: bytes = b"", cut: int = 0) -> bytes:
    """IDX bytes for a uint8 array; magic/dims override the header, extra appends, cut drops."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = {1: 2049, 3: 2051}[array.ndim]
    if dims is None:
        dims = array.shape
    header = struct.pack(">i", magic) + struct.pack(f">{len(dims)}i", *dims)
    body = array.tobytes() + extra
    return header + (body[:-cut] if cut else body)


def write(path: Path, data: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def raises(exc_type: type[Exception], fn, *args, phrase: str, path=None, **kwargs) -> str:
    """Call fn, expect exactly exc_type with a one-line message holding path and phrase."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {msg}"
    assert "\n" not in msg
    assert phrase in msg, msg
    if path is not None:
        assert str(path) in msg, msg
    return msg


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)


@pytest.fixture
def labels() -> np.ndarray:
    return np.array([3, 0, 9, 1, 7], dtype=np.uint8)


# ---------------------------------------------------------------- the shipped files


@pytest.fixture(scope="module")
def mnist_train() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(MNIST, "train")


def test_train_split_of_shipped_files(mnist_train):
    images, labels = mnist_train
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert images.min() == 0 and images.max() == 255
    assert np.bincount(labels, minlength=10).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_test_split_of_shipped_files():
    images, labels = load_mnist(MNIST, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_scaled_training_statistics(mnist_train):
    x = scale_pixels(mnist_train[0])
    assert x.dtype == np.float64 and x.shape == (60000, 28, 28)
    assert x.min() == 0.0 and x.max() == 1.0
    assert abs(x.mean() - 0.1306605) < 1e-6
    assert abs(x.std() - 0.3081078) < 1e-6


def test_shipped_manifest_verifies():
    verified = verify_manifest(MNIST / "SHA256SUMS")
    assert sorted(verified) == sorted([
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
    assert verified["t10k-labels-idx1-ubyte.gz"] == (
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b")


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000  # > one 1 MiB chunk
    path = write(tmp_path / "blob", data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- read_idx, good input


def test_raw_idx_reads_identically_to_gz(tmp_path, images, labels):
    for arr, stem in ((images, "img"), (labels, "lab")):
        raw = read_idx(write(tmp_path / f"{stem}.idx", idx_bytes(arr)))
        # gzip detected by magic bytes, not by the name: no .gz suffix here
        gz = read_idx(write(tmp_path / f"{stem}.bin", idx_bytes(arr), compress=True))
        assert raw.dtype == gz.dtype and raw.shape == gz.shape
        np.testing.assert_array_equal(raw, gz)
        np.testing.assert_array_equal(raw, arr)
    assert read_idx(tmp_path / "img.idx").dtype == np.uint8
    assert read_idx(tmp_path / "lab.idx").dtype == np.int64


def test_load_mnist_accepts_unzipped_names(tmp_path, labels):
    images = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(images))
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(labels))
    got_images, got_labels = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    raises(DataError, load_mnist, tmp_path, "train", phrase="no such file",
           path=tmp_path / "train-images-idx3-ubyte.gz")
    raises(DataError, load_mnist, tmp_path, "validation", phrase="split must be")


# ---------------------------------------------------------------- read_idx, bad input


def test_truncated_file(tmp_path, images):
    for compress in (False, True):
        path = write(tmp_path / f"trunc{compress}", idx_bytes(images, cut=1), compress)
        msg = raises(IDXFormatError, read_idx, path, phrase="truncated", path=path)
        assert "5x4x3 = 60" in msg and "has 59" in msg


def test_padded_file(tmp_path, labels):
    path = write(tmp_path / "padded.idx", idx_bytes(labels, extra=b"\x00"))
    msg = raises(IDXFormatError, read_idx, path, phrase="trailing bytes", path=path)
    assert "= 5 bytes" in msg and "has 6" in msg


def test_wrong_magic(tmp_path, images):
    path = write(tmp_path / "magic.idx", idx_bytes(images, magic=2052))
    raises(IDXFormatError, read_idx, path, phrase="unknown magic number 2052", path=path)


def test_header_too_short(tmp_path):
    short_magic = write(tmp_path / "tiny.idx", b"\x00\x00\x08")
    raises(IDXFormatError, read_idx, short_magic, phrase="header too short", path=short_magic)
    # a valid image magic but only one of its three dimensions
    short_dims = write(tmp_path / "dims.idx", struct.pack(">ii", 2051, 5))
    msg = raises(IDXFormatError, read_idx, short_dims, phrase="header too short", path=short_dims)
    assert "16-byte header" in msg


def test_zero_and_negative_dimensions(tmp_path):
    zero = write(tmp_path / "zero.idx", struct.pack(">iiii", 2051, 0, 28, 28))
    raises(IDXFormatError, read_idx, zero, phrase="invalid dimensions 0x28x28", path=zero)
    neg = write(tmp_path / "neg.idx", struct.pack(">ii", 2049, -1) + b"\x00")
    raises(IDXFormatError, read_idx, neg, phrase="invalid dimensions -1", path=neg)


def test_corrupt_gzip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    blob = bytearray(gzip.compress(idx_bytes(arr), mtime=0))
    mid = len(blob) // 2
    blob[mid:mid + 8] = bytes(b ^ 0xFF for b in blob[mid:mid + 8])
    flipped = write(tmp_path / "flipped.gz", bytes(blob))
    raises(IDXFormatError, read_idx, flipped, phrase="corrupt gzip stream", path=flipped)
    # a gzip stream cut short (EOFError inside gzip)
    cut = write(tmp_path / "cut.gz", gzip.compress(idx_bytes(arr), mtime=0)[:mid])
    raises(IDXFormatError, read_idx, cut, phrase="corrupt gzip stream", path=cut)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gz"
    raises(DataError, read_idx, path, phrase="no such file", path=path)


# ---------------------------------------------------------------- load_idx_pair


def test_pair_count_mismatch(tmp_path, images, labels):
    img = write(tmp_path / "img.idx", idx_bytes(images))
    lab = write(tmp_path / "lab.idx", idx_bytes(labels[:4]))
    msg = raises(DataError, load_idx_pair, img, lab, phrase="count mismatch", path=img)
    assert str(lab) in msg and "5 images" in msg and "4 labels" in msg


def test_pair_label_out_of_range(tmp_path, images, labels):
    img = write(tmp_path / "img.idx", idx_bytes(images))
    bad = labels.copy()
    bad[3] = 10
    lab = write(tmp_path / "lab.idx", idx_bytes(bad))
    msg = raises(DataError, load_idx_pair, img, lab, phrase="label out of range", path=lab)
    assert "value 10 at index 3" in msg
    # the same labels are fine with more classes
    assert load_idx_pair(img, lab, num_classes=11)[1][3] == 10


def test_pair_swapped_files(tmp_path, images, labels):
    img = write(tmp_path / "img.idx", idx_bytes(images))
    lab = write(tmp_path / "lab.idx", idx_bytes(labels))
    raises(IDXFormatError, load_idx_pair, lab, img, phrase="expected an image file", path=lab)
    raises(IDXFormatError, load_idx_pair, img, img, phrase="expected a label file", path=img)
    got_images, got_labels = load_idx_pair(img, lab)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.tolist() == labels.tolist()


# ---------------------------------------------------------------- manifests


def make_manifest(tmp_path: Path, lines: list[str]) -> Path:
    return write(tmp_path / "SHA256SUMS", ("\n".join(lines) + "\n").encode())


def test_manifest_binary_marker_and_root(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write(data_dir / "a.bin", b"alpha")
    digest = hashlib.sha256(b"alpha").hexdigest()
    manifest = make_manifest(tmp_path, [f"{digest.upper()} *a.bin", ""])
    assert read_manifest(manifest) == {"a.bin": digest}
    assert verify_manifest(manifest, root=data_dir) == {"a.bin": digest}
    # without root, names are relative to the manifest's folder, where a.bin is absent
    raises(ChecksumError, verify_manifest, manifest, phrase="missing", path=tmp_path / "a.bin")


def test_manifest_checksum_mismatch(tmp_path):
    path = write(tmp_path / "a.bin", b"alpha")
    wrong = hashlib.sha256(b"beta").hexdigest()
    manifest = make_manifest(tmp_path, [f"{wrong}  a.bin"])
    msg = raises(ChecksumError, verify_manifest, manifest, phrase="sha256 mismatch", path=path)
    assert f"expected {wrong}" in msg
    assert f"got {hashlib.sha256(b'alpha').hexdigest()}" in msg


def test_manifest_missing_file(tmp_path):
    write(tmp_path / "a.bin", b"alpha")
    manifest = make_manifest(tmp_path, [
        f"{hashlib.sha256(b'alpha').hexdigest()}  a.bin",
        f"{hashlib.sha256(b'beta').hexdigest()}  b.bin",
    ])
    raises(ChecksumError, verify_manifest, manifest, phrase="missing", path=tmp_path / "b.bin")


def test_manifest_malformed_line(tmp_path):
    good = f"{hashlib.sha256(b'alpha').hexdigest()}  a.bin"
    for bad in ("deadbeef  a.bin", good.replace("  ", "\t"), good[:64]):
        manifest = make_manifest(tmp_path, [good.replace("a.bin", "x.bin"), "", bad])
        raises(DataError, read_manifest, manifest, phrase="line 3: malformed", path=manifest)
        raises(DataError, verify_manifest, manifest, phrase="line 3: malformed", path=manifest)


def test_shipped_manifest_detects_a_changed_copy(tmp_path):
    for name in read_manifest(MNIST / "SHA256SUMS"):
        if "labels" in name:
            shutil.copy(MNIST / name, tmp_path / name)
    lines = [ln for ln in (MNIST / "SHA256SUMS").read_text().splitlines() if "labels" in ln]
    manifest = make_manifest(tmp_path, lines)
    assert len(verify_manifest(manifest)) == 2
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes() + b"\x00")
    raises(ChecksumError, verify_manifest, manifest, phrase="sha256 mismatch", path=target)


# ---------------------------------------------------------------- scaling and one-hot


def test_scale_pixels_dtypes_and_values():
    images = np.array([[[0, 51, 255]], [[102, 204, 1]]], dtype=np.uint8)  # (2, 1, 3)
    for dtype in ("float32", np.dtype(np.float32), np.float64, "float64"):
        x = scale_pixels(images, dtype)
        assert x.dtype == np.dtype(dtype) and x.shape == (2, 1, 3)
        np.testing.assert_allclose(x, images.astype(np.float64) / 255.0, rtol=1e-7)
    assert scale_pixels(images)[0, 0].tolist() == [0.0, 0.2, 1.0]
    raises(DataError, scale_pixels, images, "int64", phrase="must be floating")
    raises(DataError, scale_pixels, images.reshape(2, 3), phrase="(N, rows, cols)")


def test_scale_pixels_keeps_rows_as_time_steps():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    x = scale_pixels(images)
    # time step t of sample n is image row t: x[n, t] == images[n, t] / 255
    np.testing.assert_array_equal(x[1, 2], images[1, 2] / 255.0)


def test_one_hot():
    y = one_hot(np.array([3, 0, 9, 3]))
    assert y.dtype == np.float64 and y.shape == (4, 10)
    expected = np.zeros((4, 10))
    expected[[0, 1, 2, 3], [3, 0, 9, 3]] = 1.0
    np.testing.assert_array_equal(y, expected)
    assert one_hot(np.array([1, 2]), num_classes=3).tolist() == [[0, 1, 0], [0, 0, 1]]
    raises(DataError, one_hot, np.array([0, 10]), phrase="value 10 at index 1")
    raises(DataError, one_hot, np.array([0, -1]), phrase="value -1 at index 1")


# ---------------------------------------------------------------- shuffle_split


def test_split_sizes_and_coverage_book_setting():
    n = 60000
    idx = np.arange(n)
    tr_x, tr_y, va_x, va_y = shuffle_split(idx, idx.copy(), val_fraction=1 / 12, seed=0)
    assert len(tr_x) == len(tr_y) == 55000 and len(va_x) == len(va_y) == 5000
    np.testing.assert_array_equal(tr_x, tr_y)  # images and labels stay paired
    np.testing.assert_array_equal(va_x, va_y)
    assert np.intersect1d(tr_x, va_x).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr_x, va_x])), idx)
    # the validation set is the FIRST 5000 of the shuffled set; training the rest, in order
    perm = np.random.default_rng(0).permutation(n)
    np.testing.assert_array_equal(va_x, perm[:5000])
    np.testing.assert_array_equal(tr_x, perm[5000:])


def test_split_seed_reproducible_and_any_dtype():
    images = np.random.default_rng(2).random((120, 2, 3))
    labels = one_hot(np.arange(120) % 10)
    a = shuffle_split(images, labels, seed=7)
    b = shuffle_split(images, labels, seed=7)
    c = shuffle_split(images, labels, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    assert a[0].shape == (110, 2, 3) and a[1].shape == (110, 10) and a[3].shape == (10, 10)
    assert a[0].dtype == np.float64 and a[1].dtype == np.float64
    # each image keeps its own label row
    row = int(np.flatnonzero((images == a[2][0]).all(axis=(1, 2)))[0])
    np.testing.assert_array_equal(a[3][0], labels[row])


def test_split_val_fraction_bounds():
    idx = np.arange(12)
    tr, _, va, _ = shuffle_split(idx, idx, val_fraction=0.0)
    assert len(va) == 0 and sorted(tr.tolist()) == list(range(12))
    for bad in (1.0, -0.01, 1.5, float("nan")):
        raises(DataError, shuffle_split, idx, idx, val_fraction=bad, phrase="val_fraction")
    raises(DataError, shuffle_split, idx, idx[:11], phrase="differ in length")


def test_a_gzip_bomb_is_refused_after_the_size_its_header_declares(tmp_path):
    # 10 images declared, 200 MB of zeros behind them: a 200 kB file. Decompression stops one
    # byte past the declared size instead of holding 200 MB.
    import tracemalloc
    header = struct.pack(">iiii", 2051, 10, 28, 28)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = compressor.compress(header)
    zeros = bytes(1 << 20)
    for _ in range(200):
        blob += compressor.compress(zeros)
    bomb = write(tmp_path / "bomb.gz", blob + compressor.flush())
    assert bomb.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        msg = raises(IDXFormatError, read_idx, bomb, phrase="trailing bytes", path=bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "header says 10x28x28 = 7840 bytes of data, file has more than 7840" in msg
    assert peak < 10 * 2**20, peak


def test_a_gzip_file_of_exactly_the_declared_size_reads(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    path = write(tmp_path / "ok.gz", gzip.compress(idx_bytes(arr), mtime=0))
    np.testing.assert_array_equal(read_idx(path), arr)
    extra = write(tmp_path / "extra.gz", gzip.compress(idx_bytes(arr) + b"\x00", mtime=0))
    msg = raises(IDXFormatError, read_idx, extra, phrase="trailing bytes", path=extra)
    assert msg.endswith("file has 2353")  # one byte over: the whole stream was read
