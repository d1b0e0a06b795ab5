"""The whole study into one folder: every (recipe, seed) model, then the analysis files.

The folder holds ``study_config.json`` (the settings that decide what a model is), one sub-folder per
model under ``models/`` (`pipeline.run_model`, resumable stage by stage) and, once every model is
done, ``study.json``, ``summary.md``, ``correlations.png`` and ``scatter.png``. Running again into the
same folder resumes; running with other settings into it is refused (seeds and recipes may be added).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import analysis, benchmark, data, pipeline
from .recipes import RECIPES, Scale, recipe_by_name
from .world import make_world

CONFIG_FILE = "study_config.json"
STUDY_FILE = "study.json"
SUMMARY_FILE = "summary.md"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    scale: Scale
    recipes: tuple[str, ...] = tuple(r.name for r in RECIPES)
    seeds: tuple[int, ...] = (0, 1, 2)
    world_seed: int = 0

    def __post_init__(self):
        for name in self.recipes:
            recipe_by_name(name)  # an unknown name fails here, naming the recipes
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if len(self.recipes) < 2:
            raise ValueError("a ranking needs at least two recipes")

    def settings(self) -> dict:
        """What decides a model's identity (a resumed study must match it): scale, world, recipes."""
        return {"scale": dataclasses.asdict(self.scale), "world_seed": self.world_seed,
                "recipes": {r.name: dataclasses.asdict(r) for r in RECIPES}}


def _jsonable(value):
    """Plain JSON types, with NaN (an undefined correlation) as null so any JSON reader takes it."""
    value = json.loads(json.dumps(value, default=str))

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(value)


def check_folder(out: Path, config: StudyConfig) -> None:
    """Create ``out`` or accept it as this study's folder; refuse a folder of another study or other files."""
    path = out / CONFIG_FILE
    settings = _jsonable(config.settings())
    if path.is_file():
        found = json.loads(path.read_text())
        if found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise SystemExit(f"{out} holds a study with other settings ({', '.join(changed)} differ); "
                             "resume it with the same flags or choose a new --out")
        return
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not a study folder (no {CONFIG_FILE}); choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def setting_for(config: StudyConfig):
    world = make_world(config.scale.n_people, seed=config.world_seed)
    tokenizer = data.build_tokenizer(data.world_words(world, (benchmark.INSTRUCTION,)))
    return pipeline.Setting(world=world, tokenizer=tokenizer, task=benchmark.make_task(world), scale=config.scale)


def machine() -> str:
    """The benchmarks' MACHINE line (CPU, flags, threads, load) plus the cores this process may use."""
    import sys

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        from machine import machine_line
    except ImportError:
        return f"{platform.processor() or platform.machine()}, {cores} usable cores"
    return f"{machine_line()}; {cores} usable cores"


def run_study(config: StudyConfig, out: Path, *, command: str = "", log: Callable[[str], None] = print) -> dict:
    """Train and evaluate every model not yet done, then write the analysis; returns study.json's content."""
    started = time.perf_counter()
    check_folder(out, config)
    setting = setting_for(config)
    setting.tokenizer.save_pretrained(out / "tokenizer")
    log(f"world: {len(setting.world.people)} people ({len(setting.world.train_ids)} post-training, "
        f"{len(setting.world.test_ids)} benchmark), vocabulary {len(setting.tokenizer)} words")
    records = []
    for seed in config.seeds:
        for name in config.recipes:
            recipe = recipe_by_name(name)
            t0 = time.perf_counter()
            folder = out / "models" / pipeline.model_id(recipe, seed)
            records.append(pipeline.run_model(setting, recipe, seed, folder, log=log))
            log(f"  {pipeline.model_id(recipe, seed)} done in {time.perf_counter() - t0:.0f} s")
    return write_analysis(out, records, config, command=command, wall_time_s=time.perf_counter() - started)


def write_analysis(out: Path, records: Sequence[dict], config: StudyConfig, *, command: str,
                   wall_time_s: float) -> dict:
    means = analysis.recipe_means(records)
    correlations = {metric: analysis.correlations(records, metric) for metric in ("accuracy", "knowledge_accuracy")}
    study = {
        "command": command,
        "settings": _jsonable(config.settings()),
        "recipes": list(config.recipes),
        "seeds": list(config.seeds),
        "machine": machine(),
        "wall_time_s": wall_time_s,
        "models": _jsonable(list(records)),
        "recipe_means": means,
        "correlations": correlations,
        "files": {"summary": SUMMARY_FILE, "correlations_plot": "correlations.png", "scatter_plot": "scatter.png"},
    }
    analysis.plot_correlations(correlations["accuracy"], out / "correlations.png")
    analysis.plot_scatter(records, correlations["accuracy"], out / "scatter.png")
    (out / SUMMARY_FILE).write_text(analysis.summary_markdown(study), encoding="utf-8")
    tmp = out / (STUDY_FILE + ".tmp")
    tmp.write_text(json.dumps(_jsonable(study), indent=1, allow_nan=False))
    tmp.replace(out / STUDY_FILE)  # last: its presence marks a finished study
    return study
