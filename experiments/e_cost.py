"""(e) The cost of soft-prompt tuning beside full supervised fine-tuning of the same model.

Per model and method, a fresh worker process loads the model and runs a few optimizer steps on the
same fixed batch (``--batch-size`` train examples of ``--task`` in a seeded draw, so every method
sees identical rows and compiles once): the library's soft-prompt tuning (`spt_jax.tune.tune`,
P = 10, its defaults: AdamW, remat "auto"), the same with remat "full" (every layer's forward
recomputed in the backward pass), and this script's own full supervised fine-tuning (AdamW over
every parameter of `spt_jax.models.DecoderLM`, split into a pure pytree with `nnx.split` and merged
inside one jitted step; the rows are the soft prompt's without the P prompt slots, padded to the
longest). Reported: trained parameters, analytic FLOPs per step, the measured
wall time per step (median over the steps after the compiling one) and peak memory (the process's
VmHWM, reset after the model loaded: what training added on top of the loaded model, a lower bound).

FLOPs per step, with N = parameters every token passes through (all but the embedding table and an
untied head), S = the slots a step runs: the rows' shared prefix of H slots (BOS, then the soft
prompt's P) once and each row's T - H text slots, S = H + B (T - H), with T = padded row length and
B = batch; R = head rows (the batch's target tokens, packed), D x V the output projection (both
methods project only the target tokens):

    full SFT:     6 N S + 6 D V R         (forward 2, backward to activations 2, to weights 2)
    soft prompt:  (4 + 2 r) N S + 4 D V R     (no weight gradients; r = 1 under remat "full",
                  which recomputes each layer's matmuls in the backward; 0 under "dots", which
                  stores the projections' outputs, and "none")

Attention's T^2 terms are left out (under 2% of 2N per token at these lengths), and so is the soft
prompt's last layer running its output projection and MLP at the target slots alone (most of 1/L of N S).

    python experiments/e_cost.py            # both embedded models, 3 methods, 5 timed steps each
    python experiments/e_cost.py --quick    # CI-sized: SmolLM2, soft prompt and full SFT, 2 steps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "e_cost"
# soft_prompt: the library's defaults (remat "auto"); soft_prompt_remat_full: every layer recomputed
METHODS = ("soft_prompt", "soft_prompt_remat_full", "full_sft")
FULL = dict(models=common.EMBEDDED, methods=METHODS, task="capital_of", steps=5, batch_size=8)
QUICK = dict(models=("smollm2-135m-instruct",), methods=("soft_prompt", "full_sft"), task="capital_of", steps=2,
             batch_size=8)
SFT_LEARNING_RATE = 1e-5  # a usual full fine-tuning rate; the cost does not depend on it
WORKER_TIMEOUT_S = 3600
COLORS = {"soft_prompt": "tab:green", "soft_prompt_remat_full": "tab:olive", "full_sft": "tab:red"}


def parse_args(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", type=common.names, help=f"comma-separated (default {','.join(FULL['models'])})")
    p.add_argument("--methods", type=common.names, help=f"comma-separated of {', '.join(METHODS)} (default all)")
    p.add_argument("--task", help=f"whose train examples make the batch (default {FULL['task']})")
    p.add_argument("--steps", type=common.positive, help=f"timed steps after the compiling one (default {FULL['steps']})")
    p.add_argument("--batch-size", type=common.positive, help=f"examples per step (default {FULL['batch_size']})")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)  # one method in a fresh process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = common.settings(p.parse_args(argv), FULL, QUICK)
    if args.worker and (not args.result or len(args.models) != 1):
        p.error("--worker needs --result and exactly one model")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or "full_sft" not in args.methods or len(args.methods) < 2:
        p.error(f"--methods must name full_sft and at least one of {', '.join(METHODS[:2])}, got {args.methods}")
    common.check_names(p, models=args.models, tasks=[args.task])
    return args


# --------------------------------------------------------------------------------------------------
# the workers: one method, one model, one process (so each peak is its own)


def fixed_batch(task, batch_size: int) -> list[tuple[str, str]]:
    """``batch_size`` train examples drawn with the tuning data order's seed 0."""
    from spt_jax import tune

    pairs = list(task.examples("train"))
    return [pairs[i] for i in tune.DataOrder(len(pairs), 0).take(batch_size)]


def soft_prompt_steps(lm, pairs, steps: int, remat: str | None = None) -> dict:
    """The library's tuning loop on ``pairs`` alone: every step sees the same rows (one compile).
    ``remat`` None keeps the library's default."""
    from spt_jax import tune

    config = tune.TuneConfig(steps=steps + 1, batch_size=len(pairs), seed=0, **({"remat": remat} if remat else {}))
    result = tune.tune(lm, pairs, config, progress=False)
    history = result.history
    B, T = len(pairs), history[-1]["seq_len"]
    return {"trained_params": int(config.prompt_length * lm.config.d_model), "prompt_length": config.prompt_length,
            "prefix_slots": tune.tuning_layout(lm, config).n_fixed,
            "remat": config.remat, "remat_resolved": tune.step.resolve_remat(config.remat, lm.config, B, T),
            "batch": [B, T, history[-1]["head_rows"]],
            "first_step_s": history[0]["step_time_s"], "compilations": result.metadata["compilations"],
            "step_times_s": [h["step_time_s"] for h in history[1:]],
            "timed_steps_compiled": sum(bool(h["compiled"]) for h in history[1:]),
            "losses": [h["loss"] for h in history]}


def sft_loss(params, *, graphdef, batch):
    """Mean cross-entropy over the target tokens, as the soft prompt's loss, but of all parameters."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    model = nnx.merge(graphdef, params)
    prefix = model.embed(batch["prefix_tokens"][0])  # BOS, if any: these rows have no prompt slots
    hidden = model.prefixed_rows(prefix, model.embed(batch["tokens"]), batch["valid"])  # [B, T, D]
    picked = hidden[batch["target_row"], batch["target_index"]]  # [N, D]
    losses = optax.softmax_cross_entropy_with_integer_labels(model.logits(picked), batch["target_ids"])  # [N]
    mask = batch["target_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(mask.sum(), 1.0)


def full_sft_steps(lm, pairs, steps: int) -> dict:
    """Full fine-tuning: AdamW over every parameter, one jitted pure step, params and state donated."""
    import functools
    import time

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from spt_jax import tune

    layout = dataclasses.replace(tune.tuning_layout(lm, tune.TuneConfig()), prompt_length=0)  # no prompt slots
    encoder = tune.ExampleEncoder(lm.tokenizer, pairs, layout)
    longest = max(layout.row_length(encoder(i)) for i in range(len(pairs)))
    n_targets = sum(len(encoder(i).target_ids) for i in range(len(pairs)))
    # padded to the longest row and the head to the batch's targets, as tuning fits them
    layout = dataclasses.replace(layout, buckets=(longest,), head_rows=-(-n_targets // len(pairs)) * len(pairs))
    batch = tune.ExampleEncoder(lm.tokenizer, pairs, layout).batch(range(len(pairs)))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, params = nnx.split(lm.model)  # the model as a pure pytree of its parameters
    optimizer = optax.adamw(SFT_LEARNING_RATE)
    opt_state = optimizer.init(params)

    loss_fn = functools.partial(sft_loss, graphdef=graphdef)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch=batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))  # waits for the step
        times.append(time.perf_counter() - t0)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    (B, H), T = batch["prefix_tokens"].shape, batch["tokens"].shape[1]
    return {"trained_params": int(n_params), "prefix_slots": int(H),
            "batch": [int(B), int(H + T), int(batch["target_ids"].shape[0])],
            "first_step_s": times[0], "compilations": 1, "step_times_s": times[1:], "timed_steps_compiled": 0,
            "losses": losses}


def worker(args) -> int:
    from spt_jax import tasks

    lm = common.load(args.models[0])
    config = lm.config
    out = dict(method=args.worker, model=args.models[0], n_params=int(lm.n_params), d_model=config.d_model,
               vocab_size=config.vocab_size, tie_embeddings=bool(config.tie_embeddings),
               learned_positions=config.position == "learned", max_positions=config.max_position_embeddings)
    loaded = common.rss_mib()
    reset = common.reset_peak_rss()
    pairs = fixed_batch(tasks.get_task(args.task), args.batch_size)
    if args.worker == "full_sft":
        out.update(full_sft_steps(lm, pairs, args.steps))  # donates (and so deletes) the loaded weights
    else:
        out.update(soft_prompt_steps(lm, pairs, args.steps, remat="full" if args.worker.endswith("_full") else None))
    after = common.rss_mib()
    out.update(rss_after_load_mib=loaded["rss_mib"], peak_reset_after_load=reset,
               peak_training_mib=after["peak_mib"] if reset else None,
               peak_process_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(args.result).write_text(json.dumps(out), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------------------------
# the parent: workers, then arithmetic, then files


def body_params(w: dict) -> int:
    """N: the parameters every token passes through (no embedding table, no untied head)."""
    table = w["vocab_size"] * w["d_model"]
    return w["n_params"] - table * (1 if w["tie_embeddings"] else 2) - (
        w["max_positions"] * w["d_model"] if w["learned_positions"] else 0)


def flops_per_step(w: dict) -> dict:
    B, T, R = w["batch"]
    S = w["prefix_slots"] + B * (T - w["prefix_slots"])  # the shared prefix once, then each row's text
    N, head = body_params(w), w["d_model"] * w["vocab_size"]
    if w["method"] == "full_sft":
        factor, head_factor, formula = 6, 6, "6 N S + 6 D V R"
    else:
        factor, head_factor = 4 + 2 * (w["remat_resolved"] == "full"), 4  # "dots" stores every matmul's output
        formula = f"{factor} N S + 4 D V R (remat {w['remat_resolved']})"
    return {"N": N, "tokens": S, "head_rows": R, "formula": formula,
            "flops": factor * N * S + head_factor * head * R}


def run_worker(model: str, method: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "worker.json"
        command = [sys.executable, __file__, "--worker", method, "--models", model, "--task", args.task,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--result", str(result)]
        common.log(f"{model} / {method}: {args.steps} timed steps in a fresh process")
        done = subprocess.run(command, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=WORKER_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"the {method} worker for {model} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
        return json.loads(result.read_text(encoding="utf-8"))


def measure(w: dict) -> dict:
    """One worker's record plus the derived numbers: FLOPs, median step time, achieved rate."""
    times = w["step_times_s"]
    median = statistics.median(times)
    flops = flops_per_step(w)
    return {**w, "flops_per_step": flops, "median_step_s": median, "min_step_s": min(times),
            "achieved_gflops": flops["flops"] / median / 1e9}


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = (("trained_params", "trained parameters", True), ("flops", "FLOPs per step (analytic)", True),
              ("median_step_s", "wall time per step (s)", False), ("peak", "peak RSS in training (MiB)", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.6))
    for ax, (key, title, log_scale) in zip(axes, panels):
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            values = []
            for model in models:
                r = next(r for r in rows if r["model"] == model and r["method"] == method)
                values.append({"flops": r["flops_per_step"]["flops"],
                               "peak": r["peak_training_mib"] or r["peak_process_mib"]}.get(key, r.get(key)))
            ax.bar([i + (j - (len(methods) - 1) / 2) * width for i in range(len(models))], values, width=width,
                   color=COLORS[method], label=method.replace("_", " "))
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_title(title, fontsize=10)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(data: dict) -> str:
    s = data["settings"]
    table = []
    for r in data["rows"]:
        f = r["flops_per_step"]
        peak = r["peak_training_mib"]
        table.append([r["model"], r["method"].replace("_", " "), f"{r['trained_params']:,}",
                      f"{r['trained_params'] / r['n_params']:.2e}", "x".join(map(str, r["batch"])),
                      f"{f['flops'] / 1e9:.0f} G ({f['formula']})", f"{r['median_step_s']:.2f} s",
                      f"{r['achieved_gflops']:.0f}", f"{r['first_step_s']:.1f} s",
                      "-" if peak is None else f"{peak:.0f}", f"{r['rss_after_load_mib']:.0f}",
                      "-" if peak is None else f"{peak - r['rss_after_load_mib']:.0f}",
                      f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"])
    ratios = []
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        of_model = {r["method"]: r for r in data["rows"] if r["model"] == model}
        sft = of_model["full_sft"]
        for method, spt in of_model.items():
            if method == "full_sft":
                continue
            peak = added = "-"
            if spt["peak_training_mib"] is not None and sft["peak_training_mib"] is not None:
                peak = f"{sft['peak_training_mib'] / max(spt['peak_training_mib'], 1):.1f}x"
                extra = [r["peak_training_mib"] - r["rss_after_load_mib"] for r in (sft, spt)]
                added = f"{extra[0] / max(extra[1], 1):.1f}x"
            ratios.append([model, f"full SFT / {method.replace('_', ' ')}",
                           f"{sft['trained_params'] / spt['trained_params']:,.0f}x",
                           f"{sft['flops_per_step']['flops'] / spt['flops_per_step']['flops']:.2f}x",
                           f"{sft['median_step_s'] / spt['median_step_s']:.2f}x", peak, added])
    lines = [common.summary_head("(e) Soft-prompt tuning vs full supervised fine-tuning: cost", data,
                                 data["wall_time_s"]),
             f"One fixed batch of {s['batch_size']} `{s['task']}` train examples; {s['steps']} timed steps after "
             "the compiling one, each method in a fresh process; float32 on CPU. soft prompt: the library's "
             "defaults (remat 'auto', resolved per batch shape); remat full: every layer recomputed. B x T x R: batch, padded row "
             "length (the soft prompt's rows carry its P = 10 slots), head rows. Peak: VmHWM reset after "
             "the model loaded (what training added, on top of the loaded model's RSS; a lower bound, since "
             "training may first reuse pages the loader freed but the process kept).", "",
             "FLOPs per step, N = parameters every token passes through (not the embedding table), S = H + B (T - H) "
             "slots a step runs (the rows' shared H-slot prefix, BOS and the prompt, once): full SFT "
             "`6 N S + 6 D V R`; soft prompt `(4 + 2 r) N S + 4 D V R` (no weight gradients; r = 1 under "
             "remat 'full', which recomputes every layer's matmuls in the backward; 0 under 'dots', which "
             "stores their outputs). Attention's T^2 terms omitted.", "",
             common.md_table(["model", "method", "trained params", "share of model", "B x T x R", "FLOPs / step",
                              "wall / step (median)", "GFLOP/s", "first step (compile)", "peak MiB in training",
                              "RSS after load MiB", "added by training MiB", "loss"], table), "",
             common.md_table(["model", "ratio", "trained params", "FLOPs / step", "wall / step",
                              "peak in training", "added by training"], ratios), ""]
    lines += [f"![{p}]({p})" for p in data["plots"]]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    clock = common.Stopwatch()
    with common.results_folder(args.out, NAME + ("_quick" if args.quick else "")) as out:
        rows = [measure(run_worker(model, method, args)) for model in args.models for method in args.methods]
        for r in rows:
            common.log(f"{r['model']} / {r['method']}: {r['median_step_s']:.2f} s/step, peak "
                       f"{r['peak_training_mib'] or r['peak_process_mib']:.0f} MiB")
        data = {**common.run_header(NAME, args), "rows": rows, "wall_time_s": clock.seconds, "plots": ["cost.png"]}
        plot(rows, out / "cost.png")
        return common.finish(out, NAME, data, summary_markdown(data))


if __name__ == "__main__":
    args = parse_args()
    common.main(lambda: worker(args) if args.worker else run(args), NAME)
