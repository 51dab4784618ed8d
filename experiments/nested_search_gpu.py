"""The double-quant step's 256-level search on the GPU: bit cells against the binary search.

    PYTHONPATH=. python3 experiments/nested_search_gpu.py
`jq.quantize(x, "nf4", 64, double_quant=True)` of 4096x14336 and 4096x4096 bf16 weights: the
nested step quantizes the float32 constants (917,504 / 262,144) to dynamic8. Off the CPU the
search is now `_count_by_bit_cells` (a gather of the value's cell by its float bits + <= 3
compares); session 5 used `searchsorted(method="scan_unrolled")`, which XLA GPU splits into three
fusions (results/nested_search_h100.log has the other searchsorted methods). CUPTI time of the
whole call and of the nested step alone, for both, and whether the nested codes equal the CPU's;
plus `quantize(..., "dynamic8")` of a whole weight (GPU == CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import per_call_us

import jaxquant as jq
from jaxquant._src import encode, nested

cpu = jax.devices("cpu")[0]
print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
bit_cells = encode.count_by_bit_cells
for shape in [(4096, 14336), (4096, 4096)]:
    xs = [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(4)]
    ref = jq.quantize(jax.device_put(xs[0], cpu), "nf4", 64, double_quant=True, check_finite=False)
    consts = [jq.quantize(x, "nf4", 64, check_finite=False).scale for x in xs]
    for name, count in [("bit cells", bit_cells), ("searchsorted", encode.count_by_search)]:
        encode.count_by_bit_cells = count
        jax.clear_caches()
        f = lambda x: jq.quantize(x, "nf4", 64, double_quant=True, check_finite=False)
        q = f(xs[0])
        same = (np.array_equal(np.asarray(q.scale.codes), np.asarray(ref.scale.codes))
                and np.array_equal(np.asarray(q.codes), np.asarray(ref.codes)))
        t = per_call_us(f, [(x,) for x in xs])
        t_nested = per_call_us(lambda c: nested.quantize_nested(c, 256), [(c,) for c in consts])
        print(f"{shape} {name:<13} quantize NF4 + DQ {t:7.1f} us | nested step alone "
              f"{t_nested:6.1f} us | codes and nested codes == CPU: {same}", flush=True)
    encode.count_by_bit_cells = bit_cells
    jax.clear_caches()
    d8 = jq.quantize(xs[1], "dynamic8", 256, check_finite=False)
    d8_cpu = jq.quantize(jax.device_put(xs[1], cpu), "dynamic8", 256, check_finite=False)
    print(f"{shape} dynamic8 quantize of the weight: GPU == CPU "
          f"{np.array_equal(np.asarray(d8.codes), np.asarray(d8_cpu.codes))}", flush=True)
