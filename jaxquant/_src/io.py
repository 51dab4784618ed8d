"""Save and load (quantized) parameter trees as safetensors files.

Every array leaf becomes one tensor named by its path: its keys, each escaped (``%`` -> ``%25``,
``/`` -> ``%2F``, ``:`` -> ``%3A``, an empty key -> ``%``) and joined by ``/``. So two paths never
share a name and ``load`` rebuilds every key as it was. A QArray's leaves are named
``PATH::codes``, ``PATH::scale`` (or ``PATH::scale::codes`` ... when nested), ``PATH::zero_point``,
``PATH::offset``. Arrays of a dtype safetensors has no name for (float8, int4, complex128, ...) are
stored as their raw bytes, uint8 with one more axis of the item size, and their dtype recorded.

The header's ``__metadata__`` holds the format version, the layout (JSON: each path's QArray
metadata, or how its array is stored) and a CRC-32 of the layout and of every tensor's name,
dtype, shape and bytes; ``load`` checks it before building anything. CRC-32 catches accidental
damage (every burst of up to 32 flipped bits; anything else but for a 2^-32 chance), not
deliberate edits: anyone can recompute it.

Writes are atomic: a new file in the same folder (mode as ``open`` would give it: the umask's, or
that of the file replaced), fsync'd, then renamed over the target; nothing is created before the
whole tree has been checked.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import stat
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxquant._src.qarray import QArray, validate
from jaxquant._src.tree import path_str

FORMAT = "jaxquant.tree/2"
_FORMAT_1 = "jaxquant.tree/1"  # unescaped names, no checksum; still read
_NATIVE = {np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                 np.uint32, np.uint64, np.float16, jnp.bfloat16, np.float32, np.float64)}
_UNESCAPE = {"%25": "%", "%2F": "/", "%3A": ":"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back as asked (the message names the file and what)."""


def _key(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _name(path) -> str:
    """The tensor name of a key path: escaped keys joined by ``/`` (``""`` for the root)."""
    return "/".join(_key(k).replace("%", "%25").replace("/", "%2F").replace(":", "%3A") or "%"
                    for k in path)


def _parts(name: str) -> list[str]:
    return [re.sub("%(25|2F|3A)", lambda m: _UNESCAPE[m.group(0)], p) if p != "%" else ""
            for p in name.split("/")]


def _axis_json(axis):
    """None, an int, or a merged axes tuple as a JSON list (``_build`` turns it back)."""
    if axis is None:
        return None
    return [int(a) for a in axis] if isinstance(axis, tuple) else int(axis)


def _describe(q: QArray) -> dict:
    meta = dict(shape=[int(d) for d in q.shape], dtype=np.dtype(q.dtype).name, qtype=q.qtype,
                block_size=int(q.block_size), axis=_axis_json(q.axis),
                zero_point=q.zero_point is not None, offset=q.offset is not None)
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


def _bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _checksum(layout: str, tensors: dict) -> str:
    crc = zlib.crc32(layout.encode())
    for name in sorted(tensors):
        a = tensors[name]
        crc = zlib.crc32(f"{name}\0{a.dtype.name}\0{a.shape}\0".encode(), crc)
        crc = zlib.crc32(_bytes(a), crc)
    return f"crc32:{crc:08x}"


def _array(name: str, leaf) -> np.ndarray:
    try:
        a = np.asarray(leaf)
    except Exception as e:  # e.g. a typed PRNG key: store jax.random.key_data instead
        raise TypeError(f"save: {name!r} ({type(leaf).__name__}) is not an array: {e}") from None
    if a.dtype != np.bool_ and not jnp.issubdtype(a.dtype, np.number):
        raise TypeError(f"save: {name!r} has dtype {a.dtype}; only bool and numeric arrays can be saved")
    return a


def save(path: str | os.PathLike, tree) -> None:
    """Write ``tree`` (nested containers of arrays and QArrays) to a safetensors file, atomically.

    Every key and every numeric dtype JAX has round-trips through ``load``. Everything is checked
    before the file is touched, so a refused tree leaves an existing file as it was.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq, tempfile, os
      >>> f = os.path.join(tempfile.mkdtemp(), "q.safetensors")
      >>> jq.save(f, {"w": jq.quantize(jnp.ones((64, 64)))})
      >>> jq.load(f)["w"].shape
      (64, 64)

    Raises:
      ValueError: a QArray that breaks its invariant, or two keys of one node that print alike.
      TypeError: a leaf that is not a bool or numeric array.
    """
    tensors, layout = {}, {}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))[0]
    for p, leaf in leaves:
        name = _name(p)
        if name in layout:
            raise ValueError(f"save: two keys under {path_str(p[:-1])!r} both read {_key(p[-1])!r}")
        if isinstance(leaf, QArray):
            validate(leaf)
            layout[name] = _describe(leaf)
            _put(leaf, name, tensors)
            continue
        a = _array(name, leaf)
        if a.dtype in _NATIVE:
            layout[name], tensors[name] = "array", a
        else:
            layout[name] = {"raw": a.dtype.name}
            tensors[name] = _bytes(a).reshape(*a.shape, a.dtype.itemsize)
    text = json.dumps(layout)
    metadata = {"format": FORMAT, "layout": text, "checksum": _checksum(text, tensors)}
    atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp)`` fills a new file beside ``path``, which is fsync'd and renamed over ``path``:
    a reader sees the old file or the whole new one, never a part. The new file keeps the mode of
    the one it replaces (else 0o666 less the umask); on any error the temporary file is removed."""
    path = pathlib.Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)  # a plain open() keeps the replaced file's mode
    except FileNotFoundError:
        mode = None
    tmp, mode = _create_beside(path, mode)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # safetensors replaces the file it is given with a 0o600 one
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_beside(path: pathlib.Path, mode: int | None) -> tuple[pathlib.Path, int]:
    """A new empty file next to ``path`` and the mode to give it: ``mode``, or 0o666 less the
    umask, read from the new file (``os.umask`` cannot be read without changing it)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode) if mode is None else mode
        finally:
            os.close(fd)


def _jax_or_numpy(a: np.ndarray):
    """A JAX array, or the numpy array itself where JAX would narrow it (64-bit without x64)."""
    return jnp.asarray(a) if jax.dtypes.canonicalize_dtype(a.dtype) == a.dtype else a


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


def _leaf(meta, name: str, tensors: dict, file):
    if isinstance(meta, dict) and "raw" in meta:
        dtype = np.dtype(jnp.dtype(meta["raw"]))
        t = tensors.get(name)
        if t is None or t.dtype != np.uint8 or t.ndim < 1 or t.shape[-1] != dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {name!r} is not the raw bytes of {dtype} its layout says")
        return _jax_or_numpy(t.view(dtype).reshape(t.shape[:-1]))
    if meta == "array":
        if name not in tensors:
            raise CheckpointError(f"{file}: tensor {name!r} is missing")
        return _jax_or_numpy(tensors[name])
    return _build(meta, name, tensors, file)


def _read(path) -> tuple[str, dict, dict]:
    """The format, the layout and the tensors of a jaxquant file, checked; CheckpointError else."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    fmt = header.get("format")
    if fmt not in (FORMAT, _FORMAT_1):
        raise CheckpointError(f"{path}: not a jaxquant tree (format {fmt!r}, expected {FORMAT!r})")
    text = header.get("layout")
    try:
        layout = json.loads(text)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the layout in the header is not JSON ({e})") from None
    if not isinstance(layout, dict):
        raise CheckpointError(f"{path}: the layout in the header is not a JSON object")
    if fmt == FORMAT:
        stored, actual = header.get("checksum"), _checksum(text, tensors)
        if stored != actual:
            raise CheckpointError(f"{path}: checksum mismatch (header {stored!r}, data {actual!r}): "
                                  f"the file was damaged after it was written")
    return fmt, layout, tensors


def load(path: str | os.PathLike, target=None):
    """Read a tree written by ``save``.

    Args:
      path: the file.
      target: optional tree (arrays, QArrays or ``jax.eval_shape`` abstractions) the file must
        match: same paths, same QArray metadata, same array shapes and dtypes; the result then has
        the target's tree structure (FrozenDicts, lists, dataclasses). Without it, nested dicts
        with string keys (a bare array saved alone comes back bare).

    Returns:
      The tree, with JAX arrays; a 64-bit array comes back as a numpy array while
      ``jax_enable_x64`` is off, rather than narrowed.

    Raises:
      CheckpointError: a truncated, damaged or foreign file (checksum, header or layout), a missing
        tensor, or a mismatch with ``target``, naming the file and the path.
    """
    fmt, layout, tensors = _read(path)
    leaves = {}
    for name, meta in layout.items():
        try:
            leaves[name] = _leaf(meta, name, tensors, path)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            raise CheckpointError(f"{path}: the layout entry of {name!r} is malformed "
                                  f"({type(e).__name__}: {e})") from None
    naming = _name if fmt == FORMAT else path_str
    if target is None:
        return _nest(leaves, fmt, path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=lambda x: isinstance(x, QArray))
    out = []
    for p, want in flat:
        name = naming(p)
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
    extra = set(leaves) - {naming(p) for p, _ in flat}
    if extra:
        raise CheckpointError(f"{path}: holds {sorted(extra)[:3]} that the target does not have")
    return jax.tree_util.tree_unflatten(treedef, out)


def _nest(leaves: dict, fmt: str, file):
    if fmt == FORMAT and set(leaves) == {""}:
        return leaves[""]  # the tree was a single leaf
    tree = {}
    for name, leaf in leaves.items():
        node = tree
        *parents, last = _parts(name) if fmt == FORMAT else name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{file}: {name!r} lies under a leaf of the same name")
        if last in node:
            raise CheckpointError(f"{file}: {name!r} names a leaf and a folder")
        node[last] = leaf
    return tree


def _short(x) -> str:
    return repr(x) if isinstance(x, QArray) else f"an array {np.dtype(x.dtype)}{tuple(x.shape)}"
