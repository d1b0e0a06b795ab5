"""GGUF checkpoints as a transformers config, Hugging Face-named numpy tensors and a tokenizer.

Every checkpoint format meets the rest of spt_jax in one shape: a transformers config object and a
stream of ``(hf_name, array)`` pairs in Hugging Face PyTorch naming and layout. This module turns a
GGUF file (llama.cpp's format) into that. Everything family-specific (which architectures load, how
their metadata keys rename, their module names, and the `TensorFix`es undoing llama.cpp's converter:
llama's q/k permutation, Gemma's ``w + 1`` norms, GPT-2's transposed Conv1D weights) is declared with
the family in `spt_jax.models.families` (`GgufArch`); this module only reads, renames and fixes.

The header is parsed once into a `GgufHeader`; config building, tensor reading and the tokenizer
all take it (or a path, which they parse), and the header caches its transformers config, so one
load parses the file once and builds its config once.

The tokenizer is built with transformers' torch-free GGUF tokenizer converters. Neither
transformers' GGUF reader nor its tensor loader is used: both import torch, which spt_jax does not
need at run time. Tensor data is dequantized by ``gguf.quants.dequantize`` one tensor (in row
chunks) at a time. llama3 rope scaling, stored as a ``rope_freqs`` tensor, is recovered as
``rope_parameters``.

We parse the GGUF header ourselves (a few dozen lines of ``struct``) rather than with
``gguf.GGUFReader``, which builds a numpy view per vocabulary entry and takes ~10-20 s on Gemma 3's
262k-token vocabulary; the tests check this parser against ``GGUFReader`` on the same files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from spt_jax.errors import ConfigError, WeightsError, close_names
from spt_jax.models.families import GGUF_ARCHITECTURES, GgufArch, TensorFix

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

_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_DEQUANT_CHUNK_ELEMENTS = 1 << 22  # rows are dequantized ~4M values at a time to bound temporaries


# ----------------------------------------------------------------------------------------- header


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and how it is stored."""

    name: str  # GGUF name, e.g. "blk.3.attn_q.weight"
    shape: tuple[int, ...]  # numpy order (ggml's dims reversed): [out, in] for a linear weight
    qtype: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata and tensor table; no tensor data is read."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @functools.cached_property
    def tensor_by_name(self) -> dict[str, TensorInfo]:
        return {info.name: info for info in self.tensors}

    @functools.cached_property
    def hf_config(self):
        """The transformers config the metadata describes, built once per header (do not mutate)."""
        return _config_from_header(self)


GgufSource = str | Path | GgufHeader


def _header(source: GgufSource) -> GgufHeader:
    """A parsed header as is; a path parsed now."""
    return source if isinstance(source, GgufHeader) else read_gguf_header(source)


_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


class _CorruptHeader(Exception):
    """A header that does not parse as GGUF (the caller adds the file name)."""


def _value_type(type_id: int) -> gguf.GGUFValueType:
    try:
        return gguf.GGUFValueType(type_id)
    except ValueError:
        raise _CorruptHeader(f"unknown metadata value type {type_id}") from None


class _HeaderCursor:
    """Sequential little-endian reads over the mapped file."""

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        end = self.pos + length
        if end > len(self.buf):
            raise _CorruptHeader(f"a string of {length:,} bytes runs past the end of the file")
        text = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, value_type: int):
        value_type = _value_type(value_type)
        if value_type == gguf.GGUFValueType.STRING:
            return self.string()
        if value_type == gguf.GGUFValueType.ARRAY:
            element_type, count = self.unpack("<IQ")
            element_type = _value_type(element_type)
            if element_type in _SCALAR_FORMATS:  # numeric arrays (scores, token types) in one read
                dtype = np.dtype(gguf.GGUFReader.gguf_scalar_to_np[element_type]).newbyteorder("<")
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise _CorruptHeader(f"an array of {count:,} values runs past the end of the file")
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos = end
                return values.tolist()
            if element_type == gguf.GGUFValueType.STRING:
                return [self.string() for _ in range(count)]
            return [self.value(element_type) for _ in range(count)]
        (value,) = self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == gguf.GGUFValueType.FLOAT32:
            # the shortest decimal that round-trips in float32: an eps stored as 1e-6 reads as 1e-06,
            # not 9.999999974752427e-07
            return float(str(np.float32(value)))
        return value


def read_gguf_header(path) -> GgufHeader:
    """Parse a GGUF file's metadata and tensor table, checking the file holds all declared data.

    Raises WeightsError naming the file when it is missing, empty, not GGUF, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"GGUF file {path} does not exist")
    file_size = path.stat().st_size
    if file_size == 0:
        raise WeightsError(f"GGUF file {path} is empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise WeightsError(
                f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, expected b'GGUF'"
            )
        try:
            metadata, raw_tensors, table_end = _parse_header(_HeaderCursor(buf))
        except (struct.error, _CorruptHeader) as err:
            raise WeightsError(
                f"GGUF file {path} is truncated or corrupt: its header cannot be read ({err})"
            ) from err
    _check_metadata(path, metadata)
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-table_end // alignment) * alignment
    tensors = tuple(_tensor_info(path, data_start, *raw) for raw in raw_tensors)
    _check_tensor_table(path, tensors, raw_tensors, alignment, file_size)
    return GgufHeader(path=path, metadata=metadata, tensors=tensors)


# Metadata the loader reads, checked field by field before anything uses it. `{arch}.` keys that
# count things must be positive integers; the others of a family's `config_keys` numbers.
_COUNT_KEYS = frozenset({"context_length", "block_count", "feed_forward_length", "embedding_length",
                         "attention.head_count", "attention.head_count_kv", "vocab_size", "attention.key_length"})
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "unknown_token_id",
                  "padding_token_id")


def _check_metadata(path: Path, meta: dict[str, Any]) -> None:
    """WeightsError naming the file and the key of the first metadata field of the wrong kind."""

    def bad(key: str, expected: str):
        value = meta[key]
        shown = repr(value) if not isinstance(value, list) else f"a list of {len(value)}"
        return WeightsError(f"GGUF file {path}: metadata {key!r} is {shown} ({type(value).__name__}), "
                            f"expected {expected}; the file is damaged or was not written by a GGUF converter")

    if "general.architecture" not in meta:
        raise WeightsError(f"GGUF file {path} has no 'general.architecture' in its metadata")
    arch = meta["general.architecture"]
    if not isinstance(arch, str) or not arch:
        raise bad("general.architecture", "an architecture name (text)")
    alignment = meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not _is_int(alignment) or alignment < 1 or alignment & (alignment - 1):
        raise bad("general.alignment", "a positive power of two (llama.cpp's default is 32)")
    if "general.name" in meta and not isinstance(meta["general.name"], str):
        raise bad("general.name", "text")
    family = GGUF_ARCHITECTURES.get(arch)
    for key in family.config_keys if family is not None else ():
        full = f"{arch}.{key}"
        if full not in meta:
            continue
        if key in _COUNT_KEYS and not (_is_int(meta[full]) and meta[full] >= 1):
            raise bad(full, "a positive integer")
        if not _is_number(meta[full]):
            raise bad(full, "a number")
    _check_vocabulary(meta, bad)


def _check_vocabulary(meta: dict[str, Any], bad) -> None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise bad("tokenizer.ggml.tokens", "a list of token texts")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and not (isinstance(types, list) and all(_is_int(t) for t in types)
                                  and (tokens is None or len(types) == len(tokens))):
        raise bad("tokenizer.ggml.token_type", f"a list of {len(tokens or ())} integer token types")
    for name in _TOKEN_ID_KEYS:
        key = f"tokenizer.ggml.{name}"
        if key in meta and not (_is_int(meta[key]) and meta[key] >= 0):
            raise bad(key, "a token id (an integer >= 0)")


def _check_tensor_table(path: Path, tensors, raw_tensors, alignment: int, file_size: int) -> None:
    seen = set()
    for info, (_, _, _, relative) in zip(tensors, raw_tensors):
        if not info.name or info.name in seen:
            raise WeightsError(f"GGUF file {path}: tensor name {info.name!r} is empty or appears twice")
        seen.add(info.name)
        if relative % alignment:
            raise WeightsError(f"GGUF file {path}: tensor {info.name!r} starts at offset {relative:,}, "
                               f"not a multiple of the file's alignment {alignment}")
        if any(d < 1 for d in info.shape):
            raise WeightsError(f"GGUF file {path}: tensor {info.name!r} has shape {info.shape}")
        if info.offset + info.nbytes > file_size:
            raise WeightsError(
                f"GGUF file {path} is truncated: tensor {info.name!r} needs bytes up to "
                f"{info.offset + info.nbytes:,} but the file has {file_size:,}"
            )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_header(cursor: _HeaderCursor) -> tuple[dict[str, Any], list[tuple], int]:
    _magic, version, tensor_count, kv_count = cursor.unpack("<IIQQ")
    if version not in (2, 3):
        raise _CorruptHeader(f"GGUF version {version}, expected 2 or 3")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        (value_type,) = cursor.unpack("<I")
        metadata[key] = cursor.value(value_type)
    raw_tensors = []
    for _ in range(tensor_count):
        name = cursor.string()
        (n_dims,) = cursor.unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _CorruptHeader(f"tensor {name!r} has {n_dims} dimensions, expected 1 to {_MAX_DIMS}")
        dims = cursor.unpack(f"<{n_dims}Q")
        type_id, offset = cursor.unpack("<IQ")
        raw_tensors.append((name, tuple(reversed(dims)), type_id, offset))
    return metadata, raw_tensors, cursor.pos


def _tensor_info(path: Path, data_start: int, name, shape, type_id, offset) -> TensorInfo:
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise WeightsError(
            f"GGUF file {path}: tensor {name!r} has unknown ggml type id {type_id}"
        ) from None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block:
        raise WeightsError(
            f"GGUF file {path}: tensor {name!r} of shape {shape} does not split into "
            f"{qtype.name} blocks of {block}"
        )
    nbytes = math.prod(shape) // block * type_size
    return TensorInfo(name, shape, qtype, data_start + offset, nbytes)


# ----------------------------------------------------------------------------------------- config


def read_gguf_config(source: GgufSource):
    """The transformers config (LlamaConfig, Gemma3TextConfig, ...) a GGUF file's metadata describes."""
    return _header(source).hf_config


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
    header = _header(source)
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

    header = _header(source)
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
    "GgufHeader",
    "GgufSource",
    "TensorInfo",
    "iter_gguf_tensors",
    "llama3_rope_factors",
    "load_gguf_tokenizer",
    "read_gguf_config",
    "read_gguf_header",
    "unpermute_llama_qk",
]
