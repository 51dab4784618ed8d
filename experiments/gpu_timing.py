"""Shared by the GPU experiments: CUPTI kernel time (the way ANCHORS.md was measured), the
commit a result came from, and qmatmul block sizes from a short variant string."""

import collections
import os
import pathlib
import statistics
import subprocess

import jax

from jaxquant._src.kernels.qmatmul_tuning import BlockSizes


def per_call_us(f, sets, iterations=10):
    """Median kernel time of ``f(*args)`` in microseconds, read with CUPTI over one jitted call
    that cycles through the argument tuples in ``sets`` (distinct weights: more bytes than the
    50 MB L2, so every call reads HBM)."""
    from jax.experimental.mosaic.gpu import profiler

    run_all = jax.jit(lambda sets: [f(*a) for a in sets])
    jax.block_until_ready(run_all(sets))
    _, times_ms = profiler.measure(run_all, iterations=iterations)(sets)
    return statistics.median(times_ms) / len(sets) * 1e3


def kernels_us(f, sets, iterations=10):
    """{GPU kernel name: median microseconds per call of ``f``}, as ``per_call_us`` but per
    kernel (XLA's fusions around a Mosaic kernel, say)."""
    from jax.experimental.mosaic.gpu import profiler

    run_all = jax.jit(lambda sets: [f(*a) for a in sets])
    jax.block_until_ready(run_all(sets))
    _, per_iteration = profiler.measure(run_all, aggregate=False, iterations=iterations)(sets)
    times = collections.defaultdict(list)
    for timings in per_iteration:
        total = collections.Counter()
        for name, ms in timings:
            total[name[:48]] += ms
        for name, ms in total.items():
            times[name].append(ms)
    return {name: statistics.median(ms) / len(sets) * 1e3 for name, ms in times.items()}


def commit() -> str:
    """JAXQUANT_COMMIT if set (the device's copy of the tree may have no git HEAD), else git's."""
    if os.environ.get("JAXQUANT_COMMIT"):
        return os.environ["JAXQUANT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL,
                                       cwd=pathlib.Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


class Exact(BlockSizes):
    """Block sizes the kernel runs exactly as given: no preset, no fitting of steps and stages
    to shared memory (a variant that does not fit fails to compile, which is a finding)."""

    def for_problem(self, m, k, n, block_size):
        return self


# a variant: k<tile_k> s<stages> [x<split-K ways>] [w<compute warpgroups>] [t<tokens per CTA>]
# [c<split-K target CTAs>] [d<decode table copies>] [n<persistent CTAs>], e.g. "k128 s2 x1 w2
# t256", "k256 s2 d32 c200" or "k128 s2 x1 w2 t256 d32 n132"; "" is the defaults
FIELDS = dict(k="tile_k", s="max_concurrent_steps", x="k_splits", w="compute_wgs", t="token_tile",
              c="target_ctas", d="table_copies", n="persistent_ctas")


def block_sizes(variant: str, exact: bool = True) -> BlockSizes:
    """The qmatmul kernel's block sizes for a variant string: ``Exact`` ones, or (``exact=False``)
    plain ``BlockSizes`` that the kernel fits to the problem ("" then picks the preset)."""
    fields = {FIELDS[f[0]]: int(f[1:]) for f in variant.split()}
    return (Exact if exact else BlockSizes)(**fields)
