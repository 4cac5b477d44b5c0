"""Per-system reductions over the flat atom axis.

Every per-system reduction in the package goes through these helpers. Padding atoms carry
``system_idx == S`` (one past the last slot): the reductions use ``num_segments=S + 1`` and drop
that sentinel segment, and :func:`to_atoms` fills padding atoms with zero, so padding can never
leak into a system's result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_sum(x: jax.Array, system_idx: jax.Array, num_systems: int) -> jax.Array:
    """Sum a per-atom array over the atoms of each system.

    Parameters
    ----------
    x : Array, shape (N, ...)
        Per-atom values.
    system_idx : Array, shape (N,)
        Slot of each atom; padding atoms hold ``num_systems``.
    num_systems : int
        The static system capacity S.

    Returns
    -------
    Array, shape (S, ...)
    """
    return jax.ops.segment_sum(x, system_idx, num_segments=num_systems + 1)[:num_systems]


def segment_max(x: jax.Array, system_idx: jax.Array, num_systems: int) -> jax.Array:
    """Maximum of a per-atom array over each system's atoms (``-inf`` for an empty slot)."""
    return jax.ops.segment_max(x, system_idx, num_segments=num_systems + 1)[:num_systems]


def segment_min(x: jax.Array, system_idx: jax.Array, num_systems: int) -> jax.Array:
    """Minimum of a per-atom array over each system's atoms (``+inf`` for an empty slot)."""
    return jax.ops.segment_min(x, system_idx, num_segments=num_systems + 1)[:num_systems]


def segment_count(system_idx: jax.Array, num_systems: int, dtype=jnp.int32) -> jax.Array:
    """Number of real atoms in each slot, shape (S,)."""
    ones = jnp.ones(system_idx.shape, dtype)
    return segment_sum(ones, system_idx, num_systems)


def segment_mean(x: jax.Array, system_idx: jax.Array, num_systems: int) -> jax.Array:
    """Mean of a per-atom array over each system's atoms (zero for an empty slot)."""
    total = segment_sum(x, system_idx, num_systems)
    count = segment_count(system_idx, num_systems, dtype=x.dtype)
    count = count.reshape(count.shape + (1,) * (total.ndim - 1))
    return total / jnp.maximum(count, 1)


def to_atoms(x: jax.Array, system_idx: jax.Array) -> jax.Array:
    """Broadcast a per-system array to the atoms (padding atoms get zero / False).

    Parameters
    ----------
    x : Array, shape (S, ...)
    system_idx : Array, shape (N,)

    Returns
    -------
    Array, shape (N, ...)
    """
    return jnp.take(x, system_idx, axis=0, mode="fill", fill_value=0)


def first_atom(system_idx: jax.Array, num_systems: int) -> jax.Array:
    """Index of the first atom of each slot, shape (S,) (N for an empty slot).

    Atoms of one system are contiguous in a :class:`~fused_dynamics.Batch`, so a system
    occupies ``first_atom[s] : first_atom[s] + n_atoms[s]``.
    """
    n = system_idx.shape[0]
    return segment_min(jnp.arange(n, dtype=jnp.int32), system_idx, num_systems).clip(max=n)


def local_index(system_idx: jax.Array, num_systems: int) -> jax.Array:
    """Position of each atom inside its own system (0 for the first atom), shape (N,).

    Used to key per-atom random numbers so that they do not depend on the slot a system
    occupies.
    """
    n = system_idx.shape[0]
    start = jnp.take(first_atom(system_idx, num_systems), system_idx, mode="fill", fill_value=n)
    return jnp.arange(n, dtype=jnp.int32) - start
