"""Hugging Face Llama checkpoints in and out: bf16/fp32 safetensors and bitsandbytes 4-/8-bit.

``load`` reads a folder written by ``transformers`` (``save_pretrained``), with or without
bitsandbytes quantization, into ``llama.Llama`` and its Linen params; ``save`` writes the layout
``transformers`` + ``bitsandbytes`` load back. Key mapping (torch weights are ``(out, in)``, Flax
kernels ``(in, out)``)::

    model.embed_tokens.weight                 embed_tokens/embedding
    model.layers.{i}.self_attn.q_proj.weight  layers_{i}/self_attn/q_proj/kernel   (transposed)
    model.layers.{i}.input_layernorm.weight   layers_{i}/input_layernorm/scale
    model.norm.weight, lm_head.weight         norm/scale, lm_head/kernel           (untied head)

A bitsandbytes 4-bit linear (``weight`` + ``weight.absmax`` ... see REFERENCE.md) becomes the
QArray ``jaxquant.from_bnb(..., transpose=True)``: the same bytes, blocks along the kernel's input
axis. An 8-bit one (LLM.int8: int8 ``weight`` and float32 row scales ``SCB``, ``w ≈ weight * SCB
/ 127``) becomes an int8 QArray with one block per output row and ``scale = float32(SCB / 127)``:
bitsandbytes rounds ``weight * SCB`` first and then multiplies by float32(1/127), so the values
can differ from its own dequantization in the last float32 bit; ``save`` recovers ``SCB`` exactly.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors reads bf16 tensors)
import numpy as np
import safetensors.numpy
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxquant as jq
from jaxquant._src.tree import check_leaf, plan, quantize_leaf
from jaxquant.models import hf_config, llama
from jaxquant.models.hf_files import Checkpoint
from jaxquant.models.hf_config import SUPPORTED, config_from_hf, config_to_hf  # noqa: F401

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some older checkpoints carry
INV127 = np.float32(127)


def _modules(config: llama.LlamaConfig) -> dict[str, tuple]:
    """HF module name -> (param path, kind, torch shape); kind: 'linear', 'norm' or 'embed'."""
    c = config
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    dims = {"q_proj": (q, c.hidden), "k_proj": (kv, c.hidden), "v_proj": (kv, c.hidden),
            "o_proj": (c.hidden, q), "gate_proj": (c.ffn, c.hidden), "up_proj": (c.ffn, c.hidden),
            "down_proj": (c.hidden, c.ffn)}
    out = {"model.embed_tokens": (("embed_tokens", "embedding"), "embed", (c.vocab_size, c.hidden)),
           "model.norm": (("norm", "scale"), "norm", (c.hidden,))}
    if not c.tie_embeddings:
        out["lm_head"] = (("lm_head", "kernel"), "linear", (c.vocab_size, c.hidden))
    for i in range(c.layers):
        for name in LINEARS:
            parent, leaf = name.split(".")
            out[f"model.layers.{i}.{name}"] = ((f"layers_{i}", parent, leaf, "kernel"), "linear", dims[leaf])
        for name in NORMS:
            out[f"model.layers.{i}.{name}"] = ((f"layers_{i}", name, "scale"), "norm", (c.hidden,))
    return out


def _set(tree: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _linear_kind(ckpt: Checkpoint, module: str) -> str:
    if any(k.startswith(f"{module}.weight.quant_state.bitsandbytes__") for k in ckpt.where):
        return "bnb4"
    return "bnb8" if f"{module}.SCB" in ckpt.where else "float"


def _read_bnb4(ckpt: Checkpoint, module: str, shape: tuple) -> jq.QArray:
    prefix = f"{module}.weight"
    entries = {k: ckpt.get(k) for k in ckpt.where if k == prefix or k.startswith(prefix + ".")}
    try:
        q = jq.from_bnb(entries, prefix, transpose=True)
    except ValueError as e:
        raise jq.CheckpointError(f"{ckpt.where[prefix] if prefix in ckpt.where else ckpt.describe()}: "
                                 f"{module}: {e}") from None
    if q.shape != shape[::-1]:
        raise jq.CheckpointError(f"{ckpt.where[prefix]}: {prefix!r} has shape {list(q.shape[::-1])} "
                                 f"in its quant_state, the config needs {list(shape)}")
    return q


def _read_bnb8(ckpt: Checkpoint, module: str, shape: tuple, dtype) -> jq.QArray:
    weight, scb = ckpt.get(f"{module}.weight"), ckpt.get(f"{module}.SCB")
    file = ckpt.where[f"{module}.weight"]
    if weight.dtype != np.int8 or weight.shape != shape:
        raise jq.CheckpointError(f"{file}: {module}.weight is {weight.dtype}{list(weight.shape)}, an "
                                 f"8-bit checkpoint needs int8{list(shape)}")
    if scb.dtype != np.float32 or scb.shape != shape[:1]:
        raise jq.CheckpointError(f"{file}: {module}.SCB is {scb.dtype}{list(scb.shape)}, needs "
                                 f"float32[{shape[0]}]")
    fmt = f"{module}.weight_format"
    if fmt in ckpt.where and np.asarray(ckpt.get(fmt)).reshape(-1).tolist() != [0]:
        raise NotImplementedError(f"{file}: {fmt} = {ckpt.get(fmt)}; only the row-major "
                                  f"format (0) is supported")
    scale = (scb / INV127).reshape(-1, 1)  # float32(SCB / 127), correctly rounded
    return jq.validate(jq.QArray(jnp.asarray(weight.view(np.uint8)), jnp.asarray(scale), shape=shape[::-1],
                                 dtype=np.dtype(dtype), qtype="int8", block_size=shape[1], axis=0))


_COLUMN = re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head)/kernel$")
_ROW = re.compile(r"(o_proj|down_proj)/kernel$")


def tensor_parallel(path: str, axis: str = "model") -> P:
    """Megatron-style specs for the Llama port over mesh axis ``axis``: q/k/v/gate/up and the LM
    head split along their outputs, o/down along their inputs (so one all-reduce per attention and
    per MLP block), the embedding along its hidden axis, the norms whole."""
    if _COLUMN.search(path) or path.endswith("embedding"):
        return P(None, axis)
    return P(axis, None) if _ROW.search(path) else P()


def load(path: str | os.PathLike, *, dtype=None, policy: jq.Policy | None = None, mesh: Mesh | None = None,
         specs: Callable[[str], P] = tensor_parallel):
    """Read a Hugging Face ``LlamaForCausalLM`` checkpoint folder into ``(model, params)``.

    Tensor by tensor (host memory: the output plus one tensor). Float weights stay float (cast to
    ``dtype`` if given) unless ``policy`` quantizes them as they are read; bitsandbytes 4-bit and
    8-bit weights become QArrays as stored. Run the model with ``jaxquant.flax.apply``.

    Args:
      path: the folder: ``config.json`` and ``model.safetensors`` or its shards with
        ``model.safetensors.index.json``.
      dtype: compute dtype of the model and dtype of its float weights; None: the checkpoint's
        (``dtype``/``torch_dtype`` in config.json).
      policy: a ``jaxquant.Policy`` for the float weights (paths as in the Linen tree, e.g.
        ``params/layers_0/mlp/gate_proj/kernel``).
      mesh: a ``jax.sharding.Mesh``: each weight is read straight into its shards (a float
        weight device by device from the file; a stored 4-/8-bit one whole, then placed), as
        ``specs(path)`` says, and quantized there by ``policy``.
      specs: path -> ``PartitionSpec`` of the Flax weight (``tensor_parallel`` by default).

    Returns:
      ``(llama.Llama(config, dtype), {"params": ...})``.

    Raises:
      NotImplementedError: an architecture other than ``SUPPORTED``, or a quantization other than
        bitsandbytes 4-/8-bit. jaxquant.CheckpointError (a ValueError): a missing file, shard or
        key, a shape that disagrees with config.json, a truncated or corrupt safetensors file.
        ValueError: with ``mesh``, a spec that does not fit its weight (an axis the mesh lacks,
        an uneven split, shards that cut blocks), naming the weight, before anything is read.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> from jaxquant.models import hf
      >>> model, params = hf.load("tests/data/hf_tiny/nf4_dq")
      >>> logits = jq.flax.apply(model, params, jnp.zeros((1, 4), jnp.int32))
      >>> logits.shape
      (1, 4, 256)
    """
    path = pathlib.Path(path)
    raw = hf_config.read(path)
    config, stored_dtype, quant = config_from_hf(raw, path / "config.json")
    dtype = np.dtype(dtype or stored_dtype)
    ckpt = Checkpoint(path)
    try:
        return llama.Llama(config, dtype=dtype), _read(ckpt, config, quant, dtype, policy, mesh, specs)
    finally:
        ckpt.close()


def _read(ckpt: Checkpoint, config, quant: str | None, dtype, policy, mesh, specs) -> dict:
    modules = _modules(config)
    kinds, abstract, used = {}, {}, set()
    for module, (ppath, kind, shape) in modules.items():
        key = f"{module}.weight"
        kinds[module] = _linear_kind(ckpt, module) if kind == "linear" else "float"
        if kinds[module] != "float" and quant is None:
            raise jq.CheckpointError(f"{ckpt.where[key]}: {module} is stored quantized but config.json "
                                     f"has no quantization_config")
        if kinds[module] == "float":
            if key not in ckpt.where:
                raise jq.CheckpointError(f"{ckpt.describe()}: tensor {key!r} is missing")
            got_dtype, got_shape = ckpt.info[key]
            if got_shape != shape:
                raise jq.CheckpointError(f"{ckpt.where[key]}: {key!r} has shape {list(got_shape)}, "
                                         f"config.json needs {list(shape)}")
            if got_dtype not in ("BF16", "F16", "F32"):
                raise jq.CheckpointError(f"{ckpt.where[key]}: {key!r} is {got_dtype}, expected a float "
                                         f"dtype (BF16, F16 or F32)")
            leaf = jax.ShapeDtypeStruct(shape[::-1] if kind == "linear" else shape, dtype)
            used.add(key)
        else:  # a placeholder: plan() leaves QArrays alone
            leaf = jq.QArray(jax.ShapeDtypeStruct((1,), jnp.uint8), jax.ShapeDtypeStruct((1,), jnp.float32))
            used.update(k for k in ckpt.where if k.startswith(f"{key}.") or k in (
                key, f"{module}.SCB", f"{module}.weight_format"))
        _set(abstract, ("params", *ppath), leaf)
    extra = sorted(k for k in ckpt.where if k not in used and not IGNORED.search(k)
                   and not (config.tie_embeddings and k == "lm_head.weight"))
    if extra:
        raise jq.CheckpointError(f"{ckpt.where[extra[0]]}: {extra[0]!r} is not a weight of "
                                 f"{SUPPORTED[0]} with this config.json ({len(extra)} such keys)")
    decisions = plan(abstract, policy) if policy is not None else {}
    places = {}  # every placement checked before the first weight is read
    for module, (ppath, kind, shape) in modules.items() if mesh is not None else ():
        name = "/".join(("params", *ppath))
        flax_shape = shape[::-1] if kind == "linear" else shape
        places[module] = _placement(mesh, specs, name, flax_shape)
        decision = decisions.get(name)
        if kinds[module] == "float" and decision is not None and decision.config is not None:
            try:  # the policy's QArray must fit the spec too (whole blocks per shard)
                check_leaf(jax.ShapeDtypeStruct(flax_shape, dtype, sharding=places[module]), decision.config)
            except ValueError as e:
                raise ValueError(f"hf.load: {name}: {e}") from None
    params = {}
    for module, (ppath, kind, shape) in modules.items():
        name = "/".join(("params", *ppath))
        place = places.get(module)
        if kinds[module] in ("bnb4", "bnb8"):
            leaf = (_read_bnb4(ckpt, module, shape) if kinds[module] == "bnb4"
                    else _read_bnb8(ckpt, module, shape, dtype))
            if place is not None:
                try:
                    target = jq.qarray_sharding(leaf, mesh, place.spec)
                except ValueError as e:
                    raise ValueError(f"hf.load: {name}: {e}") from None
                leaf = jax.device_put(leaf, target)
        else:
            key = f"{module}.weight"
            if place is None:
                w = ckpt.get(key)
                leaf = jnp.asarray(np.ascontiguousarray(w.T) if kind == "linear" else w, dtype)
            else:
                leaf = ckpt.get_sharded(key, place, dtype, transpose=kind == "linear")
            decision = decisions.get(name)
            if decision is not None and decision.config is not None:
                leaf = quantize_leaf(leaf, decision.config)  # where its shards lie
        _set(params, ppath, leaf)
    return {"params": params}


def _placement(mesh: Mesh, specs: Callable[[str], P], name: str, shape: tuple) -> NamedSharding:
    """``specs(name)`` on ``mesh`` for the Flax weight of ``shape``, checked to fit it: a ValueError
    naming the weight, not JAX's (an IndexError for too many entries, an unnamed axis error)."""
    spec = specs(name)
    if not isinstance(spec, P):
        raise TypeError(f"hf.load: specs({name!r}) returned {spec!r}, not a PartitionSpec")
    try:
        if len(spec) > len(shape):
            raise ValueError(f"{len(spec)} entries for {len(shape)} dimensions")
        place = NamedSharding(mesh, spec)
        place.shard_shape(shape)  # raises for a dimension the devices do not divide
    except ValueError as e:
        raise ValueError(f"hf.load: specs({name!r}) = {spec} does not fit the weight {list(shape)} on "
                         f"the mesh {dict(mesh.shape)}: {e}") from None
    return place


def _bnb8_entries(q: jq.QArray, module: str) -> dict[str, np.ndarray]:
    """LLM.int8 entries of an int8 kernel with one block per output row (``_read_bnb8``'s inverse)."""
    scale = np.asarray(q.scale, np.float32).reshape(-1)
    # The SCB whose float32(SCB / 127) is this scale: float32 division by 127 is one-to-one, so
    # for a QArray that _read_bnb8 made exactly one of these neighbours of scale * 127 is it.
    near = [scale * INV127]
    for direction in (np.inf, -np.inf):
        near += [np.nextafter(near[0], np.float32(direction))]
        near += [np.nextafter(near[-1], np.float32(direction))]
    scb = near[0]
    for cand in near[::-1]:
        scb = np.where(cand / INV127 == scale, cand, scb)
    codes = np.asarray(q.codes).view(np.int8)
    return {f"{module}.weight": codes, f"{module}.SCB": scb.astype(np.float32),
            f"{module}.weight_format": np.array(0, np.uint8)}


def _entries(module: str, kind: str, leaf, dtype) -> tuple[str | None, dict[str, np.ndarray]]:
    """(the bitsandbytes format of ``leaf`` or None for float, its checkpoint entries)."""
    if not isinstance(leaf, jq.QArray):
        w = np.asarray(jnp.asarray(leaf, dtype))
        return None, {f"{module}.weight": np.ascontiguousarray(w.T) if kind == "linear" else w}
    where = f"{module} ({leaf!r})"
    if kind != "linear" or leaf.ndim != 2 or leaf.axis != 0 or leaf.zero_point is not None:
        raise NotImplementedError(f"hf.save: {where}: transformers + bitsandbytes store only linear "
                                  f"kernels quantized along their input axis (axis=0), without zero "
                                  f"point; dequantize this one first")
    if leaf.qtype in ("nf4", "fp4"):
        entries = jq.to_bnb(leaf, f"{module}.weight")
        # + 0.0: bitsandbytes' own FP4 quant_map holds +0.0 at code 8, where jaxquant's table has -0.0
        entries[f"{module}.weight.quant_map"] = entries[f"{module}.weight.quant_map"] + np.float32(0)
        return f"bnb4:{leaf.qtype}:{leaf.double_quant}", entries
    if leaf.qtype == "int8" and leaf.block_size == leaf.shape[0] and not leaf.double_quant:
        return "bnb8", _bnb8_entries(leaf, module)
    raise NotImplementedError(f"hf.save: {where}: bitsandbytes has nf4/fp4 with any block size and "
                              f"int8 with one block per output row (block_size=None); not this one")


def save(path: str | os.PathLike, model: llama.Llama, params, *, max_shard_size: int = 5 * 10**9) -> None:
    """Write ``params`` of ``model`` as a Hugging Face checkpoint folder that transformers (with
    bitsandbytes for quantized kernels) loads with ``from_pretrained``.

    nf4/fp4 kernels (axis 0, any block size, with or without double quantization) are written as
    bitsandbytes 4-bit linears, int8 kernels with one block per output row as LLM.int8 ones; all
    quantized kernels must share one format (config.json has one ``quantization_config``), and
    float kernels are listed in ``llm_int8_skip_modules``. Files above ``max_shard_size`` bytes
    are split into shards with ``model.safetensors.index.json``, a module's entries kept together.
    The folder's files are replaced together at the end, so a failed save leaves no partial files.

    Raises:
      NotImplementedError: a QArray that bitsandbytes cannot hold, or mixed quantized formats.

    Example:
      >>> import tempfile
      >>> from jaxquant.models import hf
      >>> model, params = hf.load("tests/data/hf_tiny/nf4_dq")
      >>> hf.save(tempfile.mkdtemp(), model, params)
    """
    path = pathlib.Path(path)
    config, dtype = model.config, np.dtype(model.dtype)
    tree = params["params"] if "params" in params else params
    groups, formats, float_linears = [], {}, []
    for module, (ppath, kind, _) in _modules(config).items():
        leaf = tree
        for part in ppath:
            leaf = leaf[part]
        fmt, entries = _entries(module, kind, leaf, dtype)
        if fmt is not None:
            formats.setdefault(fmt, module)
        elif kind == "linear":
            float_linears.append(module)
        groups.append(entries)
    if len(formats) > 1:
        raise NotImplementedError(f"hf.save: one quantization_config holds one format; these modules "
                                  f"differ: {formats}")
    quant = None
    if formats:
        fmt = next(iter(formats))
        # None: transformers' default, which keeps (only) lm_head in float
        default = [] if config.tie_embeddings else ["lm_head"]
        skip = None if float_linears == default else float_linears
        if fmt == "bnb8":
            quant = hf_config.quantization_config("bnb8", compute_dtype=dtype.name, skip=skip)
        else:
            _, qtype, dq = fmt.split(":")
            quant = hf_config.quantization_config("bnb4", qtype=qtype, double_quant=dq == "True",
                                                  compute_dtype=dtype.name, skip=skip)
    shards, size = [[]], 0
    for entries in groups:
        nbytes = sum(a.nbytes for a in entries.values())
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entries)
        size += nbytes
    _write(path, config_to_hf(config, dtype, quant), shards)


def _write(path: pathlib.Path, config: dict, shards: list[list[dict]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".hf-save-", dir=path))
    try:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map, total = {}, 0
        for name, shard in zip(names, shards):
            tensors = {k: np.asarray(v, order="C") for entries in shard for k, v in entries.items()}
            safetensors.numpy.save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map |= {k: name for k in tensors}
            total += sum(v.nbytes for v in tensors.values())
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for old in ["model.safetensors", "model.safetensors.index.json", *path.glob("model-*-of-*.safetensors")]:
            (path / old).unlink(missing_ok=True)
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
