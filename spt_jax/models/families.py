"""Model families: everything spt_jax knows about one architecture, declared together.

A `Family` holds, for the transformers ``model_type``s it covers:

* ``config_from_hf``: a transformers config object -> our `ModelConfig`;
* ``rules``: `WeightRule`s from Hugging Face tensor names to our parameter paths, which
  `weights.py` applies to safetensors and GGUF tensors alike (GGUF is renamed to Hugging Face first);
* ``shardings``: `ShardRule`s from our parameter paths to the axes `tune/mesh.py` splits over the
  mesh's ``model`` axis; every parameter must match exactly one (replicated ones say so);
* ``gguf``: the llama.cpp architectures that load as this family (`GgufArch`): metadata renames,
  Hugging Face module names for gguf's ``TensorNameMap``, and the `TensorFix`es undoing what
  llama.cpp's converter did. `gguf_io.py` holds only the generic GGUF reading.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Literal

from spt_jax.errors import ConfigError
from spt_jax.models.config import ModelConfig, RopeConfig

if TYPE_CHECKING:
    from spt_jax.models.gguf_io import GgufHeader

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


# ------------------------------------------------------------- llama (mistral, qwen2, qwen3)


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


# ---------------------------------------------------------------------- gemma, gemma2, gemma3


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


# ----------------------------------------------------------------------------------------- gpt2


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


# ------------------------------------------------------------------------------------- registry

FAMILIES = (LLAMA, GEMMA, GEMMA2, GPT2)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)
GGUF_ARCHITECTURES: dict[str, GgufArch] = {a.name: a for f in FAMILIES for a in f.gguf}
# Every family's sharding rules at once, for states whose family is not given (rules shared
# between families are one object, so each parameter still matches exactly one).
ANY_FAMILY_SHARDINGS = tuple(dict.fromkeys(r for f in FAMILIES for r in f.shardings))


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
