"""The README's example block and the docstring examples run as written."""

import doctest
import pathlib
import re

import jax

import jaxquant._src.dequantize
import jaxquant._src.quantize


def test_docstring_examples():
    with jax.numpy_dtype_promotion("standard"):
        results = [doctest.testmod(m, verbose=False) for m in (jaxquant._src.quantize, jaxquant._src.dequantize)]
    assert all(r.attempted > 0 and r.failed == 0 for r in results)


def test_readme_example_runs():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert abs(namespace["jq"].bits_per_param(namespace["q"]) - 4.127) < 1e-3
    assert namespace["q2"].shape == namespace["q"].shape
