"""Local Hugging Face checkpoint directories: config.json, tokenizer files and safetensors.

Only safetensors are read (pickle-based ``.bin``/``.pt`` files can run code on load and are refused),
and nothing that needs ``trust_remote_code``. Tensors stream one at a time from memory-mapped files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from spt_jax.errors import ConfigError, WeightsError
from spt_jax.system import read_text
from spt_jax.models.families import SUPPORTED_MODEL_TYPES

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_INDEX = "model.safetensors.index.json"


def read_config(directory: Path):
    """The transformers config of a checkpoint directory, refusing remote code and unknown types."""
    path = directory / "config.json"
    if not path.is_file():
        raise WeightsError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(read_text(path, "model config"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(raw).__name__}")
    if "auto_map" in raw:
        raise ConfigError(
            f"{path}: this model needs trust_remote_code (its config has 'auto_map'); spt_jax runs no "
            "code from checkpoints. Supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{path}: model_type {model_type!r} is not supported; supported model types: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(
            directory, trust_remote_code=False, local_files_only=True
        )
    except OSError:
        raise
    except Exception as e:  # transformers' config validation raises several unrelated types
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{path}: transformers refuses this config ({reason[:300]})") from None


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded through its index, or single)."""
    index = directory / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(read_text(index, "safetensors index")).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError):
            raise WeightsError(f"{index}: not a JSON object with a 'weight_map'") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index}: shard file(s) listed but missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{directory}: only pickle checkpoints found ({', '.join(pickles)}); spt_jax loads "
            "safetensors only, because loading a pickle runs whatever code it contains. Get the "
            "checkpoint's safetensors files (model.safetensors) from where it was published; converting "
            "the pickle yourself loads it, so do that only for a file from a source you trust"
        )
    raise WeightsError(f"{directory}: no *.safetensors weight files found")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor, one at a time, from memory-mapped files."""
    from safetensors import safe_open

    for file in files:
        try:
            handle = safe_open(str(file), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"{file}: cannot read safetensors file ({e}); is it truncated?") from None
        with handle as f:
            for name in f.keys():
                try:
                    yield name, f.get_tensor(name)
                except Exception as e:
                    raise WeightsError(f"{file}: cannot read tensor {name!r} ({e}); is it truncated?") from None


def load_tokenizer(directory: Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise WeightsError(f"{directory}: cannot load tokenizer files ({e})") from None
