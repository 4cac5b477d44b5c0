"""Compiled programs kept on disk between processes (JAX's persistent compilation cache).

A run compiles one program per shape of batch (docs/semantics.md §13): seconds to tens of
seconds, paid again by every new process. JAX can keep the compiled executables in a folder
and load them instead of compiling when the same program (same computation, shapes, dtypes,
devices, JAX version and flags) is asked for again. :func:`enable_compilation_cache` switches
that on with a folder of this project's choosing; the command line does it by default
(``compilation_cache`` in a run configuration), for the duration of a run. Tracing and
lowering still happen in every process: the cache saves the XLA compilation, the larger part.

JAX's cache key does not name the processor: on the CPU a program compiled for one processor's
instruction set and loaded on another can stop the process (SIGILL), and XLA only logs an
error line when it loads it. A home folder is often shared by machines of different kinds, so
this project's own default folders hold one subfolder per kind of processor
(:func:`host_tag`). XLA:CPU (jax 0.10) also logs that error line for two tuning-only flags of
the same processor (``+prefer-no-gather``, ``+prefer-no-scatter``; reported as jax-ml/jax#38445,
where the entries were said to be rejected) on every program it loads: with jax 0.10.1 on this
project's machine the program was loaded all the same (a cache hit, 0.07 s against 0.88 s to
compile).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import jax

__all__ = [
    "cache_settings",
    "check_cache_folder",
    "default_cache_dir",
    "disable_compilation_cache",
    "enable_compilation_cache",
    "host_tag",
    "restore_cache_settings",
]

ENV_DIR = "FUSED_DYNAMICS_CACHE_DIR"
DEFAULT_MIN_COMPILE_TIME = 0.2  # s: reading a file saves little on programs faster than this


def default_cache_dir() -> Path:
    """The folder used when none is given.

    In this order: ``$FUSED_DYNAMICS_CACHE_DIR``; the folder JAX already uses
    (``$JAX_COMPILATION_CACHE_DIR`` or ``jax.config``), when it is a local one;
    ``$XDG_CACHE_HOME/fused_dynamics/jax/<host>``; ``~/.cache/fused_dynamics/jax/<host>``, with
    ``<host>`` the kind of processor (:func:`host_tag`), so that machines sharing a home folder
    never load each other's programs. A folder the user names is used as it is.

    Raises
    ------
    ValueError
        No folder can be named: ``$HOME`` is not set and the user has no home directory.
    """
    own = os.environ.get(ENV_DIR)
    if own:
        return Path(own).expanduser()
    current = jax.config.jax_compilation_cache_dir
    if current and "://" not in current:
        return Path(current).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:
            raise ValueError(
                "no folder for the compilation cache: $HOME is not set and the user has no home "
                f"directory; set ${ENV_DIR} or give a folder."
            ) from None
    return Path(base).expanduser() / "fused_dynamics" / "jax" / host_tag()


def host_tag() -> str:
    """A folder name for this kind of processor.

    The architecture and a digest of the first processor's description in ``/proc/cpuinfo``
    (Linux: model, instruction-set flags, on any architecture), leaving out what changes
    between boots or cores (clock, ids, bogomips, bug and mitigation lists). Without it:
    :mod:`platform`'s processor name, and when that is empty too the machine's name, so that
    two machines never share a folder by default unless their programs can be exchanged.

    Returns
    -------
    str
        E.g. ``x86_64-3f1c0a9b2d4e``.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            block = f.read().split("\n\n")[0].splitlines()
    except OSError:
        block = []
    fields = []
    for line in block:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key and key not in _VOLATILE_CPUINFO:
            fields.append((key, " ".join(sorted(value.split()))))
    described = repr(sorted(fields)) if fields else platform.processor() or platform.node()
    digest = hashlib.sha256(described.encode()).hexdigest()[:12]
    return f"{platform.machine() or 'cpu'}-{digest}"


# /proc/cpuinfo keys that differ between boots, cores or load, not between kinds of processor
_VOLATILE_CPUINFO = frozenset(
    {
        "processor",
        "cpu mhz",
        "bogomips",
        "bogomips per cpu",
        "core id",
        "physical id",
        "siblings",
        "cpu cores",
        "apicid",
        "initial apicid",
        "bugs",
        "power management",
        "microcode",
        "hart",
        "clock",
        "timebase",
        "cpu number",
    }
)


def check_cache_folder(directory: str | os.PathLike | None = None) -> Path:
    """The folder :func:`enable_compilation_cache` would use, checked but not created.

    Raises
    ------
    ValueError
        It is a file, or it cannot be created or written by this user (naming the folder).
    """
    path = default_cache_dir() if directory is None else Path(directory).expanduser()
    path = path.absolute()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"directory {str(path)!r} is a file, not a folder.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"directory {str(path)!r} is not writable by this user.")
        return path
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot create directory {str(path)!r}: {str(parent)!r} is not a writable folder."
        )
    return path


def enable_compilation_cache(
    directory: str | os.PathLike | None = None, *, min_compile_time: float | None = None
) -> Path:
    """Keep compiled programs in ``directory`` and load them in later processes.

    Sets JAX's persistent compilation cache (``jax_compilation_cache_dir``) for this process;
    see JAX's "Persistent compilation cache" guide. Entries are new files named by a hash of
    the program; nothing else in the folder is read, changed or removed. The folder grows with
    every new shape of batch; delete it to reclaim the space. :func:`cache_settings` and
    :func:`restore_cache_settings` undo it.

    Parameters
    ----------
    directory : path, optional
        Default: :func:`default_cache_dir`. Created when missing.
    min_compile_time : float, optional
        Seconds: programs that compiled faster than this are not kept. Default: JAX's
        setting when ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` sets it, else 0.2.

    Returns
    -------
    Path
        The folder in use.

    Raises
    ------
    ValueError
        The folder is a file or cannot be created or written (:func:`check_cache_folder`), or
        ``min_compile_time`` is negative or not a finite number. Nothing is changed then.
    """
    if min_compile_time is None:
        env = os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
        min_compile_time = (
            jax.config.jax_persistent_cache_min_compile_time_secs
            if env
            else DEFAULT_MIN_COMPILE_TIME
        )
    if isinstance(min_compile_time, bool) or not (
        isinstance(min_compile_time, int | float) and 0 <= min_compile_time < float("inf")
    ):
        raise ValueError(
            "enable_compilation_cache: min_compile_time must be a finite number of seconds "
            f">= 0, got {min_compile_time!r}."
        )
    try:
        path = check_cache_folder(directory)
        path.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        why = exc if isinstance(exc, ValueError) else f"{exc.strerror} ({exc.filename})"
        raise ValueError(f"enable_compilation_cache: {why}") from None
    path = path.resolve()
    _set(str(path), float(min_compile_time))
    return path


def disable_compilation_cache() -> None:
    """Compile every time in this process (JAX's persistent compilation cache off)."""
    _set(None, jax.config.jax_persistent_cache_min_compile_time_secs)


def cache_settings() -> tuple:
    """JAX's persistent-cache settings as they are now (for :func:`restore_cache_settings`)."""
    return (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )


def restore_cache_settings(settings: tuple) -> None:
    """Put back what :func:`cache_settings` returned."""
    _set(*settings)


def _set(directory: str | None, min_compile_time: float) -> None:
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time)
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()  # a cache opened on another folder is reopened here
