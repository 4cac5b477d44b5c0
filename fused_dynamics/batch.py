"""The padded, fixed-capacity multi-system batch.

A :class:`Batch` holds up to ``S`` systems in up to ``N`` atom slots. Both capacities are the
static shapes of its arrays, so one compiled step serves every batch of the same capacity: systems
of any size are written into free slots in place and nothing recompiles.

Layout invariants (checked by :meth:`Batch.from_atoms`, kept by every update):

- atoms of one system are contiguous on the atom axis; ``system_idx[i]`` is the slot of atom ``i``
  and padding atoms carry ``system_idx == S`` (a sentinel that every reduction drops);
- ``atom_mask`` / ``system_mask`` mark occupied atom and system slots;
- a system has at most ``max_atoms_per_system`` atoms (a third static capacity, used by the dense
  pair evaluation and by per-system views of per-atom data);
- cells follow ASE: rows are lattice vectors. Units are ASE's: Å, eV, amu, and velocities in ASE's
  native unit Å·sqrt(eV/amu), so that ``0.5 * m * v**2`` is in eV and ``ase.Atoms`` round-trip
  exactly. Integrators take their time step in fs and convert with ``ase.units.fs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ase
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from . import constraints, segment
from .linalg3 import det3
from .parameters import read_info_values
from .provenance import batch_inputs
from .status import exit_reason_name, failure_names

__all__ = ["Batch", "default_float"]


def default_float():
    """The float dtype used when none is given: float64 with ``jax_enable_x64``, else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


class Batch(eqx.Module):
    """A padded batch of atomic systems: a pytree of fixed-shape arrays.

    Attributes
    ----------
    positions, velocities, forces : Array, shape (N, 3)
    masses : Array, shape (N,)
        In amu; padding atoms hold 1 so that divisions stay finite.
    atomic_numbers : Array, shape (N,) int32
    system_idx : Array, shape (N,) int32
        Slot of each atom; ``S`` for padding.
    atom_mask : Array, shape (N,) bool
    cell : Array, shape (S, 3, 3)
        Rows are lattice vectors (ASE convention). Empty slots hold the identity.
    pbc : Array, shape (S, 3) bool
    energy : Array, shape (S,)
    stress : Array, shape (S, 3, 3)
        ``(1/V) dE/dε`` in eV/Å³, ASE's sign convention.
    system_mask : Array, shape (S,) bool
    status : Array, shape (S,) int32
        Selects the sub-stage that updates the system (see :class:`~fused_dynamics.FusedStage`).
    system_id : Array, shape (S,) int32
        The caller's index of the system in its dataset; -1 for an empty slot.
    fixed : Array, shape (N, 3) bool
        Cartesian components held fixed (ASE's ``FixAtoms`` / ``FixCartesian``); see
        :mod:`fused_dynamics.constraints`.
    fix_com : Array, shape (S,) bool
        Systems whose centre of mass is held (ASE's ``FixCom``).
    virtual_cell : Array, shape (S, 3) bool
        Cell rows the input did not give: zero-length lattice vectors along non-periodic
        directions (a cluster without a cell, a slab or wire without vacuum). The engine needs
        an invertible cell, so they hold unit vectors orthogonal to the given rows (see
        :func:`complete_cell`); ``to_atoms`` and the outputs write them back as zero.
    stage_state : tuple
        Per-sub-stage state; every leaf has a leading axis of length S.
    info : dict[str, Array]
        Per-system bookkeeping arrays (leading axis S) kept by the run loop.
    parameters : dict[str, Array]
        Per-system values of the parameters given as ``from_info(key)``: shape (S,) each in the
        float dtype, keyed by the ``atoms.info`` key they were read from (``from_atoms(...,
        info_keys=...)`` or a sampler). They belong to the system in the slot: a refill writes
        the new structure's values (docs/semantics.md §14a).
    step_count : Array or None
        The fused step number (int32 scalar) of a batch prepared by a run: hook frequencies
        count it, and it carries on across resumed runs and checkpoints. ``None`` before a run.
    neighbors : pytree or None
        A neighbor list the model consumes (see ``fused_dynamics.models.neighbors``). When it
        has a true ``overflow`` flag after a run, the run loop grows it (``neighbors.grown()``)
        and runs again from the last good state.
    max_atoms_per_system : int
        Static capacity of one system.
    """

    positions: jax.Array
    velocities: jax.Array
    masses: jax.Array
    atomic_numbers: jax.Array
    forces: jax.Array
    system_idx: jax.Array
    atom_mask: jax.Array
    cell: jax.Array
    pbc: jax.Array
    energy: jax.Array
    stress: jax.Array
    system_mask: jax.Array
    status: jax.Array
    system_id: jax.Array
    fixed: jax.Array
    fix_com: jax.Array
    virtual_cell: jax.Array
    stage_state: tuple = ()
    info: dict = eqx.field(default_factory=dict)
    parameters: dict = eqx.field(default_factory=dict)
    neighbors: Any = None
    step_count: Any = None
    max_atoms_per_system: int = eqx.field(static=True, default=0)

    # ------------------------------------------------------------------ capacities
    @property
    def max_atoms(self) -> int:
        """Atom capacity N."""
        return self.system_idx.shape[-1]

    @property
    def max_systems(self) -> int:
        """System capacity S."""
        return self.system_mask.shape[-1]

    @property
    def dtype(self):
        return self.positions.dtype

    def replace(self, **fields) -> Batch:
        """A copy with some fields replaced (the original is untouched)."""
        return dataclasses.replace(self, **fields)

    # ------------------------------------------------------------------ per-system views
    @property
    def n_atoms(self) -> jax.Array:
        """Number of atoms of each slot, shape (S,) int32 (0 for an empty slot)."""
        return segment.segment_count(self.system_idx, self.max_systems)

    @property
    def volume(self) -> jax.Array:
        """Cell volume of each slot, shape (S,)."""
        return jnp.abs(det3(self.cell))

    def sum_atoms(self, x: jax.Array) -> jax.Array:
        """Sum a per-atom array over each system, shape (S, ...).

        A scatter-add in atom order (:func:`~fused_dynamics.segment.segment_sum`), so a
        system's sum does not depend on the capacities or on the other systems, bit for bit
        (docs/semantics.md §21). A gather into (S, A) blocks and a dense sum is about 3x faster
        per sum on CPU, but XLA sums a block in an order that depends on its shape (1e-14
        relative differences measured), and choosing between the two by the capacities would
        make a system's arithmetic depend on its neighbours' sizes.
        """
        return segment.segment_sum(x, self.system_idx, self.max_systems)

    def max_atoms_of(self, x: jax.Array) -> jax.Array:
        """Maximum of a per-atom array over each system (``-inf`` for empty slots)."""
        return segment.segment_max(x, self.system_idx, self.max_systems)

    def finite_systems(self) -> jax.Array:
        """Whether each slot's positions and cell are all finite, shape (S,) bool."""
        atom_bad = self.atom_mask & ~jnp.all(jnp.isfinite(self.positions), axis=-1)
        bad_atoms = self.sum_atoms(atom_bad.astype(jnp.int32))
        return (bad_atoms == 0) & jnp.all(jnp.isfinite(self.cell), axis=(-2, -1))

    def to_atoms_axis(self, x: jax.Array) -> jax.Array:
        """Broadcast a per-system array (S, ...) to the atoms (N, ...); padding gets zero."""
        return segment.to_atoms(x, self.system_idx)

    def system_view_index(self) -> tuple[jax.Array, jax.Array]:
        """Gather indices for a per-system view (S, A) of per-atom data.

        Returns
        -------
        index : Array, shape (S, A) int32
            Atom index of the k-th atom of system s (clipped into range where invalid).
        valid : Array, shape (S, A) bool
            Whether that atom exists.
        """
        a = self.max_atoms_per_system
        start = segment.first_atom(self.system_idx, self.max_systems)
        k = jnp.arange(a, dtype=jnp.int32)
        index = start[:, None] + k[None, :]
        valid = k[None, :] < self.n_atoms[:, None]
        return jnp.clip(index, 0, self.max_atoms - 1), valid

    def single_system(self, slot) -> Batch:
        """A one-system batch (capacities ``A`` atoms and 1 slot) holding slot ``slot``'s
        system, for evaluating one system alone; ``slot`` may be traced.

        Per-atom fields are its atoms' rows (the rest padding, as :meth:`from_atoms` pads);
        per-system fields its slot's row; no stage state, bookkeeping or neighbor list.
        """
        a = self.max_atoms_per_system
        index, valid = self.system_view_index()
        rows, valid = index[slot], valid[slot] & self.system_mask[slot]

        def atom_field(x, pad):
            v = valid.reshape((a,) + (1,) * (x.ndim - 1))
            return jnp.where(v, x[rows], jnp.asarray(pad, x.dtype))

        def system_field(x):
            return jax.lax.dynamic_slice_in_dim(x, slot, 1)

        return Batch(
            positions=atom_field(self.positions, 0),
            velocities=atom_field(self.velocities, 0),
            masses=atom_field(self.masses, 1),
            atomic_numbers=atom_field(self.atomic_numbers, 0),
            forces=atom_field(self.forces, 0),
            system_idx=jnp.where(valid, 0, 1).astype(self.system_idx.dtype),
            atom_mask=valid,
            fixed=atom_field(self.fixed, False),
            **{k: system_field(getattr(self, k)) for k in SYSTEM_FIELDS},
            max_atoms_per_system=a,
        )

    # ------------------------------------------------------------------ ASE in/out
    @classmethod
    def from_atoms(
        cls,
        atoms_list: Sequence[ase.Atoms],
        max_atoms: int | None = None,
        max_systems: int | None = None,
        dtype=None,
        *,
        max_atoms_per_system: int | None = None,
        system_ids: Sequence[int] | None = None,
        info_keys: Sequence[str] = (),
    ) -> Batch:
        """Pack a list of ``ase.Atoms`` into a padded batch.

        Parameters
        ----------
        atoms_list : sequence of ase.Atoms
            The systems, placed in slots 0, 1, ... in order.
        max_atoms : int, optional
            Atom capacity N (default: the total number of atoms).
        max_systems : int, optional
            System capacity S (default: ``len(atoms_list)``).
        dtype : float dtype, optional
            float32 by default, float64 when ``jax_enable_x64`` is on. Asking for float64
            without x64 raises.
        max_atoms_per_system : int, optional
            Capacity of one system (default: the largest system given).
        system_ids : sequence of int, optional
            Dataset index of each system (default: 0, 1, ...).
        info_keys : sequence of str, optional
            ``atoms.info`` keys to carry as :attr:`parameters`, for parameters given as
            ``fused_dynamics.from_info(key)``; every structure must have a real number there.

        Raises
        ------
        ValueError
            Empty input, capacities too small, non-finite positions, a singular periodic cell,
            non-positive masses, an empty system, an unsupported constraint type, an
            ``info_keys`` entry missing from a structure or not a number. The message names the
            system index.
        TypeError
            An element that is not ``ase.Atoms``, or a dtype that is not a float or not enabled.

        Notes
        -----
        Constraints (``atoms.constraints``) of the types ``FixAtoms``, ``FixCartesian`` and
        ``FixCom`` are carried into ``fixed`` / ``fix_com`` and honoured by every sub-stage.
        """
        dtype = _check_dtype(dtype)
        atoms_list = list(atoms_list)
        if len(atoms_list) == 0:
            raise ValueError("Batch.from_atoms: atoms_list is empty; give at least one ase.Atoms.")
        info_keys = _check_info_keys(info_keys)
        for i, atoms in enumerate(atoms_list):
            _validate_atoms(atoms, i)
            values = read_info_values(atoms.info, info_keys, f"Batch.from_atoms: system {i}")
            for key, value in values.items():  # a budget rounded here could not be refused
                stored = np.asarray(value, dtype).item()
                if float(value).is_integer() and stored != value:
                    raise ValueError(
                        f"Batch.from_atoms: system {i}: atoms.info[{key!r}] = {value!r} is a "
                        f"whole number that {jnp.dtype(dtype).name} stores as {stored!r}; use "
                        "float64 or a smaller value."
                    )
        sizes = [len(a) for a in atoms_list]
        n_total = sum(sizes)
        max_systems = len(atoms_list) if max_systems is None else int(max_systems)
        max_atoms = n_total if max_atoms is None else int(max_atoms)
        a_cap = max(sizes) if max_atoms_per_system is None else int(max_atoms_per_system)
        if len(atoms_list) > max_systems:
            raise ValueError(
                f"Batch.from_atoms: {len(atoms_list)} systems do not fit max_systems={max_systems}."
            )
        for i, n in enumerate(sizes):
            if n > a_cap:
                raise ValueError(
                    f"Batch.from_atoms: system {i} has {n} atoms, more than "
                    f"max_atoms_per_system={a_cap}."
                )
        if n_total > max_atoms:
            raise ValueError(
                f"Batch.from_atoms: {n_total} atoms in all do not fit max_atoms={max_atoms} "
                f"(system {_first_overflow(sizes, max_atoms)} is the first that does not fit)."
            )
        if system_ids is None:
            system_ids = range(len(atoms_list))
        system_ids = np.asarray(list(system_ids), dtype=np.int32)
        if system_ids.shape != (len(atoms_list),):
            raise ValueError("Batch.from_atoms: system_ids must give one id per system.")

        host = empty_host_arrays(max_atoms, max_systems, info_keys)
        offset = 0
        for slot, atoms in enumerate(atoms_list):
            write_system(host, slot, offset, atoms, int(system_ids[slot]))
            offset += len(atoms)
        return cls.from_host_arrays(host, dtype, a_cap)

    @classmethod
    def from_host_arrays(cls, host: dict[str, np.ndarray], dtype, max_atoms_per_system: int):
        """Build a batch from the NumPy arrays made by :func:`empty_host_arrays`."""
        fl = {"positions", "velocities", "masses", "forces", "cell", "energy", "stress"}
        host = dict(host)
        parameters = {k: jnp.asarray(v, dtype=dtype) for k, v in host.pop("parameters", {}).items()}
        # jnp.asarray of an integer or bool NumPy array compiles a copy program per shape
        # (jax 0.10's lax.stage): 6 programs, 0.07 s of a first from_atoms; device_put none
        arrays = {
            k: jnp.asarray(v, dtype=dtype) if k in fl else jax.device_put(v, may_alias=False)
            for k, v in host.items()
        }
        return cls(**arrays, parameters=parameters, max_atoms_per_system=int(max_atoms_per_system))

    def to_atoms(self, inputs=None) -> list[ase.Atoms]:
        """The occupied slots as ``ase.Atoms``, in slot order.

        ``inputs``: the structures this batch was made from (``Batch.from_atoms(inputs)``, in
        that order); each output then carries its input's ``info``, per-atom ``arrays`` and
        ``source_index`` (:func:`fused_dynamics.provenance.batch_inputs`, which raises
        ``ValueError`` when they do not match the batch's systems).

        Each carries velocities and a ``SinglePointCalculator`` with energy, forces and stress
        (stress in Voigt order, eV/Å³, as ASE returns it; present when the system's cell as given
        has full rank, as ASE requires, and its stress is finite: every run computes it for what
        it returns, a failed system has none, a cluster without a cell has none), the
        batch's constraints as ASE constraints, and in ``atoms.info``: ``system_id``,
        ``status``, and after a run ``exit_reason`` (an :class:`~fused_dynamics.ExitReason`
        code) with its name ``exit_reason_name``, ``stage_steps``, and ``failure`` (names of the
        non-finite or out-of-bound quantities, ``""`` if none, see
        :class:`~fused_dynamics.Failure`) with ``failure_step``.

        A batch holds arrays only: without ``inputs`` the inputs' own ``info`` and extra
        per-atom ``arrays`` are not carried (a run of a batch with sinks takes the same
        ``inputs``, :func:`fused_dynamics.driver.run`; a sampler carries them itself).

        In float64, positions, numbers, masses, cells, pbc and velocities come back bit for bit
        as :meth:`from_atoms` read them (zero-length non-periodic cell vectors included, see
        ``virtual_cell``). Momenta are ``m * v`` and can differ from the original ones in the last
        bit.
        """
        host = jax.device_get(self)
        arrays = {k: getattr(host, k) for k in HOST_FIELDS}
        arrays.update({k: host.info[k] for k in INFO_FIELDS if k in host.info})
        slots = np.flatnonzero(np.asarray(host.system_mask))
        out = atoms_from_arrays(arrays, slots)
        for atoms, slot in zip(out, slots, strict=True):
            for key, values in host.parameters.items():  # never over what the engine wrote
                atoms.info.setdefault(key, np.asarray(values)[slot].item())
        if inputs is not None:
            out = batch_inputs(host, inputs, in_order=True)(out)
        return out


# ---------------------------------------------------------------------- host-side packing
# The array fields of a Batch by leading axis: the atom axis (N) and the slot axis (S).
ATOM_FIELDS = (
    "positions",
    "velocities",
    "masses",
    "atomic_numbers",
    "forces",
    "system_idx",
    "atom_mask",
    "fixed",
)
SYSTEM_FIELDS = (
    "cell",
    "pbc",
    "energy",
    "stress",
    "system_mask",
    "status",
    "system_id",
    "fix_com",
    "virtual_cell",
)

HOST_FIELDS = (
    "positions",
    "velocities",
    "masses",
    "atomic_numbers",
    "forces",
    "system_idx",
    "cell",
    "pbc",
    "energy",
    "stress",
    "status",
    "system_id",
    "fixed",
    "fix_com",
    "virtual_cell",
)
#: per-system bookkeeping of a run (``batch.info``) that goes out with each system
INFO_FIELDS = ("exit_reason", "stage_steps", "failure", "failure_step")


def atoms_from_arrays(arrays: dict[str, np.ndarray], slots) -> list[ase.Atoms]:
    """Build ``ase.Atoms`` for the given slots from host copies of batch fields.

    ``arrays`` holds at least ``positions``, ``atomic_numbers``, ``masses``, ``system_idx``,
    ``cell`` and ``pbc``; ``velocities``, ``energy``, ``forces``, ``stress``, ``system_id``,
    ``status``, ``exit_reason`` and ``stage_steps`` are carried over when present.
    """
    system_idx = np.asarray(arrays["system_idx"])
    out = []
    for slot in slots:
        sel = np.flatnonzero(system_idx == slot)
        cell = np.asarray(arrays["cell"], np.float64)[slot]
        virtual = np.zeros(3, bool)
        if "virtual_cell" in arrays:
            virtual = np.asarray(arrays["virtual_cell"], bool)[slot]
            cell = np.where(virtual[:, None], 0.0, cell)
        atoms = ase.Atoms(
            numbers=np.asarray(arrays["atomic_numbers"])[sel],
            positions=np.asarray(arrays["positions"], np.float64)[sel],
            masses=np.asarray(arrays["masses"], np.float64)[sel],
            cell=cell,
            pbc=np.asarray(arrays["pbc"])[slot],
        )
        if "velocities" in arrays:
            atoms.set_velocities(np.asarray(arrays["velocities"], np.float64)[sel])
        results = {}
        if "energy" in arrays:
            results["energy"] = float(arrays["energy"][slot])
        if "forces" in arrays:
            results["forces"] = np.asarray(arrays["forces"], np.float64)[sel]
        if "stress" in arrays and not virtual.any():  # as ASE: stress needs a full-rank cell
            stress = np.asarray(arrays["stress"], np.float64)[slot]
            if np.all(np.isfinite(stress)):  # NaN: not computed, or the system failed
                results["stress"] = _voigt(stress)
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        if "fixed" in arrays:
            fix_com = bool(np.asarray(arrays["fix_com"])[slot]) if "fix_com" in arrays else False
            atoms.set_constraint(constraints.to_ase(np.asarray(arrays["fixed"])[sel], fix_com))
        for key in ("system_id", "status", "exit_reason", "failure_step"):
            if key in arrays:
                atoms.info[key] = int(np.asarray(arrays[key])[slot])
        if "exit_reason" in arrays:
            atoms.info["exit_reason_name"] = exit_reason_name(atoms.info["exit_reason"])
        if "failure" in arrays:
            atoms.info["failure"] = failure_names(int(np.asarray(arrays["failure"])[slot]))
        if "stage_steps" in arrays:
            atoms.info["stage_steps"] = np.asarray(arrays["stage_steps"])[slot].tolist()
        out.append(atoms)
    return out


def empty_host_arrays(max_atoms: int, max_systems: int, info_keys=()) -> dict[str, Any]:
    """NumPy arrays of an empty batch (every slot free), to be filled by :func:`write_system`;
    ``parameters`` holds one array (S,) per ``info_keys`` entry (empty slots hold 1, so that
    arithmetic on them stays finite)."""
    n, s = max_atoms, max_systems
    return {
        "parameters": {k: np.ones(s) for k in info_keys},
        "positions": np.zeros((n, 3)),
        "velocities": np.zeros((n, 3)),
        "masses": np.ones(n),
        "atomic_numbers": np.zeros(n, np.int32),
        "forces": np.zeros((n, 3)),
        "system_idx": np.full(n, s, np.int32),
        "atom_mask": np.zeros(n, bool),
        "cell": np.tile(np.eye(3), (s, 1, 1)),
        "pbc": np.zeros((s, 3), bool),
        "energy": np.zeros(s),
        "stress": np.zeros((s, 3, 3)),
        "system_mask": np.zeros(s, bool),
        "status": np.zeros(s, np.int32),
        "system_id": np.full(s, -1, np.int32),
        "fixed": np.zeros((n, 3), bool),
        "fix_com": np.zeros(s, bool),
        "virtual_cell": np.zeros((s, 3), bool),
    }


def write_system(host: dict, slot: int, offset: int, atoms: ase.Atoms, system_id: int) -> None:
    """Write one ``ase.Atoms`` into slot ``slot`` and atoms ``offset:offset+len(atoms)``, with
    its ``atoms.info`` values of the keys ``host["parameters"]`` holds (checked by the caller:
    :meth:`Batch.from_atoms`, a sampler)."""
    n = len(atoms)
    fixed, fix_com = constraints.from_ase(atoms, system_id)
    sel = slice(offset, offset + n)
    host["positions"][sel] = atoms.get_positions()
    host["velocities"][sel] = atoms.get_velocities()
    host["masses"][sel] = atoms.get_masses()
    host["atomic_numbers"][sel] = atoms.get_atomic_numbers()
    host["forces"][sel] = 0.0
    host["system_idx"][sel] = slot
    host["atom_mask"][sel] = True
    host["cell"][slot], host["virtual_cell"][slot] = complete_cell(atoms.get_cell(), atoms.pbc)
    host["pbc"][slot] = atoms.get_pbc()
    host["energy"][slot] = 0.0
    host["stress"][slot] = 0.0
    host["system_mask"][slot] = True
    host["status"][slot] = 0
    host["system_id"][slot] = system_id
    host["fixed"][sel] = fixed
    host["fix_com"][slot] = fix_com
    parameters = host.get("parameters", {})
    values = read_info_values(atoms.info, tuple(parameters), f"system {system_id}")
    for key, value in values.items():
        parameters[key][slot] = value


def complete_cell(cell, pbc) -> tuple[np.ndarray, np.ndarray]:
    """An invertible cell for the engine, and which of its rows the input did not give.

    Zero-length lattice vectors along non-periodic directions (ASE accepts them: a cluster with
    no cell, a slab or wire without vacuum) are replaced by unit vectors orthogonal to the given
    rows. A fully non-periodic system whose cell is still singular gets the identity (all rows
    virtual). Periodic directions are never changed.

    Parameters
    ----------
    cell : array_like, shape (3, 3)
        Rows are lattice vectors, Å.
    pbc : array_like, shape (3,) bool

    Returns
    -------
    cell : numpy.ndarray, shape (3, 3)
    virtual : numpy.ndarray, shape (3,) bool
        Rows that were filled in.
    """
    cell = np.array(cell, np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, bool).reshape(3)
    if not np.all(np.isfinite(cell)):  # refused by the validation that names the system
        return cell, np.zeros(3, bool)
    virtual = ~pbc & (np.linalg.norm(cell, axis=1) == 0.0)
    given = [cell[k] for k in range(3) if not virtual[k]]
    fill = []
    if len(given) == 1:
        u = given[0] / np.linalg.norm(given[0])
        e = np.eye(3)[np.argmin(np.abs(u))]
        v = e - (e @ u) * u
        v /= np.linalg.norm(v)
        fill = [v, np.cross(u, v)]
    elif len(given) == 2:
        w = np.cross(given[0], given[1])
        fill = [w / np.linalg.norm(w)] if np.linalg.norm(w) > 0 else [np.zeros(3)]
    elif not given:
        fill = list(np.eye(3))
    for k in np.flatnonzero(virtual):
        cell[k] = fill.pop(0)
    if not pbc.any() and not abs(np.linalg.det(cell)) > 1e-12:
        return np.eye(3), np.ones(3, bool)
    return cell, virtual


def _voigt(s: np.ndarray) -> np.ndarray:
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


def _first_overflow(sizes, capacity) -> int:
    total = 0
    for i, n in enumerate(sizes):
        total += n
        if total > capacity:
            return i
    return len(sizes) - 1


def _check_dtype(dtype):
    if dtype is None:
        return default_float()
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"Batch dtype must be a float dtype, got {dtype}.")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise TypeError(
            "Batch dtype float64 was asked for but jax_enable_x64 is off: call "
            "jax.config.update('jax_enable_x64', True) first, or use float32."
        )
    return dtype


def _check_info_keys(keys) -> tuple[str, ...]:
    if isinstance(keys, str):
        raise TypeError(f"info_keys must be a sequence of str, got the str {keys!r}.")
    keys = tuple(keys)
    for k in keys:
        if not isinstance(k, str) or not k:
            raise TypeError(f"info_keys must hold non-empty str, got {k!r}.")
    return keys


def _validate_atoms(atoms: Any, i: int) -> None:
    if not isinstance(atoms, ase.Atoms):
        raise TypeError(f"system {i}: expected ase.Atoms, got {type(atoms).__name__}.")
    if len(atoms) == 0:
        raise ValueError(f"system {i}: has no atoms.")
    constraints.from_ase(atoms, i)  # unsupported types are refused here, before anything runs
    pos = atoms.get_positions()
    if not np.all(np.isfinite(pos)):
        bad = int(np.flatnonzero(~np.isfinite(pos).all(axis=1))[0])
        raise ValueError(f"system {i}: non-finite position (atom {bad}).")
    # Masses before velocities: ASE derives velocities as momenta / masses, so a zero mass would
    # otherwise be reported as a non-finite velocity.
    masses = atoms.get_masses()
    if np.any(~(masses > 0)):
        bad = int(np.flatnonzero(~(masses > 0))[0])
        raise ValueError(f"system {i}: mass of atom {bad} is {masses[bad]}; masses must be > 0.")
    vel = atoms.get_velocities()
    if not np.all(np.isfinite(vel)):
        bad = int(np.flatnonzero(~np.isfinite(vel).all(axis=1))[0])
        raise ValueError(f"system {i}: non-finite velocity (atom {bad}).")
    if not np.all(np.isfinite(atoms.get_cell().array)):
        raise ValueError(f"system {i}: non-finite cell {atoms.get_cell().array.tolist()}.")
    if atoms.pbc.any():
        cell = complete_cell(atoms.get_cell(), atoms.pbc)[0]
        if abs(np.linalg.det(cell)) < 1e-10:
            raise ValueError(
                f"system {i}: periodic boundaries (pbc={atoms.pbc.tolist()}) with a singular "
                f"cell (volume {abs(np.linalg.det(cell))})."
            )
