"""The Hopper kernel per shard on a machine with several sm90 GPUs: the partitioned qmatmul
(``matmul_sharded``) against the unsharded one, column- and row-parallel. Skipped with fewer
than two GPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxquant as jq

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("weight_spec,x_spec", [(P(None, "model"), P()), (P("model", None), P(None, "model"))])
def test_kernel_per_shard_equals_the_unsharded_kernel(gpu, dq, weight_spec, x_spec):
    gpus = jax.devices("gpu")
    if len(gpus) < 2:
        pytest.skip("needs several GPUs")
    mesh = Mesh(np.array(gpus), ("model",))
    w = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (16, 4096), jnp.bfloat16)
    q = jq.quantize(w, "nf4", 64, axis=0, double_quant=dq)
    ref = jax.jit(jq.qmatmul)(x, q)
    qs = jax.device_put(q, jq.qarray_sharding(q, mesh, weight_spec))
    xs = jax.device_put(x, NamedSharding(mesh, x_spec))
    f = jax.jit(jq.qmatmul)
    out = f(xs, qs)
    hlo = f.lower(xs, qs).compile().as_text()
    assert "mosaic" in hlo.lower()  # the kernel ran, per shard
    assert "all-gather" not in hlo or dq  # with double quant only the nested codes (1 byte a block)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(ref.astype(jnp.float32)).max()))
