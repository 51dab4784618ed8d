"""Real data, small slices: Austen's text, SmolLM2's tokenizer and its first layers in Flax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.models import austen, llama, smollm2


@pytest.fixture(scope="module")
def pride():
    return austen.novel("prideprejudice")


def test_austen_novels_decode_from_the_debian_package(pride):
    lines = pride.split("\n")
    assert lines[0] == "PRIDE AND PREJUDICE" and len(lines) == 13030
    assert "It is a truth universally acknowledged" in pride[:400]
    assert austen.novel("emma").startswith("EMMA")
    with pytest.raises(ValueError, match="unknown novel"):
        austen.novel("ulysses")


def test_austen_without_the_data_names_the_fetch_script(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQUANT_AUSTEN_DIR", str(tmp_path))
    assert austen.data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="scripts/fetch_austen.sh"):
        austen.novel("emma")


@pytest.fixture(scope="module")
def tokenizer():
    return llama.tokenizer()


def test_tokenizer_round_trips_real_text(pride, tokenizer):
    chunk = pride[:5000]
    ids = tokenizer.encode(chunk).ids
    assert tokenizer.decode(ids) == chunk
    assert ids[:5] == [6886, 24662, 7485, 33460, 58]  # "PRIDE AND PREJUDICE"
    assert 3.5 < len(chunk) / len(ids) < 5.5  # English BPE: ~4 characters per token
    assert tokenizer.encode("1234").ids == [tokenizer.token_to_id(d) for d in "1234"]  # digits split


def test_two_real_layers_quantized_match_dequantized(pride, tokenizer):
    config, weights = smollm2.load(num_layers=2)
    params = llama.params_from_weights(weights)
    model = llama.Llama(config)
    ids = jnp.asarray(tokenizer.encode(pride[:2000]).ids[:64])[None]
    q = jq.quantize_tree(params)
    assert isinstance(q["params"]["layers_1"]["mlp"]["down_proj"]["kernel"], jq.QArray)
    out = jax.jit(lambda q, t: jq.flax.apply(model, q, t, check=False))(q, ids)
    ref = model.apply(jq.dequantize_tree(q), ids)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    full = model.apply(params, ids)
    # real weights are already on a 4-bit grid (Q4_1, blocks of 32): NF4 at block 64 moves the
    # next-token distribution only a little
    agree = float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(full, -1)))
    assert agree > 0.8, agree


def test_kv_cache_generation_matches_full_forward(tokenizer):
    import functools
    config, weights = smollm2.load(num_layers=2)
    params = llama.params_from_weights(weights)
    model = llama.Llama(config)
    prompt = jnp.asarray(tokenizer.encode("It is a truth universally acknowledged").ids)[None]
    for tree, fn in [(params, lambda p, t, c, s: model.apply(p, t, c, s)),
                     (jq.quantize_tree(params), lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False))]:
        out = jax.jit(functools.partial(llama.generate, fn, steps=6, config=config))(tree, prompt)
        full = jnp.concatenate([prompt, out], 1)
        logits = fn(tree, full, llama.init_cache(config, 1, full.shape[1]), 0)[0]
        np.testing.assert_array_equal(jnp.argmax(logits[0, prompt.shape[1] - 1:-1], -1), out[0])


def test_minilm_reproduces_sentence_similarity_and_survives_nf4():
    from jaxquant.models import minilm
    params, model = minilm.load_params(), minilm.MiniLM()
    ids, mask = minilm.tokenize(["A man is eating food.", "A man is eating a piece of bread."])
    e = model.apply(params, ids, mask)
    assert abs(float(e[0] @ e[1]) - 0.755) < 0.001  # sentence-transformers' value
    q = jq.quantize_tree(params, jq.Policy(min_size=1))  # every linear: NF4 + double quant
    eq = jq.flax.apply(model, q, ids, mask)
    assert min(float(eq[i] @ e[i]) for i in range(2)) > 0.95


def _full_logits_nll(model, params, ids):
    logp = jax.nn.log_softmax(model.apply(params, ids)[:, :-1], -1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients(pride, tokenizer):
    config, weights = smollm2.load(num_layers=1)
    params = llama.params_from_weights(weights)
    model = llama.Llama(config, loss_chunk=24, remat=True)  # 64 tokens: 2 whole chunks and a rest
    ids = jnp.asarray(tokenizer.encode(pride[:3000]).ids[:64]).reshape(2, 32)
    targets = llama.next_token_targets(ids)
    chunked = lambda p: model.apply(p, ids, targets=targets)

    # value and gradient to the block (as LoRA trains blocks; the head's own gradient is a
    # table-sized output either way), and the compiled step's temp memory: (64, 49152) float32
    # logits are 12.6 MB, chunks of 24 tokens never hold them whole
    def compiled(loss):
        of_block = lambda block: loss({"params": {**params["params"], "layers_0": block}})
        step = jax.jit(jax.value_and_grad(of_block)).lower(params["params"]["layers_0"]).compile()
        return step(params["params"]["layers_0"]), step.memory_analysis().temp_size_in_bytes

    (value, grads), temp = compiled(chunked)
    (ref_value, ref_grads), ref_temp = compiled(lambda p: _full_logits_nll(model, p, ids))
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-7)
    assert temp < ref_temp / 3, (temp, ref_temp)
    # ignored targets: the mean over the others, whatever the ignored positions hold
    masked = targets.at[:, 16:].set(-1)
    half = lambda t: model.apply(params, ids, targets=t)
    np.testing.assert_allclose(half(masked), half(jnp.where(masked < 0, -7, masked)), rtol=0)
    ref_half = model.apply(params, ids[:, :17], targets=llama.next_token_targets(ids[:, :17]))
    np.testing.assert_allclose(half(masked), ref_half, rtol=1e-5)


def test_chunked_loss_rejects_what_it_cannot_mean():
    config = smollm2.LlamaConfig(vocab_size=64, hidden=32, ffn=64, layers=1, heads=2, kv_heads=1, head_dim=16)
    ids = jnp.ones((1, 8), jnp.int32)
    params = llama.Llama(config).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="shaped like tokens"):
        llama.Llama(config).apply(params, ids, targets=ids[:, 1:])
    with pytest.raises(ValueError, match="no cache"):
        llama.Llama(config).apply(params, ids, llama.init_cache(config, 1, 8), 0, targets=ids)
    with pytest.raises(ValueError, match="'xla' or 'cudnn'"):
        llama.Llama(config, attention="flash").apply(params, ids)
    with pytest.raises(ValueError, match="loss_chunk"):
        llama.Llama(config, loss_chunk=0).apply(params, ids, targets=ids)
    with pytest.raises(TypeError, match="integers"):
        llama.Llama(config).apply(params, ids, targets=ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="< vocab_size=64"):
        llama.Llama(config).apply(params, ids, targets=ids.at[0, 3].set(64))
    # unsigned tokens: the last position is still ignored
    unsigned = llama.next_token_targets(jnp.arange(8, dtype=jnp.uint32)[None])
    assert unsigned.dtype == jnp.int32 and int(unsigned[0, -1]) == -1
    signed = llama.Llama(config).apply(params, ids, targets=llama.next_token_targets(ids))
    np.testing.assert_allclose(llama.Llama(config).apply(params, ids, targets=llama.next_token_targets(
        ids.astype(jnp.uint32))), signed, rtol=0)
    # every target ignored: a defined 0, not NaN
    assert float(llama.Llama(config).apply(params, ids, targets=-jnp.ones_like(ids))) == 0.0
