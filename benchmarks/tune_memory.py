"""Peak memory and compilations of an 80-step soft-prompt tuning run on Gemma-3-270M.

The run happens in a child process (so nothing else shares its address space) which reports its own
peak resident set size (``ru_maxrss``) after `spt_jax.tune.tune` returns. It uses the embedded
Gemma-3-270M when its loader is available; otherwise a random model of exactly Gemma-3-270M's shape
(same memory) with a character tokenizer.

Targets: peak RSS <= 3 GB; compilations <= the number of length buckets the run used.
Run: ``python benchmarks/tune_memory.py`` (``--steps N``, default 80).
"""

from __future__ import annotations

from machine import machine_line  # benchmarks/ is sys.path[0] when a script runs

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GEMMA3_270M = dict(  # google/gemma-3-270m config.json
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
    query_pre_attn_scalar=256, sliding_window=512, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
)


def random_gemma3_270m():
    """An LM of Gemma-3-270M's exact shapes; weights drawn on device, leaf by leaf (no host copies)."""
    import jax
    import transformers
    from flax import nnx

    from spt_jax.models import LM, DecoderLM, config_from_hf

    sys.path.insert(0, str(REPO / "tests"))
    from tune_support import char_tokenizer

    config = config_from_hf(transformers.Gemma3TextConfig(**GEMMA3_270M))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(abstract))))

    def draw(leaf):
        sample = jax.jit(lambda k: jax.random.normal(k, leaf.shape, leaf.dtype) * 0.02)
        return sample(next(keys))

    params = jax.tree.map(draw, abstract)
    lm = LM("gemma3-270m-random", config, graphdef, params, char_tokenizer())
    return lm, "random weights, char tokenizer"


def load_model():
    from spt_jax import models

    try:
        return models.load("gemma3-270m"), "embedded gemma3-270m"
    except Exception as e:  # the embedded-model loader is optional here; fall back to same-shape weights
        print(f"(embedded gemma3-270m unavailable: {type(e).__name__}: {str(e)[:120]}; using random weights)",
              file=sys.stderr)
        return random_gemma3_270m()


def examples(n: int = 400):
    """Multiple-choice-like rows of varied length (about 40-110 tokens), short 'Answer: X' targets."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = "the of a to in is was for on that by with as at from which this an are be it or".split()
    rows = []
    for _ in range(n):
        question = " ".join(rng.choice(words, rng.integers(8, 30)))
        options = " ".join(f"{c}) {' '.join(rng.choice(words, 3))}" for c in "ABCD")
        rows.append((f"Question: {question}?\n{options}\n", f"Answer: {'ABCD'[rng.integers(4)]}"))
    return rows


def child(steps: int) -> None:
    import resource

    from spt_jax import tune

    lm, source = load_model()
    result = tune.tune(lm, examples(), tune.TuneConfig(steps=steps), progress=False)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = [h["step_time_s"] for h in result.history if "step_time_s" in h and not h["compiled"]]
    print(json.dumps({
        "source": source,
        "peak_rss_gb": peak_kb * 1024 / 1e9,
        "compilations": result.metadata["compilations"],
        "length_buckets_used": result.metadata["length_buckets_used"],
        "batch_shapes_used": result.metadata["batch_shapes_used"],
        "median_step_s": sorted(times)[len(times) // 2] if times else None,
        "first_loss": result.history[0]["loss"],
        "last_loss": result.history[-1]["loss"],
        "n_params": lm.n_params,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    print(machine_line(), flush=True)  # the CPU kind this result holds for
    if args.child:
        child(args.steps)
        return
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child failed:\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    shapes = report["batch_shapes_used"]
    print(f"Gemma-3-270M ({report['source']}, {report['n_params'] / 1e6:.0f}M params, float32), "
          f"{args.steps} steps at batch 8, P=10")
    print(f"peak RSS      : {report['peak_rss_gb']:.2f} GB  (target <= 3 GB)")
    buckets = report["length_buckets_used"]
    print(f"compilations  : {report['compilations']} for {len(buckets)} length bucket(s) "
          f"{report['length_buckets_used']} / {len(shapes)} batch shape(s) {shapes}  "
          f"(target: compilations <= buckets used)")
    print(f"median step   : {report['median_step_s']:.2f} s; "
          f"loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}")
    ok = report["peak_rss_gb"] <= 3.0 and report["compilations"] <= len(shapes)
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
