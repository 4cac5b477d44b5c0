"""The model interface: energy per system, forces and stress by automatic differentiation."""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp

from ..batch import Batch
from ..compiled import filter_compile

__all__ = ["Model", "ModelOutput", "evaluate_energy"]


class ModelOutput(eqx.Module):
    """What a model returns for a batch.

    Attributes
    ----------
    energy : Array, shape (S,)
        Potential energy of each system in eV (0 for empty slots).
    forces : Array, shape (N, 3)
        ``-dE/dr`` in eV/Å (0 for padding atoms).
    stress : Array, shape (S, 3, 3)
        ``(1/V) dE/dε`` in eV/Å³, ASE's sign convention (negative under compression; the
        pressure is ``-trace(stress) / 3``).
    """

    energy: jax.Array
    forces: jax.Array
    stress: jax.Array


class Model(eqx.Module):
    """An energy model for a padded batch.

    Subclasses implement :meth:`energy`: the potential energy of every system of a batch, shape
    (S,), as a differentiable function of the positions and cells. Calling the model returns
    energy, forces (``-dE/dr``) and stress (``(1/V) dE/dε`` for a symmetric strain ``ε`` applied as
    ``r -> r (1 + ε)`` and ``cell -> cell (1 + ε)``), all from one reverse pass.
    """

    @abc.abstractmethod
    def energy(self, batch: Batch) -> jax.Array:
        """Potential energy of each system, shape (S,)."""

    def check_batch(self, batch: Batch) -> None:
        """Host-side checks of a concrete batch, run before compiling (default: none).

        Raises
        ------
        ValueError
            Naming what the model cannot evaluate (an element it has no parameters for) and the
            system.
        """

    def system_faults(self, batch: Batch) -> jax.Array:
        """Per-system :class:`~fused_dynamics.Failure` bits for what the model could not
        evaluate correctly, shape (S,) int32 (default: none). Traced; the run fails those
        systems instead of using their (NaN) results."""
        return jnp.zeros(batch.max_systems, jnp.int32)

    def compiler_options(self, batch: Batch) -> dict:
        """XLA ``compiler_options`` for programs that evaluate this model on ``batch``'s shapes.

        Host-side, from static capacities and the dtype only: a model asks for an option where
        XLA's default was measured to be slow for its own arithmetic (see
        :func:`fused_dynamics.compiled.library_products_only`). The engine's top-level programs
        use it (:func:`fused_dynamics.compiled.filter_compile`); ``FusedStage(compile_kwargs=
        {"compiler_options": ...})`` overrides it key by key. Ask the model a run uses
        (``model.prepare(batch)``, its image range fitted), since the answer may depend on it.

        Parameters
        ----------
        batch : Batch
            Flat, or stacked per device.

        Returns
        -------
        dict
            Option name to value (default: empty, XLA's defaults).
        """
        return {}

    def prepare(self, batch: Batch) -> Model:
        """Resolve host-side static choices for ``batch`` (default: none). Called eagerly."""
        return self

    def explicit_output(self, batch: Batch, stress: bool) -> tuple | None:
        """``(energy (S,), forces (N, 3), stress (S, 3, 3))`` from explicit derivative
        formulas, or None (the default) to differentiate :meth:`energy` automatically.

        A model overrides it where the explicit form is faster (a pair potential on a neighbor
        list with per-atom rows sums pair forces along each atom's row instead of
        scatter-adding them); the results must equal the automatic ones to rounding, and the
        values stay differentiable (``jax.grad`` of a run differentiates the formulas).
        ``stress=False``: the stress may be anything (it is replaced by NaN).
        """
        return None

    def __call__(self, batch: Batch, *, stress: bool = True) -> ModelOutput:
        """Energy, forces and stress of every system (``stress=False``: NaN, "not computed").

        The strain derivative costs about as much again as the forces, so the fused step asks
        for it only when a sub-stage uses it (barostats, cell filters).
        """
        # ``prepare`` runs here, eagerly, where it can look at concrete cells. Called eagerly,
        # the evaluation is compiled (one compilation per shape instead of slow op-by-op
        # dispatch); called while tracing (jit, vmap, grad), it is traced inline as it stands.
        model = self.prepare(batch)
        if isinstance(batch.positions, jax.core.Tracer):
            return _evaluate(model, batch, stress)
        return _evaluate_jit(model, batch, stress)


def _evaluate(model: Model, batch: Batch, with_stress: bool = True) -> ModelOutput:
    """Energy, forces (-dE/dr) and stress ((1/V) dE/dε) from one reverse pass."""
    s = batch.max_systems
    eye = jnp.eye(3, dtype=batch.dtype)
    explicit = model.explicit_output(batch, with_stress)
    if explicit is not None:
        energy, forces, stress = explicit
        if not with_stress:
            stress = jnp.full((s, 3, 3), jnp.nan, batch.dtype)  # "not computed"
        out = ModelOutput(
            energy=jnp.where(batch.system_mask, energy, 0.0),
            forces=jnp.where(batch.atom_mask[:, None], forces, 0.0),
            stress=jnp.where(batch.system_mask[:, None, None], stress, 0.0)
            if with_stress
            else stress,
        )
        return _non_finite_input_is_nan(batch, out)
    if not with_stress:

        def energy_only(positions):
            e = model.energy(batch.replace(positions=positions))
            return jnp.sum(e), e

        (_, energy), de_dr = jax.value_and_grad(energy_only, has_aux=True)(batch.positions)
        out = ModelOutput(
            energy=jnp.where(batch.system_mask, energy, 0.0),
            forces=jnp.where(batch.atom_mask[:, None], -de_dr, 0.0),
            stress=jnp.full((s, 3, 3), jnp.nan, batch.dtype),  # "not computed"
        )
        return _non_finite_input_is_nan(batch, out)

    def total_energy(positions, strain):
        strain = 0.5 * (strain + jnp.swapaxes(strain, -1, -2))
        deform = eye + strain
        atom_deform = batch.to_atoms_axis(deform) + jnp.where(
            batch.atom_mask[:, None, None], 0.0, eye
        )
        strained = eqx.tree_at(
            lambda b: (b.positions, b.cell),
            batch,
            (jnp.einsum("ni,nij->nj", positions, atom_deform), batch.cell @ deform),
        )
        e = model.energy(strained)
        return jnp.sum(e), e

    zero = jnp.zeros((s, 3, 3), batch.dtype)
    (_, energy), (de_dr, de_deps) = jax.value_and_grad(total_energy, argnums=(0, 1), has_aux=True)(
        batch.positions, zero
    )
    volume = jnp.where(batch.system_mask, batch.volume, 1.0)
    forces = jnp.where(batch.atom_mask[:, None], -de_dr, 0.0)
    stress = jnp.where(batch.system_mask[:, None, None], de_deps / volume[:, None, None], 0.0)
    energy = jnp.where(batch.system_mask, energy, 0.0)
    return _non_finite_input_is_nan(batch, ModelOutput(energy=energy, forces=forces, stress=stress))


def evaluate_energy(model: Model, batch: Batch) -> jax.Array:
    """The energy ``model(batch).energy`` gives, shape (S,) eV, from the forward pass alone.

    Zero for empty slots and NaN for a system whose positions or cell are not finite, as
    :meth:`Model.__call__`; to rounding the same numbers (a model with
    :meth:`Model.explicit_output` sums its energy another way there). What a run whose steps
    skip the energy computes once at its end (docs/semantics.md §6): a program of the forward
    pass compiles in a fraction of the time of one with the derivatives.
    """
    energy = jnp.where(batch.system_mask, model.prepare(batch).energy(batch), 0.0)
    bad = batch.system_mask & ~batch.finite_systems()
    return jnp.where(bad, jnp.nan, energy)


def _non_finite_input_is_nan(batch: Batch, out: ModelOutput) -> ModelOutput:
    """NaN energy, forces and stress for a system whose positions or cell are not finite.

    A model may drop a pair whose distance is NaN (``r2 < cutoff**2`` is False) and return a
    plausible 0 eV for an exploded structure; no result may be computed from non-finite input.
    """
    bad = batch.system_mask & ~batch.finite_systems()
    atom = batch.to_atoms_axis(bad)[:, None]
    return ModelOutput(
        energy=jnp.where(bad, jnp.nan, out.energy),
        forces=jnp.where(atom, jnp.nan, out.forces),
        stress=jnp.where(bad[:, None, None], jnp.nan, out.stress),
    )


_evaluate_jit = filter_compile(
    _evaluate, options_for=lambda model, batch, *_: model.compiler_options(batch)
)
