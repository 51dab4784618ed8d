"""Which qmatmul implementation runs: dispatch's choice for "pallas" and "auto", the fallback to
XLA, and the platform a kernel is lowered for."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qmatmul_helpers import make

import jaxquant as jq
from jaxquant._src.kernels import dispatch, platform
from jaxquant._src.kernels import qmatmul_mgpu as K
from jaxquant._src.kernels import qmatmul_tuning as T


def choose(x, q, implementation, interpret=False):
    return dispatch.choose(x, q, implementation=implementation, interpret=interpret,
                           compute_dtype=np.dtype(jnp.bfloat16))


def lowers_the_kernel(x, q):
    lowered = jax.jit(lambda x, q: jq.qmatmul(x, q)).trace(x, q).lower(lowering_platforms=("cuda",))
    return "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("case", ["N=100", "K=288", "block 32", "affine", "int8", "f32"])
def test_unsupported_inputs_raise_for_pallas_and_fall_back_for_auto(case, rng):
    k, n, m, kwargs = 512, 64, 4, {}
    if case == "N=100":
        n = 100
    elif case == "K=288":  # not a multiple of 64 (the shortest step)
        k = 288
    elif case == "block 32":
        kwargs = dict(bs=32)
    w = lambda: rng.standard_normal((k, n)).astype(np.float32)
    q = {"affine": lambda: jq.quantize(w(), "int4", 64, axis=0, zero_point=True),
         "int8": lambda: jq.quantize(w(), "int8", 64, axis=0),
         }.get(case, lambda: make(rng, k, n, **kwargs))()
    compute = jnp.float32 if case == "f32" else None
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="qmatmul_mgpu does not handle"):
        jq.qmatmul(x, q, implementation="pallas", interpret=True, compute_dtype=compute)
    auto = jq.qmatmul(x, q, implementation="auto", interpret=True, compute_dtype=compute)
    np.testing.assert_array_equal(auto, jq.qmatmul(x, q, implementation="xla", compute_dtype=compute))


def test_the_choice_is_a_kernel_or_none(rng):
    q = make(rng, 512, 128)
    x = jnp.ones((4, 512), jnp.bfloat16)
    assert choose(x, q, "xla") == dispatch.XLA
    assert choose(x, q, "auto") == dispatch.XLA  # no Hopper GPU here
    kernel = choose(x, q, "pallas", interpret=True)
    assert kernel.kernel is not None and kernel.platform is None
    with pytest.raises(NotImplementedError, match="interpret=True"):
        choose(x, q, "pallas")


def test_auto_leaves_many_tokens_to_xla(monkeypatch, rng):
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    q = make(rng, 256, 64)  # too narrow for two warpgroups: the split-K kernel up to its limit
    assert K.can_use(jnp.ones((T.AUTO_SPLIT_K_MAX_TOKENS, 256), jnp.bfloat16), q, jnp.bfloat16)
    assert not K.can_use(jnp.ones((T.AUTO_SPLIT_K_MAX_TOKENS + 1, 256), jnp.bfloat16), q,
                         jnp.bfloat16)
    q = make(rng, 256, 128)
    assert K.can_use(jnp.ones((T.AUTO_MAX_TOKENS, 256), jnp.bfloat16), q, jnp.bfloat16)
    assert not K.can_use(jnp.ones((T.AUTO_MAX_TOKENS + 1, 256), jnp.bfloat16), q, jnp.bfloat16)


def test_kernel_is_not_used_off_hopper(rng):
    if platform.hopper_present():
        pytest.skip("this machine has a Hopper GPU")
    assert not K.can_use(jnp.ones((16, 256), jnp.bfloat16), make(rng, 256, 64), jnp.bfloat16)


def test_auto_lowers_cpu_arrays_to_xla_on_a_hopper_machine(monkeypatch, rng):
    """auto picks the kernel when lowering for CUDA only: CPU-placed arrays on a machine that
    also has an H100 run the XLA path instead of failing to lower the kernel for the CPU."""
    cpu = jax.devices("cpu")[0]  # explicit: on a GPU machine the default device is the GPU
    q = jax.device_put(make(rng, 512, 64), cpu)
    x = jax.device_put(jnp.asarray(rng.standard_normal((16, 512)), jnp.bfloat16), cpu)
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    assert K.can_use(x, q, jnp.bfloat16)
    assert choose(x, q, "auto").platform == "cuda"
    out = jax.jit(lambda x, q: jq.qmatmul(x, q))(x, q)
    np.testing.assert_array_equal(out, jq.qmatmul(x, q, implementation="xla"))


@pytest.mark.parametrize("m,k,n,kernel", [(1, 576, 1536, False), (8, 1024, 1024, False),
                                          (16, 576, 1536, True), (1, 2048, 1024, True)])
def test_auto_leaves_small_decode_matmuls_to_xla(m, k, n, kernel, monkeypatch, rng):
    """On Hopper, auto runs 1-8 tokens against weights up to 1.2M elements through XLA (faster
    there) and the kernel otherwise."""
    q = make(rng, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    assert lowers_the_kernel(x, q) == kernel


def test_kernels_do_not_import_the_public_op():
    """No import cycle: the kernels, their dispatch and the XLA reference never import
    ``matmul`` (which calls them); a fallback is a choice handed back, not a call up."""
    src = pathlib.Path(jq.__file__).parent / "_src"
    for path in [*(src / "kernels").glob("*.py"), src / "matmul_xla.py"]:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert "jaxquant._src.matmul" not in imported, path.name


def test_implementation_context_sets_what_auto_means_for_whole_models(monkeypatch, rng):
    """A Linen model traced inside ``jq.implementation("xla")`` lowers no kernel on a Hopper
    machine (what a multi-GPU mesh needs); outside it, auto takes the kernel; bad names raise."""
    import flax.linen as nn

    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    jax.clear_caches()
    try:
        model = nn.Dense(2048, use_bias=False, dtype=jnp.bfloat16)  # big enough for auto's kernel
        x = jnp.ones((16, 1024), jnp.bfloat16)
        q = jq.quantize_tree(model.init(jax.random.key(0), x))
        lower = lambda: jax.jit(lambda q, x: jq.flax.apply(model, q, x, check=False)).trace(q, x).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in lower()
        with jq.implementation("xla"):
            assert "mosaic_gpu" not in lower()
        assert "mosaic_gpu" in lower()
        with pytest.raises(ValueError, match="implementation must be one of"):
            with jq.implementation("fast"):
                pass
    finally:
        jax.clear_caches()
