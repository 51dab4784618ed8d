"""The Pallas TPU qmatmul kernel in interpret mode against the XLA path, and its Mosaic TPU
lowering (no TPU here: the lowering is the check that Mosaic TPU accepts it)."""

import jax
import jax.numpy as jnp
import pytest
from qmatmul_helpers import close, make

from jaxquant._src.kernels import qmatmul_tpu as T


@pytest.mark.slow  # each run in the interpreter takes 3-6 s on 2 cores
@pytest.mark.parametrize("lead,k,n,qtype,dq", [
    ((1,), 512, 256, "nf4", True), ((3,), 256, 128, "fp4", False), ((17,), 768, 128, "int4", False),
    ((130,), 256, 128, "nf4", True), ((2, 5), 512, 256, "nf4", False)])
def test_tpu_kernel_matches_xla_path(lead, k, n, qtype, dq, rng):
    q = make(rng, k, n, qtype, dq, heavy=True)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.bfloat16)
    out = T.qmatmul(x, q, interpret=True)
    assert out.shape == (*lead, n) and out.dtype == jnp.bfloat16
    close(out, T.reference(x, q), k)


def test_tpu_kernel_refuses_what_it_does_not_handle(rng):
    with pytest.raises(NotImplementedError, match="qmatmul_tpu does not handle shape"):
        T.qmatmul(jnp.ones((1, 320), jnp.bfloat16), make(rng, 320, 128), interpret=True)
    with pytest.raises(NotImplementedError, match="empty x"):
        T.check_supported(jnp.ones((0, 256), jnp.bfloat16), make(rng, 256, 128), jnp.bfloat16)
    assert not T.can_use(jnp.ones((1, 256), jnp.bfloat16), make(rng, 256, 128), jnp.bfloat16)  # CPU


def test_tpu_kernel_lowers_for_mosaic_tpu(rng):
    q = make(rng, 512, 256)
    x = jnp.ones((4, 512), jnp.bfloat16)
    lowered = jax.jit(lambda x, q: T.qmatmul(x, q)).trace(x, q).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()
