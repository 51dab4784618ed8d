"""bitsandbytes / Hugging Face 4-bit checkpoint layout: ``to_bnb`` and ``from_bnb``.

A bitsandbytes ``Linear4bit`` stores, under a prefix such as ``weight``: the packed codes
``[ceil(n/2), 1]`` uint8, ``absmax`` (float32, or uint8 nested codes), ``quant_map`` (the 16-entry
table), with double quantization ``nested_absmax`` and ``nested_quant_map``, and a uint8 tensor
holding a JSON object, ``quant_state.bitsandbytes__nf4`` (or ``__fp4``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxquant._src import codebooks
from jaxquant._src.qarray import QArray, blocked_shape, validate

_TORCH_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def to_bnb(q: QArray, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The entries bitsandbytes stores for ``q`` in a checkpoint, as numpy arrays.

    They describe the array whose row-major flattening ``q``'s blocks run along: ``q`` itself for
    ``axis=None``, ``moveaxis(x, axis, -1)`` otherwise (for a Flax kernel ``(in, out)`` quantized
    along axis 0, that is the torch weight ``(out, in)``).

    Raises:
      ValueError: ``q`` is not nf4/fp4 absmax, or its blocks along ``axis`` are not bitsandbytes'
        blocks (the axis length must be a multiple of ``block_size``).
    """
    validate(q)
    if q.qtype not in ("nf4", "fp4") or q.zero_point is not None:
        raise ValueError(f"to_bnb needs an nf4 or fp4 absmax QArray, got {q!r}")
    if np.dtype(q.dtype).name not in _TORCH_DTYPES:
        raise TypeError(f"to_bnb: bitsandbytes records the dtype as one of {sorted(_TORCH_DTYPES)}, "
                        f"got {q!r}; quantize a float32, float16 or bfloat16 array")
    rest, length = blocked_shape(q.shape, q.axis)
    if q.axis is not None and (length % q.block_size or length % 2):
        raise ValueError(f"to_bnb needs the length of axis {q.axis} to be an even multiple of "
                         f"block_size for bitsandbytes' flat blocks, got shape={q.shape} "
                         f"block_size={q.block_size}; quantize with axis=None instead")
    state = {"quant_type": q.qtype, "blocksize": int(q.block_size), "dtype": np.dtype(q.dtype).name,
             "shape": list(q.shape) if q.axis is None else [*rest, length]}
    out = {prefix: np.asarray(q.codes).reshape(-1, 1),
           f"{prefix}.quant_map": codebooks.QTYPES[q.qtype].values.copy()}
    if isinstance(q.scale, QArray):
        nested = q.scale
        out[f"{prefix}.absmax"] = np.asarray(nested.codes).reshape(-1)
        out[f"{prefix}.nested_absmax"] = np.asarray(nested.scale).reshape(-1)
        out[f"{prefix}.nested_quant_map"] = codebooks.DYNAMIC8_SIGNED.copy()
        state |= {"nested_blocksize": int(nested.block_size), "nested_dtype": "float32",
                  "nested_offset": float(np.asarray(nested.offset))}
    else:
        out[f"{prefix}.absmax"] = np.asarray(q.scale).reshape(-1)
    out[f"{prefix}.quant_state.bitsandbytes__{q.qtype}"] = np.frombuffer(
        json.dumps(state).encode(), dtype=np.uint8).copy()
    return out


def _count(v) -> bool:
    """A JSON integer >= 0 (not a bool, a float or a string)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(d: dict, key: str, dtype) -> np.ndarray:
    if key not in d:
        raise ValueError(f"from_bnb: missing key {key!r}; present: {sorted(d, key=str)}")
    a = np.asarray(d[key])
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"from_bnb: {key!r} must be {np.dtype(dtype).name}, got {a.dtype}")
    return a


def from_bnb(d: dict, prefix: str = "weight", *, transpose: bool = False) -> QArray:
    """Read a bitsandbytes 4-bit checkpoint entry (``to_bnb``'s output, or bitsandbytes' own).

    Args:
      d: the entries (numpy arrays or anything ``np.asarray`` takes, e.g. CPU torch tensors).
      prefix: the key prefix, ``weight`` for a ``Linear4bit``.
      transpose: False gives the torch array (shape ``shape`` from the JSON, ``axis=None``);
        True gives its transpose as a Flax kernel ``(in, out)`` with blocks along axis 0 — the
        same bytes, no copy of the codes. Needs ``in`` to be a multiple of the block size.

    Raises:
      ValueError: naming the key that is missing, has the wrong dtype, or disagrees with the JSON.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"from_bnb needs a dict of arrays, got {type(d).__name__}")
    states = [k for k in d if isinstance(k, str) and k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(states) != 1:
        raise ValueError(f"from_bnb: expected one key '{prefix}.quant_state.bitsandbytes__nf4' or "
                         f"'__fp4', found {states}")
    key = states[0]
    try:
        state = json.loads(_entry(d, key, np.uint8).tobytes().decode())
        qtype, block_size, shape = state["quant_type"], state["blocksize"], state["shape"]
        dtype = np.dtype(_TORCH_DTYPES[state["dtype"]])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"from_bnb: {key!r} is not a valid quant_state JSON: {e!r}") from None
    if not (_count(block_size) and block_size > 0 and isinstance(shape, list)
            and all(_count(n) for n in shape) and _count(state.get("nested_blocksize", 1))
            and state.get("nested_blocksize", 1) > 0):
        raise ValueError(f"from_bnb: {key!r} needs a positive int blocksize (and nested_blocksize) and "
                         f"a shape of non-negative ints, got blocksize={block_size!r}, shape={shape!r}, "
                         f"nested_blocksize={state.get('nested_blocksize')!r}")
    shape = tuple(shape)
    if qtype not in ("nf4", "fp4") or not key.endswith(qtype):
        raise ValueError(f"from_bnb: {key!r} says quant_type={qtype!r}")
    table = _entry(d, f"{prefix}.quant_map", np.float32)
    if not np.array_equal(table.reshape(-1), codebooks.QTYPES[qtype].values):
        raise ValueError(f"from_bnb: {prefix}.quant_map is not bitsandbytes' {qtype} table")
    n = math.prod(shape)
    nb = -(-n // block_size)
    if prefix not in d:
        raise ValueError(f"from_bnb: missing key {prefix!r}; present: {sorted(d, key=str)}")
    weight = np.asarray(d[prefix])
    if weight.dtype != np.uint8:  # quant_storage only reinterprets the same bytes
        weight = np.ascontiguousarray(weight).view(np.uint8)
    if weight.size != -(-n // 2):
        raise ValueError(f"from_bnb: {prefix!r} holds {weight.size} bytes, but shape {list(shape)} "
                         f"in {key!r} needs {-(-n // 2)}")
    nested = "nested_offset" in state or f"{prefix}.nested_absmax" in d
    absmax = _entry(d, f"{prefix}.absmax", np.uint8 if nested else np.float32).reshape(-1)
    if absmax.size != nb:
        raise ValueError(f"from_bnb: {prefix}.absmax has {absmax.size} entries, shape {list(shape)} "
                         f"with blocksize {block_size} needs {nb}")
    if nested:
        nested_absmax = _entry(d, f"{prefix}.nested_absmax", np.float32).reshape(-1)
        nested_map = _entry(d, f"{prefix}.nested_quant_map", np.float32).reshape(-1)
        nbs = state.get("nested_blocksize", 256)
        if not np.array_equal(nested_map, codebooks.DYNAMIC8_SIGNED):
            raise ValueError(f"from_bnb: {prefix}.nested_quant_map is not the signed dynamic map")
        if nested_absmax.size != -(-nb // nbs) or "nested_offset" not in state:
            raise ValueError(f"from_bnb: {prefix}.nested_absmax has {nested_absmax.size} entries "
                             f"(needs {-(-nb // nbs)}) or {key!r} lacks nested_offset")
        offset = state["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not np.isfinite(offset):
            raise ValueError(f"from_bnb: {key!r} needs a finite number nested_offset, got {offset!r}")
        if state.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"from_bnb: {key!r} says nested_dtype={state['nested_dtype']!r}; "
                             f"bitsandbytes' nested constants are float32")
        scale = QArray(jnp.asarray(absmax), jnp.asarray(nested_absmax), None,
                       jnp.float32(offset), shape=(nb,), dtype=np.dtype(np.float32),
                       qtype="dynamic8", block_size=nbs, axis=None)
    else:
        scale = jnp.asarray(absmax)
    codes = jnp.asarray(weight.reshape(-1))
    if not transpose:
        return validate(QArray(codes, scale, None, None, shape=shape, dtype=dtype, qtype=qtype,
                               block_size=block_size, axis=None))
    if len(shape) != 2 or shape[1] % block_size or shape[1] % 2:
        raise ValueError(f"from_bnb(transpose=True) needs a 2-D weight whose last dim is an even "
                         f"multiple of blocksize, got shape {list(shape)}, blocksize {block_size}")
    out_dim, in_dim = shape
    if isinstance(scale, QArray):  # the nested codes stay flat (axis=None); only the shape changes
        scale = dataclasses.replace(scale, shape=(out_dim, in_dim // block_size))
    else:
        scale = scale.reshape(out_dim, -1)
    return validate(QArray(codes.reshape(out_dim, -1), scale, None, None, shape=(in_dim, out_dim),
                           dtype=dtype, qtype=qtype, block_size=block_size, axis=0))
