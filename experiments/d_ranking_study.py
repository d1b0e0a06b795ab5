#!/usr/bin/env python
"""Claim (d) in a controlled study: do soft-prompted base-model scores predict the post-trained ranking?

Pre-trains one small decoder per recipe and seed from scratch on a synthetic world's biographies,
evaluates each base model zero-shot, few-shot and soft-prompted, post-trains it by full SFT on QA
pairs about half of the people, evaluates the post-trained model on the other half, and correlates
(Kendall tau-b, Spearman, bootstrap intervals) each base mode's scores with the post-trained ones.

    python experiments/d_ranking_study.py --quick            # CI-sized, a few minutes
    python experiments/d_ranking_study.py                    # the full study
    python experiments/d_ranking_study.py --out DIR          # resume an interrupted study in DIR

Writes study.json, summary.md, correlations.png, scatter.png and a checkpoint folder per model into
a new folder under results/ (or --out). Everything is generated offline; see experiments/study/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spt_jax" / "jax_compilation"

from study.recipes import QUICK_RECIPES, RECIPE_NAMES, SCALES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI-sized pipeline check (120 people, 6 recipes, tiny models)")
    parser.add_argument("--out", type=Path, default=None,
                        help="study folder (default: a new results/<timestamp>_d_ranking_study); an existing "
                             "study folder resumes")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per recipe (default: 3, --quick: 1)")
    parser.add_argument("--recipes", default=None,
                        help=f"comma-separated recipes (default: all of {', '.join(RECIPE_NAMES)}; --quick: "
                             "those on the scale's own model shape)")
    parser.add_argument("--people", type=int, default=None, help="people in the world (default: the scale's)")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--compile-cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where XLA keeps compilations, so models of one shape compile once, in this run "
                             f"and later ones (default {DEFAULT_CACHE})")
    parser.add_argument("--no-compile-cache", action="store_true", help="compile everything anew")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {seeds}")
    if args.recipes is None:
        recipes = QUICK_RECIPES if args.quick else RECIPE_NAMES
    else:
        recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    unknown = [r for r in recipes if r not in RECIPE_NAMES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; recipes: {', '.join(RECIPE_NAMES)}")

    import jax

    from spt_jax.evaluate import timestamped_dir
    from study.runner import StudyConfig, run_study

    out = args.out if args.out is not None else timestamped_dir(HERE.parent / "results", "d_ranking_study")
    out = Path(out).expanduser().resolve()
    if not args.no_compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache.expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    scale = SCALES["quick" if args.quick else "full"]
    if args.people is not None:
        scale = dataclasses.replace(scale, n_people=args.people)
    config = StudyConfig(scale=scale, recipes=recipes, seeds=tuple(range(seeds)), world_seed=args.world_seed)
    command = " ".join(shlex.quote(a) for a in ["python", "experiments/d_ranking_study.py", *(argv or sys.argv[1:])])
    print(f"study folder: {out}", flush=True)
    study = run_study(config, out, command=command, log=lambda m: print(m, flush=True))
    print((out / "summary.md").read_text())
    print(f"wrote {out} in {study['wall_time_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
