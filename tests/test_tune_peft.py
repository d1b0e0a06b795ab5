"""PEFT parity: our prompt loss and prompt gradient equal Hugging Face PEFT's on the same weights.

A tiny random ``LlamaForCausalLM`` is saved with ``save_pretrained`` and loaded into spt_jax. PEFT
puts the virtual tokens before everything (BOS included) and runs without position-aware padding,
so the parity batch uses PEFT's placement, ``[P][BOS][input][target][EOS]``, and each PEFT row runs
alone, unpadded; our side runs the same rows as one left-padded batch, which also checks that
padding changes nothing.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from tune_support import char_tokenizer

from spt_jax import tune
from spt_jax.errors import ConfigError
from spt_jax.sequence import Encoded, Layout, encode
from spt_jax.tune.step import prompt_loss

P = 5
ROWS = [("12+30=", " 42"), ("7+1=", " 8"), ("100+250=", " 350")]


def hf_config(family: str, vocab_size: int):
    import transformers

    shared = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    if family == "llama":
        return transformers.LlamaConfig(**shared), transformers.LlamaForCausalLM
    # Gemma 3: sqrt(D)-scaled embeddings (the prompt must not be scaled again), a sliding layer.
    gemma = transformers.Gemma3TextConfig(
        **shared,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    return gemma, transformers.Gemma3ForCausalLM


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def models(request, tmp_path_factory):
    """(Hugging Face model, our LM loaded from its save_pretrained directory, that directory)."""
    from spt_jax.models import load

    tokenizer = char_tokenizer()
    config, model_class = hf_config(request.param, len(tokenizer))
    torch.manual_seed(0)
    hf = model_class(config).eval()
    with torch.no_grad():  # unit-scale weights, so the prompt visibly matters
        for p in hf.parameters():
            if p.ndim > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.shape[0] != len(tokenizer) else 1.0)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return hf, load(directory), directory


def peft_model(hf, prompt: np.ndarray):
    import peft

    model = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(np.array(prompt)))
    return model


def test_loss_and_gradient_match_peft(models):
    hf, lm, _ = models
    tok, eos = lm.tokenizer, lm.tokenizer.eos_token_id
    prompt = np.asarray(tune.init_prompt(lm, "vocab", length=P, seed=3))

    # PEFT: one unpadded row at a time, loss = mean over all target tokens of the batch.
    model = peft_model(hf, prompt)
    total, count = 0.0, 0
    for input_text, target_text in ROWS:
        context = [tok.bos_token_id, *encode(tok, input_text)]
        target = [*encode(tok, target_text), eos]
        ids = torch.tensor([context + target])
        labels = torch.tensor([[-100] * len(context) + target])
        total = total + model(input_ids=ids, labels=labels).loss * len(target)
        count += len(target)
    peft_loss = total / count
    peft_loss.backward()
    peft_grad = model.prompt_encoder["default"].embedding.weight.grad.numpy()

    # Ours: the same rows, PEFT's placement (no separate BOS; BOS leads the text), left-padded.
    layout = Layout(bos=(), eos=(eos,), pad_id=0, prompt_length=P, max_length=64, buckets=(32, 64))
    rows = [
        Encoded((tok.bos_token_id, *encode(tok, i)), (*encode(tok, t), eos), 0) for i, t in ROWS
    ]
    batch = layout.training_batch(rows)
    assert not batch["valid"].all()  # rows differ in length: some padding is present
    loss_and_grad = jax.jit(
        jax.value_and_grad(lambda p, params, b: prompt_loss(p, params, b, graphdef=lm.graphdef)[0])
    )
    loss, grad = loss_and_grad(prompt, lm.params, batch)

    peft_loss = peft_loss.item()
    assert peft_loss > 0.5  # not a trivially saturated model
    np.testing.assert_allclose(float(loss), peft_loss, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(grad), peft_grad, rtol=1e-3, atol=1e-5 * np.abs(peft_grad).max())


def test_export_to_peft_and_back(models, tmp_path):
    import peft

    hf, lm, base_dir = models
    prompt = np.asarray(tune.init_prompt(lm, "random", length=P, seed=1))
    out = tune.export_peft(tmp_path / "adapter", prompt, lm, base_model_name_or_path=str(base_dir))
    loaded = peft.PeftModel.from_pretrained(hf, out)
    np.testing.assert_array_equal(
        loaded.prompt_encoder["default"].embedding.weight.detach().numpy(), prompt
    )

    ours, config = tune.import_peft(out, lm)
    np.testing.assert_array_equal(ours, prompt)
    assert config["num_virtual_tokens"] == P and config["token_dim"] == 32

    # An adapter PEFT itself wrote reads back to the same vectors.
    other = np.asarray(tune.init_prompt(lm, "vocab", length=P, seed=7))
    peft_model(hf, other).save_pretrained(tmp_path / "from_peft")
    np.testing.assert_array_equal(tune.import_peft(tmp_path / "from_peft", lm)[0], other)

    with pytest.raises(ConfigError, match="missing adapter_config.json"):
        tune.import_peft(tmp_path)
    with pytest.raises(ConfigError, match=r"does not fit model"):
        tune.export_peft(tmp_path / "bad", np.zeros((P, 31), np.float32), lm)
