"""Model files: Equinox-serialised leaves behind a one-line JSON header naming the model.

Layout: the first line is a JSON object (``format``, ``version``, ``class`` as
``module:QualName``, ``kind`` and ``hyperparameters``), the rest is
``eqx.tree_serialise_leaves`` of the model. :func:`load_model` rebuilds a skeleton from the
header and deserialises the leaves into it, so a file restores the model with no other input:

- a model with a method ``hyperparameters() -> dict`` (JSON-able values) is rebuilt as
  ``cls(**hp, key=jax.random.key(0))`` when its constructor takes ``key``, else ``cls(**hp)``;
- any other Equinox model (the pair potentials) is rebuilt as ``cls(**fields)`` from the values
  of its constructor fields (scalars, strings, tuples, arrays), stored in the header. A field
  holding anything else (a nested module, a function) makes the model unsavable: define
  ``hyperparameters()``.

Files are written atomically (a temporary file in the same folder, then a rename); an existing
file is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "save_model",
    "load_model",
    "read_header",
    "atomic_write",
    "decode_header_value",
    "check_savable",
]

FORMAT, VERSION = "fused_dynamics.model", 1


def atomic_write(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; refuse an existing file unless ``overwrite``.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False (checked again at the rename, so a file
        created meanwhile is not replaced either).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{os.fspath(path)!r} exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobbers
            except FileExistsError:
                raise FileExistsError(
                    f"{os.fspath(path)!r} exists; pass overwrite=True to replace it."
                ) from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise FileExistsError(f"{os.fspath(path)!r} exists.") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _encode(value: Any, where: str) -> Any:
    """A JSON value for a constructor argument; tuples and arrays are tagged to come back."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, jax.Array | np.ndarray):
        arr = np.asarray(value)
        kind = "jax" if isinstance(value, jax.Array) else "numpy"
        return {"__array__": arr.tolist(), "dtype": str(arr.dtype), "kind": kind}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v, f"{where}.{k}") for k, v in value.items()}}
    raise TypeError(f"{where} holds a {type(value).__name__}, which a JSON header cannot hold")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__array__" in value:
            arr = np.asarray(value["__array__"], dtype=value["dtype"])
            if value.get("kind") == "jax":
                return jnp.asarray(arr, dtype=arr.dtype)
            return arr
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _decode(v) for k, v in value["__dict__"].items()}
    return value


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def check_savable(model) -> None:
    """Raise the TypeError :func:`save_model` would raise for ``model`` (nothing is written)."""
    _header(model)


def decode_header_value(value: Any) -> Any:
    """A value of a header's ``hyperparameters`` as the model had it (tuples, arrays)."""
    return _decode(value)


def _header(model) -> dict:
    cls = type(model)
    name = cls.__qualname__
    if "<locals>" in name:
        raise TypeError(
            f"cannot save a {name}: a class defined inside a function cannot be imported back; "
            "define it at module level."
        )
    if cls.__module__ == "__main__":
        raise TypeError(
            f"cannot save a {name}: it is defined in the script being run (__main__), which "
            "another program cannot import; define the class in an importable module."
        )
    if callable(getattr(model, "hyperparameters", None)):
        hp = model.hyperparameters()
        if not isinstance(hp, dict):
            raise TypeError(f"{name}.hyperparameters() must return a dict, got {type(hp)}.")
        kind = "hyperparameters"
        try:
            hp = {k: _encode(v, f"{name}.hyperparameters()[{k!r}]") for k, v in hp.items()}
        except TypeError as exc:
            raise TypeError(f"cannot save a {name}: {exc}.") from None
    elif isinstance(model, eqx.Module):
        kind = "fields"
        hp = {}
        for f in dataclasses.fields(model):
            if not f.init:
                continue
            try:
                hp[f.name] = _encode(getattr(model, f.name), f"{name}.{f.name}")
            except TypeError as exc:
                raise TypeError(
                    f"cannot save a {name}: {exc}; give the class a method hyperparameters() "
                    "returning the constructor arguments (JSON values) that rebuild it."
                ) from None
    else:
        raise TypeError(f"cannot save a {name}: not an Equinox module.")
    return {
        "format": FORMAT,
        "version": VERSION,
        "class": _class_path(cls),
        "kind": kind,
        "hyperparameters": hp,
    }


def save_model(path: str | os.PathLike, model, *, overwrite: bool = False) -> Path:
    """Save a model so that :func:`load_model` restores it from the file alone.

    Parameters
    ----------
    path : path
        The file to write (conventionally ``.eqx``); its folder is created.
    model : eqx.Module
        Any :class:`~fused_dynamics.models.Model` (see the module docstring for what is
        stored).
    overwrite : bool, default False
        Replace an existing file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists and not ``overwrite``.
    TypeError
        The model cannot be restored from a header (a class defined in a function, a field
        that is neither a scalar, string, tuple nor array and no ``hyperparameters()``): the
        message names the class and the field.
    """
    header = _header(model)
    buf = io.BytesIO()
    buf.write(json.dumps(header).encode() + b"\n")
    eqx.tree_serialise_leaves(buf, model)
    return atomic_write(path, buf.getvalue(), overwrite=overwrite)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a model file (class, kind, hyper-parameters as stored)."""
    with open(path, "rb") as f:
        return _parse_header(f.readline(), path)


def _parse_header(line: bytes, path) -> dict:
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a fused_dynamics model file.")
    if header.get("version") != VERSION:
        raise ValueError(f"{os.fspath(path)!r}: unsupported model file version.")
    return header


def load_model(path: str | os.PathLike):
    """Restore a model written by :func:`save_model`.

    Returns
    -------
    eqx.Module
        An instance of the saved class whose leaves equal the saved ones (bit for bit, same
        dtypes).

    Raises
    ------
    ValueError
        Not a model file, or the class cannot be rebuilt from the header (the message names
        the class).
    FileNotFoundError
        No such file.
    """
    with open(path, "rb") as f:
        header = _parse_header(f.readline(), path)
        name = header["class"]
        try:
            cls = _import_class(name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"{os.fspath(path)!r}: cannot import model class {name}: {exc}"
            ) from exc
        kwargs = {k: _decode(v) for k, v in header["hyperparameters"].items()}
        if header["kind"] == "hyperparameters":
            try:
                takes_key = "key" in inspect.signature(cls).parameters
            except (TypeError, ValueError):
                takes_key = False
            if takes_key and "key" not in kwargs:
                kwargs["key"] = jax.random.key(0)
        try:
            skeleton = cls(**kwargs)
        except Exception as exc:
            raise ValueError(
                f"{os.fspath(path)!r}: cannot rebuild {name} from its stored "
                f"{header['kind']}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            return eqx.tree_deserialise_leaves(f, skeleton)
        except Exception as exc:
            raise ValueError(
                f"{os.fspath(path)!r}: the stored leaves do not fit a {name} rebuilt from the "
                f"header: {type(exc).__name__}: {exc}"
            ) from exc
