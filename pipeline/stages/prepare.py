"""Stage 1: verify the raw IDX files, split them, write data/prepared/.

    python -m pipeline.stages.prepare [data=fashion_mnist]

Validation is the first 1/12 of a seeded shuffle of the training set (the book's 55,000 /
5,000); test is the official 10,000.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from birnn.data import load_mnist, mnist_files, sha256_file, shuffle_split, verify_manifest
from pipeline import files, prepared_data
from pipeline.guard.entrypoint import stage
from pipeline.guard.errors import ConfigError, StageError
from pipeline.paths import CONF_DIR, project_path

log = logging.getLogger(__name__)


def raw_checksums(data: DictConfig, raw_dir: Path) -> dict:
    """Verify the manifest if one is configured (it must list exactly the files read); else
    record the checksums of the files read."""
    read = sorted(path for split in ("train", "test") for path in mnist_files(raw_dir, split))
    if data.manifest:
        manifest = project_path(data.manifest)
        log.info("verifying %s", manifest)
        return {"verified_against": str(data.manifest),
                "sha256": verify_manifest(manifest, root=raw_dir,
                                          files=[path.name for path in read])}
    log.info("no manifest configured for %s: recording the checksums computed", data.name)
    return {"verified_against": None, "sha256": {path.name: sha256_file(path) for path in read}}


def check_name(data: DictConfig, chosen: str | None) -> None:
    """``data.name`` names the output folder and the dataset downstream: it may name a new
    dataset, never another data config's (``data.name=fashion_mnist`` on MNIST's files)."""
    if data.name != chosen and (CONF_DIR / "data" / f"{data.name}.yaml").is_file():
        raise ConfigError(f"data.name: {data.name!r} is the name of conf/data/{data.name}.yaml, "
                          f"not of data={chosen}: choose it with data={data.name}, or give "
                          "these files a name of their own")


def prepare(cfg: DictConfig) -> None:
    data = cfg.data
    check_name(data, HydraConfig.get().runtime.choices.get("data"))
    raw_dir = project_path(data.raw_dir)
    if not raw_dir.is_dir():
        hint = f": {data.install_hint}" if data.install_hint else ""
        raise StageError(f"{raw_dir}: dataset {data.name!r} not found{hint}")
    checksums = raw_checksums(data, raw_dir)

    log.info("reading %s", raw_dir)
    train_images, train_labels = load_mnist(raw_dir, "train")
    test_images, test_labels = load_mnist(raw_dir, "test")
    train_x, train_y, val_x, val_y = shuffle_split(
        train_images, train_labels, val_fraction=data.val_fraction, seed=data.split_seed)

    target = project_path(cfg.paths.prepared_dir)
    with files.publish_dir(target, "prepared data") as staging:
        meta = prepared_data.write(
            staging,
            {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_images, test_labels)},
            # The raw folder as configured (relative to the project), not resolved: an
            # absolute checkout path would make the prepared data differ per checkout.
            {"dataset": data.name, "source": str(data.raw_dir), "val_fraction": data.val_fraction,
             "split_seed": data.split_seed, "raw_files": checksums},
        )
    counts = meta["counts"]
    log.info("wrote %s: %d train / %d validation / %d test samples of %s",
             target, counts["train"], counts["val"], counts["test"], data.name)


main = stage("prepare")(prepare)

if __name__ == "__main__":
    main()
