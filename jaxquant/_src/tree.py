"""Quantize whole parameter trees by policy, and report what it did.

A *policy* is an ordered list of ``Rule``s: the first rule whose regex matches a parameter's path
(its keys joined by ``/``, e.g. ``params/layers_0/mlp/kernel``) decides how that parameter is
quantized, or that it is left alone (``qtype=None``). Parameters no rule matches are left alone.
The default policy quantizes matmul kernels (leaves named ``kernel``) to NF4 + double quant with
blocks along their contraction axis (axis 0 in Flax's ``(in, ..., out)`` layout); embeddings,
norm scales, biases and anything under ``min_size`` elements stay as they are.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant._src.config import QuantConfig
from jaxquant._src.dequantize import dequantize
from jaxquant._src.memory import nbytes
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import quantize_array


@dataclasses.dataclass(frozen=True)
class Rule:
    """How to quantize the parameters whose path matches ``pattern`` (``re.search``).

    ``qtype=None`` leaves them alone. ``axis`` is the block axis (the contraction axis of a
    kernel); ``block_size`` must divide that axis unless ``allow_partial_blocks``.
    """

    pattern: str
    qtype: str | None = "nf4"
    block_size: int | None = 64
    axis: int | None = 0
    double_quant: bool = True
    zero_point: bool = False
    allow_partial_blocks: bool = False

    def __post_init__(self):
        if isinstance(self.pattern, re.Pattern):
            return
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule pattern must be a regular expression string, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regular expression: {e}") from None

    def config(self, ndim: int) -> QuantConfig:
        return QuantConfig(self.qtype, self.block_size, self.axis, self.zero_point,
                           self.double_quant).validated(ndim)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Ordered rules, a size floor and a predicate escape hatch.

    Args:
      rules: first match wins.
      min_size: parameters with fewer elements stay as they are (small arrays cost little and
        quantize badly).
      predicate: ``predicate(path, leaf) -> bool``; False leaves the parameter alone whatever the
        rules say.
      strict: a rule that matches no parameter raises instead of warning.
    """

    rules: tuple[Rule, ...] = (Rule(r"(^|/)kernel$"),)
    min_size: int = 4096
    predicate: Callable[[str, Any], bool] | None = None
    strict: bool = False

    def __post_init__(self):
        if isinstance(self.rules, Rule) or not isinstance(self.rules, (tuple, list)):
            raise TypeError(f"Policy rules must be a tuple of Rule, got {self.rules!r}; "
                            f"write rules=(Rule(...),)")
        bad = [r for r in self.rules if not isinstance(r, Rule)]
        if bad:
            raise TypeError(f"Policy rules must be Rule objects, got {bad[0]!r}")
        object.__setattr__(self, "rules", tuple(self.rules))  # hashable, like the default
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)) \
                or self.min_size < 0:
            raise ValueError(f"Policy min_size must be an int >= 0, got {self.min_size!r}")
        if self.predicate is not None and not callable(self.predicate):
            raise TypeError(f"Policy predicate must be callable or None, got {self.predicate!r}")


class PolicyError(ValueError):
    """A parameter cannot be quantized as its rule asks (the message names the path)."""


def path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def plan(params, policy: Policy | None = None) -> dict[str, Rule | None]:
    """The rule each parameter path gets (None: left alone), checking every rule can apply.

    Raises:
      PolicyError: a matched parameter is not a float array, or its block axis is out of range
        or not a multiple of the block size; naming the path and the reason.
    """
    policy = policy or Policy()
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
    used, decisions = set(), {}
    for path, leaf in leaves:
        name = path_str(path)
        rule = next((r for r in policy.rules if re.search(r.pattern, name)), None)
        if rule is not None:
            used.add(rule)
        if (rule is None or rule.qtype is None or isinstance(leaf, QArray)
                or math.prod(leaf.shape) < policy.min_size
                or (policy.predicate is not None and not policy.predicate(name, leaf))):
            decisions[name] = None
            continue
        _check_quantizable(name, leaf, rule)
        decisions[name] = rule
    for rule in policy.rules:
        if rule not in used:
            message = f"quantize_tree: rule {rule.pattern!r} matches no parameter"
            if policy.strict:
                raise PolicyError(message)
            warnings.warn(message, stacklevel=3)
    return decisions


def _check_quantizable(name: str, leaf, rule: Rule) -> None:
    dtype = np.dtype(leaf.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise PolicyError(f"cannot quantize {name!r}: dtype {dtype} is not floating")
    try:
        cfg = rule.config(len(leaf.shape))
    except ValueError as e:
        raise PolicyError(f"cannot quantize {name!r} {tuple(leaf.shape)} by rule "
                          f"{rule.pattern!r}: {e}") from None
    if cfg.axis is not None and cfg.block_size and not rule.allow_partial_blocks:
        length = leaf.shape[cfg.axis]
        if length % cfg.block_size:
            raise PolicyError(
                f"cannot quantize {name!r} {tuple(leaf.shape)}: axis {cfg.axis} has length {length}, "
                f"not a multiple of block_size {cfg.block_size} (change the rule's block_size or "
                f"axis, or set allow_partial_blocks=True)")


def quantize_tree(params, policy: Policy | None = None, *, progress: bool = False,
                  donate: bool = False):
    """Quantize the parameters of a pytree (Linen params, FrozenDict, ...) by ``policy``.

    Leaf by leaf, so the device holds at most the input tree, the quantized tree and one leaf's
    temporaries. ``donate=True`` also deletes each quantized leaf's input array once its
    quantization is enqueued (its memory is freed when that computation is done), so the peak is
    about the input tree alone; the caller must not use those arrays afterwards. Abstract trees
    (``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``) give abstract QArrays, to plan
    memory or restore checkpoints without allocating.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> params = nn.Dense(256).init(jax.random.key(0), jnp.ones((1, 512)))
      >>> qparams = jq.quantize_tree(params)
      >>> type(qparams["params"]["kernel"]).__name__
      'QArray'
    """
    decisions = plan(params, policy)
    total = sum(r is not None for r in decisions.values())
    bar = tqdm(total=total, desc="quantizing", disable=not progress or total == 0, leave=False)
    # with donate, an array is deleted after its last quantization, and never if a kept leaf is it
    pending = collections.Counter()
    kept = set()
    is_leaf = lambda x: isinstance(x, QArray)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf)[0] if donate else ():
        if not isinstance(leaf, jax.Array):
            continue
        if decisions[path_str(path)] is None:
            kept.add(id(leaf))
        else:
            pending[id(leaf)] += 1

    def convert(path, leaf):
        rule = decisions[path_str(path)]
        if rule is None:
            return leaf
        cfg = rule.config(len(leaf.shape))
        if isinstance(leaf, jax.ShapeDtypeStruct):
            out = jax.eval_shape(lambda a: quantize_array(a, cfg), leaf)
        else:
            out = quantize_array(jnp.asarray(leaf), cfg)
            if donate and isinstance(leaf, jax.Array):
                pending[id(leaf)] -= 1
                if not pending[id(leaf)] and id(leaf) not in kept:
                    leaf.delete()  # PJRT frees the buffer after the pending quantize has read it
        bar.update()
        return out

    out = jax.tree_util.tree_map_with_path(convert, params, is_leaf=lambda x: isinstance(x, QArray))
    bar.close()
    return out


def dequantize_tree(tree):
    """Replace every QArray in ``tree`` by its dequantized array (original dtype)."""
    return jax.tree.map(lambda x: dequantize(x) if isinstance(x, QArray) else x, tree,
                        is_leaf=lambda x: isinstance(x, QArray))


def memory_report(params, qparams, with_error: bool = False) -> list[dict]:
    """One row per parameter: path, shape, qtype, bytes before and after, bits per parameter,
    and with ``with_error`` the relative RMS weight error of the quantized ones."""
    is_q = lambda x: isinstance(x, QArray)
    before = dict((path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params, is_q)[0])
    after = jax.tree_util.tree_flatten_with_path(qparams, is_q)[0]
    names = [path_str(p) for p, _ in after]
    if set(names) != set(before):
        raise ValueError(f"memory_report needs two trees with the same paths: only in params "
                         f"{sorted(set(before) - set(names))[:3]}, only in qparams "
                         f"{sorted(set(names) - set(before))[:3]}")
    rows = []
    for name, (_, leaf) in zip(names, after):
        orig = before[name]
        if tuple(orig.shape) != tuple(leaf.shape):
            raise ValueError(f"memory_report: {name!r} has shape {tuple(orig.shape)} in params but "
                             f"{tuple(leaf.shape)} in qparams")
        row = dict(path=name, shape=tuple(orig.shape), qtype=leaf.qtype if isinstance(leaf, QArray) else None,
                   bytes_before=nbytes(orig), bytes_after=nbytes(leaf))
        row["bits_per_param"] = 8 * row["bytes_after"] / max(math.prod(orig.shape), 1)
        if with_error and isinstance(leaf, QArray):
            ref = jnp.asarray(orig, jnp.float32)
            err = dequantize(leaf, jnp.float32) - ref
            row["rel_rms_error"] = float(jnp.sqrt(jnp.sum(err * err) / jnp.sum(ref * ref)))
        rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    """The report as a table with a total line."""
    lines = [f"{'path':<48} {'shape':<18} {'qtype':<6} {'before':>10} {'after':>10} {'bits':>6} {'err':>7}"]
    for r in rows:
        err = f"{r['rel_rms_error']:.4f}" if "rel_rms_error" in r else ""
        lines.append(f"{r['path'][-48:]:<48} {str(r['shape']):<18} {r['qtype'] or '-':<6} "
                     f"{r['bytes_before']:>10,} {r['bytes_after']:>10,} {r['bits_per_param']:>6.2f} {err:>7}")
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    params = sum(math.prod(r["shape"]) for r in rows)
    lines.append(f"{'total':<48} {params:<18,} {'':<6} {before:>10,} {after:>10,} "
                 f"{8 * after / max(params, 1):>6.2f}")
    return "\n".join(lines)
