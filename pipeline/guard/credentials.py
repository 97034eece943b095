"""Credentials never ride in a URI: a tracking URI that carries them is refused before anything
is written, so no file, run, log or error line can hold them.

MLflow reads a server's credentials from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD
(basic auth) or MLFLOW_TRACKING_TOKEN (bearer token) itself; a database store's password
belongs in libpq's passfile (``?passfile=``) or PGPASSWORD. What counts as a credential in a
URI: user info with a password (``user:password@``; for HTTP any user info, which is then a
token), and a token-like query parameter (``token=``, ``access_token=``, ``api_key=``,
``password=``, a signature...). The text is judged without parsing the URI as a URL, because a
password may hold ``/``, ``?`` or ``#`` unencoded, which would end a URL's user info early.

The entry wrapper checks the command line and the environment before Hydra creates its output
folder (pipeline.guard.entrypoint), and the composed config before any work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.guard.errors import StageError

ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)\\?:\\?//")   # (Hydra may escape the colon)
_NO_USER_INFO = ("sqlite", "file")  # paths: an @ in them is a folder name, not user info
_SECRET_NAME = re.compile(r"token|passw|pwd|secret|api_?key|access_?key|private_?key|"
                          r"signature|^sig$|credential|auth|^key$", re.IGNORECASE)
_PARAMETER = re.compile(r"[?&;#]([^=&;#?\s\"']*)=")


class CredentialsInURI(StageError):
    """A URI carries a credential. The message names where, never the URI."""


def found_in(text: str) -> str | None:
    """What kind of credential a URI in ``text`` carries (a few words, never the value), or
    None. ``text`` may be a bare URI or an override such as ``tracking.uri=<URI>``."""
    scheme = _SCHEME.search(text)
    if scheme is None:
        return None
    rest = text[scheme.end():]
    name = scheme.group(1).lower()
    if name not in _NO_USER_INFO and "@" in rest:
        user_info = rest.rsplit("@", 1)[0]
        if name in ("http", "https") or ":" in user_info:
            return "user info before '@'"
    for parameter in _PARAMETER.findall(rest):
        if _SECRET_NAME.search(parameter):
            return f"query parameter {parameter!r}"
    return None


def refusal(where: str, what: str) -> CredentialsInURI:
    return CredentialsInURI(
        f"{where} holds a URI with credentials ({what}); refused, nothing was written. Give "
        "a URI without them and export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
        "(basic auth) or MLFLOW_TRACKING_TOKEN (bearer token), which MLflow reads itself (a "
        "database store: its passfile or PGPASSWORD)")


def check_arguments(argv: Iterable[str]) -> None:
    """Raise CredentialsInURI for a command-line argument holding a URI with credentials."""
    for number, argument in enumerate(argv, start=1):
        what = found_in(argument)
        if what is not None:
            key = argument.split("=", 1)[0] if "=" in argument else ""
            named = key if re.fullmatch(r"[+~]{0,2}[\w.\-/@]+", key) else f"argument {number}"
            raise refusal(f"the command line ({named})", what)


def check_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Raise CredentialsInURI if $MLFLOW_TRACKING_URI (or $MLFLOW_REGISTRY_URI) carries one."""
    for name in ENV_VARS:
        what = found_in(environ.get(name, ""))
        if what is not None:
            raise refusal(f"${name}", what)


def _strings(value: Any, key: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, Mapping):
        for name, item in value.items():
            yield from _strings(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _strings(item, f"{key}[{index}]")
    elif isinstance(value, str):
        yield key, value


def extra_config_dirs(argv: Iterable[str]) -> list[Path]:
    """The folders given to Hydra with ``--config-dir``/``-cd`` on the command line."""
    argv, found = list(argv), []
    for index, argument in enumerate(argv):
        if argument in ("--config-dir", "-cd") and index + 1 < len(argv):
            found.append(Path(argv[index + 1]))
        elif argument.startswith("--config-dir="):
            found.append(Path(argument.split("=", 1)[1]))
    return found


def check_config_files(config_dirs: Iterable[Path]) -> None:
    """Raise CredentialsInURI if a value in a YAML file of ``config_dirs`` holds a URI with
    credentials: checked before Hydra composes them and copies the result to .hydra/."""
    from omegaconf import OmegaConf

    for path in sorted(p for folder in config_dirs for p in Path(folder).rglob("*.yaml")):
        try:
            values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception:  # a broken file: Hydra reports it when it composes
            continue
        for key, text in _strings(values):
            what = found_in(text)
            if what is not None:
                raise refusal(f"config file {path} ({key})", what)


def check_config(cfg) -> None:
    """Raise CredentialsInURI if a value of the composed config (a DictConfig or a mapping),
    interpolations resolved, holds a URI with credentials."""
    from omegaconf import DictConfig, OmegaConf

    values = cfg
    if isinstance(cfg, DictConfig):
        try:
            values = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an unresolvable value: validation reports it; check what is there
            values = OmegaConf.to_container(cfg, resolve=False)
    for key, text in _strings(values):
        what = found_in(text)
        if what is not None:
            raise refusal(f"config value {key}", what)
