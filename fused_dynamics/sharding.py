"""Data parallelism: the systems of a batch spread over the devices of a mesh.

Design (docs/semantics.md §21)
------------------------------
A *sharded batch* is ``D`` local batches (``D`` = devices of the mesh) stacked on a new leading
axis. Local batch ``d`` is an ordinary :class:`~fused_dynamics.Batch` of ``S/D`` system slots
and ``N/D`` atom slots whose ``system_idx`` counts its own slots (padding atoms hold ``S/D``).
Every leaf therefore has shape ``(D, ...)`` (``step_count`` too: ``(D,)``) and is placed with
``NamedSharding(mesh, P("systems"))``: each device holds whole systems, every one of their
atoms and all their per-system state.

Every compiled program of a sharded run (the chunk of steps, the whole fixed-batch loop, the
admission of new systems) is the *unchanged* single-device function run per device by
``jax.shard_map``: every per-system reduction (segment sums over ``system_idx``) stays on its
device, so a system's arithmetic is the same whichever device runs it. The only cross-device
traffic is one ``psum`` of an int32 scalar per step: the loop stops when no system on any
device is pending (:func:`fused_dynamics.loop.run_steps`), so every device takes the same
steps and keeps the same ``step_count`` as one device running the whole batch (hook
frequencies, docs/semantics.md §8). The compiled step holds no ``all-gather``
(:func:`chunk_hlo` shows its HLO; ``tests/test_sharding.py`` checks it).

Per-system parameters (a temperature per system, ...) are fitted to the flat batch's global
slots and split over the devices with them; every other parameter is replicated.

Global slots. Slot ``s`` of local batch ``d`` is global slot ``d * S/D + s``: :func:`unshard`
concatenates the local batches into one flat batch of ``S`` slots and ``N`` atoms in that order
(each device's padding atoms stay between its systems and the next device's), and
:func:`shard` puts global slots ``d*S/D .. (d+1)*S/D - 1`` and their atoms (packed at the
front) on device ``d``, so ``shard(unshard(b)) == b`` for a batch without neighbor lists
(``unshard`` drops the devices' lists, which index their local atoms).

Inflight runs (:class:`ShardedRun`, ``fused.start(..., mesh=...)`` or ``fused.run(sampler=...,
mesh=...)``). The sampler's ``max_atoms`` and ``max_systems`` are the *global* capacities;
each device gets ``max_atoms / D`` atoms and ``max_systems / D`` slots (both must divide, and
``max_atoms_per_system`` must fit one device). At each host visit the free slots of device 0,
then 1, ... are refilled from the one sampler, in the sampler's order, so every system is handed
out exactly once. Graduates are written to the sinks with the global slot numbering, each once.

Several processes (``jax.distributed.initialize``). The mesh spans every process's devices;
:func:`shard` builds each process's addressable shards from the same host data
(``jax.make_array_from_callback``), so every process must give the same flat batch (or the same
sampler over the same dataset). Host visits gather the per-system status (and, at a refill or a
write, the batch) to every process (``process_allgather``), so every process makes the same
decisions. The sampler rule: every process holds a replica of the *same* sampler and takes the
same systems in the same order; each process then owns the systems that land on its own devices:
it writes only those to its sinks (so over all processes every graduate is written exactly once),
and the lead process (the lowest-numbered one holding devices of the mesh: process 0 for a mesh
over every process) alone writes rejected systems and checkpoints and calls host hooks.

Hooks' ``on_host`` runs on any mesh: each device records its systems' payloads and the host
merges them into the flat layout after each chunk (:mod:`fused_dynamics.recording`), on process
0. A fixed batch with host hooks therefore runs as a :class:`ShardedRun` in chunks.

Neighbor lists. Each device keeps the list of its own local batch (pairs index its local
atoms), stacked like every other leaf: the per-device program is again the single-device one.
The lists share their static capacities (pairs, atoms per bin, stencil: the largest any device
needs, :func:`attach_neighbors`), because the devices run one compiled program. A list that
overflows on any device is grown on every device to what the largest need asks
(``grown()``, from the needs every device recorded) and the call redone, as on one device.
A flat batch's own list is not split: :func:`shard` builds the devices' lists with its
cutoff, skin and layout.

:class:`~fused_dynamics.inflight.StageExitWriter` listeners are host hooks recorded the same
way, so they run on any mesh.

``differentiable=True`` runs the reverse-differentiable loop on every device (:func:`run`).
"""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import inflight, loop, recording
from .batch import (
    ATOM_FIELDS,
    SYSTEM_FIELDS,
    Batch,
    default_float,
    empty_host_arrays,
    write_system,
)
from .compiled import filter_compile, model_options, retry_on_overflow
from .live import Run
from .models.neighbors import NeighborList

__all__ = [
    "AXIS",
    "ShardedRun",
    "attach_neighbors",
    "chunk_hlo",
    "devices_of",
    "gather",
    "is_sharded",
    "per_slot_parameters",
    "run",
    "shard",
    "unshard",
]

AXIS = "systems"


# ============================================================================ layout
def devices_of(mesh) -> int:
    """The number of devices D of a mesh with the one axis ``"systems"``.

    Raises
    ------
    ValueError
        ``mesh`` is not a ``jax.sharding.Mesh`` with the single axis ``"systems"``.
    """
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh(devices, ('systems',)), got {type(mesh).__name__}."
        )
    if tuple(mesh.axis_names) != (AXIS,):
        raise ValueError(
            f"mesh must have the one axis ('systems',), got axis names {tuple(mesh.axis_names)}."
        )
    return int(mesh.devices.size)


def is_sharded(batch: Batch) -> bool:
    """Whether ``batch`` is a sharded batch (its leaves carry a leading device axis)."""
    return np.ndim(batch.system_mask) == 2


def _local_capacity(max_atoms: int, max_systems: int, d: int, what: str) -> tuple[int, int]:
    if max_systems % d or max_atoms % d:
        raise ValueError(
            f"{what}: max_systems={max_systems} and max_atoms={max_atoms} must both be "
            f"divisible by the number of devices of the mesh ({d})."
        )
    return max_atoms // d, max_systems // d


def _split(flat: Batch, d: int) -> Batch:
    """Host: a flat batch (NumPy leaves) as ``d`` stacked local batches (see module doc)."""
    n, s = flat.max_atoms, flat.max_systems
    n_l, s_l = _local_capacity(n, s, d, "shard")
    sidx = np.asarray(flat.system_idx)
    device = np.where(sidx < s, sidx // s_l, d)  # padding atoms: device d (none)
    pad = np.flatnonzero(device == d)
    index = np.empty((d, n_l), np.int64)
    used = 0
    for k in range(d):
        real = np.flatnonzero(device == k)
        if len(real) > n_l:
            raise ValueError(
                f"shard: the systems of slots {k * s_l}..{(k + 1) * s_l - 1} have {len(real)} "
                f"atoms, more than max_atoms / devices = {n_l}; give the batch a larger "
                "max_atoms or order its systems so that every device's share fits."
            )
        fill = n_l - len(real)
        index[k] = np.concatenate([real, pad[used : used + fill]])
        used += fill

    def systems(x):
        x = np.asarray(x)
        return x.reshape((d, s_l) + x.shape[1:])

    changes = {f: np.asarray(getattr(flat, f))[index] for f in ATOM_FIELDS}
    glob = sidx[index]
    local = glob - (np.arange(d) * s_l)[:, None]
    changes["system_idx"] = np.where(glob < s, local, s_l).astype(sidx.dtype)
    changes.update({f: systems(getattr(flat, f)) for f in SYSTEM_FIELDS})
    changes["stage_state"] = jax.tree_util.tree_map(systems, flat.stage_state)
    changes["info"] = {k: systems(v) for k, v in flat.info.items()}
    changes["parameters"] = {k: systems(v) for k, v in flat.parameters.items()}
    if flat.step_count is not None:
        changes["step_count"] = np.full(d, np.asarray(flat.step_count), np.int32)
    return flat.replace(**changes)


def _merge(stacked: Batch) -> Batch:
    """Host: the flat batch (NumPy leaves) of a stacked one, global slots in device order."""
    s_l = np.shape(stacked.system_mask)[1]

    def flat(x):
        x = np.asarray(x)
        return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

    changes = {f: flat(getattr(stacked, f)) for f in ATOM_FIELDS + SYSTEM_FIELDS}
    changes["system_idx"] = _global_system_idx(stacked.system_idx, s_l).reshape(-1)
    changes["stage_state"] = jax.tree_util.tree_map(flat, stacked.stage_state)
    changes["info"] = {k: flat(v) for k, v in stacked.info.items()}
    changes["parameters"] = {k: flat(v) for k, v in stacked.parameters.items()}
    if stacked.step_count is not None:
        changes["step_count"] = np.asarray(stacked.step_count).reshape(-1)[0]
    changes["neighbors"] = None  # the devices' lists index their local atoms: none is flat
    return stacked.replace(**changes)


def _global_system_idx(sidx, s_l: int) -> np.ndarray:
    """Host: per-device system indices (D, N_l) as global slots ``d * s_l + s`` (padding atoms,
    local index ``s_l``, point past the last slot)."""
    sidx = np.asarray(sidx)
    d = sidx.shape[0]
    glob = np.where(sidx < s_l, sidx + (np.arange(d) * s_l)[:, None], d * s_l)
    return glob.astype(sidx.dtype)


def _fetch(x) -> np.ndarray:
    """A host copy of a whole (global) array, from every process if need be."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather(batch: Batch) -> Batch:
    """Host (NumPy) copy of a batch, sharded or not, whole on every process."""
    return jax.tree_util.tree_map(_fetch, batch)


def place(host: Batch, mesh) -> Batch:
    """Put a stacked host batch on the mesh: leading axis over ``"systems"``; each process
    builds only its addressable shards."""
    sharding = NamedSharding(mesh, P(AXIS))

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, host)


def shard(batch_or_atoms, mesh, *, max_atoms=None, max_systems=None, dtype=None) -> Batch:
    """A flat batch (or a list of ``ase.Atoms``) as a sharded batch on ``mesh``.

    Parameters
    ----------
    batch_or_atoms : Batch or sequence of ase.Atoms
        A flat batch of ``S`` slots and ``N`` atoms; atoms are packed with
        :meth:`Batch.from_atoms` (``max_atoms``, ``max_systems``, ``dtype``) first.
    mesh : jax.sharding.Mesh
        One axis named ``"systems"`` over D devices.

    Returns
    -------
    Batch
        Leaves of shape ``(D, ...)``: D local batches of ``S/D`` slots and ``N/D`` atoms;
        global slots ``d*S/D .. (d+1)*S/D - 1`` on device ``d``.

    Raises
    ------
    ValueError
        A bad mesh, ``S`` or ``N`` not divisible by D, or a device's share of atoms over
        ``N/D``.

    Notes
    -----
    A batch with a neighbor list gets one list per device, built for its local batch with the
    flat list's cutoff, skin and layout (:func:`attach_neighbors`).
    """
    d = devices_of(mesh)
    batch = batch_or_atoms
    if not isinstance(batch, Batch):
        batch = Batch.from_atoms(
            list(batch_or_atoms), max_atoms=max_atoms, max_systems=max_systems, dtype=dtype
        )
    if is_sharded(batch):
        raise ValueError("shard: the batch is sharded already.")
    nl = batch.neighbors
    if nl is not None and not isinstance(nl, NeighborList):
        raise ValueError(
            f"shard: the batch's neighbors are a {type(nl).__name__}; only a NeighborList can "
            "be rebuilt per device."
        )
    stacked = _split(gather(batch.replace(neighbors=None)), d)
    if nl is not None:
        stacked = _with_lists(stacked, functools.partial(_like, gather(nl)))
    return place(stacked, mesh)


# ============================================================================ neighbor lists
def _like(nl: NeighborList, local: Batch, capacity=None, **sizes) -> NeighborList:
    """A list for ``local`` with the cutoff, skin, layout and margin of ``nl``."""
    sizes["stencil"] = max(sizes.get("stencil") or 1, nl.stencil)
    return NeighborList.allocate(
        local, nl.cutoff, nl.skin, capacity, half=nl.half, margin=nl.margin, **sizes
    )


def _with_lists(stacked: Batch, make, first=None) -> Batch:
    """Host: ``stacked`` with the list ``make(local, capacity, stencil=, bin_capacity=,
    max_neighbors=)`` of each local batch, all of the largest capacities any of them needs
    (one program: the per-atom rows too are as wide on every device);
    ``first(local)`` (default ``make``) measures device 0's, once for what all devices share."""
    d = np.shape(stacked.system_mask)[0]
    bare = stacked.replace(neighbors=None)
    locals_ = [jax.tree_util.tree_map(lambda x, k=k: np.asarray(x)[k], bare) for k in range(d)]
    first = first or make
    # each measured on its own local batch
    sized = [(first if k == 0 else make)(local) for k, local in enumerate(locals_)]
    common = {
        "stencil": max(nl.stencil for nl in sized),
        "bin_capacity": max(nl.bin_capacity for nl in sized),
        "max_neighbors": max(nl.max_neighbors for nl in sized),
    }
    capacity = max(nl.capacity for nl in sized)
    lists = [jax.device_get(make(local, capacity, **common)) for local in locals_]
    return stacked.replace(neighbors=jax.tree_util.tree_map(lambda *xs: np.stack(xs), *lists))


def attach_neighbors(model, stacked: Batch, cells=None, pbc=None, more_batches=None) -> Batch:
    """Host: a stacked batch (NumPy leaves, ``(D, ...)``) with one neighbor list per device
    when ``model`` sums over one (``model.neighbor_list``) and the batch has none.

    Every device's list is measured on its own local batch, then all are built with the
    largest pair capacity, atoms per bin and stencil among them, so that the stacked lists
    share one compiled program. ``cells``, ``pbc``: more cells the lists must serve without
    growing their stencil, and ``more_batches`` (of a local batch's shapes) more batches whose
    needs they must cover (an inflight run's dataset), as in ``NeighborList.allocate``.
    """
    if stacked.neighbors is not None or getattr(model, "skin", None) is None:
        return stacked

    def make(local, capacity=None, **sizes):
        return model.neighbor_list(local, capacity, cells=cells, pbc=pbc, **sizes)

    def first(local):  # the dataset is measured once, with device 0's own batch
        more = {} if more_batches is None else {"more_batches": more_batches}
        return model.neighbor_list(local, cells=cells, pbc=pbc, **more)

    return _with_lists(stacked, make, first)


def _overflow_layout(mesh) -> dict:
    """``retry_on_overflow``'s options for a sharded batch: read the lists of every device,
    put the grown ones back on the mesh."""
    return {"fetch": _fetch, "place": lambda nl: place(nl, mesh)}


def _with_model_lists(fused, stacked: Batch, mesh, cells=None, pbc=None) -> Batch:
    """A sharded batch with the model's lists attached (:func:`attach_neighbors`) if it needs
    them and has none."""
    if stacked.neighbors is not None or getattr(fused.model, "skin", None) is None:
        return stacked
    return place(attach_neighbors(fused.model, gather(stacked), cells, pbc), mesh)


def _stale(stacked: Batch, mesh) -> Batch:
    """A sharded batch whose lists (if any) are marked stale on every device (atoms moved on
    the atom axis: a refill), so the next update rebuilds them."""
    nl = stacked.neighbors
    if nl is None:
        return stacked
    stale = place(np.ones(nl.stale.shape, bool), mesh)  # (D,): the global shape
    return stacked.replace(neighbors=dataclasses.replace(nl, stale=stale))


def unshard(batch: Batch) -> Batch:
    """The flat batch of a sharded one (global slot ``d * S/D + s``; see the module doc), as
    arrays on the default device; gathered from every process."""
    if not is_sharded(batch):
        raise ValueError("unshard: the batch is not sharded (its leaves have no device axis).")
    return jax.tree_util.tree_map(jnp.asarray, _merge(gather(batch)))


# ============================================================================ programs
def _per_slot(value, s: int) -> bool:
    return value is not None and np.ndim(value) == 1 and np.shape(value)[0] == s


def per_slot_parameters(fused, s: int) -> list:
    """Getters (``f -> leaf``) of the per-system parameters of ``fused`` that hold
    one value per slot of a batch of ``s`` slots: sub-stages' ``per_system_parameters`` and
    those of their convergence criteria. A sharded run splits them over the devices with the
    slots (global slot ``d * S/D + s``)."""
    getters = []
    for i, stage in enumerate(fused.stages):
        for name in getattr(type(stage), "per_system_parameters", ()):
            if _per_slot(getattr(stage, name), s):
                getters.append(lambda f, i=i, n=name: getattr(f.stages[i], n))
        criteria = getattr(stage.convergence_hook, "criteria", None) or ()
        for j, crit in enumerate(criteria):
            for name in getattr(type(crit), "per_system_parameters", ()):
                if _per_slot(getattr(crit, name), s):
                    getters.append(
                        lambda f, i=i, j=j, n=name: getattr(
                            f.stages[i].convergence_hook.criteria[j], n
                        )
                    )
    return getters


def _split_per_slot(fused, sharded: tuple):
    """``fused`` split for a per-device program: ``(dynamic, params, local_stage)``.

    ``params``: its per-slot parameters (:func:`per_slot_parameters`) as ``(D, S/D)`` arrays,
    to go with their slots; ``dynamic``: its other arrays; ``local_stage(dynamic, local)``:
    the fused stage of one device, given that device's rows of ``params``.
    """
    d, s_l = sharded[0].system_mask.shape
    getters = per_slot_parameters(fused, d * s_l)
    params = [jnp.reshape(g(fused), (d, s_l)) for g in getters]

    def where(f):
        return [g(f) for g in getters]

    if getters:
        fused = eqx.tree_at(where, fused, [jnp.zeros((), p.dtype) for p in params])
    dynamic, static = eqx.partition(fused, eqx.is_array)

    def local_stage(dynamic, local):
        f = eqx.combine(dynamic, static)
        return eqx.tree_at(where, f, list(local)) if getters else f

    return dynamic, params, local_stage


def _per_device(fn, mesh, fused, sharded: tuple, replicated: tuple):
    """``fn(fused, *local, *replicated)`` on every device of ``mesh`` (``jax.shard_map``);
    the leaves of ``sharded`` and of the outputs carry the leading device axis. Per-slot
    parameters of ``fused`` (:func:`per_slot_parameters`) go with their slots."""
    dynamic, params, local_stage = _split_per_slot(fused, sharded)

    def body(dynamic, sharded, params, replicated):
        local = jax.tree_util.tree_map(lambda x: x[0], sharded)
        f = local_stage(dynamic, [p[0] for p in params])
        out = fn(f, *local, *replicated)
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], out)

    program = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS), P()),
        out_specs=P(AXIS),
        check_vma=False,
    )
    return program(dynamic, sharded, params, replicated)


def _mapped(fn, fused, sharded: tuple, replicated: tuple):
    """``fn(fused, *local, *replicated)`` for every device's local batch, as a ``jax.vmap``
    over the device axis that XLA's partitioner spreads over the devices the leaves are placed
    on (what :func:`_per_device` does with ``jax.shard_map``).

    Used by reverse-differentiable runs: Equinox's checkpointed loop checks, in its reverse
    pass, that its arguments carry the sharding metadata of its forward pass, which inside
    ``jax.shard_map`` they do not (equinox PR #1261, open). ``fn`` must not use collectives
    (the reverse pass re-traces it outside the map's axis). Per system the arithmetic is the
    device's own, as in :func:`_per_device`.
    """
    dynamic, params, local_stage = _split_per_slot(fused, sharded)

    def body(local, params):
        return fn(local_stage(dynamic, params), *local, *replicated)

    return jax.vmap(body, axis_name=AXIS)(sharded, params)


def _steps(fused, batch, limit):
    return loop.run_steps(fused, batch, limit, axis_name=AXIS)


def _chunk(fused, stacked: Batch, limit, mesh, record_steps=None, last=False):
    """At most ``limit`` steps on every device: ``(batch, taken, active, records)``; each
    device records its own systems' host-hook payloads (:mod:`fused_dynamics.recording`)."""
    steps = functools.partial(loop.chunk, new=None, record_steps=record_steps, axis_name=AXIS)
    last = jnp.asarray(last)
    out, taken, active, records = _per_device(steps, mesh, fused, (stacked,), (limit, last))
    return out, taken[0], jnp.sum(active), records


def _whole_run(fused, stacked: Batch, limit, resume: bool, mesh, options=(None, None)):
    """The whole run on every device; ``options``: ``(max_steps, checkpoints)`` of a
    reverse-differentiable loop (:func:`loop.run_steps`), static."""
    max_steps, checkpoints = options
    differentiable = max_steps is not None

    def body(f, b, lim):
        if not resume:
            b = f._prepare(b)  # the loop's first iteration primes it (loop.run_steps)
        # differentiable: no collective (see _mapped); each device's loop stops when its own
        # systems are done (the stages leave a graduated system as it is; a hook's apply no
        # longer runs on that device: docs/semantics.md §21)
        axis = None if differentiable else AXIS
        out = loop.run_steps(
            f,
            b,
            lim,
            max_steps,
            checkpoints,
            axis_name=axis,
            prime=not resume,
            energy_at_exit=not f.needs_energy,  # as one device's run (loop.run_loop)
        )
        return out[0]

    if not differentiable:
        return _per_device(body, mesh, fused, (stacked,), (limit,))
    out = _mapped(body, fused, (stacked,), (limit,))
    steps = out.step_count  # the run's steps, as devices that stepped on would count them
    out = out.replace(step_count=jnp.broadcast_to(jnp.max(steps), steps.shape))
    spec = jax.sharding.NamedSharding(mesh, P(AXIS))
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, spec), out)


def _admit(fused, stacked: Batch, new, mesh):
    return _per_device(inflight.admit, mesh, fused, (stacked, new), ())


def _initialize(fused, stacked: Batch, mesh):
    return _per_device(inflight.initialize, mesh, fused, (stacked,), ())


def _explained(fn):
    """``fn`` with JAX's refusal of ordered host callbacks on several devices explained."""

    def call(*args):
        try:
            return fn(*args)
        except ValueError as exc:
            if "ordered effects" not in str(exc):
                raise
            raise ValueError(
                "mesh=: an ordered host callback (a hook's on_host or a jax.debug.callback "
                "inside one compiled call) cannot run on a mesh of several devices "
                "(JAX supports ordered effects on one device only); run without mesh=, or on "
                "a one-device mesh."
            ) from exc

    call.cache_size = fn.cache_size
    call.lower = fn.lower
    return call


_CHUNK = _explained(filter_compile(_chunk, options_for=model_options))
_WHOLE_RUN = _explained(filter_compile(_whole_run, options_for=model_options))
_ADMIT = _explained(filter_compile(_admit, options_for=model_options))
_INITIALIZE = _explained(filter_compile(_initialize, options_for=model_options))


def chunk_hlo(fused, stacked: Batch, mesh, limit: int = 10) -> str:
    """The optimized HLO text of the compiled chunk of a sharded run: the program a run's
    chunks call, with its XLA options (to check, for example, that it moves no atom arrays
    between devices)."""
    return _CHUNK.lower(fused, stacked, jnp.int32(limit), mesh).compile().as_text()


def prepare(fused, flat: Batch):
    """Host-side checks and static choices of a sharded run, before compiling: the image
    range for the cells, per-system parameters spread over the global slots of the flat batch
    (they are split over the devices with the slots, :func:`per_slot_parameters`).

    Raises
    ------
    ValueError
        A per-system parameter of a bad length.
    """
    mask = np.asarray(flat.system_mask)
    fused.model.check_batch(flat)
    inflight.check_batch_info(fused, flat)
    fitted = fused.prepare_for_cells(np.asarray(flat.cell)[mask], np.asarray(flat.pbc)[mask])
    return fitted.fit_per_system(flat)


def run(
    fused,
    batch: Batch,
    n_steps=None,
    *,
    mesh,
    resume: bool = False,
    differentiable: bool = False,
    checkpoints: int | None = None,
) -> Batch:
    """A fixed-batch run with the systems spread over ``mesh`` (``fused.run(batch,
    mesh=mesh)``); one compiled program, each device running its local batch.

    Parameters
    ----------
    fused : FusedStage
    batch : Batch
        Flat (sharded here with :func:`shard`) or sharded; with ``resume=True`` a sharded
        batch returned by an earlier run.
    n_steps : int, optional
    mesh : jax.sharding.Mesh
    resume : bool
    differentiable : bool, default False
        Reverse-differentiable (``jax.grad`` through the run, docs/differentiable.md): the
        loop stores ``checkpoints`` states per device and recomputes the rest. Needs
        ``n_steps``. Under ``jax.grad`` with respect to the batch (a traced batch), the batch
        must be sharded already (:func:`shard`, outside the differentiated function): its
        placement and the model's static choices are made from concrete values.
    checkpoints : int, optional
        With ``differentiable``: the states the reverse pass stores on each device.

    Returns
    -------
    Batch
        The sharded final batch; :func:`unshard` gives the flat one (global slots as given).

    Raises
    ------
    ValueError
        ``differentiable`` without ``n_steps`` or with a hook that works on the host, or a
        traced batch that is not sharded.
    """
    devices_of(mesh)
    if differentiable and n_steps is None:
        raise ValueError("FusedStage.run(differentiable=True) needs n_steps.")
    if differentiable and recording.records_hooks(fused):
        # the loop is vmapped over the devices (_mapped): a host callback would run per device
        # and on every step (a cond under vmap computes both branches)
        raise ValueError(
            "mesh=: differentiable=True does not take hooks that work on the host (on_host) "
            "on a mesh; remove them, or run without mesh=."
        )
    traced = [x for x in jax.tree_util.tree_leaves(batch) if isinstance(x, jax.core.Tracer)]
    if traced:
        if not is_sharded(batch):
            raise ValueError(
                "mesh=: a batch traced by jax.grad or jax.vmap must be sharded before it is "
                "traced (fd.shard(batch, mesh) outside the differentiated function), so that "
                "its placement is made from concrete values."
            )
        stacked = batch  # the caller's sharded batch
        if not isinstance(batch.cell, jax.core.Tracer):
            # the static choices from the concrete cells, as one device makes them
            # (driver.run fits a batch whose cell is not traced)
            concrete = jax.tree_util.tree_map(
                lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.core.Tracer) else x,
                batch,
            )
            fused = prepare(fused, _merge(gather(concrete)))
    else:
        flat = _merge(gather(batch)) if is_sharded(batch) else gather(batch)
        fused = prepare(fused, flat)
        stacked = batch if is_sharded(batch) else shard(batch, mesh)
        stacked = _with_model_lists(fused, stacked, mesh)
    limit = loop.step_limit(n_steps)
    options = (int(n_steps), checkpoints and int(checkpoints)) if differentiable else (None, None)
    return retry_on_overflow(
        lambda b: _WHOLE_RUN(fused, b, limit, bool(resume), mesh, options),
        stacked,
        **_overflow_layout(mesh),
    )


# ============================================================================ the live run
class _ShardedChunk:
    """The compiled sharded chunk with the signature of :func:`loop.compiled_chunk`'s."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __call__(self, fused, batch, limit, last, new=None, record_steps=None):
        # a sharded run admits in its own program (ShardedRun._refill): ``new`` is None
        return _CHUNK(fused, batch, limit, self.mesh, record_steps, last)

    def cache_size(self) -> int:
        return _CHUNK.cache_size()


class ShardedRun(Run):
    """A live run (:class:`~fused_dynamics.driver.Run`) whose systems are spread over a mesh.

    Same options and live API as :class:`~fused_dynamics.driver.Run`, plus ``mesh``. See the
    module docstring for the layout, the refill order and the multi-process rule.
    """

    _admits_in_chunk = False  # _refill admits on every device in a program of its own

    def __init__(self, fused, batch=None, *, mesh, **options):
        self.mesh = mesh
        self.devices = devices_of(mesh)
        super().__init__(fused, batch, **options)

    # ------------------------------------------------------------------ layout hooks
    @property
    def _lead(self) -> bool:
        """Whether this process writes for the run (host hooks, rejections, checkpoints): the
        lowest-numbered process holding devices of the mesh (process 0 for a mesh over every
        process; a pipeline stage's own process)."""
        return jax.process_index() == min(int(d.process_index) for d in self.mesh.devices.flat)

    def _make_chunk(self):
        return _ShardedChunk(self.mesh)

    def _fetch(self, x) -> np.ndarray:
        return _fetch(x).reshape(-1)

    def _deliver(self, records) -> None:
        """Merge the devices' records into the flat layout (global slot ``d * S/D + s``) and
        hand them to the hooks, on the lead process only (every process holds the same
        records)."""
        if not records:
            return
        records = jax.tree_util.tree_map(_fetch, records)
        if not self._lead:
            return
        s_l = np.shape(self.batch.system_mask)[1]

        def row(name, x, i):
            x = x[:, i]  # (D, local slots or atoms, ...), or (D,) for a scalar field
            if x.ndim == 1:
                return x[0]
            if name == "system_idx":
                return _global_system_idx(x, s_l).reshape(-1)
            return x.reshape((-1,) + x.shape[2:])

        recording.deliver(self.fused, records, row)

    def _flat_host(self) -> Batch:
        return _merge(gather(self.batch))

    def _owned(self, slots):
        if jax.process_count() == 1:
            return slots
        s_l = self.batch.max_systems
        mine = {int(d.id) for d in self.mesh.local_devices}
        order = [int(d.id) for d in self.mesh.devices.reshape(-1)]
        return np.asarray([k for k in slots if order[int(k) // s_l] in mine], dtype=np.int64)

    def _layout_header(self) -> dict:
        return {"devices": self.devices}

    def _placed(self, batch: Batch) -> Batch:
        return place(gather(batch), self.mesh)

    def _retry(self, fn, batch, **options):
        return retry_on_overflow(fn, batch, **options, **_overflow_layout(self.mesh))

    def _write_checkpoint(self, path, header) -> None:
        host = gather(self.batch)
        if self._lead:
            super()._save_file(path, host, header)

    # ------------------------------------------------------------------ setup
    def _start_batch(self, batch: Batch, resume: bool) -> None:
        flat = _merge(gather(batch)) if is_sharded(batch) else gather(batch)
        self.fused = prepare(self.fused, flat)
        written = ~np.asarray(flat.system_mask)
        if resume:
            written = written | (np.asarray(flat.status) == self.fused.exit_status)
        stacked = batch if is_sharded(batch) else shard(batch, self.mesh)
        stacked = _with_model_lists(self.fused, stacked, self.mesh)
        if not resume:
            stacked = self._retry(lambda b: _INITIALIZE(self.fused, b, self.mesh), stacked)
        self.batch = stacked
        self._written = written

    def _start_inflight(self, dtype) -> None:
        sampler = self.sampler
        n_l, s_l = _local_capacity(
            sampler.max_atoms, sampler.max_systems, self.devices, "SizeAwareSampler with mesh="
        )
        if sampler.max_atoms_per_system > n_l:
            raise ValueError(
                f"mesh=: the sampler's max_atoms_per_system={sampler.max_atoms_per_system} "
                f"exceeds one device's atoms, max_atoms / devices = {n_l}; give a larger "
                "max_atoms or a smaller max_atoms_per_system."
            )
        self._report_rejected()
        if sampler.exhausted:
            self._written = np.zeros(0, bool)
            return
        cells, pbc = sampler.cells()
        self.fused = self.fused.prepare_for_cells(cells, pbc)
        inflight.refuse_size_buckets(self.fused.model)
        dtype = default_float() if dtype is None else dtype
        locals_ = []
        for _ in range(self.devices):
            host = empty_host_arrays(n_l, s_l, getattr(sampler, "info_keys", ()))
            offset = 0
            for slot, (index, atoms) in enumerate(sampler.take(n_l, s_l)):
                write_system(host, slot, offset, atoms, index)
                offset += len(atoms)
            local = Batch.from_host_arrays(host, dtype, sampler.max_atoms_per_system)
            locals_.append(jax.device_get(local))
        self._report_rejected()
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *locals_)
        self.fused = prepare(self.fused, _merge(stacked))
        stacked = attach_neighbors(
            self.fused.model, stacked, cells, pbc, self._dataset_batches(dtype, n_l, s_l)
        )
        self.batch = self._retry(
            lambda b: _INITIALIZE(self.fused, b, self.mesh), place(stacked, self.mesh)
        )
        self._written = ~np.asarray(stacked.system_mask).reshape(-1)

    # ------------------------------------------------------------------ refill
    def _refill(self, keep: np.ndarray):
        host = gather(self.batch)
        d, s_l = np.shape(host.system_mask)
        n_l = host.max_atoms
        keep = keep.reshape(d, s_l)
        new = np.zeros((d, s_l), bool)
        parts = []
        for k in range(d):
            local = jax.tree_util.tree_map(lambda x, k=k: x[k], host)
            arrays, offset = inflight.repack(local, keep[k])
            arrays["status"][~keep[k]] = self.fused.exit_status
            free = [int(x) for x in np.flatnonzero(~keep[k])]
            for (index, atoms), slot in zip(
                self.sampler.take(n_l - offset, len(free)), free, strict=False
            ):
                write_system(arrays, slot, offset, atoms, index)
                offset += len(atoms)
                new[k, slot] = True
            parts.append(arrays)
        self._report_rejected()
        if not keep.any() and not new.any() and not self.sampler.exhausted:
            raise RuntimeError("Inflight run: the next system does not fit an empty device.")
        values = [p.pop("parameters") for p in parts]
        fields = {
            key: np.stack([p[key] for p in parts]).astype(np.asarray(getattr(host, key)).dtype)
            for key in parts[0]
        }
        fields["parameters"] = {
            key: np.stack([v[key] for v in values]).astype(host.dtype) for key in values[0]
        }
        batch = _stale(self.batch.replace(**place(fields, self.mesh)), self.mesh)
        if new.any():
            placed = place(new, self.mesh)
            batch = self._retry(lambda b: _ADMIT(self.fused, b, placed, self.mesh), batch)
        return batch, new.reshape(-1)

    def _report_rejected(self) -> None:
        if self._lead:
            super()._report_rejected()
        elif self.sampler is not None:  # the same rejections; the lead process writes them
            self.stats.rejected += len(self.sampler.take_rejected())
