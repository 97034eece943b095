"""Pinned numerics: the same bytes on every x86-64 machine with AVX2.

numpy dispatches its ufunc loops (``exp`` and ``log`` of the softmax, ``tanh`` of the cells)
to the widest SIMD code the CPU has, and OpenBLAS picks its matrix kernels per CPU. On an
AVX-512 CPU both round some results differently in the last bit from an AVX2 CPU, and 100
epochs of SGD amplify that into other accuracies. Pinned, both run the AVX2 code everywhere:
numpy's ``X86_V4`` (AVX-512) dispatch target is turned off (``NPY_DISABLE_CPU_FEATURES``) and
OpenBLAS runs its Haswell kernels (``OPENBLAS_CORETYPE``). That is the narrowest pin that
reproduces the committed outputs, which an AVX2 machine made; it costs speed only where
AVX-512 is there (docs/architecture.md, "Numerics").

Both settings are read once, when numpy loads, so :func:`pin_environment` must run before
anything imports numpy: ``birnn/__init__.py`` calls it first, and child processes (sweep
workers, Slurm jobs, DVC's queue) inherit the environment it set. ``BIRNN_NUMERICS=native``
in the environment leaves the CPU's own kernels (faster on AVX-512, not bit-reproducible
across machines). :func:`current` says what the loaded numpy actually runs, and
:func:`require` refuses a process whose numpy was loaded before the pin.

This module must not import numpy at import time.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from functools import lru_cache

MODE_ENV = "BIRNN_NUMERICS"
MODES = ("pinned", "native")
# The pin: numpy's AVX-512 dispatch target off, OpenBLAS's AVX2 (Haswell) kernels.
BLAS_KERNEL = "Haswell"
PIN = {"OPENBLAS_CORETYPE": BLAS_KERNEL, "NPY_DISABLE_CPU_FEATURES": "X86_V4"}
# numpy's dispatch targets above AVX2: a pinned numpy runs none of them.
_AVX512_TARGETS = ("X86_V4", "AVX512")
# The variables the pin replaces, as the process found them: a native child gets them back.
_OUTER = {name: os.environ.get(name) for name in (*PIN, "NPY_ENABLE_CPU_FEATURES")}


class NumericsError(RuntimeError):
    """The process cannot run the numerics it was asked for; the message is one line."""


def requested_mode() -> str:
    """``pinned`` unless the environment says ``BIRNN_NUMERICS=native``."""
    mode = os.environ.get(MODE_ENV, "pinned").strip() or "pinned"
    if mode not in MODES:
        raise NumericsError(f"{MODE_ENV}={mode!r}: must be one of {', '.join(MODES)}")
    return mode


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux's /proc/cpuinfo), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def unpinnable_reason() -> str | None:
    """Why this machine cannot run the pinned (AVX2) code, or None if it can."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"this CPU is {machine or 'unknown'}, not x86-64"
    flags = cpu_flags()
    if flags is None:
        return f"its CPU flags cannot be read on {platform.system() or 'this system'}"
    if not {"avx2", "fma"} <= flags:
        return "this x86-64 CPU has no AVX2"
    return None


def pin_environment() -> None:
    """Set the pin in the environment, if numpy has not been loaded yet, the mode is pinned
    and the CPU can run it; whatever the environment said before (an outer
    ``OPENBLAS_CORETYPE`` or ``NPY_DISABLE_CPU_FEATURES`` included) is replaced."""
    if "numpy" in sys.modules:
        return  # too late: require() tells whether it was pinned anyway
    try:
        mode = requested_mode()
    except NumericsError:
        return  # require() says so, in one line, where the process can report it
    if mode != "pinned" or unpinnable_reason() is not None:
        return
    os.environ.pop("NPY_ENABLE_CPU_FEATURES", None)  # numpy refuses it beside the other
    os.environ.update(PIN)


def environment(mode: str) -> dict[str, str]:
    """This process's environment for a child process that runs ``mode``: ``pinned`` pins
    itself when it imports birnn; ``native`` gets the variables the pin replaced back as the
    process found them."""
    env = {**os.environ, MODE_ENV: mode}
    if mode == "native":
        for name, value in _OUTER.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
    return env


@dataclass(frozen=True)
class Numerics:
    """What the loaded numpy runs: ``mode`` is ``pinned`` (the AVX2 code, the committed
    bytes), ``native`` (the CPU's own kernels, asked for) or ``unpinned`` (asked for the pin,
    but this machine cannot run it: ``reason`` says why)."""

    mode: str
    blas: str        # "OpenBLAS 0.3.31 Haswell"
    dispatch: str    # numpy's dispatch targets in use, widest first: "X86_V3 baseline(X86_V2)"
    cpu: str         # the CPU's model name
    reason: str = ""

    def tags(self) -> dict[str, str]:
        """The run tags that record it (MLflow)."""
        tags = {"numerics": self.mode, "numerics.blas": self.blas,
                "numerics.numpy_dispatch": self.dispatch, "numerics.cpu": self.cpu}
        if self.reason:
            tags["numerics.reason"] = self.reason
        return tags


def _blas() -> tuple[str, str]:
    """(description, kernel) of the BLAS numpy uses, from threadpoolctl."""
    from threadpoolctl import threadpool_info

    import numpy  # noqa: F401  (loads its BLAS, so that threadpoolctl sees it)

    for info in threadpool_info():
        if info.get("user_api") == "blas":
            kernel = info.get("architecture") or ""
            name = {"openblas": "OpenBLAS", "mkl": "MKL"}.get(info.get("internal_api"),
                                                              str(info.get("internal_api")))
            return " ".join(filter(None, (name, info.get("version"), kernel))), kernel
    return "none found", ""


def _dispatch() -> tuple[list[str], bool]:
    """(numpy's dispatch targets in use, widest first; whether every ufunc loop runs the
    widest one at most AVX2), from numpy.lib.introspect."""
    from numpy.lib.introspect import opt_func_info

    in_use: set[str] = set()
    at_avx2 = True
    for signatures in opt_func_info().values():
        for loop in signatures.values():
            current, available = loop["current"], loop["available"].split()
            in_use.add(current)
            widest_avx2 = next((t for t in available if not t.startswith(_AVX512_TARGETS)),
                               None)
            at_avx2 = at_avx2 and current == widest_avx2
    return sorted(in_use, key=_target_rank), at_avx2


def _target_rank(target: str) -> tuple[int, str]:
    order = ("AVX512", "X86_V4", "X86_V3", "baseline")
    return next((i for i, prefix in enumerate(order) if target.startswith(prefix)),
                len(order)), target


def current() -> Numerics:
    """What this process's numpy runs (loads numpy)."""
    blas, kernel = _blas()
    targets, at_avx2 = _dispatch()
    mode = requested_mode()
    reason = ""
    if mode == "pinned":
        reason = unpinnable_reason() or ""
        if reason:
            mode = "unpinned"
        elif not (at_avx2 and kernel == BLAS_KERNEL):
            mode = "unpinned"
            reason = "numpy was loaded before birnn could pin it"
    return Numerics(mode, blas, " ".join(targets), cpu_model(), reason)


def require(mode: str | None = None) -> Numerics:
    """This process's numerics, checked against ``mode`` (default: the environment's).

    Raises NumericsError, in one line, where the pin was asked for and the machine can run
    it, but numpy was loaded unpinned (numpy imported before birnn; an outer process that
    pinned nothing); or where the process runs another mode than ``mode``. A machine that
    cannot run the pin at all is not refused: the result's mode is ``unpinned`` and its
    ``reason`` says why, for the caller to say and record."""
    state = current()
    wanted = mode or requested_mode()
    if wanted not in MODES:
        raise NumericsError(f"numerics={wanted!r}: must be one of {', '.join(MODES)}")
    running = "pinned" if state.mode in ("pinned", "unpinned") else "native"
    if wanted != running:
        raise NumericsError(
            f"numerics={wanted} but this process runs {running} numerics, which are chosen "
            f"before numpy loads: set {MODE_ENV}={wanted} in the environment (or give "
            f"numerics={wanted} on the command line)")
    if state.mode == "unpinned" and unpinnable_reason() is None:
        raise NumericsError(
            f"numpy was loaded before birnn could pin its numerics (BLAS {state.blas}, numpy "
            f"dispatch {state.dispatch}), so the results would not be the same bytes on "
            f"another machine: import birnn before numpy, or set "
            f"{' '.join(f'{k}={v}' for k, v in PIN.items())} in the environment; or set "
            f"{MODE_ENV}=native for this CPU's own kernels")
    return state
