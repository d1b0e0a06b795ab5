"""What every family is made of: the `Family` type and its tables' types, and what families share.

The types (`WeightRule`, `ShardRule`, `TensorFix`, `GgufArch`, `Family`) are described in the
package docstring (`spt_jax.models.families`). The shared parts are the config helpers every rope
family reads the same way (`_rope`, `_activation`, `_common`), the sharding rules over our
parameter paths (each family lists exactly the ones its models can have), and the Llama-style
GGUF metadata keys and Hugging Face module names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Literal

from spt_jax.errors import ConfigError
from spt_jax.models.config import ModelConfig, RopeConfig

if TYPE_CHECKING:
    from spt_jax.models.gguf_header import GgufHeader

Layout = Literal["copy", "flat", "in_out", "out_in", "conv_out", "conv_qkv", "qkv_bias"]
Fix = Literal["unpermute_q", "unpermute_k", "minus_one", "transpose"]


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


REPLICATED: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShardRule:
    """``pattern`` (our dotted parameter path, full match) -> axes to split over ``model``.

    Axes count from the end, so one rule serves the stacked ``[L, ...]`` layer weights; the first
    axis that divides by the ``model`` axis size wins, and if none does the parameter stays
    replicated (deliberately: any mesh works for any model). ``REPLICATED`` says "never split".
    """

    pattern: str
    axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorFix:
    """GGUF tensors named ``*<suffix>`` get ``fix``, undoing llama.cpp's converter.

      unpermute_q / unpermute_k  interleaved-rope rows -> rotate-half (over n_heads / n_kv_heads)
      minus_one                  a norm stored as ``w + 1`` -> ``w`` (in float32)
      transpose                  a GPT-2 Conv1D weight stored ``[out, in]`` -> ``[in, out]``
    """

    suffixes: tuple[str, ...]
    fix: Fix


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """One llama.cpp ``general.architecture`` that loads as its family."""

    name: str  # llama.cpp's architecture name, e.g. "gemma3"
    model_type: str  # the transformers model_type it becomes, e.g. "gemma3_text"
    config_keys: Mapping[str, str] = dataclasses.field(hash=False)  # `{name}.<key>` -> config field
    global_modules: tuple[str, ...] = ()  # Hugging Face module names (no .weight/.bias)
    layer_modules: tuple[str, ...] = ()  # the same per layer; `{i}` is the layer index
    fixes: tuple[TensorFix, ...] = ()  # the first fix whose suffix matches applies
    rope: bool = True  # read `rope_parameters` from the `{name}.rope.*` keys
    model_type_by_name: tuple[tuple[str, str], ...] = ()  # (word in general.name, model_type)
    # Family-specific config fields from the file: (header, model_type, fields so far) -> more fields.
    config_fields: Callable[[GgufHeader, str, dict[str, Any]], dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[object], ModelConfig]
    rules: tuple[WeightRule, ...]
    shardings: tuple[ShardRule, ...]
    gguf: tuple[GgufArch, ...] = ()
    ignore: tuple[str, ...] = ()  # source names that carry no weights (buffers, tied copies)


# ------------------------------------------------------------------------------- shared helpers


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


# Sharding rules over our parameter paths (`DecoderLM`), shared by every family that has the
# parameter; each family lists exactly the ones its models can have.
_EMBED = ShardRule(r"embed_tokens", (-2, -1))  # [V, D]: vocabulary, else d_model
_LM_HEAD = ShardRule(r"lm_head", (-1, -2))  # [D, V]
_POS_EMBED = ShardRule(r"pos_embed", REPLICATED)  # [P, D]: rows gathered by position
_QKV = ShardRule(r"layers\.attn\.[qkv]_proj", (-2,))  # [L, D, H|K, d]: over heads
_O = ShardRule(r"layers\.attn\.o_proj", (-3,))  # [L, H, d, D]: over its input heads
_GATE = ShardRule(r"layers\.mlp\.gate_proj", (-1,))  # [L, D, F]: over d_ff
_UP = ShardRule(r"layers\.mlp\.up_proj", (-1,))  # [L, D, F]
_DOWN = ShardRule(r"layers\.mlp\.down_proj", (-2,))  # [L, F, D]: over its input d_ff
_QKV_BIAS = ShardRule(r"layers\.attn\.[qkv]_bias", (-2,))  # [L, H|K, d]: with their heads
_O_BIAS = ShardRule(r"layers\.attn\.o_bias", REPLICATED)  # [L, D]: added after o_proj's sum
_GATE_BIAS = ShardRule(r"layers\.mlp\.gate_bias", (-1,))  # [L, F]
_UP_BIAS = ShardRule(r"layers\.mlp\.up_bias", (-1,))  # [L, F]
_DOWN_BIAS = ShardRule(r"layers\.mlp\.down_bias", REPLICATED)  # [L, D]: added after down's sum
_NORMS = ShardRule(r"(layers\.(attn|mlp)_norm|final_norm)\.scale", REPLICATED)  # [L, D], [D]
_NORM_BIASES = ShardRule(r"(layers\.(attn|mlp)_norm|final_norm)\.bias", REPLICATED)  # LayerNorm
_QK_NORMS = ShardRule(r"layers\.attn\.[qk]_norm\.scale", REPLICATED)  # [L, d]
_POST_NORMS = ShardRule(r"layers\.(attn|mlp)_post_norm\.scale", REPLICATED)  # [L, D]
_DECODER_SHARDINGS = (_EMBED, _LM_HEAD, _QKV, _O, _GATE, _UP, _DOWN, _NORMS)
_BIAS_SHARDINGS = (_QKV_BIAS, _O_BIAS, _GATE_BIAS, _UP_BIAS, _DOWN_BIAS)

# llama.cpp metadata `{arch}.<key>` -> transformers config field (as transformers' own
# GGUF_CONFIG_MAPPING has them), shared by the rope families.
_ROPE_GGUF_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
    "attention.key_length": "head_dim",  # e.g. Qwen3: head_dim != hidden / heads
}

# Hugging Face module names of the Llama-style decoders, which gguf's TensorNameMap names in GGUF.
_DECODER_MODULES = ("model.embed_tokens", "model.norm", "lm_head")
_LLAMA_LAYER_MODULES = (
    "model.layers.{i}.input_layernorm",
    "model.layers.{i}.post_attention_layernorm",
    "model.layers.{i}.self_attn.q_proj",
    "model.layers.{i}.self_attn.k_proj",
    "model.layers.{i}.self_attn.v_proj",
    "model.layers.{i}.self_attn.o_proj",
    "model.layers.{i}.mlp.gate_proj",
    "model.layers.{i}.mlp.up_proj",
    "model.layers.{i}.mlp.down_proj",
)
_QK_NORM_MODULES = ("model.layers.{i}.self_attn.q_norm", "model.layers.{i}.self_attn.k_norm")

_L = r"model\.layers\.(?P<layer>\d+)\."
