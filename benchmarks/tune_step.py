"""Prompt-tuning step time: spt_jax vs Hugging Face PEFT (PyTorch), and vs the float32 compute bound.

Setup (the protocol's): an embedded model in float32 (``--model``: SmolLM2-135M-Instruct, the
default, or Gemma-3-270M), batch 8, P=10 soft-prompt vectors + 64 input tokens, answers of 1..8
tokens (EOS included). Both sides use the same weights: the embedded GGUF, dequantized by spt_jax and
by transformers (``gguf_file=``); without the embedded SmolLM2, a random SmolLM2-135M-shaped Llama
saved once with ``save_pretrained`` (step time does not depend on weight values). Same token ids, same thread count. PEFT pads a batch to its
longest row and projects every position onto the vocabulary; spt_jax pads to the bucket `tune`
fits to the run's batches (for one batch: its longest row), projects only the target positions, and
recomputes activations only when they would pass its memory budget (``remat="auto"``).

Compute bound: the FLOPs one step must do (forward, plus backward to the inputs only: the weights
are frozen; the rows' shared prefix, BOS and the prompt, once, as spt_jax runs it), the layers' at
the float32 rate a library reaches on the layers' own matmul shapes and the vocabulary head's at its
rate on the head's shape (each shape with its weight stored either way, the faster), each part at
the faster library's rate: XLA (jitted) or PyTorch (its CPU GEMM library), both sampled between the
steps; the script says which. Those rates are the libraries' best, each weight hot in cache from the
call before. A step reads every layer's weights once per pass, from memory: the script also samples
the layers' GEMMs walking over L layers' distinct weights (the "cold-weight" rate, what a step's
matmuls can reach) and prints the step against that bound too, for what bounds the ratio.

Targets: spt_jax step <= 0.7x PEFT's; <= 1.3x the compute bound. Run: ``python benchmarks/tune_step.py
[--model gemma3-270m]`` (``--steps N`` timed steps, default 10; ``--threads N`` for PyTorch, default:
the core count).
"""

from __future__ import annotations

from machine import machine_line  # benchmarks/ is sys.path[0] when a script runs

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

B, P, INPUT_LEN, MAX_ANSWER = 8, 10, 64, 8
DEFAULT_MODEL, MODELS = "smollm2-135m-instruct", ("smollm2-135m-instruct", "gemma3-270m")
SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M-Instruct config.json
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def make_checkpoint(directory: Path) -> None:
    """A random SmolLM2-135M-shaped checkpoint with a tiny tokenizer (the benchmark feeds ids)."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tune_support import char_tokenizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M))
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)


@dataclasses.dataclass(frozen=True)
class Specials:
    """The token ids both sides build rows from, as spt_jax read them from the model's own metadata
    (transformers' GGUF loader keeps them in the tokenizer, not in the model config)."""

    bos: int
    eos: int
    pad: int
    vocab: int

    @classmethod
    def of(cls, lm) -> Specials:
        """From `spt_jax.sequence`, which owns BOS/EOS/pad resolution for every model."""
        from spt_jax import sequence as seq

        eos = seq.eos_ids(lm)
        if lm.config.bos_token_id is None or not eos:
            raise SystemExit(f"{lm.name} has no BOS or EOS id (bos {lm.config.bos_token_id}, eos {eos})")
        return cls(bos=lm.config.bos_token_id, eos=eos[0], pad=seq.pad_id(lm), vocab=lm.config.vocab_size)


def make_rows(specials: Specials, seed: int = 0):
    """B rows of token ids: 64 input ids, 1..8 answer ids (the last is EOS), drawn from ids >= 10 (step
    time does not depend on which; for Gemma some are its unused or control tokens)."""
    rng = np.random.default_rng(seed)
    ordinary = lambda n: (rng.integers(10, specials.vocab, n)).tolist()  # noqa: E731
    return [(ordinary(INPUT_LEN), ordinary(rng.integers(1, MAX_ANSWER)) + [specials.eos]) for _ in range(B)]


def time_calls(fn, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def load_models(tmp: Path, name: str):
    """(our LM, the same weights as a transformers model, where they came from)."""
    import torch
    import transformers

    from spt_jax import models

    try:
        from spt_jax.models import embedded

        path = embedded.embedded_gguf_path(name)
        lm = models.load(name, dtype="float32")
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        return lm, torch_model, f"embedded {name} GGUF, dequantized"
    except Exception as e:  # SmolLM2 is optional: same-shape random weights time the same
        if name != DEFAULT_MODEL:
            raise SystemExit(f"embedded {name} unavailable: {type(e).__name__}: {str(e)[:200]}")
        print(f"(embedded {name} unavailable: {type(e).__name__}: {str(e)[:120]}; "
              "using random weights)", file=sys.stderr)
    make_checkpoint(tmp)
    torch_model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return models.load(tmp), torch_model, "random SmolLM2-135M-shaped weights"


def spt_jax_step(lm, rows, specials: Specials):
    """(batch, one_step, train_step) for spt_jax's jitted train step on one device."""
    import jax

    from spt_jax import tune
    from spt_jax.sequence import Encoded, Layout, closed_buckets, fit_buckets, round_up
    from spt_jax.tune.mesh import replicated

    config = tune.TuneConfig(prompt_length=P, batch_size=B)  # remat="auto", as `tune` runs it
    encoded = [Encoded((*inp,), (*ans,), 0) for inp, ans in rows]
    layout = Layout(bos=(specials.bos,), eos=(), pad_id=specials.pad, prompt_length=P, max_length=512,
                    buckets=(512,))
    # the buckets and head rows `tune` fits to a run's batches (here: one batch, so its own longest
    # row and its own target tokens, rounded up to a multiple of the batch size)
    buckets = closed_buckets(fit_buckets([max(map(layout.row_length, encoded))]), 512)
    head_rows = round_up(sum(len(e.target_ids) for e in encoded), B)
    batch = dataclasses.replace(layout, buckets=buckets, head_rows=head_rows).training_batch(encoded)
    mesh = tune.make_mesh(1, 1, devices=jax.devices()[:1])
    step = tune.make_train_step(lm, config, mesh)
    prompt = jax.device_put(tune.init_prompt(lm, config), replicated(mesh))
    state = {"prompt": prompt, "opt": jax.jit(step.init, out_shardings=replicated(mesh))(prompt)}

    def one_step():
        state["prompt"], state["opt"], metrics = step(state["prompt"], state["opt"], lm.params, batch)
        jax.block_until_ready(metrics["loss"])

    return batch, one_step, step


def peft_step(base, rows, specials: Specials, threads: int):
    """(one_step, padded length) for PEFT prompt tuning with AdamW, right-padded to the longest row."""
    import peft
    import torch

    torch.set_num_threads(threads)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-2, weight_decay=0.0)
    longest = max(1 + len(i) + len(a) for i, a in rows)
    ids = torch.full((B, longest), specials.pad)
    mask = torch.zeros((B, longest), dtype=torch.long)
    labels = torch.full((B, longest), -100)
    for b, (inp, ans) in enumerate(rows):
        seq = [specials.bos, *inp, *ans]
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        labels[b, len(seq) - len(ans) : len(seq)] = torch.tensor(ans)

    def one_step():
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    return one_step, longest


def step_flops(config, prefix: int, T: int, n_targets: int) -> tuple[float, float]:
    """Forward + backward-to-inputs FLOPs of one step, (layers, vocabulary head): a ``prefix``-slot
    prefix once, then B rows of T text slots (matmuls and attention); the last layer's output
    projection and MLP at the ``n_targets`` head rows only, as the loss reads them."""
    D, H, K, d, F, L, V = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                           config.d_ff, config.n_layers, config.vocab_size)
    tokens = prefix + B * T
    qkv, rest = D * H * d + 2 * D * K * d, H * d * D + 3 * D * F  # per slot: q, k, v; o and the MLP
    linear = 2 * (L * tokens * qkv + ((L - 1) * tokens + n_targets) * rest)
    # scores and weighted values, full (masked) rectangles: the prefix over itself, rows over both
    attention = 2 * 2 * L * H * d * (prefix * prefix + B * T * (prefix + T))
    head = 2 * n_targets * D * V
    # backward to the inputs: one matmul per linear (dX = dY W^T), two per attention product
    return 2 * linear + 3 * attention, 2 * head


def _layer_shapes(config, M: int) -> list[tuple[int, int, int]]:
    """``(rows, in, out)`` of one layer's weight matmuls at M rows: q, k, v, o, gate, up, down."""
    D, H, K, d, F = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff
    return [(M, D, H * d), (M, D, K * d), (M, D, K * d), (M, H * d, D), (M, D, F), (M, D, F), (M, F, D)]


def _operands(rng, x: np.ndarray, k: int, n: int):
    """x, a random W [in, out], and the same W stored [out, in]."""
    w = rng.standard_normal((k, n), np.float32)
    return x, w, np.ascontiguousarray(w.T)


def _rate_samplers(groups, calls: int):
    """``{library: sample}`` over ``groups`` of ``(x, W [in, out], W [out, in])`` numpy operands:
    ``sample()`` times every operand set in both weight layouts (``x @ W`` and ``x @ W.T``), each
    form's best of ``calls`` back-to-back calls, keeps the faster form, and returns each group's
    FLOP/s. XLA's matmuls are jitted up front, PyTorch's run on the benchmark's threads."""
    import jax
    import jax.numpy as jnp
    import torch

    in_out, out_in = jax.jit(lambda x, w: x @ w), jax.jit(lambda x, wt: x @ wt.T)
    runs = {  # (x @ W, x @ W.T from the [out, in] copy, conversion from numpy)
        "XLA": (lambda x, w, wt: in_out(x, w).block_until_ready(),
                lambda x, w, wt: out_in(x, wt).block_until_ready(), jnp.asarray),
        "PyTorch": (lambda x, w, wt: torch.matmul(x, w), lambda x, w, wt: torch.matmul(x, wt.T), torch.from_numpy),
    }

    def sampler(*forms_and_convert):
        *forms, convert = forms_and_convert
        placed = [[tuple(map(convert, ops)) for ops in group] for group in groups]
        for ops in (ops for group in placed for ops in group):
            for form in forms:
                form(*ops)  # compiles XLA's; warms both
        flops = [sum(2 * x.shape[0] * x.shape[1] * w.shape[1] for x, w, _ in group) for group in placed]

        def faster_form_seconds(ops) -> float:
            return min(min(time_calls(lambda: form(*ops), calls)) for form in forms)

        def sample() -> tuple[float, ...]:
            return tuple(f / sum(faster_form_seconds(ops) for ops in group) for f, group in zip(flops, placed))

        return sample

    return {library: sampler(*run) for library, run in runs.items()}


def gemm_rate_samplers(config, M: int, n_targets: int):
    """``{library: sample}``: each ``sample()`` measures that library's float32 FLOP/s on this model's
    matmul shapes, ``(layers' rate, head's rate)``: one layer's shapes at M rows weighted by their
    FLOPs, and the vocabulary head at the target rows. Each shape is timed with its weight stored
    both ways, ``[in, out]`` (``x @ W``) and ``[out, in]`` (``x @ W.T``, a tied head's and
    ``torch.nn.Linear``'s layout), each form's best of three back-to-back calls (threads awake and the
    weight in cache, as fast as the library goes), and the faster form counts: on the head's shapes
    XLA's ``x @ W.T`` runs about twice as fast as ``x @ W`` (BUILD_NOTES.md, issue 11)."""
    rng = np.random.default_rng(0)
    layers = [_operands(rng, rng.standard_normal((m, k), np.float32), k, n) for m, k, n in _layer_shapes(config, M)]
    head = _operands(rng, rng.standard_normal((n_targets, config.d_model), np.float32), config.d_model,
                     config.vocab_size)
    return _rate_samplers([layers, [head]], calls=3)


def cold_layer_rate_samplers(config, M: int):
    """``{library: sample}``: the layers' float32 FLOP/s as a step meets their weights, ``(rate,)``:
    every layer's shapes at M rows with weights of its own (L distinct sets, ~4 bytes a parameter
    per layout), each matmul called once a sample, so each weight comes from memory, not from the
    cache the previous call left it in. Why a step's matmuls run below `gemm_rate_samplers`' rate."""
    rng = np.random.default_rng(1)
    shapes = _layer_shapes(config, M)
    inputs = [rng.standard_normal((m, k), np.float32) for m, k, _ in shapes]
    return _rate_samplers([[_operands(rng, x, k, n) for _ in range(config.n_layers)
                            for x, (_, k, n) in zip(inputs, shapes)]], calls=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    args = parser.parse_args()
    print(machine_line(), flush=True)  # the CPU kind this result holds for
    from spt_jax.tune import TuneConfig
    from spt_jax.tune.step import resolve_remat  # what the step recomputes at this shape

    with tempfile.TemporaryDirectory() as tmp:
        lm, torch_model, source = load_models(Path(tmp), args.model)
    specials = Specials.of(lm)
    rows = make_rows(specials)
    batch, ours_step, train_step = spt_jax_step(lm, rows, specials)
    theirs_step, peft_len = peft_step(torch_model, rows, specials, args.threads)
    t0 = time.perf_counter()
    ours_step()  # compiles
    compile_s = time.perf_counter() - t0
    theirs_step()  # warm-up
    prefix, T, N = batch["prefix_tokens"].shape[1], batch["tokens"].shape[1], batch["target_ids"].shape[0]
    samplers = gemm_rate_samplers(lm.config, prefix + B * T, N)
    # Interleaved, so a change in machine load while measuring hits all of them alike.
    layer_flops, head_flops = step_flops(lm.config, prefix, T, N)
    ours, theirs, rates = [], [], {library: [] for library in samplers}
    for _ in range(args.steps):
        ours += time_calls(ours_step, 1)
        theirs += time_calls(theirs_step, 1)
        for library, sample in samplers.items():  # each library's best of three samples, per part
            samples = [sample() for _ in range(3)]
            rates[library].append(tuple(max(r[part] for r in samples) for part in (0, 1)))
    compilations = train_step.compilations
    # After the steps, so its L sets of weights (~1.7 GB for SmolLM2) are not in memory while they run.
    cold_rates = {library: [sample()[0] for _ in range(3)]
                  for library, sample in cold_layer_rate_samplers(lm.config, prefix + B * T).items()}

    # The bound at the best rate any library reached for each part (layers, head), sample by sample.
    fastest = [max(rates, key=lambda library: statistics.median(r[part] for r in rates[library])) for part in (0, 1)]
    best = [tuple(max(r[i][part] for r in rates.values()) for part in (0, 1)) for i in range(args.steps)]
    bounds = [layer_flops / layers_rate + head_flops / head_rate for layers_rate, head_rate in best]
    n_targets = int(batch["target_mask"].sum())
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    bound_s, best_bound_s = statistics.median(bounds), min(bounds)
    print(f"{args.model} ({source}), float32, batch {B}, P={P} + {INPUT_LEN} input tokens, "
          f"answers <= {MAX_ANSWER} "
          f"tokens ({n_targets} target tokens); {os.cpu_count()} cores, torch threads {args.threads}")
    print(f"spt_jax : {ours_s * 1e3:8.1f} ms/step (median of {args.steps}; min {min(ours) * 1e3:.1f}), "
          f"padded length {prefix + T} (fitted bucket; the {prefix}-slot prefix run once, then {B} x {T} "
          f"text slots), head rows {N}, first call {compile_s:.1f} s, compilations {compilations}, "
          f"remat {resolve_remat(TuneConfig().remat, lm.config, B, prefix + T)}")
    print(f"PEFT    : {theirs_s * 1e3:8.1f} ms/step (median of {args.steps}; min {min(theirs) * 1e3:.1f}), "
          f"length {P + peft_len} (prompt + longest row)")
    print("GEMM rate on the model's shapes, float32, median (layers; head): " + ", ".join(
        f"{library} {statistics.median(r[0] for r in samples) / 1e9:.1f}; "
        f"{statistics.median(r[1] for r in samples) / 1e9:.1f} GFLOP/s" for library, samples in rates.items()))
    print(f"compute bound: {layer_flops / 1e9:.1f} GFLOP of layers at {fastest[0]}'s rate + {head_flops / 1e9:.1f} "
          f"of head at {fastest[1]}'s = {bound_s * 1e3:.1f} ms median, {best_bound_s * 1e3:.1f} ms best")
    # Not the target's bound: the rate a step's matmuls can reach, each layer's weights read from memory.
    cold = {library: statistics.median(r) for library, r in cold_rates.items()}  # median of 3 samples
    cold_fastest = max(cold, key=cold.get)
    cold_bound_s = layer_flops / cold[cold_fastest] + head_flops / statistics.median(head for _, head in best)
    print(f"layers' GEMMs over {lm.config.n_layers} layers' own weights, each called once (weights cold in cache, "
          f"as a step meets them), median: " + ", ".join(f"{library} {rate / 1e9:.1f}" for library, rate in cold.items())
          + f" GFLOP/s; the bound at {cold_fastest}'s = {cold_bound_s * 1e3:.1f} ms, ratio {ours_s / cold_bound_s:.2f}")
    # Medians and best-of-N both: on a shared machine the best times are the ones least disturbed.
    print(f"ratio spt_jax / PEFT  = {ours_s / theirs_s:.2f} median, {min(ours) / min(theirs):.2f} best  "
          "(target <= 0.70)")
    print(f"ratio spt_jax / bound = {ours_s / bound_s:.2f} median, {min(ours) / best_bound_s:.2f} best  "
          "(target <= 1.30)")
    print(f"SUMMARY tune_step {args.model}: spt_jax {ours_s * 1e3:.0f} ms, PEFT {theirs_s * 1e3:.0f} ms, "
          f"ratio {ours_s / theirs_s:.2f} (target <= 0.70); bound ({' / '.join(fastest)}) ratio {ours_s / bound_s:.2f} "
          f"(target <= 1.30); cold-weight bound ratio {ours_s / cold_bound_s:.2f}")


if __name__ == "__main__":
    main()
