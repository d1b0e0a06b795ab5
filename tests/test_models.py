"""Logits parity with transformers' PyTorch models, KV-cached decoding and dtypes.

Every family variant is a tiny random checkpoint saved with `save_pretrained` and loaded through
`spt_jax.models.load`, so these tests cover the config mapping, the weight maps and the model code
together. See CONTRIBUTING.md ("Tolerances") for why 1e-4 in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import N_SPECIAL, VARIANTS, VOCAB
from spt_jax import models
from spt_jax.models import DecoderLM, KVCache, RopeConfig, positions_from_mask

ATOL = 1e-4  # float32 vs float32, both sides summing in a different order
SEQ = 12  # longer than every sliding window in conftest (4 or 5)


@pytest.fixture(scope="module")
def loaded(tiny_hf_checkpoint):
    """``variant -> (LM, torch_model)``, each loaded once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            directory, torch_model = tiny_hf_checkpoint(variant)
            cache[variant] = (models.load(directory), torch_model)
        return cache[variant]

    return get


def _tokens(seed=0, batch=3):
    return np.random.RandomState(seed).randint(N_SPECIAL, VOCAB, (batch, SEQ))


def _right_padded():
    mask = np.ones((3, SEQ), bool)
    mask[1, -4:] = False
    mask[2, -7:] = False
    return _tokens(0), mask


def _left_padded():
    mask = np.ones((3, SEQ), bool)
    mask[1, :3] = False
    mask[2, :6] = False
    return _tokens(1), mask


def _hf_positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(_hf_positions(mask)),
        )
    return out.logits.float().numpy()


def _max_diff_valid(a, b, mask) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask].max())


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(loaded, variant, padding):
    lm, torch_model = loaded(variant)
    ids, mask = _right_padded() if padding == "right" else _left_padded()
    ours = np.asarray(lm.logits(ids, mask))
    ref = torch_logits(torch_model, ids, mask)
    assert ours.shape == ref.shape == (3, SEQ, VOCAB)
    assert ours.dtype == np.float32
    assert _max_diff_valid(ours, ref, mask) <= ATOL


@functools.partial(jax.jit, static_argnums=0, static_argnames="out_major")
def _step(graphdef, params, tokens, positions, valid, cache, layer_weights=None, out_major=False):
    model = nnx.merge(graphdef, params)
    hidden, cache = model(model.embed(tokens), positions, valid, cache, layer_weights=layer_weights,
                          out_major=out_major)
    return model.logits(hidden, out_major=out_major), cache


@pytest.mark.parametrize("decode_layers", ["scan", "per_layer", "per_layer_out_major"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cached_decode_matches_full_forward(loaded, variant, decode_layers):
    """Prefill 5 tokens (scanned layers), then feed the rest one at a time, with the layers scanned or
    run one by one on `unstack_layers`' buffers (generation's decode; output-major: its kernels
    transposed and each projection computed as W @ x^T); row 2's prefill is all padding."""
    lm, torch_model = loaded(variant)
    out_major = decode_layers == "per_layer_out_major"
    layer_weights = jax.jit(functools.partial(models.unstack_layers, out_major=out_major))(lm.params)
    ids, mask = _left_padded()
    positions = positions_from_mask(jnp.asarray(mask))
    prefill = 5
    cache = KVCache.init(lm.config, batch=3, length=SEQ + 4)  # 4 slots stay empty throughout
    chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, SEQ)]
    outs = []
    for start, stop in chunks:
        decoding = start >= prefill and decode_layers != "scan"
        logits, cache = _step(
            lm.graphdef,
            lm.params,
            jnp.asarray(ids[:, start:stop]),
            positions[:, start:stop],
            jnp.asarray(mask[:, start:stop]),
            cache.per_layer() if decoding else cache,
            layer_weights if decoding else None,
            out_major=decoding and out_major,
        )
        outs.append(np.asarray(logits))
    incremental = np.concatenate(outs, axis=1)
    assert int(cache.index) == SEQ
    assert isinstance(cache.k, tuple) == (decode_layers != "scan")
    assert _max_diff_valid(incremental, lm.logits(ids, mask), mask) <= ATOL
    assert _max_diff_valid(incremental, torch_logits(torch_model, ids, mask), mask) <= ATOL


@pytest.mark.parametrize(("remat", "prefix_len"), [("none", 3), ("dots", 3), ("none", 0)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefixed_rows_match_each_row_run_alone(loaded, variant, remat, prefix_len):
    """Rows that share their first slots (tuning's BOS + soft prompt) run the prefix once, packed in
    front of the rows' slots: the logits are each full row's, with the padding between prefix and
    text, by our plain forward, and without it (the rows left-padded) by transformers, whose sliding
    window counts slots rather than positions. The longest row outruns every sliding window in
    conftest, so the window is checked across the prefix too."""
    lm, torch_model = loaded(variant)
    ids, mask = _left_padded()
    ids[:, :prefix_len] = ids[0, :prefix_len]
    text_mask = mask.copy()
    mask[:, :prefix_len] = True  # rows [prefix | padding | text]

    @functools.partial(jax.jit, static_argnames="pack")
    def prefixed(params, ids, text_valid, pack=True):
        model = nnx.merge(lm.graphdef, params)
        prefix = model.embed(ids[0, :prefix_len])
        hidden = model.prefixed_rows(prefix, model.embed(ids[:, prefix_len:]), text_valid, remat=remat, pack=pack)
        return model.logits(hidden)

    ours = np.asarray(prefixed(lm.params, jnp.asarray(ids), jnp.asarray(text_mask[:, prefix_len:])))
    assert ours.shape == (3, SEQ, VOCAB)
    whole_rows = prefixed(lm.params, jnp.asarray(ids), jnp.asarray(text_mask[:, prefix_len:]), pack=False)
    assert _max_diff_valid(ours, whole_rows, mask) <= ATOL  # a data-sharded mesh's form (`tune.step.packs_prefix`)
    # read out at a few slots only (the tuning loss's targets): the last layer runs there alone
    row = np.array([0, 2, 1, 2 if prefix_len else 0, 0])  # (2, prefix_len - 1): a prefix slot
    slot = np.array([SEQ - 1, 7, SEQ - 2, max(prefix_len - 1, 0), 4])

    @jax.jit
    def read_out(params, ids, text_valid):
        model = nnx.merge(lm.graphdef, params)
        prefix = model.embed(ids[0, :prefix_len])
        at = (jnp.asarray(row), jnp.asarray(slot))
        return model.logits(model.prefixed_rows(prefix, model.embed(ids[:, prefix_len:]), text_valid, remat=remat, at=at))

    picked = np.asarray(read_out(lm.params, jnp.asarray(ids), jnp.asarray(text_mask[:, prefix_len:])))
    assert mask[row, slot].all() and float(np.abs(picked - ours[row, slot]).max()) <= ATOL
    assert _max_diff_valid(ours, lm.logits(ids, mask), mask) <= ATOL
    compact = np.sort(mask, axis=1)  # each row's real slots, in order, left-padded
    compact_ids = np.zeros_like(ids)
    compact_ids[compact] = ids[mask]
    ref = torch_logits(torch_model, compact_ids, compact)
    assert float(np.abs(ours[mask] - ref[compact]).max()) <= ATOL


def _with_config(lm, **changes):
    """The same weights under a changed architecture (shapes unchanged)."""
    config = lm.config.replace(**changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    return dataclasses.replace(lm, config=config, graphdef=graphdef)


# Each feature, switched off, must move the logits far beyond ATOL: otherwise the parity test above
# could pass with that feature mapped wrongly, and the variant would test nothing.
ABLATIONS = [
    ("mistral", dict(layer_kinds=(), sliding_window=None)),
    ("gemma2", dict(layer_kinds=(), sliding_window=None)),
    ("gemma2", dict(attn_softcap=None)),
    ("gemma2", dict(final_softcap=None)),
    ("gemma3_text", dict(rope_local=None)),
    ("gemma3_text", dict(rope=RopeConfig(theta=1000.0))),
    ("llama3_rope", dict(rope=RopeConfig(theta=100.0))),
]

def _textbook_attention(q, k, v, mask, scale, softcap):
    """Repeat each kv head for its query heads (head h reads kv head h // G, as HF's repeat_kv) and
    softmax the masked scores."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    weights = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_attention_matches_the_textbook_formula_and_its_gradient(softcap):
    """`_attend`'s heads-major blocks, with 3 query heads per kv head (the fixtures have 2) and a query
    row with no key to attend to (a padding slot): outputs and gradients as the plain formula's."""
    from spt_jax.models.transformer import _attend

    config = models.ModelConfig("llama", vocab_size=8, d_model=24, n_layers=1, n_heads=6, n_kv_heads=2,
                                head_dim=4, d_ff=8, max_position_embeddings=16, attn_softcap=softcap)
    kq, kk, kv, km, kc = jax.random.split(jax.random.key(0), 5)
    B, T, S = 2, 3, 5
    q, k, v = (jax.random.normal(key, shape) for key, shape in
               ((kq, (B, T, 6, 4)), (kk, (B, S, 2, 4)), (kv, (B, S, 2, 4))))
    mask = jax.random.bernoulli(km, 0.6, (B, T, S)).at[:, :, 0].set(True).at[1, 2].set(False)
    cotangent = jax.random.normal(kc, (B, T, 6, 4))
    ours = lambda q, k, v: _attend(q, k, v, mask, config, jnp.float32)  # noqa: E731
    textbook = lambda q, k, v: _textbook_attention(q, k, v, mask, config.scale, softcap)  # noqa: E731
    got = ours(q, k, v)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, textbook(q, k, v), atol=1e-6)
    grads = [jax.grad(lambda *x, f=f: (f(*x) * cotangent).sum(), argnums=(0, 1, 2))(q, k, v)
             for f in (ours, textbook)]
    for got_grad, want_grad in zip(*grads):
        np.testing.assert_allclose(got_grad, want_grad, atol=1e-5)
    half = _attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, config, jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), got, atol=3e-2)


@pytest.mark.parametrize(("variant", "changes"), ABLATIONS, ids=lambda p: str(p))
def test_variant_features_matter(loaded, variant, changes):
    lm, torch_model = loaded(variant)
    ids, mask = _right_padded()
    ablated = np.asarray(_with_config(lm, **changes).logits(ids, mask))
    assert _max_diff_valid(ablated, torch_logits(torch_model, ids, mask), mask) > 100 * ATOL


def test_bfloat16_load(tiny_hf_checkpoint):
    directory, _ = tiny_hf_checkpoint("gemma3_text")
    lm32 = models.load(directory)
    lm16 = models.load(directory, dtype="bfloat16")

    config = lm16.config
    template = nnx.state(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    leaves = jax.tree.leaves(lm16.params)
    # Exactly the module's parameters: no optimizer state, gradients or second copies.
    assert len(leaves) == len(jax.tree.leaves(template))
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.bfloat16 for x in leaves)
    assert lm16.n_params == lm32.n_params

    ids, mask = _left_padded()
    full = np.asarray(lm32.logits(ids, mask))
    half = np.asarray(lm16.logits(ids, mask))
    assert half.dtype == np.float32  # logits are always float32
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.2%) on every weight and every
    # activation between matmuls; over 3 layers that compounds to a few percent of the logit scale.
    # 5% of the largest float32 logit still catches a wrong layout or a dropped scale, which move
    # logits by their own magnitude.
    scale = np.abs(full[mask]).max()
    assert _max_diff_valid(half, full, mask) <= 0.05 * scale
    assert _max_diff_valid(half, full, mask) > 0  # really computed in bfloat16


def test_per_layer_weights_refuse_a_stacked_cache(loaded):
    lm, _ = loaded(VARIANTS[0])
    model = lm.model
    ids = jnp.asarray(_tokens(batch=1)[:, :2])
    cache = KVCache.init(lm.config, batch=1, length=4)
    with pytest.raises(ValueError, match="per-layer cache"):
        model(model.embed(ids), jnp.arange(2)[None], jnp.ones((1, 2), bool), cache,
              layer_weights=models.unstack_layers(lm.params))
    with pytest.raises(ValueError, match="out_major needs layer_weights"):
        model(model.embed(ids), jnp.arange(2)[None], jnp.ones((1, 2), bool), out_major=True)
