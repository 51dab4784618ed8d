"""``qeinsum``: a two-operand einsum with a quantized kernel, as one 2-D ``qmatmul`` where it can be.

Dense, DenseGeneral, Einsum and attention projections are all ``einsum(spec, x, W)``. When ``W``'s
blocks run along exactly the axes the spec contracts (``QArray.axis``, merged when several), the
kernel is the matrix ``W[K, N]`` (``layout.as_matrix``: no data moves), ``x`` is transposed to
``(..., K)``, and the product is ``qmatmul`` — the Hopper kernel where its shape fits. Anything
else (batch letters shared by x, W and the output; blocks along other axes) dequantizes ``W``
next to its use and calls ``jnp.einsum``: the same numbers, without the kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxquant._src import layout
from jaxquant._src.matmul import qmatmul
from jaxquant._src.dequantize import dequantize
from jaxquant._src.qarray import QArray


def parse(spec: str) -> tuple[str, str, str]:
    """``"btd,dh->bth"`` -> ``("btd", "dh", "bth")`` (no ellipsis, explicit output)."""
    spec = spec.replace(" ", "")
    if "->" not in spec or "." in spec or spec.count(",") != 1:
        raise NotImplementedError(f"qeinsum needs 'x,w->out' without ellipsis, got {spec!r}")
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    return x_spec, w_spec, out


def contracted_axes(spec: str) -> tuple[int, ...]:
    """The kernel axes (second operand) the spec sums over with the input."""
    x_spec, w_spec, out = parse(spec)
    return tuple(i for i, c in enumerate(w_spec) if c in x_spec and c not in out)


def matrix_form(spec: str, q: QArray):
    """``(x letters kept, contracted letters in kernel order, kernel letters kept)`` when the
    product is ``x[..., K] @ W[K, N]`` with W's blocks along the contraction; else None."""
    try:
        x_spec, w_spec, out = parse(spec)
    except NotImplementedError:
        return None
    contracted = "".join(c for c in w_spec if c in x_spec and c not in out)
    x_kept = "".join(c for c in x_spec if c not in contracted)
    w_kept = "".join(c for c in w_spec if c not in contracted)
    fits = (contracted and len(set(x_spec)) == len(x_spec) and len(set(w_spec)) == len(w_spec)
            and sorted(x_kept + w_kept) == sorted(out) and not set(x_kept) & set(w_kept)
            and layout.axes_of(q.axis) == tuple(w_spec.index(c) for c in contracted)
            and not layout.stack_ndim(q))
    return (x_kept, contracted, w_kept) if fits else None


def qeinsum(spec: str, x: jax.Array, q: QArray, dtype, *, implementation: str = "auto") -> jax.Array:
    """``jnp.einsum(spec, x, dequantize(q, dtype))``, with ``x`` cast to ``dtype`` (the compute
    dtype; accumulation in float32 on the qmatmul path).

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> from jaxquant._src.qeinsum import qeinsum
      >>> w = jax.random.normal(jax.random.key(0), (4, 32, 128))  # (heads, head_dim, features)
      >>> q = jq.quantize(w, "nf4", 64, axis=(0, 1))
      >>> qeinsum("bthd,hdo->bto", jnp.ones((2, 3, 4, 32)), q, jnp.float32).shape
      (2, 3, 128)
    """
    x = x.astype(dtype)
    form = matrix_form(spec, q)
    if form is None:
        return jnp.einsum(spec, x, dequantize(q, dtype))
    x_spec, w_spec, out = parse(spec)
    x_kept, contracted, w_kept = form
    sizes = dict(zip(x_spec, x.shape))
    xt = x if x_spec == x_kept + contracted else jnp.einsum(f"{x_spec}->{x_kept}{contracted}", x)
    xt = xt.reshape(*xt.shape[:len(x_kept)], math.prod(sizes[c] for c in contracted))
    y = qmatmul(xt, layout.as_matrix(q), implementation=implementation, compute_dtype=dtype)
    kept = dict(zip(w_spec, q.shape))
    y = y.reshape(*y.shape[:-1], *(kept[c] for c in w_kept))
    return jnp.einsum(f"{x_kept}{w_kept}->{out}", y) if x_kept + w_kept != out else y
