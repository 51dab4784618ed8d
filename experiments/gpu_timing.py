"""Shared by the GPU experiments: CUPTI kernel time per call (the way ANCHORS.md was measured),
and qmatmul block sizes from a short variant string."""

import statistics

import jax


def per_call_us(f, sets, iterations=10):
    """Median kernel time of ``f(*args)`` in microseconds, read with CUPTI over one jitted call
    that cycles through the argument tuples in ``sets`` (distinct weights: more bytes than the
    50 MB L2, so every call reads HBM)."""
    from jax.experimental.mosaic.gpu import profiler

    run_all = jax.jit(lambda sets: [f(*a) for a in sets])
    jax.block_until_ready(run_all(sets))
    _, times_ms = profiler.measure(run_all, iterations=iterations)(sets)
    return statistics.median(times_ms) / len(sets) * 1e3


# a variant: k<tile_k> s<stages> [x<split-K ways>] [w<compute warpgroups>] [t<tokens per CTA>]
# [c<split-K target CTAs>] [d<decode table copies>] [n<persistent CTAs>] [p<probe>], e.g.
# "k128 s2 x1 w2 t256", "k256 s2 d32 c200", "k128 s2 x1 w2 t256 d32 n132" or "k128 s2 pload"
FIELDS = dict(k="tile_k", s="max_concurrent_steps", x="k_splits", w="compute_wgs", t="token_tile",
              c="target_ctas", d="table_copies", n="persistent_ctas", p="probe")


def block_sizes(variant: str):
    """The qmatmul kernel's ``BlockSizes`` for a variant string (the defaults for "")."""
    from jaxquant._src.kernels import qmatmul_mgpu as K

    return K.BlockSizes(**{FIELDS[f[0]]: f[1:] if f[0] == "p" else int(f[1:])
                           for f in variant.split()})


def fixed(variant: str):
    """The qmatmul kernel with exactly the variant's block sizes (its own fitting of steps and
    stages bypassed), as a function of (x, q)."""
    from jaxquant._src.kernels import qmatmul_mgpu as K

    bs = block_sizes(variant)
    fit_k, fit_stages = K._fit_tile_k, K._fit_stages

    def call(x, q):
        K._fit_tile_k, K._fit_stages = (lambda k, b, bs, m: bs), (lambda bs, m: bs)
        try:
            return K.qmatmul.__wrapped__(x, q, block_sizes=bs)
        finally:
            K._fit_tile_k, K._fit_stages = fit_k, fit_stages
    return call
