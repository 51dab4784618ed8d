"""Hardware checks on a Hopper (sm90) GPU: GPU quantize bit-exact with the CPU's, and the Mosaic
GPU qmatmul kernel (its real PTX decodes) against the XLA path. Marked ``gpu``: they skip on any
other machine (tests/conftest.py). Run them on the device from the repository root (jax, flax,
optax, chex, pytest and hypothesis are installed there; ``python3 -m`` puts the repository, so
jaxquant, on sys.path):

    python3 -m pytest -q -p no:cacheprovider --durations=10 tests/gpu
"""

import jax
import pytest


@pytest.fixture(scope="session")
def cpu():
    return jax.devices("cpu")[0]


@pytest.fixture(scope="session")
def gpu():
    return jax.devices("gpu")[0]
