"""The GPT-2 family: LayerNorm, learned positions, fused Conv1D q/k/v, no rope."""

from __future__ import annotations

from spt_jax.models.config import ModelConfig
from spt_jax.models.families._base import (
    _DOWN,
    _DOWN_BIAS,
    _EMBED,
    _NORM_BIASES,
    _NORMS,
    _O,
    _O_BIAS,
    _POS_EMBED,
    _QKV,
    _QKV_BIAS,
    _UP,
    _UP_BIAS,
    Family,
    GgufArch,
    TensorFix,
    WeightRule,
    _activation,
    _ids,
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

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    config_from_hf=gpt2_config,
    rules=_GPT2_RULES,
    ignore=(r"lm_head\.weight", r"(?:transformer\.)?h\.\d+\.attn\.(?:masked_)?bias"),
    shardings=(
        _EMBED, _POS_EMBED, _QKV, _O, _UP, _DOWN,
        _QKV_BIAS, _O_BIAS, _UP_BIAS, _DOWN_BIAS, _NORMS, _NORM_BIASES,
    ),  # fmt: skip
    gguf=(
        GgufArch(
            name="gpt2",
            model_type="gpt2",
            config_keys={
                "block_count": "n_layer",
                "context_length": "n_positions",
                "embedding_length": "n_embd",
                "feed_forward_length": "n_inner",
                "attention.head_count": "n_head",
                "attention.layer_norm_epsilon": "layer_norm_epsilon",
            },
            global_modules=("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"),
            layer_modules=(
                "transformer.h.{i}.ln_1",
                "transformer.h.{i}.attn.c_attn",
                "transformer.h.{i}.attn.c_proj",
                "transformer.h.{i}.ln_2",
                "transformer.h.{i}.mlp.c_fc",
                "transformer.h.{i}.mlp.c_proj",
            ),
            # Conv1D keeps [in, out]; llama.cpp stores these as linear [out, in]
            fixes=(
                TensorFix(
                    ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"),
                    "transpose",
                ),
            ),
            rope=False,
        ),
    ),
)
