"""The soft prompt: P trainable vectors in the model's input-embedding space, ``[P, D]`` float32.

Initializers are small pure functions of (frozen LM, seed); embeddings are taken with the model's own
`embed` so a Gemma prompt starts at Gemma's sqrt(D)-scaled embedding scale, exactly where PEFT's
``inputs_embeds`` would. Prompts are stored as one safetensors tensor plus JSON metadata that names
the model, so loading a prompt into the wrong model is a clear error instead of silent garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spt_jax.errors import ConfigError, DataError, environment_fault
from spt_jax.sequence import encode
from spt_jax.tune.config import TuneConfig

PROMPT_FORMAT = "spt_jax.prompt/1"


def model_id(lm) -> str:
    """A short model identity for prompt files: the embedded name, or a checkpoint's file/dir name."""
    name = str(lm.name)
    return Path(name).name if ("/" in name or Path(name).exists()) else name


def model_metadata(lm) -> dict:
    """What a prompt file records about the model it was tuned on."""
    c = lm.config
    return {
        "model": model_id(lm),
        "model_type": c.model_type,
        "d_model": c.d_model,
        "n_layers": c.n_layers,
        "vocab_size": c.vocab_size,
    }


def _replicated_like(array) -> NamedSharding | None:
    sharding = getattr(array, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def embed_tokens(lm, token_ids) -> np.ndarray:
    """Input embeddings ``[N, D]`` float32 of ``token_ids`` through the frozen model's `embed`."""
    ids = jnp.asarray(np.asarray(token_ids, np.int32))
    embed_table = lm.params["embed_tokens"][...]

    @jax.jit
    def embed(params, ids):
        return nnx.merge(lm.graphdef, params).embed(ids).astype(jnp.float32)

    out_sharding = _replicated_like(embed_table)
    if out_sharding is not None:
        embed = jax.jit(embed, out_shardings=out_sharding)
        ids = jax.device_put(ids, out_sharding)
    return np.asarray(embed(lm.params, ids))


def regular_token_ids(lm) -> np.ndarray:
    """Vocabulary ids the model learned as text: not special, not added (control tokens and never-
    trained placeholders such as Gemma's 6242 ``<unusedN>``), not beyond the tokenizer's vocabulary."""
    n = min(lm.config.vocab_size, len(lm.tokenizer))
    excluded = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    excluded |= set(getattr(lm.tokenizer, "added_tokens_decoder", {}) or {})
    ids = np.array([i for i in range(n) if i not in excluded], np.int32)
    if ids.size == 0:
        raise ConfigError(f"model {model_id(lm)!r}: the tokenizer has no regular tokens to sample from")
    return ids


def init_from_vocab(lm, length: int, seed: int = 0) -> jax.Array:
    """Embeddings of ``length`` distinct random regular tokens (Lester et al. 2021's sampled-vocab init)."""
    candidates = regular_token_ids(lm)
    rng = np.random.default_rng([seed, 0])
    ids = rng.choice(candidates, size=length, replace=length > candidates.size)
    return jnp.asarray(embed_tokens(lm, ids))


def init_from_text(lm, length: int, text: str) -> jax.Array:
    """Embeddings of ``text``'s tokens, repeated or cut to ``length`` (PEFT's TEXT init)."""
    ids = encode(lm.tokenizer, text)
    if not ids:
        raise ConfigError(f"init_text {text!r} has no tokens; give a non-empty text")
    ids = (ids * (length // len(ids) + 1))[:length]
    return jnp.asarray(embed_tokens(lm, ids))


def init_random(lm, length: int, seed: int = 0) -> jax.Array:
    """Normal noise with the spread of the model's (scaled) input embeddings."""
    sample = embed_tokens(lm, regular_token_ids(lm)[:4096])
    std = float(sample.std())
    rng = np.random.default_rng([seed, 1])
    return jnp.asarray(rng.normal(0.0, std, (length, lm.config.d_model)).astype(np.float32))


def init_prompt(
    lm,
    config_or_kind: TuneConfig | str = "vocab",
    *,
    length: int | None = None,
    text: str | None = None,
    seed: int | None = None,
) -> jax.Array:
    """A fresh soft prompt ``[P, D]`` float32.

    ``config_or_kind`` is a `TuneConfig` (its init, prompt_length, init_text and seed are used) or
    one of "vocab", "text", "random"; keyword arguments override the config's values.
    """
    if isinstance(config_or_kind, TuneConfig):
        c = config_or_kind
        kind, length = c.init, length or c.prompt_length
        text = text if text is not None else c.init_text
        seed = seed if seed is not None else c.seed
    else:
        kind, length, seed = config_or_kind, length or 10, seed or 0
    if kind == "vocab":
        return init_from_vocab(lm, length, seed)
    if kind == "text":
        if not text:
            raise ConfigError("init 'text' needs text=... (the text whose embeddings start the prompt)")
        return init_from_text(lm, length, text)
    if kind == "random":
        return init_random(lm, length, seed)
    raise ConfigError(f"unknown prompt init {kind!r}; expected 'vocab', 'text' or 'random'")


def save_prompt(path, prompt, metadata: dict | None = None) -> Path:
    """Write ``prompt [P, D]`` and JSON ``metadata`` (include `model_metadata(lm)`) to a safetensors file."""
    from safetensors.numpy import save_file

    array = np.asarray(prompt, np.float32)
    if array.ndim != 2:
        raise ConfigError(f"a soft prompt is [P, D]; got shape {array.shape}")
    meta = dict(metadata or {})
    meta.setdefault("d_model", int(array.shape[1]))
    meta.setdefault("prompt_length", int(array.shape[0]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"prompt": np.ascontiguousarray(array)},
        str(path),
        metadata={"format": PROMPT_FORMAT, "spt_jax": json.dumps(meta, default=str)},
    )
    return path


def load_prompt(path, lm=None, *, check_model: bool = True) -> tuple[jax.Array, dict]:
    """Read a prompt file; with ``lm``, refuse a prompt tuned for another model or width.

    Returns ``(prompt [P, D] float32, metadata)``. ``check_model=False`` accepts a different model
    name (the same weights loaded from another path, say) but never a different d_model.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        inside = path / "soft_prompt.safetensors"
        raise ConfigError(f"{path} is a folder, not a prompt file; "
                          + (f"pass the prompt file in it: {inside}" if inside.is_file() else
                             "pass a .safetensors file written by 'spt-jax tune' or 'spt-jax run'"))
    if not path.is_file():
        raise ConfigError(f"{path}: no such prompt file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            if "prompt" not in f.keys():
                raise ConfigError(f"{path}: no 'prompt' tensor (is this a spt_jax prompt file?)")
            array = f.get_tensor("prompt")
    except ConfigError:
        raise
    except OSError as e:
        raise environment_fault(e, "cannot read the prompt file", path) from None
    except Exception as e:  # safetensors' own error types for corrupt headers
        raise DataError(f"{path}: cannot read prompt file ({e})") from None
    if header.get("format") != PROMPT_FORMAT:
        raise ConfigError(f"{path}: format {header.get('format')!r}, expected {PROMPT_FORMAT!r}")
    metadata = _prompt_metadata(path, header.get("spt_jax", "{}"))
    _check_prompt_array(path, array)
    if lm is not None:
        want, got = model_id(lm), metadata.get("model")
        if array.shape[1] != lm.config.d_model:
            raise ConfigError(
                f"{path}: prompt width d_model={array.shape[1]} (tuned on {got!r}) does not match "
                f"model {want!r} with d_model={lm.config.d_model}"
            )
        if check_model and got is not None and got != want:
            raise ConfigError(
                f"{path}: prompt was tuned on model {got!r}, not {want!r}; prompts do not transfer "
                "between models (pass check_model=False if this is the same model under another name)"
            )
    return jnp.asarray(array.astype(np.float32)), metadata


def _prompt_metadata(path: Path, text: str) -> dict:
    """The JSON metadata of a prompt file; DataError naming the file when it is not a JSON object."""
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: its 'spt_jax' metadata is not valid JSON ({e.msg} at character {e.pos}); "
                        "the file is damaged: tune the prompt again") from None
    if not isinstance(metadata, dict):
        raise DataError(f"{path}: its 'spt_jax' metadata is a {type(metadata).__name__}, expected a JSON object")
    return metadata


def _check_prompt_array(path: Path, array: np.ndarray) -> None:
    """A prompt is a non-empty ``[P, D]`` float array of finite values (a NaN prompt generates nothing)."""
    if array.ndim != 2 or 0 in array.shape:
        raise ConfigError(f"{path}: prompt has shape {array.shape}, expected [P, D] with P, D >= 1")
    if not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"{path}: prompt has dtype {array.dtype}, expected floating point")
    bad = ~np.isfinite(array)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} of the prompt's {array.size} values are NaN or infinite "
                        f"(first at vector {int(np.argwhere(bad)[0][0])}); the tuning that wrote it diverged: "
                        "tune again with a lower learning rate")

