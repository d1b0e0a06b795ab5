"""Model families: everything spt_jax knows about one architecture, declared together.

A `Family` holds, for the transformers ``model_type``s it covers:

* ``config_from_hf``: a transformers config object -> our `ModelConfig`;
* ``rules``: `WeightRule`s from Hugging Face tensor names to our parameter paths, which
  `weights.py` applies to safetensors and GGUF tensors alike (GGUF is renamed to Hugging Face first);
* ``shardings``: `ShardRule`s from our parameter paths to the axes `tune/mesh.py` splits over the
  mesh's ``model`` axis; every parameter must match exactly one (replicated ones say so);
* ``gguf``: the llama.cpp architectures that load as this family (`GgufArch`): metadata renames,
  Hugging Face module names for gguf's ``TensorNameMap``, and the `TensorFix`es undoing what
  llama.cpp's converter did. `gguf_header.py` and `gguf_io.py` hold only the generic GGUF reading.

One module per family group declares its `Family` objects (`llama.py`, `gemma.py`, `gpt2.py`) from
the types and shared rules in `_base.py`; `FAMILIES` below registers them, and everything else
(`SUPPORTED_MODEL_TYPES`, `GGUF_ARCHITECTURES`, `ANY_FAMILY_SHARDINGS`, `family_for`) follows from it.
"""

from __future__ import annotations

from spt_jax.errors import ConfigError
from spt_jax.models.config import ModelConfig
from spt_jax.models.families._base import (
    REPLICATED,
    Family,
    Fix,
    GgufArch,
    Layout,
    ShardRule,
    TensorFix,
    WeightRule,
)
from spt_jax.models.families.gemma import GEMMA, GEMMA2, gemma_config
from spt_jax.models.families.gpt2 import GPT2, gpt2_config
from spt_jax.models.families.llama import LLAMA, llama_config

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


__all__ = [
    "ANY_FAMILY_SHARDINGS",
    "FAMILIES",
    "GEMMA",
    "GEMMA2",
    "GGUF_ARCHITECTURES",
    "GPT2",
    "LLAMA",
    "REPLICATED",
    "SUPPORTED_MODEL_TYPES",
    "Family",
    "Fix",
    "GgufArch",
    "Layout",
    "ShardRule",
    "TensorFix",
    "WeightRule",
    "config_from_hf",
    "family_for",
    "gemma_config",
    "gpt2_config",
    "llama_config",
]
