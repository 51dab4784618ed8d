"""Save and load (quantized) parameter trees as safetensors files.

Every array leaf becomes one tensor named by its path (keys joined by ``/``); a QArray's leaves
are named ``PATH::codes``, ``PATH::scale`` (or ``PATH::scale::codes`` ... when nested),
``PATH::zero_point``, ``PATH::offset``. The static metadata of each QArray (shape, dtype, qtype,
block size, axis) goes into the header's ``__metadata__`` as JSON, with a format version.
Writes are atomic: a temporary file in the same folder, fsync'd, then renamed over the target.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxquant._src.qarray import QArray, validate
from jaxquant._src.tree import path_str

FORMAT = "jaxquant.tree/1"
_FIELDS = ("codes", "scale", "zero_point", "offset")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back as asked (the message names the file and what)."""


def _describe(q: QArray) -> dict:
    meta = dict(shape=list(q.shape), dtype=np.dtype(q.dtype).name, qtype=q.qtype,
                block_size=q.block_size, axis=q.axis, zero_point=q.zero_point is not None,
                offset=q.offset is not None)
    if isinstance(q.scale, QArray):
        meta["scale"] = _describe(q.scale)
    return meta


def _put(q: QArray, name: str, tensors: dict) -> None:
    tensors[f"{name}::codes"] = np.asarray(q.codes)
    if isinstance(q.scale, QArray):
        _put(q.scale, f"{name}::scale", tensors)
    else:
        tensors[f"{name}::scale"] = np.asarray(q.scale)
    for field in ("zero_point", "offset"):
        if getattr(q, field) is not None:
            tensors[f"{name}::{field}"] = np.asarray(getattr(q, field))


def save(path: str | os.PathLike, tree) -> None:
    """Write ``tree`` (nested dicts of arrays and QArrays) to a safetensors file, atomically."""
    tensors, layout = {}, {}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))[0]
    for p, leaf in leaves:
        name = path_str(p)
        if isinstance(leaf, QArray):
            validate(leaf)
            layout[name] = _describe(leaf)
            _put(leaf, name, tensors)
        else:
            layout[name] = "array"
            tensors[name] = np.asarray(leaf)
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        safetensors.numpy.save_file(tensors, tmp, metadata={"format": FORMAT, "layout": json.dumps(layout)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _take(tensors: dict, name: str, file) -> jax.Array:
    if name not in tensors:
        raise CheckpointError(f"{file}: tensor {name!r} is missing")
    return jnp.asarray(tensors[name])


def _build(meta: dict, name: str, tensors: dict, file) -> QArray:
    scale = (_build(meta["scale"], f"{name}::scale", tensors, file) if "scale" in meta
             else _take(tensors, f"{name}::scale", file))
    q = QArray(_take(tensors, f"{name}::codes", file), scale,
               _take(tensors, f"{name}::zero_point", file) if meta["zero_point"] else None,
               _take(tensors, f"{name}::offset", file) if meta["offset"] else None,
               shape=tuple(meta["shape"]), dtype=np.dtype(jnp.dtype(meta["dtype"])), qtype=meta["qtype"],
               block_size=meta["block_size"],
               axis=tuple(meta["axis"]) if isinstance(meta["axis"], list) else meta["axis"])  # JSON list
    try:
        return validate(q)
    except ValueError as e:
        raise CheckpointError(f"{file}: {name!r} does not match its metadata: {e}") from None


def load(path: str | os.PathLike, target=None):
    """Read a tree written by ``save``.

    Args:
      path: the file.
      target: optional tree (arrays, QArrays or ``jax.eval_shape`` abstractions) the file must
        match: same paths, same QArray metadata, same array shapes and dtypes; the result then has
        the target's tree structure (FrozenDicts included). Without it, nested dicts.

    Raises:
      CheckpointError: a truncated or foreign file, a missing tensor, or a mismatch with ``target``,
        naming the file and the path.
    """
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a jaxquant tree (format {header.get('format')!r})")
    layout = json.loads(header["layout"])
    leaves = {name: (_build(meta, name, tensors, path) if meta != "array" else _take(tensors, name, path))
              for name, meta in layout.items()}
    if target is None:
        tree = {}
        for name, leaf in leaves.items():
            node = tree
            *parents, last = name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = leaf
        return tree
    flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=lambda x: isinstance(x, QArray))
    out = []
    for p, want in flat:
        name = path_str(p)
        if name not in leaves:
            raise CheckpointError(f"{path}: has no {name!r}, which the target needs")
        got = leaves[name]
        if isinstance(want, QArray) != isinstance(got, QArray) or (
                isinstance(want, QArray) and _describe(want) != _describe(got)):
            raise CheckpointError(f"{path}: {name!r} is {_short(got)} in the file, the target "
                                  f"wants {_short(want)}")
        if not isinstance(want, QArray) and (tuple(want.shape) != tuple(got.shape) or
                                             np.dtype(want.dtype) != np.dtype(got.dtype)):
            raise CheckpointError(f"{path}: {name!r} is {got.dtype}{tuple(got.shape)} in the file, "
                                  f"the target wants {np.dtype(want.dtype)}{tuple(want.shape)}")
        out.append(got)
    extra = set(leaves) - {path_str(p) for p, _ in flat}
    if extra:
        raise CheckpointError(f"{path}: holds {sorted(extra)[:3]} that the target does not have")
    return jax.tree_util.tree_unflatten(treedef, out)


def _short(x) -> str:
    return repr(x) if isinstance(x, QArray) else f"an array {np.dtype(x.dtype)}{tuple(x.shape)}"
