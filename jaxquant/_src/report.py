"""Per-parameter memory reports of quantized trees: what was quantized, what stayed float and why."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import layout
from jaxquant._src.dequantize import dequantize
from jaxquant._src.memory import nbytes
from jaxquant._src.qarray import QArray
from jaxquant._src.tree import Layout, Policy, is_qarray, path_str, plan


def _logical(leaf):
    """The float array a leaf stands for, abstractly: a QArray's full shape (stacks included)."""
    if isinstance(leaf, QArray):
        return jax.ShapeDtypeStruct(layout.stack_shape(leaf) + tuple(leaf.shape), leaf.dtype)
    return leaf


_FIELDS = ("codes", "scale", "zero_point", "offset")


def _group_fields(after: dict) -> dict:
    """An NNX state holds a QArray's leaves (``kernel/codes``, ``kernel/scale/codes``, ...) without
    its metadata (that is in the graphdef): group them back under the parameter's path."""
    out = {}
    for name, leaf in after.items():
        parts = name.split("/")
        # the first field name whose parent also has codes: that parent is the QArray
        cut = next((i for i, part in enumerate(parts) if part in _FIELDS and i
                    and "/".join(parts[:i] + ["codes"]) in after), None)
        if cut is None:
            out[name] = leaf
        else:
            out.setdefault("/".join(parts[:cut]), []).append(leaf)
    return out


def memory_report(params, qparams=None, with_error: bool = False, *, policy: Policy | None = None,
                  layouts: dict[str, Layout] | None = None) -> list[dict]:
    """One row per parameter: path, shape, qtype, bytes before and after, bits per parameter, and
    for a parameter left float ``why`` (``plan``'s reason under ``policy``, the default policy if
    None, and ``layouts``); with ``with_error``, the relative RMS weight error of quantized ones.

    ``params`` may be a Linen tree, an NNX state or an NNX module. With ``qparams=None``,
    ``params`` is the quantized tree or module alone (bytes before from the QArrays' shapes and
    dtypes; no errors then). An NNX state holds a QArray's leaves but not its metadata: its
    quantized rows say ``qtype="quantized"`` and need the float state beside them.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> params = nn.Dense(256).init(jax.random.key(0), jnp.ones((1, 784)))
      >>> rows = jq.memory_report(params, jq.quantize_tree(params))
      >>> [(r["path"], r["qtype"] or r["why"]) for r in rows]
      [('params/bias', 'no rule matches'), ('params/kernel', 'nf4')]

    Raises:
      ValueError: the two trees do not have the same parameter paths, or a parameter's shape
        differs between them (naming them).
    """
    if qparams is None:
        params, qparams, with_error = None, params, False
    after = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]
    after = _group_fields({path_str(p): leaf for p, leaf in after})
    grouped = [name for name, leaf in after.items() if isinstance(leaf, list)]
    if params is None:
        if grouped:
            raise ValueError(f"memory_report: {grouped[0]!r} is a QArray's leaves without its "
                             f"metadata (an NNX state): pass the module, or the float state too")
        before = {name: _logical(leaf) for name, leaf in after.items()}
    else:
        before = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if set(before) != set(after):
        raise ValueError(f"memory_report needs two trees with the same paths: only in params "
                         f"{sorted(set(before) - set(after))[:3]}, only in qparams "
                         f"{sorted(set(after) - set(before))[:3]}; pass the tree quantize_tree "
                         f"was given and the tree it returned")
    for name, leaf in after.items():
        if not isinstance(leaf, list) and tuple(before[name].shape) != tuple(_logical(leaf).shape):
            raise ValueError(f"memory_report: {name!r} has shape {tuple(before[name].shape)} in "
                             f"params but {tuple(_logical(leaf).shape)} in qparams")
    float_view = {name: before[name] if isinstance(leaf, list) else _logical(leaf)
                  for name, leaf in after.items()}
    reasons = plan(float_view, policy, layouts)
    rows = []
    for name, leaf in after.items():
        orig = before[name]
        quantized = isinstance(leaf, (QArray, list))
        qtype = leaf.qtype if isinstance(leaf, QArray) else "quantized" if quantized else None
        row = dict(path=name, shape=tuple(orig.shape), qtype=qtype,
                   bytes_before=math.prod(orig.shape) * np.dtype(orig.dtype).itemsize,
                   bytes_after=nbytes(leaf))
        row["bits_per_param"] = 8 * row["bytes_after"] / max(math.prod(orig.shape), 1)
        if not quantized:
            row["why"] = reasons[name].why or "left float by the policy that made the tree"
        if with_error and isinstance(leaf, QArray):
            ref = jnp.asarray(orig, jnp.float32)
            err = dequantize(leaf, jnp.float32).reshape(ref.shape) - ref
            row["rel_rms_error"] = float(jnp.sqrt(jnp.sum(err * err) / jnp.sum(ref * ref)))
        rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    """The report as a table with a total line; a float parameter's reason in the last column."""
    lines = [f"{'path':<48} {'shape':<18} {'qtype':<6} {'before':>10} {'after':>10} {'bits':>6} "
             f"{'err':>7}  why float"]
    for r in rows:
        err = f"{r['rel_rms_error']:.4f}" if "rel_rms_error" in r else ""
        lines.append(f"{r['path'][-48:]:<48} {str(r['shape']):<18} {r['qtype'] or '-':<6} "
                     f"{r['bytes_before']:>10,} {r['bytes_after']:>10,} {r['bits_per_param']:>6.2f} "
                     f"{err:>7}  {r.get('why', '')}".rstrip())
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    params = sum(math.prod(r["shape"]) for r in rows)
    lines.append(f"{'total':<48} {params:<18,} {'':<6} {before:>10,} {after:>10,} "
                 f"{8 * after / max(params, 1):>6.2f}")
    return "\n".join(lines)
