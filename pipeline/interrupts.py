"""What runs when a command is interrupted (Ctrl-C) before it exits: the hooks that mark
the runs it leaves behind (a sweep's parent run, its jobs' runs) KILLED."""

from __future__ import annotations

import sys
from typing import Callable

_hooks: list[Callable[[], None]] = []


def on_interrupt(hook: Callable[[], None]) -> None:
    _hooks.append(hook)


def run_hooks_and_exit() -> None:
    for hook in _hooks:
        try:
            hook()
        except Exception:  # interrupted twice, or the store is gone: exit regardless
            pass
    print("error: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
