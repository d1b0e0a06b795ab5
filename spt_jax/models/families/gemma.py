"""The Gemma families: Gemma 1 (``gemma``) and Gemma 2/3 (``gemma2``, ``gemma3_text``), whose norms differ."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from spt_jax.errors import ConfigError
from spt_jax.models.config import ModelConfig
from spt_jax.models.families._base import (
    _DECODER_MODULES,
    _DECODER_SHARDINGS,
    _L,
    _LLAMA_LAYER_MODULES,
    _POST_NORMS,
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
from spt_jax.models.families.llama import _LLAMA_RULES

if TYPE_CHECKING:
    from spt_jax.models.gguf_header import GgufHeader


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


_GEMMA1_RULES = _LLAMA_RULES
# Gemma 2/3 name their norms differently: post_attention_layernorm is the sandwich norm there.
_GEMMA_RULES = tuple(r for r in _LLAMA_RULES if "post_attention" not in r.pattern) + (
    WeightRule(_L + r"post_attention_layernorm\.weight", ("layers.attn_post_norm.scale",)),
    WeightRule(_L + r"pre_feedforward_layernorm\.weight", ("layers.mlp_norm.scale",)),
    WeightRule(_L + r"post_feedforward_layernorm\.weight", ("layers.mlp_post_norm.scale",)),
)

_GEMMA_FIXES = (TensorFix(("norm.weight",), "minus_one"),)  # every norm stored as w + 1
_SANDWICH_MODULES = (
    "model.layers.{i}.pre_feedforward_layernorm",
    "model.layers.{i}.post_feedforward_layernorm",
)
_GEMMA2_GGUF_KEYS = {**_ROPE_GGUF_KEYS, "attention.sliding_window": "sliding_window"}


def _gemma_layer_types(meta: dict, arch: str, n_layers: int, period: int) -> list[str]:
    """Sliding vs full attention per layer: the file's pattern if it states one, else llama.cpp's."""
    stated = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(stated, list):
        if len(stated) != n_layers:
            raise ConfigError(
                f"{arch}.attention.sliding_window_pattern has {len(stated)} entries for {n_layers} layers"
            )
        return ["sliding_attention" if s else "full_attention" for s in stated]
    period = int(stated) if stated else period
    return [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)
    ]


def _gemma2_gguf_fields(
    header: GgufHeader, model_type: str, fields: dict, *, n_layers_27b: int = 46, period: int = 2
) -> dict:
    """Query scale, layer pattern and soft-caps, where llama.cpp has them (or hard-codes them)."""
    arch, meta = header.architecture, header.metadata
    n_layers, d_model, n_heads = fields["num_hidden_layers"], fields["hidden_size"], fields["num_attention_heads"]
    head_dim = fields.get("head_dim", d_model // n_heads)
    # llama.cpp scales queries by head_dim**-0.5 except for the 27B models (hidden / heads)
    out = {
        "query_pre_attn_scalar": d_model // n_heads if n_layers == n_layers_27b else head_dim,
        "layer_types": _gemma_layer_types(meta, arch, n_layers, period),
    }
    for softcap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if meta.get(f"{arch}.{softcap}") is not None:
            out[softcap] = meta[f"{arch}.{softcap}"]
    return out


def _gemma3_gguf_fields(header: GgufHeader, model_type: str, fields: dict) -> dict:
    """Gemma 2's fields, plus the sliding layers' rope llama.cpp hard-codes: base 10k, no scaling."""
    out = _gemma2_gguf_fields(header, model_type, fields, n_layers_27b=62, period=6)
    out["rope_parameters"] = {
        "full_attention": fields["rope_parameters"],
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    return out


GEMMA = Family(
    name="gemma",
    model_types=("gemma",),
    config_from_hf=gemma_config,
    rules=_GEMMA1_RULES,
    shardings=_DECODER_SHARDINGS,
    gguf=(
        GgufArch(
            name="gemma",
            model_type="gemma",
            config_keys=_ROPE_GGUF_KEYS,  # Gemma 2's keys without the sliding window
            global_modules=_DECODER_MODULES,
            layer_modules=_LLAMA_LAYER_MODULES,
            fixes=_GEMMA_FIXES,
        ),
    ),
)

GEMMA2 = Family(
    name="gemma2",
    model_types=("gemma2", "gemma3_text"),
    config_from_hf=gemma_config,
    rules=_GEMMA_RULES,
    shardings=_DECODER_SHARDINGS + (_QK_NORMS, _POST_NORMS),
    gguf=(
        GgufArch(
            name="gemma2",
            model_type="gemma2",
            config_keys=_GEMMA2_GGUF_KEYS,
            global_modules=_DECODER_MODULES,
            layer_modules=_LLAMA_LAYER_MODULES + _SANDWICH_MODULES,
            fixes=_GEMMA_FIXES,
            config_fields=_gemma2_gguf_fields,
        ),
        GgufArch(
            name="gemma3",
            model_type="gemma3_text",
            config_keys=_GEMMA2_GGUF_KEYS,
            global_modules=_DECODER_MODULES,
            layer_modules=_LLAMA_LAYER_MODULES + _SANDWICH_MODULES + _QK_NORM_MODULES,
            fixes=_GEMMA_FIXES,
            config_fields=_gemma3_gguf_fields,
        ),
    ),
)
