"""The evaluation protocol: one model x one task in zero-shot, k-shot and soft-prompt modes.

Every generation mode generates greedily on the same test items and scores the outputs with the
task's parser, so the rows differ only in what precedes the question; reference scorers (the
log-likelihood choice accuracy of multiple-choice tasks) add format-free rows. Modules, one job each:

* `config`   -- `EvalConfig`, the one source of the settings and their defaults;
* `modes`    -- modes as objects and their registry (`register_mode`);
* `protocol` -- `evaluate` (a loop over the modes) and `tune_outputs`, with injectable `Backends`;
* `results`  -- the files of a results folder: results.json assembly, writing and loading
  (docs/results_schema.md);
* `folders`  -- where outputs go: guarded, locked, staged folders renamed into place when complete;
* `compare`  -- models x tasks from a config file and rank correlations between modes;
  `mode_correlations` ranks your own checkpoints' per-mode scores against a target score.
"""

from spt_jax.evaluate.compare import (
    CompareConfig,
    ModelSpec,
    compare,
    compare_config_from_dict,
    load_compare_config,
    mode_correlations,
    mode_scores,
    rank_correlations,
)
from spt_jax.evaluate.config import TUNE_SHORTCUTS, EvalConfig, eval_config_from_dict, tune_config_with
from spt_jax.evaluate.folders import Staging, check_out_dir, output_folder, timestamped_dir, writes_results
from spt_jax.evaluate.modes import (
    GenerationMode,
    Mode,
    ModeRun,
    Prepared,
    all_modes,
    generation_mode_names,
    get_mode,
    mode_label,
    register_mode,
    score_outputs,
    unregister_mode,
)
from spt_jax.evaluate.protocol import (
    Backends,
    EvalContext,
    ValidityCurve,
    check_inputs,
    curve_records,
    evaluate,
    select_test,
    tune_outputs,
    tune_soft_prompt,
)
from spt_jax.evaluate.results import (
    COMPARE_FILE,
    PREDICTIONS_FILE,
    PROMPT_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    SCHEMA_VERSION,
    TUNING_FILE,
    load_results,
    versions,
)

__all__ = [
    "Backends", "COMPARE_FILE", "CompareConfig", "EvalConfig", "EvalContext", "GenerationMode", "Mode",
    "ModeRun", "ModelSpec", "PREDICTIONS_FILE", "PROMPT_FILE", "Prepared", "REPORT_FILE", "RESULTS_FILE",
    "SCHEMA_VERSION", "Staging", "TUNE_SHORTCUTS", "TUNING_FILE", "ValidityCurve", "all_modes", "check_inputs",
    "check_out_dir", "compare", "compare_config_from_dict", "curve_records", "eval_config_from_dict",
    "evaluate", "generation_mode_names", "get_mode", "load_compare_config", "load_results", "mode_correlations",
    "mode_label", "mode_scores", "output_folder", "writes_results",
    "rank_correlations", "register_mode", "score_outputs", "select_test", "timestamped_dir",
    "tune_config_with", "tune_outputs", "tune_soft_prompt", "unregister_mode", "versions",
]  # fmt: skip
