"""Five-shot evaluation with the shared demonstration prefix cached vs recomputed per example.

The built-in `capitals_mc` task, 5 seeded demonstrations (the same prefix for every test item),
SmolLM2-135M-Instruct (float32), batch 8, greedy, <= 16 new tokens, stop at newline:

* cached:     ``generate(lm, inputs, prefix_text=demos)``: the demonstrations' KV is computed once
              and broadcast to every batch; only each question is prefilled.
* recomputed: ``generate(lm, [demos + x for x in inputs])``: every example prefills the whole prompt.

Both run in this process on the same cores, after a warm-up pass each (so compiles are excluded
and reported apart), in alternating timed passes, and must give the same outputs:

    python benchmarks/fewshot_prefix_cache.py [--n 64] [--shots 5] [--random-weights]
"""

from __future__ import annotations

from machine import machine_line  # benchmarks/ is sys.path[0] when a script runs

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m-instruct"


def load_model(random_weights: bool):
    from flax import nnx

    from spt_jax import models

    lm = models.load(MODEL, dtype="float32")
    if random_weights:  # same shapes and tokenizer, random weights: every row decodes all tokens
        graphdef, params = nnx.split(models.DecoderLM(lm.config, rngs=nnx.Rngs(0)))
        lm = models.LM(f"random-{MODEL}", lm.config, graphdef, params, lm.tokenizer)
    return lm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="capitals_mc")
    parser.add_argument("--n", type=int, default=64, help="test items per pass")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode (after one warm-up)")
    parser.add_argument("--random-weights", action="store_true")
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)  # the CPU kind this result holds for
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    from spt_jax import generate as gen
    from spt_jax.tasks import get_task
    from spt_jax.sequence import encode

    lm = load_model(args.random_weights)
    task = get_task(args.task)
    demos = task.fewshot_prefix(args.shots, seed=0)
    inputs = [task.render_input(r) for r in task.records("test")[: args.n]]
    config = gen.GenerationConfig(max_new_tokens=16, stop_sequences=task.stop_sequences, batch_size=args.batch)

    modes = {
        "cached": lambda: gen.generate(lm, inputs, prefix_text=demos, config=config),
        "recomputed": lambda: gen.generate(lm, [demos + x for x in inputs], config=config),
    }
    results = {}
    for name, run in modes.items():  # warm-up: compiles every shape the timed passes use
        before = lm.compiled.compilations()
        start = time.perf_counter()
        run()
        results[name] = dict(warm_s=time.perf_counter() - start, compiles=lm.compiled.compilations() - before, times=[])
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # alternate, so both modes meet the same background load
        for name, run in modes.items():
            start = time.perf_counter()
            results[name]["outputs"] = run()
            results[name]["times"].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]

    rate = {k: args.n / statistics.median(r["times"]) for k, r in results.items()}
    same = sum(a == b for a, b in zip(results["cached"]["outputs"], results["recomputed"]["outputs"])) / args.n
    valid = sum(task.parse(o).valid for o in results["cached"]["outputs"]) / args.n
    input_tokens = statistics.mean(len(encode(lm.tokenizer, x)) for x in inputs)
    print(f"{lm.name}, {args.task} {args.shots}-shot, {args.n} items, batch {args.batch}, float32, "
          f"{args.threads} cores; prefix {len(encode(lm.tokenizer, demos))} tokens, "
          f"inputs {input_tokens:.0f} tokens on average; load average {load_before:.1f} -> "
          f"{load_after:.1f}")  # fmt: skip
    for name, r in results.items():
        print(f"  {name:10s}: warm-up {r['warm_s']:.1f}s ({r['compiles']} compiles), passes "
              f"{', '.join(f'{t:.2f}' for t in r['times'])}s -> {rate[name]:.2f} examples/s")  # fmt: skip
    print(f"  identical outputs {same:.0%}, format-valid {valid:.0%}; sample {results['cached']['outputs'][0]!r}")
    speedup = rate["cached"] / rate["recomputed"]
    print(f"SUMMARY fewshot_prefix_cache: cached {rate['cached']:.2f} ex/s, recomputed "
          f"{rate['recomputed']:.2f} ex/s, speedup {speedup:.2f}x, outputs identical {same:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
