"""Quantize whole parameter trees by policy.

A *policy* is an ordered list of ``Rule``s: the first rule whose regex matches a parameter's path
(its keys joined by ``/``, e.g. ``params/layers_0/mlp/kernel``) decides how that parameter is
quantized, or that it is left alone (``qtype=None``). Parameters no rule matches are left alone.
The default policy quantizes matmul and conv kernels (leaves named ``kernel``) to NF4 + double
quant with blocks along their contraction axes (``Layout``: what the owning module contracts, or
inferred from the shape); embeddings, norm scales, biases and anything under ``min_size``
elements stay as they are, and so does a kernel it cannot quantize, with the reason in
``plan`` / ``memory_report`` instead of an error.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant._src import layout as layout_lib, sharding
from jaxquant._src.config import QuantConfig
from jaxquant._src.dequantize import dequantize
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import quantize_array, raise_if_nonfinite

CONTRACTION = "contraction"


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the module owning a parameter says about it (``jaxquant.flax.layouts`` builds these).

    Attributes:
      axis: the axes one layer's weight is contracted over (Dense ``0``; DenseGeneral its input
        axes; Einsum its equation's; Conv ``(0, .., ndim-2)``); None when it is no matmul weight.
      stack: leading stack dimensions (``nn.scan`` / ``nnx.scan`` / ``nnx.vmap`` layers).
      module: the owning module's type, for reports.
      why_not: non-empty: the default policy leaves it float, for this reason.
    """

    axis: int | tuple[int, ...] | None
    stack: int = 0
    module: str = ""
    why_not: str = ""


@dataclasses.dataclass(frozen=True)
class Rule:
    """How to quantize the parameters whose path matches ``pattern`` (``re.search``).

    ``qtype=None`` leaves them alone. ``axis`` is the block axis, or a tuple of contiguous axes
    merged into one; ``"contraction"`` takes the contraction axes of the owning module (its
    ``Layout``), or without one the shortest run of leading axes whose product is a multiple of
    ``block_size`` (all but the last axis if none is). ``block_size`` must divide that length
    unless ``allow_partial_blocks``. ``required=False`` leaves a parameter this rule cannot
    quantize as it is (``plan`` says why) instead of raising ``PolicyError``.
    """

    pattern: str
    qtype: str | None = "nf4"
    block_size: int | None = 64
    axis: int | tuple[int, ...] | str | None = CONTRACTION
    double_quant: bool = True
    zero_point: bool = False
    allow_partial_blocks: bool = False
    required: bool = True

    def __post_init__(self):
        is_int = lambda a: isinstance(a, (int, np.integer)) and not isinstance(a, bool)
        if isinstance(self.axis, list):  # hashable, as a rule must be
            object.__setattr__(self, "axis", tuple(self.axis))
        if not (self.axis is None or self.axis == CONTRACTION or is_int(self.axis)
                or isinstance(self.axis, tuple) and all(map(is_int, self.axis))):
            raise TypeError(f"Rule axis must be None, an int, a tuple of ints or {CONTRACTION!r}, "
                            f"got axis={self.axis!r}")
        if isinstance(self.pattern, re.Pattern):
            return
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule pattern must be a regular expression string, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regular expression: {e}") from None

    def config(self, ndim: int, axis=None) -> QuantConfig:
        """The config for one ``ndim``-d layer; ``axis`` stands in for ``"contraction"``."""
        axis = self.axis if axis is None and self.axis != CONTRACTION else axis
        return QuantConfig(self.qtype, self.block_size, axis, self.zero_point,
                           self.double_quant).validated(ndim)


DEFAULT_RULES = (Rule(r"(^|/)kernel$", allow_partial_blocks=True, required=False),)


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

    rules: tuple[Rule, ...] = DEFAULT_RULES
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
    """A key path as ``a/b/0/kernel``; a last ``.value`` step (an NNX ``Variable``'s) is left
    out, so an NNX state or module names a parameter as its attribute (``layers/0/kernel``)."""
    parts = []
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in ("value", "raw_value"):
        path = path[:-1]
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What ``plan`` decided for one parameter: ``config`` None leaves it as it is, for ``why``."""

    config: QuantConfig | None
    stack: int = 0
    why: str = ""


def infer_axis(shape: tuple[int, ...], block_size: int | None):
    """Contraction axes of a kernel whose module is unknown: the shortest run of leading axes
    whose product ``block_size`` divides (an attention output ``(heads, head_dim, features)``
    gives ``(0, 1)``), else all but the last axis (Flax's ``(*in, out)`` conv layout)."""
    if len(shape) < 2:
        return None
    for j in range(1, len(shape)):
        if block_size is None or math.prod(shape[:j]) % block_size == 0:
            return layout_lib.normalize_axis(tuple(range(j)), len(shape))
    return layout_lib.normalize_axis(tuple(range(len(shape) - 1)), len(shape))


def plan(params, policy: Policy | None = None, layouts: dict[str, Layout] | None = None
         ) -> dict[str, Decision]:
    """What ``quantize_tree`` does with each parameter (by path), checking every rule can apply.

    Raises:
      PolicyError: parameters a ``required`` rule matches but cannot quantize (not a float array,
        block axis out of range or not a multiple of the block size), every one named with its
        shape and reason.
    """
    policy = policy or Policy()
    layouts = layouts or {}
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]
    used, decisions, errors = set(), {}, []
    for path, leaf in leaves:
        name = path_str(path)
        rule = next((r for r in policy.rules if re.search(r.pattern, name)), None)
        if rule is not None:
            used.add(rule)
        why = _skip_reason(name, leaf, rule, policy)
        if why is not None:
            decisions[name] = Decision(None, why=why)
            continue
        lay = layouts.get(name)
        stack = lay.stack if lay is not None else 0
        cfg, problem = _config(leaf, rule, lay, stack)
        if problem is not None:
            if rule.required:
                errors.append(f"  {name!r} {tuple(leaf.shape)}: {problem}")
            decisions[name] = Decision(None, why=problem)
            continue
        decisions[name] = Decision(cfg, stack)
    if errors:
        raise PolicyError(f"cannot quantize {len(errors)} parameter(s) as the policy's rules ask "
                          f"(change the rule's block_size or axis, allow_partial_blocks=True, "
                          f"required=False to leave them float, or Rule(pattern, qtype=None)):\n"
                          + "\n".join(errors))
    for rule in policy.rules:
        if rule not in used and rule not in DEFAULT_RULES:
            message = f"quantize_tree: rule {rule.pattern!r} matches no parameter"
            if policy.strict:
                raise PolicyError(message)
            warnings.warn(message, stacklevel=3)
    return decisions


def _skip_reason(name: str, leaf, rule: Rule | None, policy: Policy) -> str | None:
    """Why a parameter is left alone before any rule is applied to it (None: it is not)."""
    if isinstance(leaf, QArray):
        return "already quantized"
    if rule is None:
        return "no rule matches"
    if rule.qtype is None:
        return f"rule {rule.pattern!r} leaves it"
    if not hasattr(leaf, "shape") or math.prod(leaf.shape) < policy.min_size:
        return f"under min_size {policy.min_size}"
    if policy.predicate is not None and not policy.predicate(name, leaf):
        return "the predicate leaves it"
    return None


def _config(leaf, rule: Rule, lay: Layout | None, stack: int):
    """``(QuantConfig for one layer, None)`` or ``(None, why it cannot be quantized)``."""
    dtype = np.dtype(leaf.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return None, f"dtype {dtype} is not floating"
    shape = tuple(leaf.shape[stack:])
    axis = None
    if rule.axis == CONTRACTION:
        if lay is not None and lay.why_not:
            return None, lay.why_not
        if lay is not None and lay.axis is None:
            return None, f"{lay.module or 'its module'} contracts no axis of it"
        axis = lay.axis if lay is not None else infer_axis(shape, rule.block_size)
        if axis is None:
            return None, f"no contraction axis for a {len(shape)}-d array"
    try:
        cfg = rule.config(len(shape), axis)
    except ValueError as e:
        return None, f"rule {rule.pattern!r}: {e}"
    if cfg.axis is not None and cfg.block_size and not rule.allow_partial_blocks:
        length = layout_lib.rows_shape(shape, cfg.axis)[1]
        if length % cfg.block_size:
            return None, (f"axis {cfg.axis} has length {length}, not a multiple of block_size "
                          f"{cfg.block_size}")
    return cfg, None


@functools.lru_cache(maxsize=None)
def _layers(cfg: QuantConfig, stack: int):
    """``x -> QArray`` for ``cfg`` with ``stack`` leading stack dims (``layout.py``): one layer's
    metadata, every leaf stacked (double quantization's constants per layer). One function object
    per ``(cfg, stack)``: the sharded path caches its compiled program on it."""
    def layers(a):
        if not stack:
            return quantize_array(a, cfg)
        flat = a.reshape(-1, *a.shape[stack:])
        q = jax.lax.map(lambda one: quantize_array(one, cfg), flat)
        return jax.tree.map(lambda leaf: leaf.reshape(*a.shape[:stack], *leaf.shape[1:]), q)
    return layers


def quantize_leaf(x, cfg: QuantConfig, stack: int = 0) -> QArray:
    """Quantize ``x`` by ``cfg``; with ``stack`` leading stack dims, layer by layer.

    ``x`` split over a mesh (a NamedSharding, concrete or abstract) is quantized where its shards
    lie, into a QArray sharded to match (``sharding.py``); an abstract ``x`` (a
    ``jax.ShapeDtypeStruct``) gives the abstract QArray."""
    layers = _layers(cfg, stack)
    if sharding.is_sharded(x):
        q = sharding.quantize_in_shards(layers, x)
    else:
        q = jax.eval_shape(layers, x) if isinstance(x, jax.ShapeDtypeStruct) else layers(x)
    raise_if_nonfinite(x, q)
    return q


def check_leaf(x, cfg: QuantConfig, stack: int = 0) -> None:
    """Raise the ValueError ``quantize_leaf`` would for a sharded ``x`` whose spec cannot shard
    its QArray, without quantizing (nothing for an unsharded ``x``)."""
    if sharding.is_sharded(x):
        sharding.check_in_shards(_layers(cfg, stack), x)


def check_shards(params, decisions: dict[str, Decision]) -> None:
    """Raise PolicyError naming every sharded leaf whose spec cannot shard its QArray, before
    anything is quantized: so a bad spec costs no quantizing time, and ``donate`` deletes no
    leaf before the error (else the leaves before the first bad one would be gone)."""
    errors = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
        decision = decisions[path_str(path)]
        if decision.config is None:
            continue
        try:
            check_leaf(leaf, decision.config, decision.stack)
        except ValueError as e:
            errors.append(f"  {path_str(path)!r} {tuple(leaf.shape)} {leaf.sharding.spec}: {e}")
    if errors:
        raise PolicyError(f"cannot quantize {len(errors)} sharded parameter(s) in their shards "
                          f"(change the spec or the rule's block_size):\n" + "\n".join(errors))


def quantize_tree(params, policy: Policy | None = None, *, layouts: dict[str, Layout] | None = None,
                  progress: bool = False, donate: bool = False):
    """Quantize the parameters of a pytree (Linen params, FrozenDict, NNX state) by ``policy``.

    ``layouts`` (path -> ``Layout``, from ``jaxquant.flax.layouts(model, *args)``) says which axes
    each kernel's module contracts and which leading axes stack scanned layers; without it the
    contraction axes are inferred from the shapes (``infer_axis``) and nothing is stacked.

    Leaf by leaf, so the device holds at most the input tree, the quantized tree and one leaf's
    temporaries. ``donate=True`` also deletes each quantized leaf's input array once its
    quantization is enqueued (its memory is freed when that computation is done), so the peak is
    about the input tree alone; the caller must not use those arrays afterwards. Abstract trees
    (``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``) give abstract QArrays, to plan
    memory or restore checkpoints without allocating.

    Sharded leaves (``NamedSharding`` over a ``Mesh``, concrete or abstract) are quantized where
    their shards lie, each device its own, into QArrays sharded the same way
    (``qarray_sharding``: a split block axis must cut whole blocks; a spec that cannot shard a
    leaf raises ``PolicyError`` naming every such leaf, before any leaf is quantized or donated).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> params = nn.Dense(256).init(jax.random.key(0), jnp.ones((1, 512)))
      >>> qparams = jq.quantize_tree(params)
      >>> type(qparams["params"]["kernel"]).__name__
      'QArray'
    """
    decisions = plan(params, policy, layouts)
    check_shards(params, decisions)
    total = sum(d.config is not None for d in decisions.values())
    bar = tqdm(total=total, desc="quantizing", disable=not progress or total == 0, leave=False)
    # with donate, an array is deleted after its last quantization, and never if a kept leaf is it
    pending = collections.Counter()
    kept = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_qarray)[0] if donate else ():
        if not isinstance(leaf, jax.Array):
            continue
        if decisions[path_str(path)].config is None:
            kept.add(id(leaf))
        else:
            pending[id(leaf)] += 1

    def convert(path, leaf):
        decision = decisions[path_str(path)]
        if decision.config is None:
            return leaf
        abstract = isinstance(leaf, jax.ShapeDtypeStruct)
        out = quantize_leaf(leaf if abstract else jnp.asarray(leaf), decision.config, decision.stack)
        if donate and isinstance(leaf, jax.Array):
            pending[id(leaf)] -= 1
            if not pending[id(leaf)] and id(leaf) not in kept:
                leaf.delete()  # PJRT frees the buffer after the pending quantize has read it
        bar.update()
        return out

    out = jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_qarray)
    bar.close()
    return out


def dequantize_tree(tree):
    """Replace every QArray in ``tree`` by its dequantized array (original dtype)."""
    return jax.tree.map(lambda x: dequantize(x) if isinstance(x, QArray) else x, tree,
                        is_leaf=is_qarray)
