"""The Llama family: Llama 2/3 (and SmolLM), Mistral, Qwen2 and Qwen3, one Llama-style decoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spt_jax.models.config import ModelConfig
from spt_jax.models.families._base import (
    _BIAS_SHARDINGS,
    _DECODER_MODULES,
    _DECODER_SHARDINGS,
    _L,
    _LLAMA_LAYER_MODULES,
    _QK_NORM_MODULES,
    _QK_NORMS,
    _ROPE_GGUF_KEYS,
    Family,
    GgufArch,
    TensorFix,
    WeightRule,
    _activation,
    _common,
    _rope,
)

if TYPE_CHECKING:
    from spt_jax.models.gguf_header import GgufHeader


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


def _llama_gguf_fields(header: GgufHeader, model_type: str, fields: dict) -> dict:
    """llama.cpp states biases only by writing them, and Mistral's window only if it has one."""
    tensors = header.tensor_by_name
    out = {"attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}
    if model_type == "mistral":  # MistralConfig defaults to a 4096 window; llama.cpp uses none unless stated
        out["sliding_window"] = header.metadata.get("llama.attention.sliding_window")
    return out


# q/k rows permuted for llama.cpp's interleaved rope (Qwen's converter leaves them alone)
_LLAMA_QK_FIXES = (
    TensorFix(("attn_q.weight",), "unpermute_q"),
    TensorFix(("attn_k.weight",), "unpermute_k"),
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    config_from_hf=llama_config,
    rules=_LLAMA_RULES,
    ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    shardings=_DECODER_SHARDINGS + _BIAS_SHARDINGS + (_QK_NORMS,),
    gguf=(
        GgufArch(
            name="llama",
            model_type="llama",
            # llama.cpp writes Mistral as llama; transformers makes the same check
            model_type_by_name=(("mistral", "mistral"),),
            config_keys={"rope.dimension_count": "head_dim", **_ROPE_GGUF_KEYS},
            global_modules=_DECODER_MODULES,
            layer_modules=_LLAMA_LAYER_MODULES,
            fixes=_LLAMA_QK_FIXES,
            config_fields=_llama_gguf_fields,
        ),
        GgufArch(
            name="qwen2",
            model_type="qwen2",
            config_keys=_ROPE_GGUF_KEYS,
            global_modules=_DECODER_MODULES,
            layer_modules=_LLAMA_LAYER_MODULES,
        ),
        GgufArch(
            name="qwen3",
            model_type="qwen3",
            config_keys=_ROPE_GGUF_KEYS,
            global_modules=_DECODER_MODULES,
            layer_modules=_LLAMA_LAYER_MODULES + _QK_NORM_MODULES,
        ),
    ),
)
