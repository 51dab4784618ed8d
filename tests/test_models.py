"""Real data, small slices: Austen's text, SmolLM2's tokenizer and its first layers in Flax."""

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
