"""MNIST-style data: read and validate IDX files, verify checksums, scale, one-hot, split.

Every error is a :class:`DataError` (or subclass) whose message is one line naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import zlib
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

__all__ = [
    "DataError",
    "IDXFormatError",
    "ChecksumError",
    "read_idx",
    "load_idx_pair",
    "sha256_file",
    "read_manifest",
    "verify_manifest",
    "check_label_range",
    "mnist_files",
    "scale_pixels",
    "one_hot",
    "shuffle_split",
    "load_mnist",
]

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
_NDIM = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20

IMAGE_SHAPE = (28, 28)  # rows x columns: what the models read as 28 steps of 28 features
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


class DataError(ValueError):
    """Any problem with the data files or data arrays (missing/unreadable file, bad argument)."""


class IDXFormatError(DataError):
    """An IDX file is malformed: short header, unknown magic, bad dimensions, wrong size, bad gzip."""


class ChecksumError(DataError):
    """A file listed in a manifest is missing or its sha256 does not match."""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _header(path: Path, raw: bytes) -> tuple[int, int, int]:
    """The magic number, the number of dimensions and the header's length, checked."""
    if len(raw) < 4:
        raise IDXFormatError(
            f"{path}: header too short: {len(raw)} bytes, an IDX magic number needs 4"
        )
    magic = int(np.frombuffer(raw, dtype=">i4", count=1)[0])
    if magic not in _NDIM:
        raise IDXFormatError(
            f"{path}: unknown magic number {magic} (0x{magic & 0xFFFFFFFF:08x}), "
            f"expected {IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels)"
        )
    ndim = _NDIM[magic]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(
            f"{path}: header too short: magic {magic} needs a {header_len}-byte header, "
            f"file has {len(raw)} bytes"
        )
    return magic, ndim, header_len


def _gunzip(path: Path, compressed: bytes) -> tuple[bytes, bool]:
    """The decompressed file, but never more than its header declares plus one byte (a small
    gzip that expands to gigabytes is refused as trailing bytes after reading that much), and
    whether it was cut there."""
    stream = zlib.decompressobj(wbits=31)  # gzip framing
    try:
        head = stream.decompress(compressed, 4 + 4 * max(_NDIM.values()))
        if len(head) >= 4 and int.from_bytes(head[:4], "big") in _NDIM:
            _, ndim, header_len = _header(path, head)
            dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big", signed=True)
                    for i in range(ndim)]
            limit = header_len + math.prod(max(d, 0) for d in dims) + 1
        else:
            limit = len(head)  # not IDX: the header check below says so
        data = head + stream.decompress(stream.unconsumed_tail, max(limit - len(head), 1))
        if len(data) < limit and not stream.eof:
            raise EOFError("the stream ends before its end-of-stream marker")
    except (OSError, EOFError, zlib.error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise IDXFormatError(f"{path}: corrupt gzip stream: {reason}") from None
    return data, not stream.eof or bool(stream.unused_data)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) and validate it completely.

    Compression is detected from the gzip magic bytes ``1f 8b``, not from the file name.

    Returns:
        magic 2051 (images): uint8 array of shape (N, rows, cols);
        magic 2049 (labels): int64 array of shape (N,).
        The array is a writable copy.

    Raises:
        DataError: the file does not exist or cannot be read.
        IDXFormatError: corrupt gzip stream, header shorter than required, unknown magic,
            a dimension that is zero or negative (>= 2**31 as unsigned), or a data length
            different from the product of the dimensions (truncated or trailing bytes).
    """
    path = Path(path)
    raw, cut = _read_bytes(path), False
    if raw[:2] == _GZIP_MAGIC:
        raw, cut = _gunzip(path, raw)
    magic, ndim, header_len = _header(path, raw)
    dims = [int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)]
    if any(d <= 0 for d in dims):
        raise IDXFormatError(
            f"{path}: invalid dimensions {'x'.join(str(d) for d in dims)} in header "
            f"(every dimension must be positive)"
        )
    expected = math.prod(dims)
    found = len(raw) - header_len
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes"
        raise IDXFormatError(
            f"{path}: {what}: header says {'x'.join(str(d) for d in dims)} = {expected} "
            f"bytes of data, file has {'more than ' if cut else ''}{found - cut}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header_len).reshape(dims)
    if magic == LABELS_MAGIC:
        return data.astype(np.int64)
    return data.copy()


def load_idx_pair(
    images_path: PathLike, labels_path: PathLike, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image file and its label file and check that they belong together.

    Returns:
        images: uint8 (N, rows, cols); labels: int64 (N,) with values in 0..num_classes-1.

    Raises:
        IDXFormatError: either file is malformed, or is of the wrong kind (labels where
            images are expected or vice versa).
        DataError: the sample counts differ, a label lies outside 0..num_classes-1, or a
            file cannot be read.
    """
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    images = read_idx(images_path)
    if images.ndim != 3:
        raise IDXFormatError(
            f"{images_path}: expected an image file (magic {IMAGES_MAGIC}), "
            f"found a label file (magic {LABELS_MAGIC})"
        )
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise IDXFormatError(
            f"{labels_path}: expected a label file (magic {LABELS_MAGIC}), "
            f"found an image file (magic {IMAGES_MAGIC})"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}, {labels_path}: count mismatch: {len(images)} images "
            f"but {len(labels)} labels"
        )
    check_label_range(labels, num_classes, where=str(labels_path))
    return images, labels


def check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise DataError naming ``where``, the first bad value and its index, unless every
    label lies in 0..num_classes-1."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: label out of range: value {int(labels[i])} at index {i} "
            f"(expected 0..{num_classes - 1}; {bad.size} bad label(s) in all)"
        )


def sha256_file(path: PathLike) -> str:
    """Return the lowercase hex sha256 of a file, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def read_manifest(manifest_path: PathLike) -> dict[str, str]:
    """Parse a manifest in ``sha256sum`` format into {filename: lowercase hex}.

    Each non-blank line is ``<64 hex digits><space><space or *><filename>``; the ``*`` is
    sha256sum's binary-mode marker. Blank lines are skipped. A file name is a plain name in
    the manifest's data folder: a path (``../x``, ``/etc/x``, ``sub/x``) is refused.

    Raises:
        DataError: the manifest is missing, not UTF-8, empty, has a malformed line (the line
            number is given), names a path instead of a file, or lists one file twice.
    """
    manifest_path = Path(manifest_path)
    raw = _read_bytes(manifest_path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{manifest_path}: not a UTF-8 text file") from None
    entries: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line.rstrip("\r"))
        if match is None:
            raise DataError(
                f"{manifest_path}: line {lineno}: malformed, expected "
                f"'<64 hex digits>  <filename>', got {line[:80]!r}"
            )
        digest, name = match.group(1).lower(), match.group(2)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise DataError(f"{manifest_path}: line {lineno}: {name!r} is not a plain file name "
                            "(entries name files in the data folder itself)")
        if name in entries:
            raise DataError(f"{manifest_path}: line {lineno}: {name} is listed twice")
        entries[name] = digest
    if not entries:
        raise DataError(f"{manifest_path}: manifest lists no files")
    return entries


def verify_manifest(manifest_path: PathLike, root: PathLike | None = None,
                    files: list[str] | None = None) -> dict[str, str]:
    """Check every file of a sha256sum manifest; return the verified {filename: hex}.

    File names are resolved relative to ``root``, or to the manifest's folder if ``root`` is
    None. ``files``, if given, are the names that will be read: the manifest must list exactly
    those (a file read but not listed would be used unchecked). Stops at the first failing file.

    Raises:
        ChecksumError: a listed file is missing or its sha256 differs from the manifest, or
            the manifest does not list exactly ``files``.
        DataError: the manifest itself is unreadable or malformed.
    """
    manifest_path = Path(manifest_path)
    entries = read_manifest(manifest_path)
    base = Path(root) if root is not None else manifest_path.parent
    if files is not None:
        unlisted = [name for name in files if name not in entries]
        if unlisted:
            raise ChecksumError(f"{base / unlisted[0]}: not listed in {manifest_path}: every "
                                f"file read must be ({len(unlisted)} unlisted)")
        unread = [name for name in entries if name not in files]
        if unread:
            raise ChecksumError(f"{manifest_path}: lists {unread[0]}, which is not read: the "
                                f"manifest must list exactly the files read ({', '.join(files)})")
    for name, expected in entries.items():
        path = base / name
        if not path.is_file():
            raise ChecksumError(f"{path}: missing: listed in {manifest_path} but not found")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path}: sha256 mismatch: expected {expected}, got {actual}"
            )
    return entries


def scale_pixels(images: np.ndarray, dtype: str | np.dtype = np.float64) -> np.ndarray:
    """Scale pixels to [0, 1] as ``images / 255``, computed in ``dtype``.

    The book scales by the global min and max of each set, (x - min) / (max - min); MNIST
    and Fashion-MNIST sets span 0..255, so that is exactly x / 255, which is what this does
    (no data-dependent statistics, so train and test are scaled identically).

    Args:
        images: (N, rows, cols) pixel values 0..255 (normally uint8).
        dtype: a floating dtype, as a string ("float64", "float32") or np.dtype.

    Returns:
        (N, T, D) array of ``dtype`` with T = rows and D = cols: row t of an image is time
        step t (top to bottom) and its D pixels are the features of that step, so the
        (N, 28, 28) array already is the sequence view; no reshape is needed.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DataError(f"scale_pixels: not a dtype: {dtype!r}") from None
    if not np.issubdtype(dt, np.floating):
        raise DataError(f"scale_pixels: dtype must be floating, got {dt}")
    images = np.asarray(images)
    if images.ndim != 3:
        raise DataError(
            f"scale_pixels: expected images of shape (N, rows, cols), got shape {images.shape}"
        )
    return images.astype(dt) / dt.type(255)


def one_hot(labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Encode integer labels (N,) as a float64 (N, num_classes) matrix of 0s and a single 1."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"one_hot: expected labels of shape (N,), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"one_hot: labels must be integers, got dtype {labels.dtype}")
    check_label_range(labels, num_classes, where="one_hot")
    out = np.zeros((labels.shape[0], num_classes), dtype=np.float64)
    out[np.arange(labels.shape[0]), labels] = 1.0
    return out


def shuffle_split(
    images: np.ndarray,
    labels: np.ndarray,
    val_fraction: float = 1 / 12,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle the samples and split off a validation set, as the book does.

    The permutation is ``np.random.default_rng(seed).permutation(N)``. The validation set is
    the FIRST ``round(N * val_fraction)`` samples of the shuffled set (book: 60000 / 12 =
    5000); training keeps the rest, in shuffled order. Works for arrays of any dtype and
    trailing shape (e.g. uint8 or float images; int or one-hot labels).

    Returns:
        (train_images, train_labels, val_images, val_labels): first axis N - n_val for the
        training pair and n_val for the validation pair; other axes unchanged.

    Raises:
        DataError: val_fraction not in [0, 1), lengths of images and labels differ, or the
            training part would be empty.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if not (isinstance(val_fraction, (int, float, np.floating, np.integer))
            and 0.0 <= float(val_fraction) < 1.0):
        raise DataError(f"shuffle_split: val_fraction must be in [0, 1), got {val_fraction!r}")
    n = images.shape[0] if images.ndim else 0
    if labels.ndim == 0 or labels.shape[0] != n:
        raise DataError(
            f"shuffle_split: images and labels differ in length: "
            f"{n} vs {labels.shape[0] if labels.ndim else 'scalar'}"
        )
    n_val = int(round(n * float(val_fraction)))
    if n > 0 and n_val >= n:
        raise DataError(
            f"shuffle_split: val_fraction {val_fraction} of {n} samples leaves no training data"
        )
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / stem}.gz: no such file (nor {root / stem})")


def mnist_files(root: PathLike, split: str) -> tuple[Path, Path]:
    """The image and label files :func:`load_mnist` reads for ``split``: the ``.gz`` names,
    else the same names without ``.gz``."""
    if split not in _SPLIT_FILES:
        raise DataError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    images_stem, labels_stem = _SPLIT_FILES[split]
    return _find(Path(root), images_stem), _find(Path(root), labels_stem)


def load_mnist(root: PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load the "train" or "test" split of MNIST (or Fashion-MNIST) from a folder.

    Looks for ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz`` (``t10k-*`` for
    "test"), falling back to the same names without ``.gz`` (:func:`mnist_files`). Checksums
    are not verified here; use :func:`verify_manifest` for that.

    Returns:
        images: uint8 (N, 28, 28); labels: int64 (N,) in 0..9.

    Raises:
        DataError: besides what :func:`load_idx_pair` raises, images of another size than
            28 x 28, which the models cannot read.
    """
    images_path, labels_path = mnist_files(root, split)
    images, labels = load_idx_pair(images_path, labels_path, num_classes=10)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
    return images, labels
