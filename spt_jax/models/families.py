"""Model families: a transformers config -> `ModelConfig`, and a declarative weight map.

Each family is one table. A weight rule maps a Hugging Face tensor name (regex; group ``layer`` for
stacked layers) to our parameter path(s) with a named layout transform; `weights.py` applies the
table to safetensors and GGUF tensors alike (GGUF is renamed to Hugging Face names first).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

from spt_jax.errors import ConfigError
from spt_jax.models.config import ModelConfig, RopeConfig

Layout = Literal["copy", "flat", "in_out", "out_in", "conv_out", "conv_qkv", "qkv_bias"]


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """``pattern`` (a Hugging Face name) -> ``targets`` (our dotted param paths), via ``layout``.

    Layouts (source shape -> our shape):
      copy      same shape                         flat      [prod(ours)] -> ours (per-head biases)
      in_out    torch Linear [out, in] -> [in, *out_heads]   (q, k, v, gate, up, down, lm_head)
      out_in    torch Linear [out, in] -> [*in_heads, out]   (o_proj)
      conv_out  GPT-2 Conv1D [in, out] -> [*in_heads, out]   (c_proj, c_fc, mlp c_proj)
      conv_qkv  GPT-2 fused Conv1D [D, 3 H d] -> three [D, H, d]
      qkv_bias  GPT-2 fused bias [3 H d] -> three [H, d]
    """

    pattern: str
    targets: tuple[str, ...]
    layout: Layout = "copy"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[object], ModelConfig]
    rules: tuple[WeightRule, ...]
    ignore: tuple[str, ...] = ()  # source names that carry no weights (buffers, tied copies)


def _rope(params: dict | None, default_theta: float = 10_000.0) -> RopeConfig:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(
            f"rope_type {kind!r} is not supported; supported: 'default', 'linear', 'llama3'"
        )
    return RopeConfig(
        theta=float(params.get("rope_theta", default_theta)),
        kind=kind,
        factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor") or 1.0),
        high_freq_factor=float(params.get("high_freq_factor") or 4.0),
        original_max_position=int(params.get("original_max_position_embeddings") or 8192),
    )


_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _layer_kinds(hf, n_layers: int) -> tuple[str, ...]:
    types = getattr(hf, "layer_types", None)
    if types:
        return tuple("sliding" if t == "sliding_attention" else "global" for t in types)
    if getattr(hf, "sliding_window", None):  # Mistral: every layer slides
        return ("sliding",) * n_layers
    return ()


def _common(hf) -> dict:
    """Fields every rope family (Llama-like and Gemma) reads the same way."""
    d_model, n_heads = hf.hidden_size, hf.num_attention_heads
    n_layers = hf.num_hidden_layers
    kinds = _layer_kinds(hf, n_layers)
    return dict(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(hf, "head_dim", None) or d_model // n_heads,
        d_ff=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=hf.rms_norm_eps,
        layer_kinds=kinds if "sliding" in kinds else (),
        sliding_window=getattr(hf, "sliding_window", None) if "sliding" in kinds else None,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_ids(hf.eos_token_id),
        pad_token_id=hf.pad_token_id,
    )


def llama_config(hf) -> ModelConfig:
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        **_common(hf),
        activation=_activation(hf.hidden_act),
        attn_bias=attention_bias or hf.model_type == "qwen2",  # Qwen2 always has q/k/v biases
        attn_out_bias=attention_bias and hf.model_type != "qwen3",
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=hf.model_type == "qwen3",
        rope=_rope(hf.rope_parameters),
    )


def gemma_config(hf) -> ModelConfig:
    rope = hf.rope_parameters
    per_kind = "full_attention" in rope  # Gemma 3: separate rope for global and sliding layers
    return ModelConfig(
        **_common(hf),
        norm_offset=1.0,
        activation=_activation(getattr(hf, "hidden_activation", None) or hf.hidden_act),
        qk_norm=hf.model_type == "gemma3_text",
        sandwich_norm=hf.model_type in ("gemma2", "gemma3_text"),
        rope=_rope(rope["full_attention"] if per_kind else rope),
        rope_local=_rope(rope["sliding_attention"]) if per_kind else None,
        attn_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_softcap=getattr(hf, "final_logit_softcapping", None),
        query_scale=(hf.query_pre_attn_scalar**-0.5) if hasattr(hf, "query_pre_attn_scalar") else None,
        embed_scale=math.sqrt(hf.hidden_size),
    )


def gpt2_config(hf) -> ModelConfig:
    d_model = hf.n_embd
    return ModelConfig(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        d_model=d_model,
        n_layers=hf.n_layer,
        n_heads=hf.n_head,
        n_kv_heads=hf.n_head,
        head_dim=d_model // hf.n_head,
        d_ff=hf.n_inner or 4 * d_model,
        max_position_embeddings=hf.n_positions,
        norm="layer",
        norm_eps=hf.layer_norm_epsilon,
        activation=_activation(hf.activation_function),
        gated_mlp=False,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        position="learned",
        tie_embeddings=True,
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_ids(hf.eos_token_id),
        pad_token_id=getattr(hf, "pad_token_id", None),
    )


_L = r"model\.layers\.(?P<layer>\d+)\."
_LLAMA_RULES = (
    WeightRule(r"model\.embed_tokens\.weight", ("embed_tokens",)),
    WeightRule(_L + r"self_attn\.q_proj\.weight", ("layers.attn.q_proj",), "in_out"),
    WeightRule(_L + r"self_attn\.k_proj\.weight", ("layers.attn.k_proj",), "in_out"),
    WeightRule(_L + r"self_attn\.v_proj\.weight", ("layers.attn.v_proj",), "in_out"),
    WeightRule(_L + r"self_attn\.o_proj\.weight", ("layers.attn.o_proj",), "out_in"),
    WeightRule(_L + r"self_attn\.q_proj\.bias", ("layers.attn.q_bias",), "flat"),
    WeightRule(_L + r"self_attn\.k_proj\.bias", ("layers.attn.k_bias",), "flat"),
    WeightRule(_L + r"self_attn\.v_proj\.bias", ("layers.attn.v_bias",), "flat"),
    WeightRule(_L + r"self_attn\.o_proj\.bias", ("layers.attn.o_bias",)),
    WeightRule(_L + r"self_attn\.q_norm\.weight", ("layers.attn.q_norm.scale",)),
    WeightRule(_L + r"self_attn\.k_norm\.weight", ("layers.attn.k_norm.scale",)),
    WeightRule(_L + r"mlp\.gate_proj\.weight", ("layers.mlp.gate_proj",), "in_out"),
    WeightRule(_L + r"mlp\.up_proj\.weight", ("layers.mlp.up_proj",), "in_out"),
    WeightRule(_L + r"mlp\.down_proj\.weight", ("layers.mlp.down_proj",), "in_out"),
    WeightRule(_L + r"mlp\.gate_proj\.bias", ("layers.mlp.gate_bias",)),
    WeightRule(_L + r"mlp\.up_proj\.bias", ("layers.mlp.up_bias",)),
    WeightRule(_L + r"mlp\.down_proj\.bias", ("layers.mlp.down_bias",)),
    WeightRule(_L + r"input_layernorm\.weight", ("layers.attn_norm.scale",)),
    WeightRule(_L + r"post_attention_layernorm\.weight", ("layers.mlp_norm.scale",)),
    WeightRule(r"model\.norm\.weight", ("final_norm.scale",)),
    WeightRule(r"lm_head\.weight", ("lm_head",), "in_out"),
)

# Gemma 2/3 name their norms differently: post_attention_layernorm is the sandwich norm there.
_GEMMA_RULES = tuple(r for r in _LLAMA_RULES if "post_attention" not in r.pattern) + (
    WeightRule(_L + r"post_attention_layernorm\.weight", ("layers.attn_post_norm.scale",)),
    WeightRule(_L + r"pre_feedforward_layernorm\.weight", ("layers.mlp_norm.scale",)),
    WeightRule(_L + r"post_feedforward_layernorm\.weight", ("layers.mlp_post_norm.scale",)),
)
_GEMMA1_RULES = _LLAMA_RULES

_H = r"(?:transformer\.)?h\.(?P<layer>\d+)\."
_GPT2_RULES = (
    WeightRule(r"(?:transformer\.)?wte\.weight", ("embed_tokens",)),
    WeightRule(r"(?:transformer\.)?wpe\.weight", ("pos_embed",)),
    WeightRule(_H + r"ln_1\.weight", ("layers.attn_norm.scale",)),
    WeightRule(_H + r"ln_1\.bias", ("layers.attn_norm.bias",)),
    WeightRule(
        _H + r"attn\.c_attn\.weight",
        ("layers.attn.q_proj", "layers.attn.k_proj", "layers.attn.v_proj"),
        "conv_qkv",
    ),
    WeightRule(
        _H + r"attn\.c_attn\.bias",
        ("layers.attn.q_bias", "layers.attn.k_bias", "layers.attn.v_bias"),
        "qkv_bias",
    ),
    WeightRule(_H + r"attn\.c_proj\.weight", ("layers.attn.o_proj",), "conv_out"),
    WeightRule(_H + r"attn\.c_proj\.bias", ("layers.attn.o_bias",)),
    WeightRule(_H + r"ln_2\.weight", ("layers.mlp_norm.scale",)),
    WeightRule(_H + r"ln_2\.bias", ("layers.mlp_norm.bias",)),
    WeightRule(_H + r"mlp\.c_fc\.weight", ("layers.mlp.up_proj",), "conv_out"),
    WeightRule(_H + r"mlp\.c_fc\.bias", ("layers.mlp.up_bias",)),
    WeightRule(_H + r"mlp\.c_proj\.weight", ("layers.mlp.down_proj",), "conv_out"),
    WeightRule(_H + r"mlp\.c_proj\.bias", ("layers.mlp.down_bias",)),
    WeightRule(r"(?:transformer\.)?ln_f\.weight", ("final_norm.scale",)),
    WeightRule(r"(?:transformer\.)?ln_f\.bias", ("final_norm.bias",)),
)

FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), llama_config, _LLAMA_RULES,
           ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)),
    Family("gemma", ("gemma",), gemma_config, _GEMMA1_RULES),
    Family("gemma2", ("gemma2", "gemma3_text"), gemma_config, _GEMMA_RULES),
    Family("gpt2", ("gpt2",), gpt2_config, _GPT2_RULES,
           ignore=(r"lm_head\.weight", r"(?:transformer\.)?h\.\d+\.attn\.(?:masked_)?bias")),
)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ConfigError(
        f"model_type {model_type!r} is not supported; supported model types: "
        + ", ".join(SUPPORTED_MODEL_TYPES)
    )


def config_from_hf(hf_config) -> ModelConfig:
    """A transformers config object -> our `ModelConfig` (ConfigError for unsupported ones)."""
    return family_for(hf_config.model_type).config_from_hf(hf_config)
