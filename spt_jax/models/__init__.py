"""Frozen decoder-only LMs in Flax NNX, loaded from local checkpoints without a hub.

``load`` takes an embedded model name (``smollm2-135m-instruct``, ``gemma3-270m``), a Hugging Face
checkpoint directory (config.json + safetensors) or a ``.gguf`` file, and returns an `LM`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from spt_jax.errors import ConfigError, close_names
from spt_jax.models.config import ModelConfig, RopeConfig
from spt_jax.models.families import SUPPORTED_MODEL_TYPES, config_from_hf, family_for
from spt_jax.models.lm import LM
from spt_jax.models.transformer import DecoderLM, KVCache, positions_from_mask, unstack_layers
from spt_jax.models.weights import load_params

__all__ = [
    "LM",
    "DecoderLM",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "load",
    "positions_from_mask",
    "resolve_dtype",
    "resolve_dtype_name",
    "unstack_layers",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype_name(dtype: str) -> str:
    """A dtype setting's name with "auto" resolved by backend: bfloat16 on TPU/GPU, float32 on CPU."""
    if dtype != "auto":
        return dtype
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        dtype = resolve_dtype_name(dtype)
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type


def load(
    name_or_path: str | Path,
    *,
    dtype="float32",
    param_dtype=None,
    shardings: Callable[[nnx.State], object] | None = None,
) -> LM:
    """Load a frozen LM.

    Args:
      name_or_path: an embedded model name, a checkpoint directory, or a ``.gguf`` file.
      dtype: compute dtype ("float32" on CPU; "bfloat16" on TPU/GPU; "auto" picks by backend).
      param_dtype: storage dtype of the frozen weights (defaults to ``dtype``).
      shardings: maps the abstract parameter state to a matching pytree of shardings, so each
        tensor is placed on its devices as it is loaded (see `spt_jax.tune.mesh.param_shardings`).
    """
    started = time.perf_counter()
    lm = _load(name_or_path, dtype, param_dtype, shardings)
    return dataclasses.replace(lm, load_time_s=time.perf_counter() - started)


def _load(name_or_path, dtype, param_dtype, shardings) -> LM:
    from spt_jax.models import embedded, gguf_header, gguf_io, hf_checkpoint

    dtype = resolve_dtype(dtype)
    param_dtype = resolve_dtype(param_dtype) if param_dtype is not None else dtype
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in embedded.EMBEDDED_MODELS:
        path = embedded.embedded_gguf_path(name)
    elif not path.exists():
        raise ConfigError(
            f"{name!r} is neither an embedded model ({', '.join(embedded.EMBEDDED_MODELS)}) nor an "
            f"existing checkpoint directory or .gguf file{close_names(name, embedded.EMBEDDED_MODELS)}"
        )

    if path.is_dir():
        hf_config = hf_checkpoint.read_config(path)
        tensors = hf_checkpoint.iter_safetensors(hf_checkpoint.safetensors_files(path))
        load_tokenizer = functools.partial(hf_checkpoint.load_tokenizer, path)
    else:
        header = gguf_header.read_gguf_header(path)  # parsed once: config, tensors and tokenizer share it
        hf_config = gguf_io.read_gguf_config(header)
        tensors = gguf_io.iter_gguf_tensors(header)
        load_tokenizer = functools.partial(gguf_io.load_gguf_tokenizer, header)

    config = config_from_hf(hf_config)
    abstract = nnx.eval_shape(
        lambda: DecoderLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, abstract_state = nnx.split(abstract)
    params = load_params(
        abstract_state,
        family_for(config.model_type),
        tensors,
        source=str(path),
        n_layers=config.n_layers,
        shardings=shardings(abstract_state) if shardings is not None else None,
    )
    # After the weights: a large vocabulary's tokenizer (Gemma 3: 262k) then doesn't sit on top
    # of the loading peak.
    tokenizer = load_tokenizer()
    return LM(name=name, config=config, graphdef=graphdef, params=params, tokenizer=tokenizer, dtype=dtype)
