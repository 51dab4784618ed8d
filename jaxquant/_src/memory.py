"""Memory accounting: bytes actually stored, bits per parameter, and the 7B-model table.

Code tables are library constants, not stored per array, so they are not counted; a bitsandbytes
checkpoint adds its own copies (64 B per weight, 1 KiB more with double quantization).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import layout
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import quantize


def _leaf_bytes(leaf) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def nbytes(tree) -> int:
    """Bytes stored by a QArray, array or pytree of them: codes, constants, nested constants.

    Works on abstract trees (``jax.ShapeDtypeStruct`` leaves from ``jax.eval_shape``), NNX states
    and NNX modules (pytrees in Flax >= 0.11) too.
    """
    return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(tree))


def num_params(tree) -> int:
    """Logical parameters: a QArray counts the elements of the array it stands for (every layer
    of a stacked one). Works on NNX states and modules (they are pytrees)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda t: isinstance(t, QArray))
    return sum(math.prod(leaf.shape) * (math.prod(layout.stack_shape(leaf)) if isinstance(leaf, QArray)
                                        else 1) for leaf in leaves)


def bits_per_param(tree) -> float:
    """Stored bits over logical parameters, e.g. 4.5 for NF4 at block 64, ~4.127 with double quant."""
    n = num_params(tree)
    return 8 * nbytes(tree) / n if n else 0.0


def llama2_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Llama-2-7B's weight shapes (Flax layout, kernels ``(in, out)``): 32 layers, 6.74B params."""
    hidden, ffn, vocab, layers = 4096, 11008, 32000, 32
    shapes = {"embed_tokens": (vocab, hidden), "norm": (hidden,), "lm_head": (hidden, vocab)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes |= {p + n: (hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        shapes |= {p + "gate_proj": (hidden, ffn), p + "up_proj": (hidden, ffn), p + "down_proj": (ffn, hidden)}
        shapes |= {p + "input_layernorm": (hidden,), p + "post_attention_layernorm": (hidden,)}
    return shapes


def memory_table(shapes: dict[str, tuple[int, ...]] | None = None, block_size: int = 64,
                 quantize_all: bool = True) -> list[dict]:
    """Storage of a model in bf16, NF4 with float32 absmax, and NF4 + double quant, in GB (1e9 B).

    Computed with ``jax.eval_shape`` on the real quantizer, so nothing of the model's size is
    allocated. ``quantize_all=True`` quantizes every 2-D weight (the usual "7B × 4 bits" count);
    False keeps embeddings and the LM head in bf16 as QLoRA does (only the linear layers in NF4).

    Returns:
      One dict per format: ``format``, ``weights_gb`` (codes or bf16 values), ``constants_gb``
      (absmax, nested codes and constants), ``total_gb``, ``bits_per_param``.
    """
    shapes = llama2_7b_shapes() if shapes is None else shapes
    rows = []
    for name, double in (("bf16", None), ("nf4", False), ("nf4+dq", True)):
        weights = constants = params = 0
        for path, shape in shapes.items():
            n = math.prod(shape)
            params += n
            linear = len(shape) == 2 and (quantize_all or "proj" in path)
            if double is None or not linear:
                weights += 2 * n
                continue
            spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
            q = jax.eval_shape(lambda w: quantize(w, "nf4", block_size, 0, double), spec)
            weights += _leaf_bytes(q.codes)
            constants += nbytes(q) - _leaf_bytes(q.codes)
        total = weights + constants
        rows.append(dict(format=name, weights_gb=weights / 1e9, constants_gb=constants / 1e9,
                         total_gb=total / 1e9, bits_per_param=8 * total / params, params=params))
    return rows


def format_memory_table(rows: list[dict]) -> str:
    lines = [f"{'format':<8} {'weights GB':>11} {'constants GB':>13} {'total GB':>9} {'bits/param':>11}"]
    for r in rows:
        lines.append(f"{r['format']:<8} {r['weights_gb']:>11.3f} {r['constants_gb']:>13.3f} "
                     f"{r['total_gb']:>9.3f} {r['bits_per_param']:>11.3f}")
    return "\n".join(lines)
