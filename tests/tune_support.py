"""Shared builders for the tuning tests (no tests here): a tiny offline tokenizer and random LMs.

Kept in a ``test_tune*`` module so the tune tests own it; worker subprocesses import it too.
"""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def char_tokenizer(bos: bool = True):
    """Character-level WordLevel tokenizer: <pad>=0, <s>=1, </s>=2, <unk>=3, then printable chars."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_config(vocab_size: int = 104, **changes):
    from spt_jax.models import ModelConfig

    base = dict(
        model_type="llama",
        vocab_size=vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        d_ff=64,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=0,
    )
    return ModelConfig(**{**base, **changes})


def tiny_lm(seed: int = 0, *, bos: bool = True, name: str = "tiny", **config_changes):
    """A random tiny LM whose output actually depends on its input (unit-scale weights).

    Parameters are drawn with numpy into `nnx.eval_shape`'s template, which is much faster than
    running the initializers op by op.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from spt_jax.models import LM, DecoderLM

    tokenizer = char_tokenizer(bos=bos)
    config = tiny_config(len(tokenizer), **config_changes)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = ".".join(str(getattr(k, "key", "")) for k in path)
        if "norm" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = 1 if "embed" in name else config.d_ff if "down" in name else config.d_model
        return jnp.asarray(rng.normal(0.0, fan_in**-0.5, leaf.shape).astype(leaf.dtype))

    params = jax.tree_util.tree_map_with_path(draw, abstract)
    return LM(name, config, graphdef, params, tokenizer)


def arithmetic_examples(n: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, 10, (n, 2))
    return [(f"{a}+{b}=", f" {a + b}") for a, b in pairs]


def subprocess_env(n_devices: int | None = None) -> dict:
    """Environment for a worker: the repo importable, and ``n_devices`` fake CPU devices."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["JAX_PLATFORMS"] = "cpu"
    if n_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    return env


PYTHON = sys.executable


def save_tiny_llama(directory: Path, *, max_position_embeddings: int = 128, tie_word_embeddings: bool = True) -> None:
    """A tiny random Llama checkpoint (config.json + safetensors + char tokenizer) in ``directory``,
    its matrices scaled so greedy choices are sharp."""
    import torch
    import transformers

    tokenizer = char_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.shape[0] != len(tokenizer) else 1.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
