"""Compiled programs kept on disk between processes (JAX's persistent compilation cache).

A run compiles one program per shape of batch (docs/semantics.md §13): seconds to tens of
seconds, paid again by every new process. JAX can keep the compiled executables in a folder
and load them instead of compiling when the same program (same computation, shapes, dtypes,
devices, JAX version and flags) is asked for again. :func:`enable_compilation_cache` switches
that on with a folder of this project's choosing; the command line does it by default
(``compilation_cache`` in a run configuration). Tracing and lowering still happen in every
process: the cache saves the XLA compilation, the larger part.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["default_cache_dir", "enable_compilation_cache"]

ENV_DIR = "FUSED_DYNAMICS_CACHE_DIR"


def default_cache_dir() -> Path:
    """The folder used when none is given.

    ``$FUSED_DYNAMICS_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/fused_dynamics/jax``, else
    ``~/.cache/fused_dynamics/jax`` (the XDG base-directory convention).
    """
    own = os.environ.get(ENV_DIR)
    if own:
        return Path(own).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fused_dynamics" / "jax"


def enable_compilation_cache(
    directory: str | os.PathLike | None = None, *, min_compile_time: float = 0.2
) -> Path:
    """Keep compiled programs in ``directory`` and load them in later processes.

    Sets JAX's persistent compilation cache (``jax_compilation_cache_dir``); see JAX's
    "Persistent compilation cache" guide. Entries are new files named by a hash of the
    program; nothing else in the folder is read, changed or removed. The folder grows with
    every new shape of batch; delete it to reclaim the space.

    Parameters
    ----------
    directory : path, optional
        Default: the folder JAX already uses when one is set (``JAX_COMPILATION_CACHE_DIR`` or
        ``jax.config``), else :func:`default_cache_dir`. Created when missing.
    min_compile_time : float, default 0.2
        Seconds: programs that compiled faster than this are not kept (reading a file would
        save little).

    Returns
    -------
    Path
        The folder in use.

    Raises
    ------
    ValueError
        ``directory`` is a file or cannot be created, or ``min_compile_time`` is negative or
        not finite.
    """
    if not (isinstance(min_compile_time, int | float) and 0 <= min_compile_time < float("inf")):
        raise ValueError(
            "enable_compilation_cache: min_compile_time must be a finite number of seconds "
            f">= 0, got {min_compile_time!r}."
        )
    if directory is None:
        current = jax.config.jax_compilation_cache_dir
        path = Path(current) if current else default_cache_dir()
    else:
        path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"enable_compilation_cache: directory {str(path)!r} is a file, not a folder."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"enable_compilation_cache: cannot create directory {str(path)!r} ({exc.strerror})."
        ) from None
    from jax.experimental.compilation_cache import compilation_cache

    path = path.resolve()
    if jax.config.jax_compilation_cache_dir != str(path):
        compilation_cache.set_cache_dir(str(path))
        compilation_cache.reset_cache()  # a cache opened on another folder is reopened here
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time))
    return path
