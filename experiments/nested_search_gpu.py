"""The double-quant step's 256-level search on the GPU: searchsorted methods compared.

    PYTHONPATH=. python3 experiments/nested_search_gpu.py
`jq.quantize(x, "nf4", 64, double_quant=True)` of a 4096x14336 bf16 weight: the nested step
quantizes its 917,504 float32 constants to dynamic8, and XLA GPU splits `searchsorted(method=
"scan_unrolled")` into three fusions (~13 us of the step's ~25). CUPTI time of the whole call
and of the nested codes alone, per method, and whether the codes equal the CPU's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import per_call_us

import jaxquant as jq
from jaxquant._src import quantize as Q

cpu = jax.devices("cpu")[0]
xs = [jax.random.normal(jax.random.key(i), (4096, 14336), jnp.bfloat16) for i in range(4)]
ref = jq.quantize(jax.device_put(xs[0], cpu), "nf4", 64, double_quant=True, check_finite=False)
searchsorted = jnp.searchsorted
print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
for method in ("scan_unrolled", "compare_all", "sort", "scan"):
    Q.jnp.searchsorted = lambda a, v, side="left", method=None, _m=method: searchsorted(a, v, side=side, method=_m)
    jax.clear_caches()
    f = functools.partial(jq.quantize, qtype="nf4", block_size=64, double_quant=True, check_finite=False)
    q = f(xs[0])
    same = np.array_equal(np.asarray(q.scale.codes), np.asarray(ref.scale.codes))
    t = per_call_us(f, [(x,) for x in xs])
    consts = [jq.quantize(x, "nf4", 64, check_finite=False).scale for x in xs]
    t_nested = per_call_us(lambda c: Q._quantize_nested(c, 256), [(c,) for c in consts])
    print(f"{method:<14} quantize NF4 + DQ {t:7.1f} us | nested step alone {t_nested:6.1f} us | "
          f"nested codes == CPU: {same}", flush=True)
jnp.searchsorted = Q.jnp.searchsorted = searchsorted
