"""A GGUF file's header: its metadata and tensor table, read once and checked field by field.

`read_gguf_header` maps the file, parses the header into a `GgufHeader` (no tensor data is read)
and checks it before anything uses it: the magic and version, every metadata value type, the
metadata fields the loader reads (counts positive integers, token ids >= 0, an alignment that is a
power of two), and a tensor table whose names are unique, offsets aligned, shapes split into their
quantization blocks and data inside the file. Every failure is a `WeightsError` naming the file and
the field. Config assembly, tensor streaming and the tokenizer (`gguf_io`) all take the header.

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
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from spt_jax.errors import WeightsError
from spt_jax.models.families import GGUF_ARCHITECTURES

_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


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
        from spt_jax.models import gguf_io  # config assembly lives there, and gguf_io imports this module

        return gguf_io._config_from_header(self)


GgufSource = str | Path | GgufHeader


def as_header(source: GgufSource) -> GgufHeader:
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


__all__ = [
    "GgufHeader",
    "GgufSource",
    "TensorInfo",
    "as_header",
    "read_gguf_header",
]
