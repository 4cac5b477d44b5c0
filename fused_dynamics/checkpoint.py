"""Checkpoints of a run: the whole batch (stage state, random-stream positions, step count) and
the host-side progress (sampler position, rejected set, what the sinks hold, statistics).

One file per checkpoint: a first line naming the format and the length of a JSON header, the
header, then the batch's leaves written by ``equinox.tree_serialise_leaves`` (NumPy's ``.npy``
format per leaf). It is written atomically: to a temporary file in the same folder, flushed and
``fsync``-ed, then renamed over the previous checkpoint, so a run killed at any moment leaves
either the previous checkpoint or the new one, never a partial file (docs/semantics.md §19).

The array layout is rebuilt from the header and the fused stage on loading (``like`` of
``equinox.tree_deserialise_leaves``); no Python object is pickled.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import json
import os
import tempfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .batch import Batch, empty_host_arrays
from .models.neighbors import NEEDED_FIELDS, NO_SYSTEM, NeighborList
from .parameters import resolve_info

__all__ = [
    "save",
    "load",
    "read_header",
    "is_checkpoint",
    "layout_of",
    "fingerprint",
    "FORMAT",
    "VERSION",
]

FORMAT = "fused_dynamics-checkpoint"
VERSION = 1


def layout_of(batch: Batch) -> dict:
    """What is needed to rebuild the structure of ``batch`` (capacities, dtype, the list's
    static fields), as JSON-able values."""
    out = {
        "max_atoms": batch.max_atoms,
        "max_systems": batch.max_systems,
        "max_atoms_per_system": batch.max_atoms_per_system,
        "dtype": str(jnp.dtype(batch.dtype)),
        "info_keys": sorted(batch.info),
        "parameter_keys": sorted(batch.parameters),
        "neighbors": None,
        "leaves": [
            [list(np.shape(x)), str(np.asarray(x).dtype)] for x in jax.tree_util.tree_leaves(batch)
        ],
    }
    nl = batch.neighbors
    if nl is not None:
        cls = type(nl)
        if not cls.__module__.startswith("fused_dynamics."):
            raise TypeError(
                f"checkpoint: cannot save a batch whose neighbors are a {cls.__name__}; only "
                "fused_dynamics neighbor lists are supported."
            )
        static = {
            f.name: getattr(nl, f.name)
            for f in dataclasses.fields(nl)
            if f.metadata.get("static", False)
        }
        arrays = [f.name for f in dataclasses.fields(nl) if not f.metadata.get("static", False)]
        out["neighbors"] = {
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "static": static,
            "arrays": arrays,
        }
    return out


def _skeleton(fused, layout: dict) -> Batch:
    """A batch with the structure of a saved one (values are placeholders)."""
    keys = layout.get("parameter_keys", [])  # absent from checkpoints of earlier versions
    host = empty_host_arrays(layout["max_atoms"], layout["max_systems"], keys)
    blank = Batch.from_host_arrays(host, jnp.dtype(layout["dtype"]), layout["max_atoms_per_system"])

    def state_and_info(b):
        info = fused.fresh_info(b)
        stages = resolve_info(fused, b).stages  # from_info parameters: placeholder values
        return tuple(st.init_state(b) for st in stages), info

    stage_state, info = jax.eval_shape(state_and_info, blank)
    missing = set(layout["info_keys"]) ^ set(info)
    if missing:
        raise ValueError(
            f"checkpoint: it was written by a run with other hooks or sub-stages (bookkeeping "
            f"{sorted(missing)} differs); resume it with the fused stage that wrote it."
        )
    neighbors = None
    if layout["neighbors"] is not None:
        spec = layout["neighbors"]
        module, name = spec["class"].split(":")
        cls = getattr(importlib.import_module(module), name)
        fields = {k: jnp.zeros(()) for k in spec["arrays"]}
        if cls is NeighborList:  # a list saved before it had per-atom rows or exclusions
            fields.update({k: None for k in (*_ROW_FIELDS, "excluded_ids") if k not in fields})
        neighbors = cls(**fields, **spec["static"])
    skeleton = blank.replace(
        stage_state=stage_state,
        info=info,
        neighbors=neighbors,
        step_count=jnp.zeros((), jnp.int32),
    )
    # the structure from the fused stage, the shapes and dtypes from the file
    treedef = jax.tree_util.tree_structure(skeleton)
    if treedef.num_leaves != len(layout["leaves"]):
        raise ValueError(
            "checkpoint: it was written by a run with another structure (sub-stages, hooks or "
            "stage state differ); resume it with the fused stage that wrote it."
        )
    leaves = [jax.ShapeDtypeStruct(tuple(shape), dtype) for shape, dtype in layout["leaves"]]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def save(path: str | os.PathLike, batch: Batch, header: dict[str, Any]) -> None:
    """Write ``batch`` and ``header`` (JSON-able) to ``path`` atomically.

    Raises
    ------
    TypeError
        When the header is not JSON-able or the batch's neighbor list is not a
        fused_dynamics one.
    FileExistsError
        When something other than a fused_dynamics checkpoint file is at ``path`` (a
        checkpoint replaces only a checkpoint).
    OSError
        When the folder cannot be written (the previous checkpoint is left as it was).
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not is_checkpoint(path):
        raise FileExistsError(
            f"checkpoint {path!r}: a file or folder that is not a fused_dynamics checkpoint is "
            "there; a checkpoint replaces only a checkpoint. Remove it or give another path."
        )
    header = dict(header, format=FORMAT, version=VERSION, layout=layout_of(batch))
    text = json.dumps(header, sort_keys=True).encode()
    host = jax.device_get(batch)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(f"{FORMAT} {VERSION} {len(text)}\n".encode())
            f.write(text)
            eqx.tree_serialise_leaves(f, host)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # the rename itself survives a crash once the folder is synced
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file (or a link to one) that begins as a checkpoint does. A link is
    replaced by the new checkpoint, its target left as it was."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    magic = f"{FORMAT} ".encode()
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _read_header(f, path) -> dict:
    first = f.readline().decode(errors="replace").split()
    if len(first) != 3 or first[0] != FORMAT:
        raise ValueError(f"{path!r} is not a fused_dynamics checkpoint.")
    if int(first[1]) != VERSION:
        raise ValueError(
            f"{path!r} is a checkpoint of format version {first[1]}; this version of "
            f"fused_dynamics reads version {VERSION}."
        )
    text = f.read(int(first[2]))
    try:
        return json.loads(text.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {path!r}: its header is damaged or incomplete.") from exc


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a checkpoint (step count, statistics, sampler and sink progress)."""
    with open(os.fspath(path), "rb") as f:
        return _read_header(f, os.fspath(path))


def load(path: str | os.PathLike, fused, check=None) -> tuple[dict, Batch]:
    """The header and the batch of a checkpoint written for ``fused``.

    ``check(header)``, when given, runs before the batch is read (to refuse a checkpoint of
    another run with a message naming the difference).

    Raises
    ------
    FileNotFoundError
    ValueError
        Not a checkpoint, another format version, or written by a different fused stage.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        header = _read_header(f, path)
        if check is not None:
            check(header)
        like = _skeleton(fused, header["layout"])
        try:
            batch = eqx.tree_deserialise_leaves(f, like)
        except Exception as exc:
            raise ValueError(
                f"checkpoint {path!r} is damaged or incomplete ({type(exc).__name__}); resume "
                "from an intact checkpoint."
            ) from exc
        if f.read(1):
            raise ValueError(f"checkpoint {path!r} has data after its end (damaged).")
    return header, _with_exclusions(_with_rows(batch))


_ROW_FIELDS = ("row_receivers", "row_shifts")


def _with_exclusions(batch: Batch) -> Batch:
    """A batch read from a checkpoint written before neighbor lists could leave systems out
    (``excluded_ids``), with a list that leaves none out."""
    nl = batch.neighbors
    if not isinstance(nl, NeighborList) or nl.excluded_ids is not None:
        return batch
    lead = np.shape(nl.senders)[:-1]
    s = int(np.shape(nl.reference_cell)[-3])
    none = jnp.full(lead + (s,), NO_SYSTEM, jnp.int32)
    return batch.replace(neighbors=dataclasses.replace(nl, excluded_ids=none))


def _with_rows(batch: Batch) -> Batch:
    """A batch read from a checkpoint written before neighbor lists kept per-atom rows, with
    a list of no rows (``max_neighbors == 0``, the half-list path: the arithmetic of the run
    that wrote it) and the row need, unknown then, recorded as 0."""
    nl = batch.neighbors
    if not isinstance(nl, NeighborList) or nl.row_receivers is not None:
        return batch
    n = int(np.shape(nl.reference_positions)[-2])
    lead = np.shape(nl.senders)[:-1]
    needed = jnp.asarray(nl.needed)
    short = len(NEEDED_FIELDS) - needed.shape[-1]
    if short > 0:
        needed = jnp.concatenate(
            [needed, jnp.zeros(needed.shape[:-1] + (short,), needed.dtype)], -1
        )
    return batch.replace(
        neighbors=dataclasses.replace(
            nl,
            row_receivers=jnp.full(lead + (n, 0), n, jnp.int32),
            row_shifts=jnp.zeros(lead + (n, 0, 3), jnp.int32),
            needed=needed,
        )
    )


def fingerprint(fused) -> str:
    """A digest of everything that decides a fused stage's arithmetic: its structure, every
    parameter (array values included), its model and hooks. Objects without a value (a sink a
    hook writes to) count by type only."""
    digest = hashlib.sha256()

    def visit(x):
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            a = np.asarray(x)
            digest.update(f"array{a.shape}{a.dtype}".encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        elif isinstance(x, (bool, int, float, complex, str, bytes, type(None))):
            digest.update(f"{type(x).__name__}:{x!r};".encode())
        elif isinstance(x, enum.Enum):
            digest.update(f"{type(x).__qualname__}.{x.name};".encode())
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__}[{len(x)}](".encode())
            for y in x:
                visit(y)
            digest.update(b")")
        elif isinstance(x, dict):
            digest.update(f"dict[{len(x)}](".encode())
            for k in sorted(x, key=repr):
                visit(k)
                visit(x[k])
            digest.update(b")")
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            digest.update(f"{type(x).__module__}.{type(x).__qualname__}(".encode())
            for f in dataclasses.fields(x):
                digest.update(f.name.encode())
                visit(getattr(x, f.name, None))
            digest.update(b")")
        elif callable(x):
            name = getattr(x, "__qualname__", type(x).__qualname__)
            digest.update(f"callable:{getattr(x, '__module__', '')}.{name};".encode())
        else:
            digest.update(f"object:{type(x).__module__}.{type(x).__qualname__};".encode())

    visit(fused)
    return digest.hexdigest()
