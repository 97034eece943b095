"""The prepared dataset on disk: data/prepared/{train,val,test}.npz and meta.json.

Images are kept as uint8 (8x smaller than float64) and scaled at load time; meta.json records
the split and the sha256 of every file, which :func:`load` verifies, and then what the hash
cannot vouch for: an archive that opens, uint8 images of 28 x 28, labels 0..9, the recorded
count (a file rewritten with its hash updated passes the hash).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from omegaconf import OmegaConf

from birnn.data import IMAGE_SHAPE, DataError, check_label_range, read_manifest, sha256_file
from pipeline import files
from pipeline.paths import CONF_DIR, project_path

SPLITS = ("train", "val", "test")
META = "meta.json"


def write(folder: Path, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
          meta: dict) -> dict:
    """Write the three splits and meta.json into ``folder`` (an empty staging folder)."""
    digests = {}
    for split in SPLITS:
        images, labels = splits[split]
        path = folder / f"{split}.npz"
        files.save_npz(path, {"images": images.astype(np.uint8), "labels": labels.astype(np.int64)})
        digests[path.name] = sha256_file(path)
    meta = {**meta, "counts": {split: int(len(splits[split][1])) for split in SPLITS},
            "storage": "images uint8 0..255 (N, 28, 28), labels int64 (N,); "
                       "scaled to [0, 1] at load with birnn.data.scale_pixels",
            "files_sha256": digests}
    files.write_json(folder / META, meta)
    return meta


def read_meta(folder: Path, dataset: str | None = None) -> dict:
    """meta.json of ``folder``; with ``dataset``, it must be that dataset's."""
    path = folder / META
    prepare = f"python -m pipeline.stages.prepare data={dataset or '<dataset>'}"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file: run the prepare stage first ({prepare})") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable: {exc}") from None
    files.check_shape(path, meta, {"dataset": str, "files_sha256": dict},
                      f"rerun the prepare stage ({prepare})", DataError)
    if dataset is not None and meta.get("dataset") != dataset:
        raise DataError(f"{path}: holds {meta.get('dataset')!r} data, not {dataset!r} (the "
                        f"configured dataset): set dataset={meta.get('dataset')} to use it, or "
                        f"run {prepare}")
    if dataset is not None:
        check_raw_files(path, meta, prepare)
    return meta


def committed_manifest(dataset: str) -> str | None:
    """The manifest conf/data/<dataset>.yaml names (relative to the project), if any."""
    config = CONF_DIR / "data" / f"{dataset}.yaml"
    return OmegaConf.load(config).get("manifest") if config.is_file() else None


def check_raw_files(path: Path, meta: dict, prepare: str) -> None:
    """The raw files meta.json records are the ones its dataset's committed manifest lists.
    Else prepared data of other files under that name (data=mnist pointed at Fashion-MNIST's
    files and manifest, or its recorded checksums edited) would train and be reported as that
    dataset."""
    raw = meta.get("raw_files")
    manifest = committed_manifest(meta["dataset"])
    if manifest is None or raw is None:
        # A dataset of one's own (no committed manifest), or data not made by the prepare
        # stage (which always records its raw files): nothing to hold it to.
        return
    recorded = raw.get("sha256") if isinstance(raw, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    listed = read_manifest(project_path(manifest))
    if recorded != listed:
        differs = sorted(set(listed) ^ set(recorded) or
                         {name for name in listed if listed[name] != recorded[name]})
        raise DataError(f"{path}: says {meta['dataset']!r}, but the raw files it records are "
                        f"not the ones {manifest} lists ({differs[0]} differs): "
                        f"prepare it again ({prepare})")


def fingerprint(meta: dict) -> str:
    """One sha256 standing for the whole prepared dataset (for an MLflow tag)."""
    listing = "".join(f"{name} {digest}\n" for name, digest in sorted(meta["files_sha256"].items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def check_arrays(path: Path, images: np.ndarray, labels: np.ndarray,
                 count: int | None = None) -> None:
    """What the training and testing code assumes of a split, checked where it is read."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: images are {images.dtype} {images.shape}, expected uint8 "
                        f"(N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}): rerun the prepare stage")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
        raise DataError(f"{path}: labels are {labels.dtype} {labels.shape}, expected integers "
                        f"({len(images)},): rerun the prepare stage")
    if count is not None and len(images) != count:
        raise DataError(f"{path}: {len(images)} samples, meta.json records {count}: "
                        "rerun the prepare stage")
    check_label_range(labels, 10, where=str(path))


def load(folder: Path, split: str, meta: dict, limit: int | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of one split, checksum-verified.

    ``limit`` keeps only the first N samples (the quick preset); the split is already shuffled.
    """
    path = folder / f"{split}.npz"
    expected = meta.get("files_sha256", {}).get(path.name)
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"{path}: sha256 {actual} differs from {expected} recorded in "
                        f"{folder / META}: rerun the prepare stage")
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: unreadable: {reason}: rerun the prepare stage") from None
    check_arrays(path, images, labels, meta.get("counts", {}).get(split))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels
