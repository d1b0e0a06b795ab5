"""Soft-prompt tuning: a frozen LM, P trainable input vectors right after BOS, ~80 steps.

    from spt_jax import models, tune
    lm = models.load("smollm2-135m-instruct")
    result = tune.tune(lm, task.examples("train"), tune.TuneConfig(steps=80, batch_size=8))
    result.prompt  # [P, D] float32, passed as-is to generation

Modules, one job each: `config` (TuneConfig), `prompt` (initializers, prompt files), `data` (rows,
buckets, data order), `step` (loss and jitted train step), `mesh` (mesh and shardings),
`checkpoint` (Orbax), `export` (PEFT adapters), `loop` (`tune` and its `PromptEvaluator` callback).
See docs/tuning.md.
"""

from spt_jax.tune.checkpoint import TuneCheckpoints
from spt_jax.tune.config import TuneConfig
from spt_jax.tune.data import DataOrder, ExampleEncoder, tuning_layout
from spt_jax.tune.export import export_peft, import_peft
from spt_jax.tune.loop import Evaluation, NonFiniteLossError, PromptEvaluator, TuneResult, tune
from spt_jax.tune.mesh import make_mesh, param_shardings, place_params
from spt_jax.tune.prompt import (
    init_from_text,
    init_from_vocab,
    init_prompt,
    init_random,
    load_prompt,
    model_metadata,
    save_prompt,
)
from spt_jax.tune.step import TrainStep, make_optimizer, make_train_step, prompt_loss

__all__ = [
    "DataOrder",
    "Evaluation",
    "ExampleEncoder",
    "NonFiniteLossError",
    "PromptEvaluator",
    "TrainStep",
    "TuneCheckpoints",
    "TuneConfig",
    "TuneResult",
    "tuning_layout",
    "export_peft",
    "import_peft",
    "init_from_text",
    "init_from_vocab",
    "init_prompt",
    "init_random",
    "load_prompt",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "model_metadata",
    "param_shardings",
    "place_params",
    "prompt_loss",
    "save_prompt",
    "tune",
]
