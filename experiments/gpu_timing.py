"""CUPTI kernel time per call, shared by the GPU experiments (the way ANCHORS.md was measured)."""

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
