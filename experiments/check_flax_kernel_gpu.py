"""On the GPU machine: a stock Linen attention model's out projection (kernel (heads, head_dim,
features), blocks along the merged (heads, head_dim)) runs through the Hopper qmatmul kernel.

Asserts the Mosaic GPU custom call is in the compiled HLO of ``jq.flax.apply`` for a
``nn.MultiHeadDotProductAttention`` model whose only quantized kernel is the out projection, and
that the output matches the dequantized model. Run: ``python experiments/check_flax_kernel_gpu.py``.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq

HEADS, HEAD_DIM, TOKENS = 16, 128, 64  # out kernel (16, 128, 2048): W[2048, 2048]
FEATURES = HEADS * HEAD_DIM


def main() -> int:
    model = nn.MultiHeadDotProductAttention(num_heads=HEADS, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (1, TOKENS, FEATURES), jnp.bfloat16)
    params = model.init(jax.random.key(0), x)
    policy = jq.Policy(rules=(jq.Rule(r"out/kernel$"),))
    q = jq.quantize_tree(params, policy, layouts=jq.flax.layouts(model, x))
    assert q["params"]["out"]["kernel"].axis == (0, 1), q["params"]["out"]["kernel"]
    run = jax.jit(lambda q, x: jq.flax.apply(model, q, x, check=False))
    hlo = run.lower(q, x).compile().as_text()
    calls = [line for line in hlo.splitlines() if "custom_call_target=\"mosaic_gpu" in line]
    out = run(q, x)
    ref = model.apply(jq.dequantize_tree(q), x)
    err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()
                / jnp.abs(ref.astype(jnp.float32)).max())
    print(f"device={jax.devices()[0].device_kind} jax={jax.__version__} mosaic_gpu calls={len(calls)} "
          f"max rel err vs dequantized={err:.2e}")
    ok = len(calls) >= 1 and err < 2e-2 and np.isfinite(err)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
