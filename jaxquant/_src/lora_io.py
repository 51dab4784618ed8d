"""Save and load LoRA adapters: jaxquant's safetensors file, and PEFT's adapter folder.

jaxquant's file holds ``PATH::a`` and ``PATH::b`` per adapter and, in the header's metadata, the
format and each adapter's alpha. PEFT's folder (what ``PeftModel.save_pretrained`` writes for a
Llama) holds ``adapter_model.safetensors`` with ``base_model.model.model.layers.{i}.self_attn.
q_proj.lora_A.weight`` of shape ``(r, in)`` and ``...lora_B.weight`` ``(out, r)`` (torch's
``(out, in)`` layout, so the transposes of ``a`` and ``b``) and ``adapter_config.json``.
"""

from __future__ import annotations

import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np

from jaxquant._src.io import atomic_write
from jaxquant._src.lora import Adapter, AdapterError

FORMAT = "jaxquant.lora/1"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# The Llama port's module names are Hugging Face's; only the layer list differs (layers_0 vs layers.0).
_LLAMA_PATH = re.compile(r"^params/(?:layers_(\d+)/)?(.+)/kernel$")
_PEFT_KEY = re.compile(r"^base_model\.model\.(?:model\.layers\.(\d+)\.)?(.+)\.lora_([AB])\.weight$")


def _atomic_write(path: pathlib.Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def _host(x, dtype=None) -> np.ndarray:
    x = np.asarray(x)
    return np.ascontiguousarray(x if dtype is None else x.astype(dtype))


def save(path, adapters: dict[str, Adapter]) -> None:
    """Write adapters to one safetensors file (atomically).

    Example:
      >>> jq.lora.save("/tmp/adapters.safetensors", adapters)  # doctest: +SKIP
      >>> adapters = jq.lora.load("/tmp/adapters.safetensors")  # doctest: +SKIP
    """
    import safetensors.numpy
    tensors, alphas = {}, {}
    for name, ad in adapters.items():
        if not isinstance(ad, Adapter):
            raise AdapterError(f"adapters[{name!r}] is a {type(ad).__name__}, not a lora.Adapter")
        tensors[f"{name}::a"], tensors[f"{name}::b"] = _host(ad.a), _host(ad.b)
        alphas[name] = ad.alpha
    meta = {"format": FORMAT, "alpha": json.dumps(alphas)}
    _atomic_write(pathlib.Path(path), lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=meta))


def load(path) -> dict[str, Adapter]:
    """Read adapters written by ``save`` (AdapterError for another kind of file)."""
    import safetensors
    with safetensors.safe_open(str(path), "numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise AdapterError(f"{path} is not a jaxquant adapter file (format {meta.get('format')!r}, "
                               f"expected {FORMAT!r})")
        alphas = json.loads(meta["alpha"])
        return {name: Adapter(jnp.asarray(f.get_tensor(f"{name}::a")), jnp.asarray(f.get_tensor(f"{name}::b")),
                              float(alpha)) for name, alpha in alphas.items()}


def peft_module_name(path: str) -> str:
    """The Hugging Face module a Llama-port kernel path names: ``params/layers_3/mlp/up_proj/kernel``
    -> ``model.layers.3.mlp.up_proj``; ``params/lm_head/kernel`` -> ``lm_head``."""
    m = _LLAMA_PATH.match(path)
    if m is None or (m.group(1) is None and m.group(2) != "lm_head"):
        raise AdapterError(f"to_peft: {path!r} is not a Llama-port kernel path "
                           f"(params/layers_<i>/<module>/kernel or params/lm_head/kernel)")
    return m.group(2).replace("/", ".") if m.group(1) is None else (
        f"model.layers.{m.group(1)}.{m.group(2).replace('/', '.')}")


def to_peft(directory, adapters: dict[str, Adapter], *, base_model_name_or_path: str | None = None,
            task_type: str = "CAUSAL_LM", dtype=np.float32) -> None:
    """Write adapters trained on the Llama port as PEFT's LoRA adapter folder.

    ``peft.PeftModel.from_pretrained(LlamaForCausalLM(...), directory)`` loads it: same module
    names, ``lora_A.weight = a.T (r, in)``, ``lora_B.weight = b.T (out, r)``, ``lora_alpha`` and
    ``r`` in ``adapter_config.json`` (PEFT scales by ``lora_alpha / r``, as here).

    Raises:
      AdapterError: a path that is not a Llama-port kernel. NotImplementedError: adapters with
        different ranks or alphas (PEFT would need rank_pattern / alpha_pattern).
    """
    import safetensors.numpy
    if not adapters:
        raise AdapterError("to_peft: no adapters to write")
    ranks = {ad.rank for ad in adapters.values()}
    alphas = {ad.alpha for ad in adapters.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise NotImplementedError(f"to_peft: adapters with one rank and alpha only, got ranks "
                                  f"{sorted(ranks)} and alphas {sorted(alphas)}")
    tensors, targets = {}, set()
    for name, ad in sorted(adapters.items()):
        module = peft_module_name(name)
        targets.add(module.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{module}.lora_A.weight"] = _host(ad.a.T, dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = _host(ad.b.T, dtype)
    (rank,), (alpha,) = ranks, alphas
    # the fields of peft's LoraConfig as its to_dict writes them (defaults for what we don't use)
    config = dict(
        alpha_pattern={}, auto_mapping=None, base_model_name_or_path=base_model_name_or_path,
        bias="none", corda_config=None, eva_config=None, exclude_modules=None, fan_in_fan_out=False,
        inference_mode=True, init_lora_weights=True, layer_replication=None, layers_pattern=None,
        layers_to_transform=None, loftq_config={}, lora_alpha=alpha if alpha != int(alpha) else int(alpha),
        lora_bias=False, lora_dropout=0.0, megatron_config=None, megatron_core="megatron.core",
        modules_to_save=None, peft_type="LORA", r=rank, rank_pattern={}, revision=None,
        target_modules=sorted(targets), task_type=task_type, trainable_token_indices=None,
        use_dora=False, use_rslora=False)
    directory = pathlib.Path(directory)
    _atomic_write(directory / PEFT_WEIGHTS,
                  lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / PEFT_CONFIG,
                  lambda tmp: pathlib.Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))


def from_peft(directory, dtype=jnp.float32) -> dict[str, Adapter]:
    """Read a PEFT LoRA folder for a Llama into adapters keyed by the Llama port's kernel paths."""
    import safetensors.numpy
    directory = pathlib.Path(directory)
    config = json.loads((directory / PEFT_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise NotImplementedError(f"from_peft: plain LoRA only, got peft_type={config.get('peft_type')!r} "
                                  f"use_dora={config.get('use_dora')} use_rslora={config.get('use_rslora')}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise NotImplementedError("from_peft: rank_pattern / alpha_pattern are not supported")
    tensors = safetensors.numpy.load_file(str(directory / PEFT_WEIGHTS))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterError(f"from_peft: unexpected tensor {key!r} in {directory / PEFT_WEIGHTS}")
        layer, module, which = m.groups()
        path = (f"params/{module.replace('.', '/')}/kernel" if layer is None
                else f"params/layers_{layer}/{module.replace('.', '/')}/kernel")
        pairs.setdefault(path, {})[which] = value
    alpha = float(config["lora_alpha"])
    out = {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"from_peft: {path} has only lora_{''.join(pair)}")
        out[path] = Adapter(jnp.asarray(pair["A"].T, dtype), jnp.asarray(pair["B"].T, dtype), alpha)
    return out
