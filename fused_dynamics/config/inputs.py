"""The structures a configuration names, and the check of their elements against the model."""

from __future__ import annotations

import json
import os

import ase.io
import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from ase.io.formats import string2index

from ..structures import make_structures
from .base import ConfigError
from .build import file_model_elements
from .model_keys import FILE_MODEL_TYPES
from .schema import RunConfig

__all__ = ["check_structure_species", "load_structures", "load_structures_with_sources"]


def load_structures(cfg: RunConfig, base_dir: str | os.PathLike = ".") -> list:
    """The structures a configuration names, as a list of ``ase.Atoms``.

    Raises :class:`ConfigError` when a file cannot be read or holds no structure.
    """
    return load_structures_with_sources(cfg, base_dir)[0]


def _frame_numbers(index: str, n: int) -> list[int]:
    """The frame numbers an ase.io ``index`` string selects from a file of ``n`` frames."""
    sel = string2index(index)
    frames = list(range(n))
    return [frames[sel]] if isinstance(sel, int) else frames[sel]


def load_structures_with_sources(
    cfg: RunConfig, base_dir: str | os.PathLike = "."
) -> tuple[list, list[tuple[str | None, int]]]:
    """The structures and, for each, ``(file, frame index in that file)``.

    Generated structures have no file: ``(None, i)``. The frame index counts every frame of
    the file, also those that ``structures.index`` leaves out.

    Raises
    ------
    ConfigError
        A file cannot be read, an index selects nothing valid, or no structure at all.
    """
    s = cfg.structures
    if s.generate is not None:
        seed = cfg.seed if s.seed is None else s.seed
        made = make_structures(s.count, seed=seed, rattle=s.rattle, max_size=s.max_size)
        return made, [(None, i) for i in range(len(made))]
    out, sources = [], []
    for f in s.files(base_dir):
        try:
            frames = ase.io.read(f, index=":", format=s.format)
        except Exception as exc:  # ase raises many kinds
            raise ConfigError(
                f"structures.path: cannot read {f!r} with ase.io ({type(exc).__name__}: {exc}); "
                "check the file, or set structures.format to its ase.io format (e.g. 'vasp', "
                "'cif', 'extxyz') when its name does not say"
            ) from exc
        frames = frames if isinstance(frames, list) else [frames]
        try:
            keep = _frame_numbers(s.index, len(frames))
        except (ValueError, IndexError, TypeError) as exc:  # TypeError: "abc", "1.5"
            raise ConfigError(
                f"structures.index: {s.index!r} does not select frames of {f!r} "
                f"({len(frames)} frames): {exc}"
            ) from None
        out.extend(frames[k] for k in keep)
        sources.extend((f, k) for k in keep)
    if not out:
        raise ConfigError(
            f"structures.path: {s.path!r} holds no structure (structures.index = {s.index!r} "
            "selects no frame); give files with structures, or another structures.index"
        )
    return out, sources


def _where(source: tuple[str | None, int]) -> str:
    f, k = source
    return f"generated structure {k}" if f is None else f"{f!r} frame {k}"


def check_structure_species(cfg: RunConfig, structures, sources=None) -> str:
    """Refuse structures with an element the model has no parameters for, before compiling.

    The elements with parameters are ``model.species`` (scalar form) or the keys of
    ``model.pairs``. A scalar model without ``species`` applies only when every structure,
    all together, holds one element type: that element is then implied.

    Parameters
    ----------
    cfg : RunConfig
    structures : list of ase.Atoms
    sources : list of (file or None, frame index), optional
        Where each structure comes from (:func:`load_structures_with_sources`), for the
        message.

    Returns
    -------
    str
        A line for the summary: the elements the model's parameters are used for, and why.

    Raises
    ------
    ConfigError
        Naming each element without parameters, the first structure holding it (file and
        frame), how many hold it, and the key to add.
    """
    m = cfg.model
    sources = sources if sources is not None else [(None, i) for i in range(len(structures))]
    first: dict[int, tuple[str | None, int]] = {}
    count: dict[int, int] = {}
    for atoms, src in zip(structures, sources, strict=True):
        for z in np.unique(np.asarray(atoms.numbers, dtype=int)):
            z = int(z)
            first.setdefault(z, src)
            count[z] = count.get(z, 0) + 1

    def name(z: int) -> str:
        return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"

    def found(zs) -> str:
        parts = []
        for z in zs:
            others = count[z] - 1
            more = f" and {others} more structure(s)" if others else ""
            parts.append(f"{name(z)} (in {_where(first[z])}{more})")
        return "; ".join(parts)

    present = sorted(first)
    if m.type in FILE_MODEL_TYPES:
        return _check_file_model(m, present, found, name)
    kind = {"lennard_jones": "LennardJones", "morse": "Morse", "soft_sphere": "SoftSphere"}[m.type]
    scalar = ", ".join(f"{n} ({m._units[n]})" for n in m._scalar)
    elements = m.elements()
    if elements is None:  # scalar form without species
        if len(present) <= 1:
            what = name(present[0]) if present else "no element"
            return (
                f"model: {kind} parameters for {what} (implied: the only element of the "
                "structures; model.species would say so)"
            )
        symbols = [name(z) for z in present]
        raise ConfigError(
            f"model: {scalar} are given once, without model.species, but the structures "
            f"hold {len(present)} elements: {found(present)}. One set of parameters is never "
            "applied to several elements unasked: give a per-species table "
            f"[model.pairs] ({', '.join(symbols)} and their cross pairs, or model.mixing), or "
            f"model.species = {json.dumps(symbols)} to use these parameters for every pair of them"
        )
    known = {atomic_numbers[e] for e in elements}
    unknown = [z for z in present if z not in known]
    if unknown:
        symbols = [name(z) for z in unknown]
        if m.pairs is not None:
            entries = ", ".join(f"{e} = {{...}}" for e in symbols)
            crosses = ", ".join(f'"{a}-{b}"' for a in elements for b in symbols)
            how = (
                f"add {entries} to [model.pairs] ({scalar}) and the cross pairs {crosses}"
                + (" (or let model.mixing fill them)" if m._mixable else "")
                + ", or leave these structures out"
            )
            key = "model.pairs"
        else:
            how = (
                f"add {', '.join(repr(e) for e in symbols)} to model.species to use the same "
                "parameters for it, or give a per-species table [model.pairs], or leave these "
                "structures out"
            )
            key = "model.species"
        raise ConfigError(
            f"{key}: the model has parameters for {', '.join(elements)} only, but the "
            f"structures hold {found(unknown)}: {how}"
        )
    used = ", ".join(e for e in elements if atomic_numbers[e] in first)
    if m.pairs is None:
        return (
            f"model: {kind} parameters for {', '.join(elements)} (model.species); present: {used}"
        )
    mixed = ""
    if m.mixing is not None:
        listed = set(m.pair_table())
        filled = [
            f"{a}-{b}"
            for i, a in enumerate(elements)
            for b in elements[i + 1 :]
            if (a, b) not in listed
        ]
        if filled:
            mixed = f"; mixed ({m.mixing}): {', '.join(filled)}"
    return f"model: {kind} per species pair for {', '.join(elements)}{mixed}; present: {used}"


def _check_file_model(m, present, found, name) -> str:
    """:func:`check_structure_species` for a model read from a file."""
    elements = file_model_elements(m)
    if elements is None:
        return f"model: {m.type} model from {m.file} (it lists no elements)"
    known = {atomic_numbers[e] for e in elements}
    unknown = [z for z in present if z not in known]
    if unknown:
        raise ConfigError(
            f"model.file: {m.file} has parameters for {', '.join(elements)} only, but the "
            f"structures hold {found(unknown)}: use a model that covers "
            f"{', '.join(name(z) for z in unknown)}, or leave these structures out"
        )
    used = ", ".join(e for e in elements if atomic_numbers[e] in set(present))
    return f"model: {m.type} model from {m.file} for {', '.join(elements)}; present: {used}"
