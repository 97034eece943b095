"""Where a stage may write, checked before any work starts (docs/architecture.md, "Safety").

Every folder a stage writes into or replaces is resolved (symlinks followed, ``..`` removed)
and must lie inside one of the project's output areas (models/, metrics/, evaluation/,
reports/, data/prepared/, multirun/, outputs/), inside Hydra's own ``outputs/`` or
``multirun/`` under the working directory, or under a folder listed in $BIRNN_OUTPUT_ROOTS
(absolute paths separated by ``:``; the tests list their temporary folders there). A folder
that a stage replaces whole must not exist, be empty, or hold an output of the same kind
(KINDS): one carrying the marker that :func:`pipeline.files.publish_dir` leaves in what it
writes, naming the kind, or one in a place where the shipped configuration puts that kind.
Anything else is a one-line :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from pipeline.guard.errors import ConfigError, StageError
from pipeline import paths

OUTPUT_AREAS = ("models", "metrics", "evaluation", "reports", "data/prepared", "multirun",
                "outputs")
HYDRA_AREAS = ("outputs", "multirun")  # Hydra's defaults, relative to the working directory
ROOTS_ENV = "BIRNN_OUTPUT_ROOTS"
MARKER = ".birnn-output"  # in every folder publish_dir writes; ignored by git and DVC

# The kinds of whole-folder output, and where the shipped configuration puts each (a * is one
# folder name: a dataset, a model, a sweep id). Outputs restored by DVC or git (and those
# written before folders were marked) carry no marker; these places are ours anyway, for
# their own kind only: a stage never replaces another stage's output.
KINDS = {
    "prepared data": ("data/prepared/*",),
    "model": ("models/*/*",),
    "evaluation": ("evaluation/*",),
    "report": ("reports/table_19_12/*", "reports/sweeps/*", "reports/findings"),
}
KIND_OF_KEY = {"paths.prepared_dir": "prepared data", "paths.models_dir": "model",
               "paths.evaluation_dir": "evaluation", "paths.reports_dir": "report"}


# The staging folders of the outputs being written (files.publish_dir), and their targets:
# beside a checked target, so outside an area when the target is one (data/.prepared.new.*).
staging_folders: dict[Path, Path] = {}


def allowed_roots() -> list[Path]:
    roots = [paths.PROJECT_ROOT / area for area in OUTPUT_AREAS] + list(staging_folders)
    roots += [Path.cwd() / area for area in HYDRA_AREAS]
    for item in os.environ.get(ROOTS_ENV, "").split(os.pathsep):
        if item.strip():
            root = Path(item.strip()).expanduser()
            if not root.is_absolute():
                raise ConfigError(f"{ROOTS_ENV}: {item!r} is not an absolute path")
            roots.append(root)
    return [root.resolve() for root in roots]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve(key: str, value: str | os.PathLike, base: Path | None = None) -> Path:
    """``value`` (relative to ``base``, by default the project root) resolved, if it lies
    inside an output area; else a ConfigError naming ``key``."""
    if not str(value).strip():
        raise ConfigError(f"{key}: must not be empty")
    path = (base / value if base is not None else paths.project_path(value)).resolve()
    if not any(_inside(path, root) for root in allowed_roots()):
        raise ConfigError(
            f"{key}: {str(value)!r} resolves to {path}, outside the output folders "
            f"({', '.join(a + '/' for a in OUTPUT_AREAS)} of the project; add a folder to "
            f"${ROOTS_ENV} to write elsewhere)")
    return path


def _is_default_location(path: Path, kind: str) -> bool:
    root = paths.PROJECT_ROOT.resolve()
    if root not in path.parents:
        return False
    parts = path.relative_to(root).parts
    return any(len(parts) == len(place.split("/"))
               and all(fnmatchcase(part, pattern) for part, pattern in zip(parts, place.split("/")))
               for place in KINDS[kind])


def output_holding(path: Path) -> str | None:
    """The kind of stage output that ``path`` lies in or is (a default place, or a folder
    marked by the stage that wrote it), or None."""
    for folder in (path, *path.parents):
        kind = marked_kind(folder) if folder.is_dir() else None
        if kind and kind != UNNAMED:
            return kind
        found = next((k for k in KINDS if _is_default_location(folder, k)), None)
        if found:
            return found
    return None


def check_not_inside_output(key: str, path: Path, allowed: str | None = None) -> None:
    """Files written into a folder (Hydra's run folder, the metrics) must not land inside a
    stage output of another kind (``allowed``: the writer's own kind)."""
    kind = output_holding(path)
    if kind is not None and kind != allowed:
        raise ConfigError(f"{key}: {path} lies in another stage's output ({kind}): refusing "
                          "to write into it; name a folder of its own")


def marker_text(kind: str) -> str:
    return ("Written by the birnn pipeline (pipeline/files.py): a stage writing this kind of "
            f"output may replace this folder whole.\nkind: {kind}\n")


UNNAMED = "unnamed"  # the kind of a marker written before markers named their kind


def marked_kind(path: Path) -> str | None:
    """The kind of output the marker in folder ``path`` names (UNNAMED for an old marker);
    None without a marker."""
    try:
        text = (path / MARKER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return next((line[len("kind: "):] for line in text.splitlines() if line.startswith("kind: ")),
                UNNAMED)


def check_replaceable(key: str, path: Path, kind: str) -> None:
    """A folder a stage is about to replace whole with an output of ``kind``: refuse one this
    pipeline did not write, or wrote as another kind of output."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not an output folder: refusing to replace it")
    written = marked_kind(path)
    if written in (kind, UNNAMED) or _is_default_location(path, kind) or not any(path.iterdir()):
        return
    other = written or next((k for k in KINDS if _is_default_location(path, k)), None)
    if other is not None:
        raise ConfigError(f"{key}: {path} holds another stage's output ({other}), not "
                          f"{kind}: refusing to replace it; name a new or empty folder")
    raise ConfigError(f"{key}: {path} is a non-empty folder this pipeline did not write (no "
                      f"{MARKER} in it): refusing to replace it; name a new or empty folder")


def check_hydra_dir(key: str, value: str) -> None:
    """``hydra.run.dir`` or ``hydra.sweep.dir`` as given on the command line, where Hydra
    takes it: relative to the working directory. An interpolation (``${now:...}``) counts
    from where it starts; ``hydra.sweep.subdir`` must stay inside the sweep's folder."""
    if key == "hydra.sweep.subdir":
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise ConfigError(f"{key}: {value!r} must be a relative path without '..'")
        return
    if re.search(r"\$\{(?!now:)", value):  # resolved only once Hydra has written there
        raise ConfigError(f"{key}: {value!r}: only ${{now:...}} may be interpolated here; "
                          "give the folder itself")
    literal = value.split("${")[0]
    if literal == value:
        path = resolve(key, value, base=Path.cwd())
    else:  # the folder the literal part names (itself if it ends with '/')
        path = resolve(key, (Path.cwd() / literal) if literal.endswith("/") or not literal
                       else (Path.cwd() / literal).parent, base=Path.cwd())
    check_not_inside_output(key, path)


def check_hydra_setting(key: str, value) -> None:
    """Hydra's other places on the command line: its files' subfolder, a log file."""
    if key == "hydra.output_subdir":
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", str(value)) \
                or str(value) in (".", ".."):
            raise ConfigError(f"{key}: {value!r} must be a folder name inside the run's folder "
                              "(no '/', not '..'), or null")
    elif key.startswith(("hydra.job_logging.", "hydra.hydra_logging.")) and \
            key.endswith(".filename"):
        raise ConfigError(f"{key}: Hydra's log goes into the run's folder; choose that folder "
                          "with hydra.run.dir (or hydra.sweep.dir) instead")


def check_writable(output: Output) -> None:
    """A read-only filesystem or a missing permission, found before the work rather than
    after it: the nearest existing folder that the output's files will be created in."""
    folder = output.path.parent if output.replaced else output.path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{output.key}: {folder} is a file, not a folder")
    if os.access(folder, os.W_OK):
        return
    read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    raise StageError(f"{output.key}: {output.path}: cannot write: "
                     f"{'read-only file system' if read_only else 'permission denied'} "
                     f"({folder})")


@dataclass(frozen=True)
class Output:
    key: str  # the configuration key the path comes from, for the error message
    path: Path  # resolved
    replaced: bool  # replaced whole (publish_dir), or only written into


def _check(key: str, value, replaced: bool = False) -> Output:
    output = Output(key, resolve(key, value), replaced)
    if replaced:
        check_replaceable(key, output.path, KIND_OF_KEY[key])
    return output


def _metrics(value) -> Output:
    """The metrics folder: files are written into it, so it must not be another output."""
    output = _check("paths.metrics_dir", value)
    check_not_inside_output(output.key, output.path)
    return output


def _inside_job_folder(key: str, value, job_dir: Path) -> None:
    """Parallel jobs writing one folder would replace each other's files: a sweep job writes
    only under its own folder (conf/train.yaml)."""
    path = paths.project_path(value).resolve()
    if not _inside(path, job_dir.resolve()):
        raise ConfigError(f"{key}: {str(value)!r}: a sweep job writes only under its own folder "
                          f"({job_dir}); leave {key} unset in a sweep (-m)")


# The shipped per-dataset places (conf/paths/default.yaml): the folder after these names the
# dataset whose output it holds.
DATASET_PLACES = (("data", "prepared"), ("models",), ("metrics",), ("evaluation",),
                  ("reports", "table_19_12"))


def dataset_of_place(path: Path) -> str | None:
    """The dataset whose default output folder ``path`` is or lies in, or None."""
    root = paths.PROJECT_ROOT.resolve()
    if root not in path.parents:
        return None
    parts = path.relative_to(root).parts
    for place in DATASET_PLACES:
        if len(parts) > len(place) and parts[:len(place)] == place:
            return parts[len(place)]
    return None


def _check_dataset(output: Output, dataset: str) -> None:
    """A stage of one dataset never writes into another dataset's folders."""
    found = dataset_of_place(output.path)
    if found is not None and found != dataset:
        raise ConfigError(f"{output.key}: {output.path} holds dataset {found}'s output, and this "
                          f"run is dataset={dataset}: refusing to write it; set dataset={found} "
                          "or name a folder of its own")


def stage_outputs(config_name: str, cfg, job_dir: Path | None = None) -> list[Output]:
    """Check what the stage ``config_name`` will write with ``cfg`` (in a sweep job, whose own
    folder is ``job_dir``); return it."""
    outputs = _outputs(config_name, cfg, job_dir)
    if cfg.get("dataset") is not None:
        for output in outputs:
            _check_dataset(output, str(cfg.dataset))
    return outputs


def _outputs(config_name: str, cfg, job_dir: Path | None) -> list[Output]:
    """The folder names below are those the stages use (pipeline/stages/, pipeline/sweeps/)."""
    configured = cfg.get("paths")
    if config_name == "prepare":
        return [_check("paths.prepared_dir", configured.prepared_dir, replaced=True)]
    if config_name == "train" and job_dir is not None:
        for key in ("models_dir", "metrics_dir"):
            _inside_job_folder(f"paths.{key}", configured[key], job_dir)
    if config_name == "train":
        return [_check("paths.models_dir", Path(str(configured.models_dir)) / str(cfg.name),
                       replaced=True),
                _metrics(configured.metrics_dir)]
    if config_name == "evaluate":
        return [_check("paths.evaluation_dir", configured.evaluation_dir, replaced=True),
                _metrics(configured.metrics_dir)]
    if config_name == "compare":
        return [_check("paths.reports_dir",
                       Path(str(configured.reports_dir)) / "table_19_12" / str(cfg.dataset),
                       replaced=True)]
    if configured is not None and "reports_dir" in configured:  # sweep reports, findings
        return [_check("paths.reports_dir", configured.reports_dir)]
    return []
