"""QLoRA: low-rank adapters on a frozen quantized base, trained with any optax optimizer.

    adapters = jq.lora.init(key, qparams, rank=16, alpha=32.0)
    merged = jq.lora.merge(qparams, adapters)                       # float tree
    requant = jq.lora.merge(qparams, adapters, requantize=True)     # the base's format
    y = jq.flax.apply(model, qparams, x, lora=adapters)             # Linen: base(x) + delta(x)
    model = jq.lora.add_lora(nnx_model, rank=16, alpha=32.0)        # NNX: nnx.LoRAParam adapters

The Flax parts (``apply``, ``intercept``, ``add_lora``, ``LoRA``) load Flax on first use.
"""

from jaxquant._src.lora import (Adapter, AdapterError, check_adapters, delta, init, lora_matmul,
                                matrix_shape, merge)
from jaxquant._src.lora_io import from_peft, load, peft_module_name, save, to_peft

_FLAX = ("LoRA", "add_lora", "apply", "intercept")

__all__ = ["Adapter", "AdapterError", "LoRA", "add_lora", "apply", "check_adapters", "delta", "from_peft",
           "init", "intercept", "load", "lora_matmul", "matrix_shape", "merge", "peft_module_name",
           "save", "to_peft"]


def __getattr__(name):
    if name == "apply":  # the quantized Linen apply with adapters (jaxquant.flax.apply(lora=))
        from jaxquant._src.flax_linen import lora_apply
        return lora_apply
    if name in _FLAX:
        from jaxquant._src import lora_flax
        return getattr(lora_flax, name)
    raise AttributeError(f"module 'jaxquant.lora' has no attribute {name!r}")
