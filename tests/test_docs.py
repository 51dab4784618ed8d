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


def test_readme_qlora_example_trains():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## QLoRA"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    with jax.numpy_dtype_promotion("standard"):  # optax's step count meets floats (the JAX default)
        exec(compile(block, "README.md (QLoRA)", "exec"), namespace)
    jq = namespace["jq"]
    first = namespace["loss"](jq.lora.init(jax.random.key(1), namespace["qparams"], rank=8, alpha=16.0),
                              namespace["qparams"])
    assert float(namespace["value"]) < 0.5 * float(first)  # the adapters learned
    assert not isinstance(namespace["merged"]["params"]["layers_0"]["kernel"], jq.QArray)
