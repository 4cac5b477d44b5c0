"""NequIP: an E(3)-equivariant message-passing interatomic potential (e3nn-jax on Equinox).

The architecture of Batzner et al., "E(3)-equivariant graph neural networks for data-efficient
and accurate interatomic potentials", Nat. Commun. 13, 2453 (2022), with every equivariant
operation taken from e3nn-jax (Geiger & Smidt, arXiv:2207.09453): ``e3nn.spherical_harmonics``,
``e3nn.tensor_product``, ``e3nn.FunctionalLinear``, ``e3nn.gate``, ``e3nn.bessel`` and
``e3nn.poly_envelope``. Per atom ``i`` of species ``s_i``, with ``h`` its features:

1. embedding: ``h_i = onehot(s_i) @ W`` (scalars ``C x 0e``, ``C`` the ``0e`` multiplicity of
   ``features``);
2. edges ``j -> i`` within ``cutoff``: spherical harmonics ``Y(r_ij / |r_ij|)`` up to ``l_max``
   and the radial basis ``bessel_n(|r_ij|) u_p(|r_ij| / cutoff)`` (NequIP's polynomial envelope
   ``u_p``, ``p = envelope_p``, which goes to zero with two derivatives at the cutoff);
3. ``n_layers`` interaction blocks: ``x = Linear(h)``; messages ``R(|r_ij|) * (x_j ⊗ Y_ij)``,
   one weight per output irrep of the tensor product (per channel and path, "uvu") from a radial
   MLP without biases (so every message vanishes smoothly at the cutoff); their sum over
   neighbors divided by ``sqrt(avg_num_neighbors)`` (NequIP's normalisation); ``Linear`` plus a
   species-indexed self-connection ``Linear_{s_i}(h_i)``; the gate nonlinearity (SiLU on
   scalars, sigmoid gates on the others); residual ``h + ...`` where the irreps agree;
4. output: ``E_i = energy_scale[s_i] * Linear(h_i)[0e] + energy_shift[s_i]`` in eV, summed per
   system (:meth:`with_reference_energies` fits the scale and shift to data).

Parameters are kept in ``param_dtype`` and cast to the batch's float dtype at every call: a
float64 batch is evaluated (and differentiated) in float64, a float32 batch in float32, with
the same parameters. Activations are not moment-normalised (``normalize_act=False``), so both
precisions use identical constants.

e3nn's own ``e3nn.equinox.Linear`` is not used: it keeps an ``e3nn.FunctionalLinear`` (compared
by identity) in a static field, so two identically built models would have different pytree
structures and each would be compiled anew. Here the weights are plain arrays and the
``FunctionalLinear`` is rebuilt from static irreps strings while tracing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import e3nn_jax as e3nn
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers as _Z_OF_SYMBOL
from ase.data import chemical_symbols as _SYMBOLS

from ..batch import Batch
from .graph import Graph, GraphModel
from .species import atom_species, check_batch_species

__all__ = ["NequIP"]

_NORM = {"path_normalization": "element", "gradient_normalization": "element"}


def _irreps_array(irreps, array) -> e3nn.IrrepsArray:
    return e3nn.IrrepsArray(e3nn.Irreps(irreps), array)


class _Linear(eqx.Module):
    """Equivariant linear map (``e3nn.FunctionalLinear``) on (N, dim) features; with
    ``num_indexed`` one weight set per species, chosen per atom by an index."""

    irreps_in: str = eqx.field(static=True)
    irreps_out: str = eqx.field(static=True)
    weights: list

    def __init__(self, irreps_in, irreps_out, *, key, dtype, num_indexed=None, weights=None):
        self.irreps_in, self.irreps_out = str(e3nn.Irreps(irreps_in)), str(e3nn.Irreps(irreps_out))
        if weights is None:
            lin = self._functional()
            keys = jax.random.split(key, max(len(lin.instructions), 1))
            lead = () if num_indexed is None else (num_indexed,)
            weights = [
                ins.weight_std * jax.random.normal(k, lead + ins.path_shape, dtype)
                for k, ins in zip(keys, lin.instructions, strict=False)
            ]
        self.weights = list(weights)

    def _functional(self) -> e3nn.FunctionalLinear:
        return e3nn.FunctionalLinear(self.irreps_in, self.irreps_out, **_NORM)

    def __call__(self, x: e3nn.IrrepsArray, index: jax.Array | None = None) -> e3nn.IrrepsArray:
        """``x`` (N, dim) -> (N, dim_out); ``index`` (N,) int picks each atom's weight set.

        ``FunctionalLinear``'s instructions, path weights and output assembly, with each
        channel mixing done as a multiply-and-sum instead of its ``einsum``: XLA:CPU lowers
        that batched einsum to dot kernels that round an atom's row differently depending on
        its position in the batch, which breaks bitwise slot independence
        (``tests/test_nequip.py``).
        """
        lin = self._functional()
        x = x.rechunk(lin.irreps_in)
        weights = self.weights if index is None else [w[index] for w in self.weights]
        paths = []
        for ins, w in zip(lin.instructions, weights, strict=True):
            chunk = x.chunks[ins.i_in]  # (N, u, 2l+1) or None (zeros)
            if chunk is None:
                paths.append(None)
                continue
            mixed = jnp.sum(chunk[..., :, None, :] * w[..., :, :, None], axis=-3)
            paths.append(ins.path_weight * mixed)  # (N, v, 2l+1)
        return lin.aggregate_paths(paths, x.shape[:-1], x.dtype)


class _RadialMLP(eqx.Module):
    """Bias-free MLP with SiLU, weights ~ N(0, 1) scaled by ``1/sqrt(fan_in)`` (e3nn style)."""

    weights: list

    def __call__(self, x: jax.Array) -> jax.Array:
        for k, w in enumerate(self.weights):
            x = (x @ w) / math.sqrt(w.shape[0])  # a plain row-major matmul rounds each row alike
            if k < len(self.weights) - 1:
                x = jax.nn.silu(x)
        return x


class _Interaction(eqx.Module):
    """One NequIP interaction block (module docstring, step 3)."""

    irreps_in: str = eqx.field(static=True)
    irreps_tp: str = eqx.field(static=True)
    up: _Linear
    radial: _RadialMLP
    down: _Linear
    self_connection: _Linear


class NequIP(GraphModel):
    """NequIP equivariant message-passing potential (module docstring).

    Parameters
    ----------
    species : sequence of int or str
        The elements (atomic numbers or symbols) the model has parameters for, in the order of
        the per-species arrays.
    cutoff : float
        Radial cutoff in Å (default 5.0).
    n_layers : int
        Number of interaction blocks (default 3).
    features : str
        Hidden irreps, e.g. ``"32x0e+16x1o+16x2e"``; its scalars must be ``0e``.
    l_max : int
        Largest degree of the edge spherical harmonics (default 2).
    n_radial : int
        Number of Bessel radial basis functions (default 8).
    radial_width, radial_layers : int
        Hidden width and number of hidden layers of the radial MLP (default 64, 2).
    avg_num_neighbors : float
        Neighbor sums are divided by its square root (default 20.0).
    envelope_p : int
        Exponent ``p`` of the polynomial cutoff envelope (default 6).
    param_dtype : str, optional
        Storage dtype of the parameters (default float64 when ``jax_enable_x64`` is on, else
        float32). They are cast to the batch's dtype at every call.
    key : jax.Array
        PRNG key (``jax.random.key``) for the random initial parameters.
    images : tuple of 3 int, optional
        See :class:`~fused_dynamics.models.graph.GraphModel`.
    embedding, layers, readout, energy_scale, energy_shift : optional
        Parameter values (given by ``dataclasses.replace``; build new models with ``key``).

    Attributes
    ----------
    energy_scale, energy_shift : Array, shape (K,)
        Per-species scale (eV) and shift (eV) of the atomic energies (default 1 and 0).
    """

    species: tuple[int, ...] = eqx.field(static=True)
    cutoff: float = eqx.field(static=True)
    n_layers: int = eqx.field(static=True)
    features: str = eqx.field(static=True)
    l_max: int = eqx.field(static=True)
    n_radial: int = eqx.field(static=True)
    radial_width: int = eqx.field(static=True)
    radial_layers: int = eqx.field(static=True)
    avg_num_neighbors: float = eqx.field(static=True)
    envelope_p: int = eqx.field(static=True)
    param_dtype: str = eqx.field(static=True)
    embedding: jax.Array
    layers: tuple
    readout: _Linear
    energy_scale: jax.Array
    energy_shift: jax.Array

    def __init__(
        self,
        species: Sequence[int | str],
        cutoff: float = 5.0,
        n_layers: int = 3,
        features: str = "32x0e+16x1o+16x2e",
        l_max: int = 2,
        n_radial: int = 8,
        radial_width: int = 64,
        radial_layers: int = 2,
        avg_num_neighbors: float = 20.0,
        envelope_p: int = 6,
        param_dtype: str | None = None,
        *,
        key: jax.Array | None = None,
        images: Sequence[int] | None = None,
        embedding=None,
        layers=None,
        readout=None,
        energy_scale=None,
        energy_shift=None,
    ):
        self.species = _species(species)
        self.cutoff = float(cutoff)
        self.n_layers, self.l_max, self.n_radial = int(n_layers), int(l_max), int(n_radial)
        self.radial_width, self.radial_layers = int(radial_width), int(radial_layers)
        self.avg_num_neighbors, self.envelope_p = float(avg_num_neighbors), int(envelope_p)
        self.features = str(e3nn.Irreps(features).regroup())
        if param_dtype is None:
            param_dtype = "float64" if jax.config.jax_enable_x64 else "float32"
        self.param_dtype = jnp.dtype(param_dtype).name
        self.images = None if images is None else tuple(int(n) for n in images)
        _check_hyperparameters(self)
        given = (embedding, layers, readout, energy_scale, energy_shift)
        if all(p is not None for p in given):
            self.embedding, self.layers, self.readout = embedding, tuple(layers), readout
            self.energy_scale, self.energy_shift = energy_scale, energy_shift
            return
        if key is None:
            raise ValueError("NequIP: give key=jax.random.key(...) for the initial parameters.")
        self._initialise(key)

    def _initialise(self, key: jax.Array) -> None:
        dtype, k = jnp.dtype(self.param_dtype), len(self.species)
        feats = e3nn.Irreps(self.features)
        n_scalar = feats.count("0e")
        gated = feats.filter(drop=["0e"])
        gate_in = str((e3nn.Irreps(f"{n_scalar + gated.num_irreps}x0e") + gated).regroup())
        sh = e3nn.Irreps.spherical_harmonics(self.l_max)
        keys = jax.random.split(key, 2 + self.n_layers)
        self.embedding = jax.random.normal(keys[0], (k, n_scalar), dtype)
        irreps_in, layers = e3nn.Irreps(f"{n_scalar}x0e"), []
        for key_layer in keys[2:]:
            ku, kr, kd, ks = jax.random.split(key_layer, 4)
            tp = e3nn.tensor_product(irreps_in, sh, filter_ir_out=feats).regroup()
            sizes = [self.n_radial] + [self.radial_width] * self.radial_layers + [tp.num_irreps]
            kws = jax.random.split(kr, len(sizes) - 1)
            shapes = zip(sizes[:-1], sizes[1:], strict=True)
            mlp = [jax.random.normal(kw, s, dtype) for kw, s in zip(kws, shapes, strict=True)]
            layers.append(
                _Interaction(
                    irreps_in=str(irreps_in),
                    irreps_tp=str(tp),
                    up=_Linear(irreps_in, irreps_in, key=ku, dtype=dtype),
                    radial=_RadialMLP(mlp),
                    down=_Linear(tp, gate_in, key=kd, dtype=dtype),
                    self_connection=_Linear(irreps_in, gate_in, key=ks, dtype=dtype, num_indexed=k),
                )
            )
            irreps_in = feats
        self.layers = tuple(layers)
        self.readout = _Linear(feats, "0e", key=keys[1], dtype=dtype)
        self.energy_scale = jnp.ones(k, dtype)
        self.energy_shift = jnp.zeros(k, dtype)

    # ------------------------------------------------------------------ protocol
    def _matrix_names(self) -> str:
        return "embedding, energy_scale, energy_shift"

    def check_batch(self, batch: Batch) -> None:
        """Host-side: every occupied atom is one of ``species`` (ValueError naming the element
        and the system slot otherwise)."""
        check_batch_species(self, batch)

    def energy(self, batch: Batch) -> jax.Array:
        # the positions carry the error that names an unknown element and its system slot
        batch, _ = atom_species(self, batch)
        return super().energy(batch)

    def graph_energy(self, batch: Batch, graph: Graph) -> jax.Array:
        """Energy of each system in eV, shape (S,) (0 for empty slots and padding atoms)."""
        dtype, n = batch.dtype, batch.max_atoms
        model = jax.tree_util.tree_map(
            lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, self
        )
        _, index = atom_species(self, batch)
        lengths = graph.lengths
        sh = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(self.l_max),
            graph.safe_vectors,
            normalize=True,
            normalization="component",
        )
        envelope = e3nn.poly_envelope(self.envelope_p - 1, 2, self.cutoff)(lengths)
        basis = e3nn.bessel(lengths, self.n_radial, self.cutoff) * envelope[:, None]
        h = _irreps_array(f"{self.embedding.shape[1]}x0e", model.embedding[index])  # one-hot @ W
        norm = 1.0 / math.sqrt(self.avg_num_neighbors)
        for layer in model.layers:
            x = layer.up(h)
            xs = _irreps_array(
                x.irreps, jnp.take(x.array, graph.senders, axis=0, mode="fill", fill_value=0)
            )
            m = e3nn.tensor_product(
                xs, sh, filter_ir_out=e3nn.Irreps(self.features), irrep_normalization="component"
            ).regroup()
            m = m * layer.radial(basis)
            agg = _irreps_array(layer.irreps_tp, norm * graph.sum_to_receivers(m.array, n))
            y = layer.down(agg) + layer.self_connection(h, index)
            y = e3nn.gate(
                y,
                even_act=jax.nn.silu,
                odd_act=jnp.tanh,
                even_gate_act=jax.nn.sigmoid,
                odd_gate_act=jnp.tanh,
                normalize_act=False,
            )
            h = h + y if h.irreps == y.irreps else y
        out = model.readout(h).array[:, 0]
        e_atom = model.energy_scale[index] * out + model.energy_shift[index]
        return batch.sum_atoms(jnp.where(batch.atom_mask, e_atom, 0.0))

    # ------------------------------------------------------------------ hyper-parameters, data
    def hyperparameters(self) -> dict:
        """Everything the constructor needs except ``key`` (JSON-serialisable).

        ``NequIP(**m.hyperparameters(), key=jax.random.key(0))`` has the pytree structure of
        ``m``: the skeleton for ``eqx.tree_deserialise_leaves``.
        """
        return {
            "species": list(self.species),
            "cutoff": self.cutoff,
            "n_layers": self.n_layers,
            "features": self.features,
            "l_max": self.l_max,
            "n_radial": self.n_radial,
            "radial_width": self.radial_width,
            "radial_layers": self.radial_layers,
            "avg_num_neighbors": self.avg_num_neighbors,
            "envelope_p": self.envelope_p,
            "param_dtype": self.param_dtype,
            "images": None if self.images is None else list(self.images),
        }

    def with_reference_energies(self, atoms_list, energies=None, forces=None) -> NequIP:
        """A copy with ``energy_shift`` and ``energy_scale`` fitted to reference data.

        ``energy_shift`` (eV, per species) is the least-squares solution of
        ``Σ_species count[s, k] shift[k] = E[s]`` over the structures ``s`` (the isolated-atom
        energies "E0s" of NequIP and MACE); ``energy_scale`` (eV, the same for every species) is
        the root mean square of all force components of the data (NequIP's default
        ``dataset_forces_rms``), so the network's output is in units of typical forces.

        Parameters
        ----------
        atoms_list : sequence of ase.Atoms
            The reference structures.
        energies : array of shape (M,), optional
            Their energies in eV (default ``atoms.get_potential_energy()``).
        forces : sequence of (n_atoms, 3) arrays, optional
            Their forces in eV/Å (default ``atoms.get_forces()``).

        Raises
        ------
        ValueError
            An element outside ``species``, mismatched lengths, or all forces zero.
        """
        atoms_list = list(atoms_list)
        if energies is None:
            energies = [a.get_potential_energy() for a in atoms_list]
        if forces is None:
            forces = [a.get_forces() for a in atoms_list]
        energies = np.asarray(energies, np.float64).reshape(-1)
        if len(energies) != len(atoms_list) or len(forces) != len(atoms_list):
            raise ValueError("NequIP.with_reference_energies: one energy and forces per structure.")
        counts = np.zeros((len(atoms_list), len(self.species)))
        for i, atoms in enumerate(atoms_list):
            for z in atoms.numbers:
                if int(z) not in self.species:
                    raise ValueError(
                        f"NequIP.with_reference_energies: structure {i} contains {_SYMBOLS[z]} "
                        f"(Z={z}), not among the model's species {self.species}."
                    )
                counts[i, self.species.index(int(z))] += 1
        shift, _, rank, _ = np.linalg.lstsq(counts, energies, rcond=None)
        if rank < len(self.species):
            warnings.warn(
                "NequIP.with_reference_energies: the compositions do not determine every "
                "species' shift; the minimum-norm solution is used.",
                UserWarning,
                stacklevel=2,
            )
        f = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in forces])
        rms = float(np.sqrt(np.mean(f * f))) if f.size else 0.0
        if not rms > 0:
            raise ValueError("NequIP.with_reference_energies: the forces are all zero.")
        dtype = self.energy_shift.dtype
        return eqx.tree_at(
            lambda m: (m.energy_shift, m.energy_scale),
            self,
            (jnp.asarray(shift, dtype), jnp.full(len(self.species), rms, dtype)),
        )


def _species(species) -> tuple[int, ...]:
    if isinstance(species, (str, int, np.integer)):
        species = (species,)
    out = []
    for x in species:
        z = _Z_OF_SYMBOL.get(x) if isinstance(x, str) else x
        if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not 1 <= z <= 118:
            raise ValueError(f"NequIP: species must be elements (symbols or Z), got {x!r}.")
        out.append(int(z))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"NequIP: species must be distinct elements, got {tuple(species)!r}.")
    return tuple(out)


def _check_hyperparameters(m: NequIP) -> None:
    feats = e3nn.Irreps(m.features)
    rules = {
        "cutoff": m.cutoff > 0 and math.isfinite(m.cutoff),
        "n_layers": m.n_layers >= 1,
        "l_max": m.l_max >= 0,
        "n_radial": m.n_radial >= 1,
        "radial_width": m.radial_width >= 1,
        "radial_layers": m.radial_layers >= 0,
        "avg_num_neighbors": m.avg_num_neighbors > 0,
        "envelope_p": m.envelope_p >= 2,
        "features": feats.count("0e") >= 1 and feats.count("0o") == 0,
    }
    for name, ok in rules.items():
        if not ok:
            raise ValueError(
                f"NequIP: {name}={getattr(m, name)!r} is out of range (cutoff > 0 Å, counts >= 1, "
                "envelope_p >= 2, features with at least one 0e scalar and no 0o)."
            )
