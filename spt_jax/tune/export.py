"""PEFT interop: write a tuned prompt as a PEFT prompt-tuning adapter, and read one back.

The files are what ``PeftModel.save_pretrained`` writes for ``PromptTuningConfig`` (an
``adapter_config.json`` and ``adapter_model.safetensors`` holding ``prompt_embeddings [P, D]``), so
``PeftModel.from_pretrained(base_model, directory)`` loads our prompt, and our `import_peft` loads
one tuned with PEFT. PEFT itself is not needed for either direction.

Placement differs: PEFT puts the virtual tokens before *everything* (before BOS, and before left
padding), while spt_jax puts them right after BOS (`spt_jax.sequence`). A prompt moved across keeps
its vectors but sees BOS on the other side, which usually costs a little accuracy; re-tune a few
steps if exact behaviour matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from spt_jax.errors import ConfigError
from spt_jax.system import read_text
from spt_jax.tune.prompt import model_id

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHT_KEY = "prompt_embeddings"


def export_peft(directory, prompt, lm, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``prompt [P, D]`` as a PEFT prompt-tuning adapter directory for ``lm``'s base model."""
    from safetensors.numpy import save_file

    array = np.asarray(prompt, np.float32)
    c = lm.config
    if array.ndim != 2 or array.shape[1] != c.d_model:
        raise ConfigError(
            f"prompt shape {array.shape} does not fit model {lm.name!r} (expected [P, {c.d_model}])"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or str(lm.name),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": int(array.shape[0]),
        "token_dim": int(c.d_model),
        "num_transformer_submodules": 1,
        "num_attention_heads": int(c.n_heads),
        "num_layers": int(c.n_layers),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "auto_mapping": None,
        "modules_to_save": None,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file({WEIGHT_KEY: np.ascontiguousarray(array)}, str(directory / ADAPTER_WEIGHTS))
    return directory


def import_peft(directory, lm=None) -> tuple[jax.Array, dict]:
    """Read a PEFT prompt-tuning adapter: ``(prompt [P, D] float32, adapter_config)``.

    With ``lm``, the adapter's width must equal the model's d_model.
    """
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConfigError(f"{directory}: missing {path.name} (expected a PEFT adapter directory)")
    try:
        config = json.loads(read_text(config_path, "adapter config"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ConfigError(
            f"{config_path}: peft_type {config.get('peft_type')!r}; only 'PROMPT_TUNING' adapters "
            "hold a soft prompt"
        )
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError(f"{config_path}: num_transformer_submodules must be 1 for a decoder-only model")
    weights = load_file(str(weights_path))
    if WEIGHT_KEY not in weights:
        raise ConfigError(f"{weights_path}: no {WEIGHT_KEY!r} tensor (found {sorted(weights)})")
    array = weights[WEIGHT_KEY].astype(np.float32)
    if lm is not None and array.shape[1] != lm.config.d_model:
        raise ConfigError(
            f"{weights_path}: prompt width {array.shape[1]} does not match model "
            f"{model_id(lm)!r} with d_model={lm.config.d_model}"
        )
    return jnp.asarray(array), config
