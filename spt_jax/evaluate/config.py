"""`EvalConfig`: what one evaluation runs -- the one source of the settings' defaults.

The CLI (`spt_jax.cli`) builds its flags and their defaults from these fields and from `TuneConfig`,
and compare config files use the same names, so a knob has one spelling and one default everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from spt_jax.errors import ConfigError, close_names
from spt_jax.evaluate.modes import generation_mode_names
from spt_jax.tune.config import TuneConfig

# "auto": bfloat16 on TPU/GPU, float32 on CPU (`spt_jax.models.resolve_dtype_name`, when the model loads).
DTYPES = ("auto", "float32", "bfloat16", "float16")
FEWSHOT_FORMS = ("shared", "lm_eval")

# TuneConfig fields an evaluation config (and the CLI) may set directly, by the name used there.
TUNE_SHORTCUTS = {"steps": "steps", "tune_batch_size": "batch_size", "prompt_length": "prompt_length",
                  "learning_rate": "learning_rate"}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What one evaluation runs. Defaults follow the method: k=5, 80 tuning steps at batch 8.

    ``n_test`` takes a seeded sample of that many test items (the same items for every mode, so
    paired comparisons hold); 200 keeps the default run on Gemma-3-270M near 10 minutes on 2 CPU
    cores, ``None`` evaluates the whole split. ``eval_every`` tuning steps between evaluations of
    ``n_curve`` fixed validation items (0: only before and after tuning). ``prompt_file`` evaluates
    a saved soft prompt instead of tuning one. ``dtype`` is used by the callers that load the model
    (CLI, ``compare``); "auto" is bfloat16 on TPU/GPU and float32 on CPU. ``mesh`` is where generation,
    scoring and tuning run: "auto" (every device, as many on ``data`` as divide the batch sizes, the
    rest on ``model``), "data=N,model=M", a `jax.sharding.Mesh`, or None (generation and scoring on
    one device, tuning on `spt_jax.tune.tune`'s default mesh); see `device_mesh`. ``seed`` picks the test sample, the demonstrations and the curve items; the
    prompt's initialization and data order follow ``tune.seed``. ``chat_template`` wraps each input
    in the tokenizer's chat template as one user turn (the soft prompt precedes the turn).
    """

    modes: tuple[str, ...] = ("zero_shot", "few_shot", "soft_prompt")
    k: int = 5
    seed: int = 0
    n_test: int | None = 200
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    eval_every: int = 10
    n_curve: int = 64
    batch_size: int = 16
    dtype: str = "auto"
    mesh: Any = "auto"  # "auto", "data=N,model=M", a jax.sharding.Mesh, or None
    loglik: bool = True  # the MCF reference (the letter after the lettered list) on multiple-choice tasks
    # "shared": k seeded train demos behind the instruction, one prefix for all items (KV-cached, fast);
    # "lm_eval": lm-eval's own k-shot context per item (its sampler, no invented instruction), also
    # given to the CF references, so numbers compare with published lm-eval ones
    fewshot_form: str = "shared"
    seeds: int = 1  # independently tuned soft prompts (init and data order from tune.seed + i)
    chat_template: bool = False  # wrap every input in the model's chat template (post-trained models)
    cloze: bool = True  # the CF references (each choice's text as the continuation) where the task has a cloze form
    max_new_tokens: int | None = None  # None: the task's own budget
    confidence: float = 0.95
    prompt_file: str | None = None

    def __post_init__(self):
        names = generation_mode_names()
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        if not modes:
            raise ConfigError(f"modes must name at least one of {', '.join(names)}")
        for mode in modes:
            if mode not in names:
                raise ConfigError(f"unknown mode {mode!r}{close_names(str(mode), names)}; "
                                  f"modes are {', '.join(names)}")
        if len(set(modes)) != len(modes):
            raise ConfigError(f"modes {modes!r} name a mode twice")
        object.__setattr__(self, "modes", modes)
        _check_int("k", self.k, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.n_test is not None:
            _check_int("n_test", self.n_test, minimum=1)
        _check_int("eval_every", self.eval_every, minimum=0)
        _check_int("n_curve", self.n_curve, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("seeds", self.seeds, minimum=1)
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if self.fewshot_form not in FEWSHOT_FORMS:
            raise ConfigError(f"fewshot_form must be one of {', '.join(FEWSHOT_FORMS)}, got {self.fewshot_form!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from spt_jax.tune.mesh import parse_mesh_spec

        object.__setattr__(self, "mesh", parse_mesh_spec(self.mesh))
        if not (isinstance(self.confidence, float) and 0.0 < self.confidence < 1.0):
            raise ConfigError(f"confidence must be a float strictly between 0 and 1, got {self.confidence!r}")
        if not isinstance(self.tune, TuneConfig):
            raise ConfigError(f"tune must be a TuneConfig, got {type(self.tune).__name__}")

    def replace(self, **changes) -> EvalConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        from spt_jax.tune.mesh import mesh_spec

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tune"}
        out["modes"] = list(self.modes)
        if out["mesh"] is not None and not isinstance(out["mesh"], str):
            out["mesh"] = mesh_spec(out["mesh"])
        out["tune"] = self.tune.to_dict()
        return out

    def batch_sizes(self) -> dict[str, int]:
        """The batch sizes that run on the mesh, by setting name: generation/scoring, and tuning's
        when this evaluation tunes a prompt."""
        sizes = {"EvalConfig.batch_size": self.batch_size}
        if "soft_prompt" in self.modes and self.prompt_file is None:
            sizes["TuneConfig.batch_size"] = self.tune.batch_size
        return sizes

    def device_mesh(self):
        """The `jax.sharding.Mesh` named by ``mesh`` (None for None), checked against `batch_sizes`:
        a ConfigError when a batch size does not divide its ``data`` axis or the sizes do not match
        the devices."""
        from spt_jax.tune.mesh import mesh_from_spec

        return mesh_from_spec(self.mesh, self.batch_sizes())


def default_of(config_class, name: str):
    """The declared default of a dataclass field (the CLI's defaults come from here)."""
    field = {f.name: f for f in dataclasses.fields(config_class)}[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


EVAL_KEYS = frozenset({f.name for f in dataclasses.fields(EvalConfig)} - {"tune", "prompt_file"}
                      | set(TUNE_SHORTCUTS))


def eval_config_from_dict(spec: Mapping | None, origin: str, base: EvalConfig | None = None) -> EvalConfig:
    """EvalConfig fields (plus the `TUNE_SHORTCUTS`) from a config file's ``eval`` mapping."""
    spec = dict(spec or {})
    for key in spec:
        if key not in EVAL_KEYS:
            raise ConfigError(f"{origin}: unknown field 'eval.{key}'{close_names(str(key), EVAL_KEYS)}")
    base = base or EvalConfig()
    tune_changes = {TUNE_SHORTCUTS[k]: spec.pop(k) for k in list(spec) if k in TUNE_SHORTCUTS}
    if "modes" in spec and isinstance(spec["modes"], list):
        spec["modes"] = tuple(spec["modes"])
    try:
        tune_config = tune_config_with(base.tune, tune_changes, origin)
        return dataclasses.replace(base, tune=tune_config, **spec)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{origin}: bad eval settings ({e})") from None


def tune_config_with(tune_config: TuneConfig, changes: Mapping, origin: str = "tuning settings") -> TuneConfig:
    """``tune_config`` with ``changes``; unknown fields and bad values are ConfigErrors naming ``origin``."""
    if not changes:
        return tune_config
    names = {f.name for f in dataclasses.fields(tune_config)}
    for key in changes:
        if key not in names:
            raise ConfigError(f"{origin}: TuneConfig has no field {key!r}{close_names(key, names)}")
    try:
        return dataclasses.replace(tune_config, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{origin}: bad tuning settings ({e})") from None
