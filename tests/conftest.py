"""Shared fixtures: tiny random Hugging Face checkpoints built offline, one per model variant.

Each variant is a small transformers config (vocab 128, d_model 64, 2-3 layers) chosen so that the
feature it stands for actually changes the logits: sliding windows shorter than the test sequences,
soft-caps low enough to bite, rope scalings whose scaled frequencies turn by a visible angle.
Weights are perturbed after random init, because init sets norms to 1 (or 0 for Gemma's 1 + w) and
biases to 0, where a wrongly mapped norm or bias would go unnoticed.

Nothing here sets XLA_FLAGS or other process-wide XLA options: other tests spawn subprocesses with
their own flags. The in-process CLI tests keep JAX's persistent compilation cache off (the CLI would
turn it on in the user's home); `test_system` checks it in subprocesses.
"""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

VOCAB = 128
# Token ids below this are special in the tiny tokenizer; tests draw ids from the rest.
N_SPECIAL = 4

# Parity with PyTorch is checked in float32; on accelerators JAX would otherwise use bf16 passes.
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_enable_compilation_cache", False)


def _small(**overrides) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {**base, **overrides}


def variant_configs():
    """name -> a transformers config object. One entry per family feature the loader must honour."""
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**_small(tie_word_embeddings=False)),
        "llama_tied": lambda: tf.LlamaConfig(**_small(tie_word_embeddings=True)),
        # theta 100 and original_max 32 put head_dim 16's frequencies in all three llama3 regimes
        # (kept, smoothed, divided by 8) while positions < 16 still turn the slow ones visibly.
        "llama3_rope": lambda: tf.LlamaConfig(
            **_small(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=100.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=32,
                )
            )
        ),
        "llama_attn_bias": lambda: tf.LlamaConfig(**_small(attention_bias=True, mlp_bias=True)),
        "mistral": lambda: tf.MistralConfig(**_small(sliding_window=5)),
        "qwen2": lambda: tf.Qwen2Config(**_small(tie_word_embeddings=False)),
        # head_dim 24 != d_model / n_heads, as in real Qwen3 checkpoints.
        "qwen3": lambda: tf.Qwen3Config(**_small(head_dim=24, tie_word_embeddings=True)),
        "gemma": lambda: tf.GemmaConfig(**_small(num_key_value_heads=1, head_dim=16)),
        "gemma2": lambda: tf.Gemma2Config(
            **_small(
                head_dim=16,
                sliding_window=4,
                query_pre_attn_scalar=24,
                attn_logit_softcapping=0.5,
                final_logit_softcapping=5.0,
            )
        ),
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **_small(
                num_hidden_layers=3,
                num_key_value_heads=1,
                head_dim=16,
                sliding_window=4,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                query_pre_attn_scalar=24,
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                },
            )
        ),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    }


VARIANTS = tuple(variant_configs())


def save_tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over ``<pad> <s> </s> <unk> w4 ... w127`` (offline, no hub)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(N_SPECIAL, VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    ).save_pretrained(directory)


def build_torch_model(variant: str, seed: int = 0):
    """A random transformers model of ``variant`` in eval mode, every parameter perturbed."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(variant_configs()[variant]()).eval()
    with torch.no_grad():
        for param in model.parameters():
            # Vectors (norm scales, biases) move a lot so a misplaced one shows; matrices a little.
            param.add_(torch.randn_like(param) * (0.3 if param.ndim == 1 else 0.05))
    return model


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
    """Factory ``(variant, **save_kwargs) -> (checkpoint_dir, torch_model)``, cached per session.

    The directory holds config.json, safetensors weights and a tiny tokenizer, as `save_pretrained`
    writes them. Tests that damage a checkpoint must copy it first (see `copy_checkpoint`).
    """
    cache: dict = {}

    def make(variant: str, **save_kwargs):
        key = (variant, tuple(sorted(save_kwargs.items())))
        if key not in cache:
            model = build_torch_model(variant)
            directory = tmp_path_factory.mktemp(f"hf_{variant}")
            model.save_pretrained(directory, **save_kwargs)
            save_tiny_tokenizer(directory)
            cache[key] = (directory, model)
        return cache[key]

    return make


@pytest.fixture
def copy_checkpoint(tmp_path):
    """Copy a checkpoint directory into this test's tmp dir, so the test may damage it."""
    import shutil

    def copy(directory: Path) -> Path:
        target = tmp_path / directory.name
        shutil.copytree(directory, target)
        return target

    return copy
