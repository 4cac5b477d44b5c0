"""Moving systems between the device groups of a pipeline without the host
(docs/semantics.md §16).

A system that graduates from stage ``k`` of a :class:`~fused_dynamics.DistributedPipeline`
becomes an entry of stage ``k + 1``. What the next stage reads of it is its *row*: per atom
``positions``, ``velocities``, ``masses``, ``atomic_numbers`` and ``fixed``, per system
``cell``, ``virtual_cell``, ``pbc``, ``fix_com``, ``system_id``, the atom count and the values
the stages read from ``atoms.info`` (``fd.from_info``: ``Batch.parameters``, row fields
``"info:KEY"``); everything else (forces, energy, stage state, bookkeeping) is recomputed when
it is admitted.

1. :func:`extract` (compiled, per device of the sender's mesh with ``jax.shard_map``) gathers
   the row of every slot of the sender's local batches into fixed-size arrays: atom fields of
   shape ``(D, S/D, A, ...)`` (``A = max_atoms_per_system``), system fields ``(D, S/D, ...)``.
   They stay on the sender's devices; only the per-slot atom counts come to the host.
2. A graduate's row is sliced from its device's shard (still on that device) and waits in the
   bounded :class:`DeviceBuffer`.
3. The receiver takes rows in arrival order for the free slots of its device ``k`` and moves
   them there with ``jax.device_put`` (a device-to-device copy; on CPU devices a memory copy),
   stacks them into ``S/D`` fixed-size rows, assembles the per-device stacks into one array
   sharded over the receiver's mesh (``jax.make_array_from_single_device_arrays``) and
   :func:`insert` (compiled, per device) scatters them into the slots and atom offsets the host
   chose. The host only chooses slots and offsets (from the atom counts), exactly as for systems
   from a sampler; the values are copies, so a row arrives bit for bit.

Failed systems leave the pipeline (they are written to the final sinks from the host copy the
sender makes anyway for them); checkpoints copy the waiting rows to the host
(:meth:`DeviceBuffer.state`).
"""

from __future__ import annotations

import hashlib
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .compiled import filter_compile
from .sharding import AXIS

__all__ = ["ATOM_ROWS", "INFO_PREFIX", "SYSTEM_ROWS", "DeviceBuffer", "extract", "insert"]

ATOM_ROWS = ("positions", "velocities", "masses", "atomic_numbers", "fixed")
SYSTEM_ROWS = ("cell", "virtual_cell", "pbc", "fix_com", "system_id")
INFO_PREFIX = "info:"  # row field of Batch.parameters[key]: "info:" + key


# ============================================================================ compiled parts
def _extract_local(batch, a_max: int) -> dict:
    """Rows of every slot of one local batch: atom fields ``(S, A, ...)`` in the batch's atom
    order, zero past a system's atoms; system fields ``(S, ...)``; ``n_atoms`` ``(S,)``."""
    s, n = batch.max_systems, batch.max_atoms
    idx = batch.system_idx
    counts = jax.ops.segment_sum(jnp.ones_like(idx), idx, num_segments=s + 1)[:s]
    starts = jnp.cumsum(counts) - counts
    order = jnp.argsort(idx, stable=True)  # atoms grouped by slot, in their order
    k = jnp.arange(a_max)
    valid = k[None, :] < counts[:, None]
    atom = order[jnp.clip(starts[:, None] + k[None, :], 0, n - 1)]
    rows = {}
    for f in ATOM_ROWS:
        x = getattr(batch, f)[atom]
        rows[f] = jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.zeros_like(x))
    rows.update({f: getattr(batch, f) for f in SYSTEM_ROWS})
    rows.update({INFO_PREFIX + k: v for k, v in batch.parameters.items()})
    rows["n_atoms"] = counts.astype(jnp.int32)
    return rows


def _insert_local(batch, rows: dict, slot, offset):
    """``batch`` with row ``p`` written into slot ``slot[p]`` and atoms ``offset[p]...``; rows
    with ``slot[p] == S`` are padding (dropped)."""
    s, n = batch.max_systems, batch.max_atoms
    a_max = rows["positions"].shape[1]
    k = jnp.arange(a_max)
    use = (slot < s)[:, None] & (k[None, :] < rows["n_atoms"][:, None])
    dst = jnp.where(use, offset[:, None] + k[None, :], n).reshape(-1)
    changes = {}
    for f in ATOM_ROWS:
        x = getattr(batch, f)
        src = rows[f].reshape((-1,) + x.shape[1:]).astype(x.dtype)
        changes[f] = x.at[dst].set(src, mode="drop")
    for f in SYSTEM_ROWS:
        x = getattr(batch, f)
        changes[f] = x.at[slot].set(rows[f].astype(x.dtype), mode="drop")
    changes["parameters"] = {
        k: x.at[slot].set(rows[INFO_PREFIX + k].astype(x.dtype), mode="drop")
        for k, x in batch.parameters.items()
    }
    return batch.replace(**changes)


def _per_device(fn, mesh, *args):
    def body(*local):
        local = jax.tree_util.tree_map(lambda x: x[0], local)
        out = fn(*local)
        return jax.tree_util.tree_map(lambda x: x[None], out)

    return jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False)(
        *args
    )


def _extract(stacked, a_max: int, mesh):
    return _per_device(lambda b: _extract_local(b, a_max), mesh, stacked)


def _insert(stacked, rows, slot, offset, mesh):
    return _per_device(_insert_local, mesh, stacked, rows, slot, offset)


_EXTRACT = filter_compile(_extract)
_INSERT = filter_compile(_insert)


def extract(stacked, mesh) -> dict:
    """The rows of every slot of a sharded batch, left on its devices (see the module doc).

    Returns
    -------
    dict of jax.Array
        Atom fields ``(D, S/D, A, ...)``, system fields and ``n_atoms`` ``(D, S/D, ...)``,
        sharded as the batch (``A = max_atoms_per_system``).
    """
    return _EXTRACT(stacked, int(stacked.max_atoms_per_system), mesh)


def slice_rows(rows: dict, device: int, slot: int) -> dict:
    """The row of local slot ``slot`` of device ``device`` (index in the mesh), as arrays on
    that device (no host copy)."""
    out = {}
    for f, x in rows.items():
        shard = x.addressable_shards[device].data  # (1, S/D, ...) on that device
        out[f] = shard[0, slot]
    return out


def insert(stacked, per_device: list, mesh):
    """``stacked`` with incoming rows written into it, per device.

    Parameters
    ----------
    stacked : Batch
        The receiver's sharded batch; the host has already written the new systems'
        bookkeeping (``system_idx``, masks, ``status``) at the chosen slots and offsets.
    per_device : list of list of (slot, offset, row)
        For each device of ``mesh``, its incoming systems (at most ``S/D``); ``row`` is a dict
        from :func:`slice_rows`, on any device.
    mesh : jax.sharding.Mesh
    """
    d, s_l = np.shape(stacked.system_mask)
    devices = list(mesh.devices.reshape(-1))
    template = next(row for part in per_device for _, _, row in part)
    fields = {f: [] for f in template}
    slots, offsets = np.full((d, s_l), s_l, np.int32), np.zeros((d, s_l), np.int32)
    for k, part in enumerate(per_device):
        dev = devices[k]
        moved = [jax.device_put(row, dev) for _, _, row in part]  # device to device
        for f, x in template.items():
            pad = jax.device_put(jnp.zeros(x.shape, x.dtype), dev)
            parts = [m[f] for m in moved] + [pad] * (s_l - len(moved))
            fields[f].append(jnp.stack(parts)[None])
        for p, (slot, offset, _) in enumerate(part):
            slots[k, p], offsets[k, p] = slot, offset
    sharding = NamedSharding(mesh, P(AXIS))
    rows = {
        f: jax.make_array_from_single_device_arrays((d,) + xs[0].shape[1:], sharding, xs)
        for f, xs in fields.items()
    }

    def put(x):
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return _INSERT(stacked, rows, put(slots), put(offsets), mesh)


# ============================================================================ the buffer
class DeviceBuffer:
    """The bounded queue between two stages; its entries are rows on the sender's devices.

    For the sending stage it takes graduates (:meth:`put`); for the receiving stage it is the
    source of new systems (in arrival order) with the sampler interface the live run reads
    (``exhausted``, ``take_rejected``, ``fingerprint``, ``state_dict``, ``annotate``).

    Parameters
    ----------
    size : int
        Most systems it holds (``buffer_size``).
    like : SizeAwareSampler
        The pipeline's sampler: capacities, the cells of every system that may arrive (for
        static image ranges) and provenance (``annotate``).
    name : str
        Where it sits in the pipeline (part of its fingerprint, which a checkpoint records).
    """

    def __init__(self, size: int, like, name: str):
        self.size = int(size)
        self.queue: deque = deque()  # (system_id, n_atoms, row)
        self.closed = False
        self.max_atoms = like.max_atoms
        self.max_systems = like.max_systems
        self.max_atoms_per_system = like.max_atoms_per_system
        self._cells = like.cells()
        self.annotate = getattr(like, "annotate", None)
        self._fingerprint = hashlib.sha256(f"{like.fingerprint()}|{name}".encode()).hexdigest()
        self.received = 0
        self.peak = 0

    # ------------------------------------------------------------------ sender side
    @property
    def room(self) -> int:
        return self.size - len(self.queue)

    def put(self, system_id: int, n_atoms: int, row: dict) -> None:
        if self.room < 1:
            raise RuntimeError("pipeline buffer is full")
        self.queue.append((int(system_id), int(n_atoms), row))
        self.received += 1
        self.peak = max(self.peak, len(self.queue))

    def close(self) -> None:
        """The sender is done: nothing more will arrive."""
        self.closed = True

    # ------------------------------------------------------------------ receiver side
    def __len__(self) -> int:
        return len(self.queue)

    @property
    def exhausted(self) -> bool:
        return self.closed and not self.queue

    def take(self, free_atoms: int, free_slots: int) -> list:
        """The next entries ``(system_id, n_atoms, row)`` in arrival order while they fit."""
        out = []
        while self.queue and free_slots > 0 and self.queue[0][1] <= free_atoms:
            entry = self.queue.popleft()
            out.append(entry)
            free_atoms -= entry[1]
            free_slots -= 1
        return out

    def cells(self):
        return self._cells

    def take_rejected(self) -> list:
        return []

    def fingerprint(self) -> str:
        return self._fingerprint

    def state_dict(self) -> dict:
        return {}  # the queue is saved by the pipeline (state/restore)

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """Host copies of the waiting rows (for a checkpoint), in order."""
        return {
            "closed": self.closed,
            "received": self.received,
            "peak": self.peak,
            "entries": [
                (sid, n, {f: np.asarray(x) for f, x in row.items()}) for sid, n, row in self.queue
            ],
        }

    def restore(self, state: dict) -> None:
        """Put back what :meth:`state` saved (the rows on the default device)."""
        self.closed = bool(state["closed"])
        self.received = int(state["received"])
        self.peak = int(state["peak"])
        self.queue = deque(
            (int(sid), int(n), {f: jnp.asarray(x) for f, x in row.items()})
            for sid, n, row in state["entries"]
        )
