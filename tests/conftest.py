"""Strict numerics for every test: no silent dtype or rank promotion (STYLE.md §8). Tests marked
``gpu`` (tests/gpu/) skip unless this process has a Hopper (sm90) GPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import hypothesis
import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True,
                                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("ci")

# Float tolerances by dtype (relative to the scale of the values compared).
TOLERANCE = {np.dtype("float32"): 1e-6, np.dtype(jax.numpy.bfloat16): 1e-2, np.dtype("float16"): 1e-3}


def pytest_collection_modifyitems(config, items):
    from jaxquant._src.kernels import platform

    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not platform.hopper_present():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs a Hopper (sm90) GPU"))


@pytest.fixture
def rng():
    """A fresh, seeded numpy generator per test: random inputs, never zeros."""
    return np.random.default_rng(1234)
