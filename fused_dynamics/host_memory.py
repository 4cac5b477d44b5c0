"""Host memory that compiled programs get back on their next call (glibc's malloc settings).

On the CPU, XLA allocates a program's temporaries with ``malloc`` at every call and frees them
when the call returns. glibc serves a block above its largest mmap threshold (32 MiB) with a
fresh ``mmap`` and unmaps it on free, and the worker threads of XLA have arenas of their own
that give whole heaps back to the kernel when they empty. So a program with large temporaries
(the dense pair blocks of a batch, a chunk of an inflight run) faults every page of them in
again at every call, and the kernel zeroes each one: 8,500 page faults per chunk of issue 13's
W4 workload, 2-4 % of its inflight run's time, and more of a short relaxation whose temporaries
are hundreds of megabytes (docs/concepts.md, "Inflight batching and sinks").

:func:`reuse_host_memory` sets glibc's allocator so that freed memory stays in the process
and is handed out again: one arena for every thread (``M_ARENA_MAX`` 1), no block served by
``mmap`` (``M_MMAP_MAX`` 0), and free memory at the top of the heap given back to the kernel
only above 2 GiB (``M_TRIM_THRESHOLD``). These are the settings of the environment variables
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` (glibc's ``mallopt(3)``),
made from inside the process. ``M_ARENA_MAX`` acts only on threads that have no arena yet,
and a thread's own arena grows in heaps of at most 64 MiB, so a larger block there is still
served by ``mmap`` whatever the settings: they must be made before JAX starts its backend (its
first computation) and before any other thread has allocated (a tqdm progress bar's monitor
thread, or a library that starts threads at import): a script calls the function first thing.
The function checks both (the backend, and the allocator's own count of its arenas from
``malloc_info``) and raises rather than report settings that would not reach XLA's threads.

What they cost: the process keeps its peak host memory instead of giving it back (free memory
below the top of the heap is never returned), every thread allocates from one arena, and a freed
block that small allocations have split is not found whole again, so the heap grows by the size
of the temporaries at some calls before it settles, and the peak itself rises: a program with
one 64 MB temporary settled 110-410 MB above the same process without the settings (six runs,
three of them a reviewer's), with growth as late as its 31st-40th call in one run. So importing
:mod:`fused_dynamics` never makes them; the command line makes them when
``$FUSED_DYNAMICS_REUSE_HOST_MEMORY`` is ``1`` (or ``true``, ``yes``, ``on``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import warnings

__all__ = [
    "ENV_REUSE",
    "backend_started",
    "host_memory_settings",
    "malloc_arena_count",
    "reuse_host_memory",
    "reuse_host_memory_if_asked",
]

ENV_REUSE = "FUSED_DYNAMICS_REUSE_HOST_MEMORY"  # 1/true/yes/on: the programs make them
_ENV_ON = ("1", "true", "yes", "on")
_ENV_OFF = ("", "0", "false", "no", "off")

# name: (mallopt(3) parameter number from glibc's <malloc.h>, value); the trim threshold is
# the largest value mallopt's int takes (2 GiB)
_SETTINGS = {"M_ARENA_MAX": (-8, 1), "M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, 2**31 - 1)}
_made: dict = {}  # name: value of each setting made so far (all of _SETTINGS once complete)
_complete = False  # all of _SETTINGS made: a second call does nothing


def backend_started() -> bool:
    """Whether JAX has started a backend (run a computation) in this process.

    Uses JAX's private ``xla_bridge.backends_are_initialized``; where a JAX version lacks it,
    returns False (the settings are then made without this check).
    """
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def malloc_arena_count() -> int | None:
    """How many arenas glibc's malloc has in this process (``malloc_info``'s ``<heap>`` count).

    1 until a thread other than the main one allocates; each thread that allocates after that
    gets an arena of its own, up to 8 per core, and keeps it, as do threads that reuse it after
    its thread exits. None where the C library is not glibc or the count cannot be read.

    Call it from the main thread, before other threads start: the count allocates (its
    ``open_memstream`` buffer) in the calling thread, so from a thread that had not allocated
    it gives that thread an arena and counts it, and a thread that allocates after the count
    is not in it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.open_memstream.restype = ctypes.c_void_p
        libc.open_memstream.argtypes = [
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):  # pragma: no cover - a glibc without them
        return None
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:  # pragma: no cover - out of memory
        return None
    ok = libc.malloc_info(0, stream) == 0
    libc.fclose(stream)  # flushes: buf and size hold the document
    text = ctypes.string_at(buf, size.value).decode("ascii", "replace")
    libc.free(ctypes.cast(buf, ctypes.c_void_p))
    return text.count("<heap nr=") if ok else None


def reuse_host_memory() -> bool:
    """Make glibc's malloc keep freed host memory for the next call of a compiled program.

    Sets one arena for all threads, no ``mmap``-served blocks and a 2 GiB trim threshold
    (module docstring: why, and what it costs). Call it before the first JAX computation of
    the process, and before any other thread allocates (a tqdm progress bar, a library that
    starts threads at import): threads that have an arena keep it, and later threads are
    handed those arenas. Call it from the main thread, before other threads start: the arena
    count it checks first is taken in the calling thread (from another thread the count's own
    allocation gives that thread an arena, and the call raises), and a thread that allocates
    between the count and the settings is not caught. A second call after the settings were
    made does nothing. With another allocator preloaded (``LD_PRELOAD`` of jemalloc or
    tcmalloc) glibc's settings have no effect, and this call cannot tell.

    Returns
    -------
    bool
        True when the settings are in force (Linux with glibc); False where the C library is
        not glibc (macOS, musl), where there is nothing to set.

    Raises
    ------
    RuntimeError
        JAX's backend has already started in this process, or another thread has already
        allocated (glibc has more than one arena, :func:`malloc_arena_count`): XLA's worker
        threads would allocate from arenas of their own, whose heaps hold at most 64 MiB, so
        larger temporaries would still be served by ``mmap``. The message says which.
    OSError
        glibc refused one of the settings (``mallopt`` returned 0); the message names it and
        the settings made before it (in the order above), which stay made and which
        :func:`host_memory_settings` reports. A later call tries again those not made.

    Examples
    --------
    >>> import fused_dynamics as fd
    >>> fd.reuse_host_memory()  # first thing in the script  # doctest: +SKIP
    True
    """
    global _complete
    if _complete:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if backend_started():
        raise RuntimeError(
            "reuse_host_memory() must be called before JAX's first computation in this "
            "process: JAX's backend has started, and its worker threads keep the allocator "
            "arenas they already have. Call it first thing in the script, or start Python "
            "with MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647."
        )
    arenas = malloc_arena_count()
    if arenas is not None and arenas > 1:
        raise RuntimeError(
            f"reuse_host_memory() must be called before any other thread allocates: glibc's "
            f"malloc already has {arenas} arenas in this process (another thread allocated: "
            "a tqdm progress bar's monitor, a library that starts threads at import, or a "
            "thread that ran and exited), and XLA's threads would be handed those, whose "
            "heaps hold at most 64 MiB: larger blocks there are still served by mmap whatever "
            "the settings. Call it first thing in the script, or start Python with "
            "MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647."
        )
    for name, (param, value) in _SETTINGS.items():
        if name in _made:  # made by an earlier call that glibc refused a later setting
            continue
        if _mallopt(param, value) != 1:
            made = ", ".join(f"{n} = {v}" for n, v in _made.items())
            raise OSError(
                f"glibc's mallopt refused {name} = {value}; "
                + (f"made before it, and still in force: {made}" if made else "none was made")
            )
        _made[name] = value
    _complete = True
    return True


def _mallopt(param: int, value: int) -> int:
    """glibc's ``mallopt(param, value)``: 1 where it made the setting, 0 where it refused."""
    return ctypes.CDLL("libc.so.6").mallopt(param, value)


def reuse_host_memory_if_asked() -> bool:
    """What the project's programs (command line, ``python -m fused_dynamics.demo``) call first.

    :func:`reuse_host_memory` when ``$FUSED_DYNAMICS_REUSE_HOST_MEMORY`` is ``1``, ``true``,
    ``yes`` or ``on`` (any case, surrounding spaces ignored); nothing when it is unset, empty,
    ``0``, ``false``, ``no`` or ``off``. Where the settings cannot be made or can no longer
    reach XLA's threads (a program called from Python after a computation, or after other
    threads allocated, or glibc refused one) it warns and goes on without them.

    Returns
    -------
    bool
        Whether the settings are in force.

    Raises
    ------
    ValueError
        The variable has another value; the message names the variable and the value.

    Warns
    -----
    RuntimeWarning
        Asked, but the settings cannot be made (the reason :func:`reuse_host_memory` gives,
        its ``RuntimeError`` or ``OSError``): "were not made", or, where glibc refused one
        after others were made, "were made only in part", naming those made.
    """
    value = os.environ.get(ENV_REUSE, "").strip()
    if value.lower() in _ENV_OFF:
        return _complete
    if value.lower() not in _ENV_ON:
        raise ValueError(
            f"${ENV_REUSE} is {value!r}: use 1 (or true, yes, on) to make the host-memory "
            "settings, 0 (or false, no, off, or leave it unset) for the default"
        )
    try:
        return reuse_host_memory()
    except (RuntimeError, OSError) as exc:
        outcome = "were made only in part" if _made else "were not made"
        warnings.warn(
            f"${ENV_REUSE} asks for the host-memory settings, but they {outcome}: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def host_memory_settings() -> dict | None:
    """The malloc settings :func:`reuse_host_memory` made in this process, or None.

    Returns
    -------
    dict or None
        ``{name: value}`` of each setting made: all three once the call succeeded, only those
        made before glibc refused one where it raised ``OSError`` (then
        ``len(host_memory_settings()) < 3``); None where none was made.
    """
    return dict(_made) if _made else None
