"""GGUF checkpoints as a transformers config, Hugging Face-named numpy tensors and a tokenizer.

Every checkpoint format meets the rest of spt_jax in one shape: a transformers config object and a
stream of ``(hf_name, array)`` pairs in Hugging Face PyTorch naming and layout. This module turns a
GGUF file (llama.cpp's format) into that. Everything family-specific (which architectures load, how
their metadata keys rename, their module names, and the `TensorFix`es undoing llama.cpp's converter:
llama's q/k permutation, Gemma's ``w + 1`` norms, GPT-2's transposed Conv1D weights) is declared with
the family in `spt_jax.models.families` (`GgufArch`); this module only renames and fixes.

The header is parsed and checked once into a `GgufHeader` (`spt_jax.models.gguf_header`); config
building, tensor reading and the tokenizer all take it (or a path, which they parse), and the header
caches its transformers config, so one load parses the file once and builds its config once.

The tokenizer is built with transformers' torch-free GGUF tokenizer converters. Neither
transformers' GGUF reader nor its tensor loader is used: both import torch, which spt_jax does not
need at run time. Tensor data is dequantized by ``gguf.quants.dequantize`` one tensor (in row
chunks) at a time. llama3 rope scaling, stored as a ``rope_freqs`` tensor, is recovered as
``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from spt_jax.errors import ConfigError, WeightsError, close_names
from spt_jax.models.families import GGUF_ARCHITECTURES, GgufArch, TensorFix
from spt_jax.models.gguf_header import GgufHeader, GgufSource, TensorInfo, as_header

SUPPORTED_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)

# Tokens llama.cpp treats as end-of-generation when the vocabulary marks them as control tokens
# (llama-vocab.cpp); a chat model stops on these, not only on `tokenizer.ggml.eos_token_id`.
_END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
    }
)
_CONTROL_TOKEN = 3  # llama.cpp's token type for control tokens

# GGUF tensors with no Hugging Face parameter: llama3's rope factors become config fields instead.
_NON_PARAMETER_TENSORS = frozenset({"rope_freqs.weight"})

_DEQUANT_CHUNK_ELEMENTS = 1 << 22  # rows are dequantized ~4M values at a time to bound temporaries


# ----------------------------------------------------------------------------------------- config


def read_gguf_config(source: GgufSource):
    """The transformers config (LlamaConfig, Gemma3TextConfig, ...) a GGUF file's metadata describes."""
    return as_header(source).hf_config


def _config_from_header(header: GgufHeader):
    import transformers

    model_type, fields = _config_fields(header)
    return transformers.AutoConfig.for_model(model_type, **fields)


def _gguf_arch(header: GgufHeader) -> GgufArch:
    """The family table of the file's architecture (ConfigError naming the file if there is none)."""
    arch = header.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"GGUF file {header.path} has architecture {arch!r}, which spt_jax cannot load"
            f"{close_names(arch, SUPPORTED_ARCHITECTURES)}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return GGUF_ARCHITECTURES[arch]


def _model_type(arch: GgufArch, meta: dict[str, Any]) -> str:
    name = str(meta.get("general.name", "")).lower()
    return next((t for word, t in arch.model_type_by_name if word in name), arch.model_type)


def _config_fields(header: GgufHeader) -> tuple[str, dict[str, Any]]:
    """`(model_type, config kwargs)` from the metadata, following llama.cpp where the file is silent."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = _gguf_arch(header)
    meta = header.metadata
    model_type = _model_type(arch, meta)
    fields: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
    for gguf_key, field in arch.config_keys.items():
        if meta.get(f"{arch.name}.{gguf_key}") is not None:
            fields[field] = meta[f"{arch.name}.{gguf_key}"]
    for gguf_key, field in GGUF_CONFIG_MAPPING["tokenizer"].items():
        if meta.get(f"tokenizer.{gguf_key}") is not None:
            fields[field] = meta[f"tokenizer.{gguf_key}"]

    fields["_name_or_path"] = str(header.path)
    # llama.cpp writes the output projection only when it is not the embedding matrix
    fields["tie_word_embeddings"] = "output.weight" not in header.tensor_by_name
    fields["vocab_size"] = _vocab_size(header, fields.get("vocab_size"))
    fields["eos_token_id"] = _end_of_generation_ids(meta) or fields.get("eos_token_id")
    if arch.rope:
        fields["rope_parameters"] = _rope_parameters(header, arch.name, fields)
        fields.pop("rope_theta", None)
    if arch.config_fields is not None:
        fields.update(arch.config_fields(header, model_type, fields))
    return model_type, fields


def _vocab_size(header: GgufHeader, stated: int | None) -> int:
    """The embedding's row count (what the weights need), else the stated size or the vocabulary's."""
    for name in ("token_embd.weight", "output.weight"):
        if name in header.tensor_by_name:
            return header.tensor_by_name[name].shape[0]
    return stated if stated is not None else len(header.metadata.get("tokenizer.ggml.tokens", ()))


def _end_of_generation_ids(meta: dict[str, Any]) -> int | list[int] | None:
    """eos, eot and eom ids plus the control tokens llama.cpp recognises as ends of a turn."""
    ids = []
    for name in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if meta.get(f"tokenizer.ggml.{name}") is not None:
            ids.append(meta[f"tokenizer.ggml.{name}"])
    tokens = meta.get("tokenizer.ggml.tokens", ())
    types = meta.get("tokenizer.ggml.token_type", ())
    for index, (text, kind) in enumerate(zip(tokens, types)):
        if kind == _CONTROL_TOKEN and text in _END_OF_GENERATION_TEXTS:
            ids.append(index)
    ids = list(dict.fromkeys(ids))
    return ids[0] if len(ids) == 1 else (ids or None)


def _rope_parameters(header: GgufHeader, arch: str, fields: dict[str, Any]) -> dict[str, Any]:
    """transformers' `rope_parameters` for the (global) attention layers."""
    meta = header.metadata
    theta = float(fields.get("rope_theta", 10_000.0))
    scaling = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if "rope_freqs.weight" in header.tensor_by_name:  # llama3-style scaling, stored as factors
        return _llama3_rope(header, theta, fields)
    if scaling in (None, "none") or factor in (None, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    rope = {"rope_type": scaling, "rope_theta": theta, "factor": float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        rope["original_max_position_embeddings"] = int(original)
    return rope


# The values every Llama 3.x checkpoint uses; llama.cpp's converter keeps only the resulting factors.
_LLAMA3_LOW_FREQ_FACTOR, _LLAMA3_HIGH_FREQ_FACTOR, _LLAMA3_ORIGINAL_CONTEXT = 1.0, 4.0, 8192


def _llama3_rope(header: GgufHeader, theta: float, fields: dict[str, Any]) -> dict[str, Any]:
    """Recover llama3 rope scaling from llama.cpp's `rope_freqs` tensor (one factor per frequency)."""
    info = header.tensor_by_name["rope_freqs.weight"]
    stored = _dequantize(header.path, info, np.float32).astype(np.float64)
    head_dim = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    rope = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": float(stored.max()),
        "low_freq_factor": _LLAMA3_LOW_FREQ_FACTOR,
        "high_freq_factor": _LLAMA3_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
    }
    expected = llama3_rope_factors(head_dim, **{k: v for k, v in rope.items() if k != "rope_type"})
    if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-4):
        raise ConfigError(
            f"GGUF file {header.path}: its rope_freqs tensor is not llama3 rope scaling with "
            f"low/high frequency factors {_LLAMA3_LOW_FREQ_FACTOR}/{_LLAMA3_HIGH_FREQ_FACTOR} and "
            f"original context {_LLAMA3_ORIGINAL_CONTEXT}; spt_jax cannot recover its rope scaling"
        )
    return rope


def llama3_rope_factors(
    head_dim: int,
    rope_theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """Per-frequency divisors ``[head_dim // 2]`` as llama.cpp's converter writes ``rope_freqs``."""
    freqs = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    mid = 1 / ((1 - smooth) / factor + smooth)
    high_wavelen = original_max_position_embeddings / high_freq_factor
    low_wavelen = original_max_position_embeddings / low_freq_factor
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))


# ---------------------------------------------------------------------------------------- tensors


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where a GGUF tensor goes and what undoes llama.cpp's change to it."""

    hf_name: str
    reorder: Callable[[np.ndarray], np.ndarray] | None = None  # exact in any dtype
    subtract: float = 0.0  # value offset, applied in float32 before the final cast


def unpermute_llama_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> Hugging Face's rotate-half halves).

    llama.cpp's converter views the rows of each head as ``[2, head_dim // 2]`` and swaps the axes;
    the inverse views them as ``[head_dim // 2, 2]`` and swaps back.
    """
    rows = weight.shape[0]
    split = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def _transpose(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight.T)


# How each `TensorFix` of a family is carried out, given the file's transformers config.
_FIXES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "unpermute_q": lambda c: {"reorder": functools.partial(unpermute_llama_qk, n_heads=c.num_attention_heads)},
    "unpermute_k": lambda c: {"reorder": functools.partial(unpermute_llama_qk, n_heads=c.num_key_value_heads)},
    "minus_one": lambda c: {"subtract": 1.0},
    "transpose": lambda c: {"reorder": _transpose},
}


def _tensor_targets(header: GgufHeader) -> dict[str, _Target]:
    """GGUF name -> `_Target`, built by naming every HF parameter through gguf's TensorNameMap."""
    arch, config = _gguf_arch(header), header.hf_config
    n_layers = config.num_hidden_layers  # GPT-2's n_layer answers to this name too
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    name_map = gguf.get_tensor_name_map(model_arch, n_layers)
    modules = list(arch.global_modules) + [
        m.format(i=i) for i in range(n_layers) for m in arch.layer_modules
    ]
    targets = {}
    for module in modules:
        gguf_module = name_map.get_name(module)
        if gguf_module is None:  # e.g. gemma's lm_head: always the embedding in llama.cpp
            continue
        for suffix in (".weight", ".bias"):
            fix = _fix_for(arch.fixes, gguf_module + suffix)
            kwargs = _FIXES[fix.fix](config) if fix is not None else {}
            targets[gguf_module + suffix] = _Target(module + suffix, **kwargs)
    return targets


def _fix_for(fixes: tuple[TensorFix, ...], gguf_name: str) -> TensorFix | None:
    return next((f for f in fixes if gguf_name.endswith(f.suffixes)), None)


def iter_gguf_tensors(source: GgufSource, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every parameter in the file, in file order, one at a time.

    Arrays are dequantized, put back in Hugging Face layout and cast to ``dtype`` (np.float32 or
    ml_dtypes.bfloat16); each is a fresh array the caller owns, so dropping it frees its memory.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise ConfigError(f"iter_gguf_tensors dtype must be a float type, got {dtype}")
    header = as_header(source)
    targets = _tensor_targets(header)
    unknown = [
        t.name for t in header.tensors if t.name not in targets and t.name not in _NON_PARAMETER_TENSORS
    ]
    if unknown:
        raise WeightsError(
            f"GGUF file {header.path} ({header.architecture}) holds tensors spt_jax cannot place: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    return _stream_tensors(header, targets, dtype)  # errors above surface at the call, not on first next()


def _stream_tensors(header: GgufHeader, targets: dict[str, _Target], dtype) -> Iterator[tuple[str, np.ndarray]]:
    for info in header.tensors:
        target = targets.get(info.name)
        if target is None:
            continue
        if target.subtract:
            array = _dequantize(header.path, info, np.float32)
            array -= np.float32(target.subtract)
            array = array.astype(dtype, copy=False)
        else:
            array = _dequantize(header.path, info, dtype)
        if target.reorder is not None:
            array = target.reorder(array)
        yield target.hf_name, array


def _dequantize(path: Path, info: TensorInfo, dtype) -> np.ndarray:
    """One tensor as a fresh ``dtype`` array, dequantized by gguf in row chunks.

    Chunks are read with plain file reads rather than through a memory map, so neither the
    tensor's stored bytes nor gguf's float32 temporaries are resident beyond one chunk.
    """
    out = np.empty(info.shape, dtype=dtype)
    if out.size == 0:
        return out
    rows = out.reshape(-1, info.shape[-1])  # [R, C] view of `out`
    row_bytes = info.nbytes // rows.shape[0]
    chunk_rows = max(1, _DEQUANT_CHUNK_ELEMENTS // rows.shape[1])
    with open(path, "rb") as f:
        f.seek(info.offset)
        for start in range(0, rows.shape[0], chunk_rows):
            n = min(chunk_rows, rows.shape[0] - start)
            blocks = np.fromfile(f, dtype=np.uint8, count=n * row_bytes)
            if blocks.size != n * row_bytes:
                raise WeightsError(
                    f"GGUF file {path} is truncated: tensor {info.name!r} ends past the end of the file"
                )
            try:
                values = gguf.quants.dequantize(blocks.reshape(n, row_bytes), info.qtype)
            except NotImplementedError as err:
                raise WeightsError(
                    f"GGUF file {path}: tensor {info.name!r} is stored as {info.qtype.name}, which "
                    f"gguf cannot dequantize ({err})"
                ) from err
            rows[start : start + n] = values.reshape(n, rows.shape[1])
    return out


# -------------------------------------------------------------------------------------- tokenizer


def load_gguf_tokenizer(source: GgufSource):
    """A transformers fast tokenizer rebuilt from the vocabulary, merges and special tokens in the file.

    Built with transformers' GGUF tokenizer converters directly: ``AutoTokenizer(gguf_file=...)``
    reads the file through torch.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    header = as_header(source)
    arch = _gguf_arch(header).name
    meta = header.metadata
    grouped = {
        group: {
            field: meta[f"tokenizer.{key}"]
            for key, field in renames.items()
            if f"tokenizer.{key}" in meta
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise WeightsError(f"GGUF file {header.path} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS for a sentencepiece vocabulary unless the file says otherwise
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for special, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            tokenizer_config[special] = tokens[token_id]
    try:
        backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    except ValueError as err:
        raise WeightsError(f"GGUF file {header.path}: cannot build its tokenizer ({err})") from err
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=str(header.path), **tokenizer_config, **extra
    )
    return tokenizer


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "iter_gguf_tensors",
    "llama3_rope_factors",
    "load_gguf_tokenizer",
    "read_gguf_config",
    "unpermute_llama_qk",
]
