"""Fault injection: every kind of bad input or machine fault ends as ONE line on stderr with the
documented exit code (README: exit codes), never a traceback, and nothing of the user's earlier
results or checkpoints is lost or silently replaced.

The table `CASES` holds one entry per case: how to build it, the exit code, what the line must say,
and what it did before this suite existed (``before``, from issue #8; ``python tests/test_faults.py``
prints the tally). Every case asserts the exit code, a single stderr line without a traceback, and
that the results folder (and the checkpoint directory, if any) is exactly as it was. Then: runs
killed with SIGKILL at random moments resume to the uninterrupted result, a second writer is
refused by the lock, and a real SIGINT exits 130. Disk-full and read-only cases use a small tmpfs
(root only; skipped elsewhere, with the reason).
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import gc
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from spt_jax import cli
from spt_jax import evaluate as ev
from test_cli import write_task
from test_evaluate import make_tiny_lm

ROOT = Path(__file__).resolve().parents[1]
REAL_LOAD = cli.load_model
QUICK_EVAL = ["--modes", "zero_shot", "--n-test", "2", "--no-loglik", "--batch-size", "2", "--quiet"]
QUICK_TUNE = ["--steps", "2", "--tune-batch-size", "2", "--prompt-length", "2", "--eval-every", "0", "--quiet"]


# --------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_lm()


@pytest.fixture
def fake_load(monkeypatch, tiny_model):
    """cli.load_model returns the tiny model (or what ``fake_load.model`` is set to)."""

    class Loader:
        model = tiny_model
        calls = 0

        def __call__(self, name, *, dtype="float32", log=None):
            Loader.calls += 1
            return self.model

    loader = Loader()
    monkeypatch.setattr(cli, "load_model", loader)
    return loader


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` with a hash of each file's bytes (empty when ``root`` is absent)."""
    if not root.exists():
        return {}
    if not root.is_dir():
        return {".": hashlib.sha1(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv, capfd) -> Outcome:
    """``spt-jax ARGV`` in-process; stderr captured at the file descriptor (Orbax's threads too)."""
    code = cli.main([str(a) for a in argv])
    captured = capfd.readouterr()
    return Outcome(code, captured.out, captured.err)


def assert_one_line(outcome: Outcome, code: int, *needles: str) -> None:
    err = outcome.err
    assert outcome.code == code, (outcome.code, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.count("\n") == 1 and err.startswith("spt-jax: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def old_results(folder: Path, kind: str = "run") -> Path:
    """A folder as a finished command leaves it (contents are placeholders: the guards read names)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"run": [ev.RESULTS_FILE, ev.PREDICTIONS_FILE, ev.PROMPT_FILE, ev.REPORT_FILE],
             "tune": [ev.TUNING_FILE, ev.PROMPT_FILE, "tuning_curve.png"],
             "compare": [ev.COMPARE_FILE, "compare.md"],
             "partial": [ev.PREDICTIONS_FILE, "metrics_by_mode.png"]}[kind]
    for name in files:
        (folder / name).write_text(f"{kind} {name} from an earlier run\n")
    if kind == "compare":
        old_results(folder / "tiny" / "toy_file")
    return folder


# --------------------------------------------------------------------------------------------------
# the case table


@dataclasses.dataclass(frozen=True)
class Case:
    """``make(tmp) -> argv`` builds the inputs; the command must exit ``code`` with one line holding
    ``needles``, leaving ``tmp/r`` (results) and ``tmp/ck`` (checkpoints) as they were."""

    name: str
    make: Callable[[Path], list]
    code: int
    needles: tuple[str, ...]
    before: str  # what the command did before issue #8: clean, traceback, wrong-code, silent, lost, misleading
    fake_model: bool = True  # False: the real loader reads the --model file
    root_only: bool = False  # needs a tmpfs
    absent: tuple[str, ...] = ()  # what the line must not say
    created: tuple[str, ...] = ()  # entries the command may create (under tmp), e.g. an asked-for directory


CASES: list[Case] = []


def case(name, code, needles, before, **kw):
    def register(make):
        CASES.append(Case(name, make, code, tuple(needles), before, **kw))
        return make

    return register


def _task(tmp: Path, **kw) -> Path:
    return write_task(tmp, **kw)


def _eval(tmp: Path, *extra, task=None, model="tiny") -> list:
    return ["eval", "--model", model, "--task", task or _task(tmp), "--out", tmp / "r", *QUICK_EVAL, *extra]


def _tune(tmp: Path, *extra, task=None) -> list:
    return ["tune", "--model", "tiny", "--task", task or _task(tmp), "--out", tmp / "r", *QUICK_TUNE, *extra]


# --- text that is not UTF-8: file, line and byte offset ---------------------------------------------


def _bad_jsonl(tmp):
    task = _task(tmp)
    good = (tmp / "test.jsonl").read_bytes().splitlines(keepends=True)
    (tmp / "test.jsonl").write_bytes(b"".join(good[:2]) + b'{"id": "caf\xe9"}\n' + b"".join(good[2:]))
    return _eval(tmp, task=task)


case("jsonl not utf-8", 2, [r"test.jsonl, line 3 (byte offset", "not UTF-8"], "traceback")(_bad_jsonl)


def _offset_of_bad_byte(tmp):
    # the offset must be the exact byte: two good lines, then 'caf' and the bad byte
    task = _task(tmp)
    lines = (tmp / "test.jsonl").read_bytes().splitlines(keepends=True)
    (tmp / "test.jsonl").write_bytes(lines[0] + lines[1] + b'{"id": "caf\xe9"}\n')
    offset = len(lines[0]) + len(lines[1]) + len(b'{"id": "caf')
    (tmp / "offset.txt").write_text(str(offset))
    return _eval(tmp, task=task)


case("jsonl byte offset is exact", 2, ["(byte offset"], "traceback")(_offset_of_bad_byte)


def _bad_csv(tmp):
    def edit(spec):
        spec["source"] = {"type": "csv", "path": "{split}.csv", "fields": {"choices": ["c1", "c2"]}}

    task = _task(tmp, edit=edit)
    for split in ("train", "validation", "test"):
        rows = ["id,question,c1,c2,answer"] + [f"q{i},{i}+1?,{i + 1},{i + 2},A" for i in range(12)]
        data = ("\n".join(rows) + "\n").encode()
        if split == "test":
            data = data.replace(b"q3,", b"q3\xff,")
        (tmp / f"{split}.csv").write_bytes(data)
    return _eval(tmp, task=task)


case("csv not utf-8", 2, ["test.csv, line 5 (byte offset", "not UTF-8"], "traceback")(_bad_csv)


def _bad_task_yaml(tmp):
    task = _task(tmp)
    task.write_bytes(task.read_bytes().replace(b"tiny sums", b"tiny \xc3\x28sums"))
    return _eval(tmp, task=task)


case("task yaml not utf-8", 2, ["toy_file.yaml, line", "not UTF-8"], "traceback")(_bad_task_yaml)


def _bad_task_json(tmp):
    task = _task(tmp)
    spec = yaml.safe_load(task.read_text())
    path = tmp / "toy_file.json"
    path.write_bytes(json.dumps(spec).encode().replace(b"tiny sums", b"tiny \x80sums"))
    return _eval(tmp, task=path)


case("task json not utf-8", 2, ["toy_file.json, line 1", "not UTF-8"], "traceback")(_bad_task_json)


def _bad_compare_config(tmp):
    config = tmp / "cmp.yaml"
    config.write_bytes(b"models: [tiny]\ntasks: [caf\xe9]\n")
    return ["compare", config, "--out", tmp / "r", "--quiet"]


case("compare config not utf-8", 2, ["cmp.yaml, line 2", "not UTF-8"], "traceback")(_bad_compare_config)


def _hf_dir(tmp, config: dict | bytes, weights: dict | None = None) -> Path:
    model = tmp / "hf"
    model.mkdir()
    (model / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    for name, data in (weights or {"model.safetensors": b"junk"}).items():
        (model / name).write_bytes(data)
    return model


_LLAMA = {"model_type": "llama", "vocab_size": 259, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
          "max_position_embeddings": 64}


def _hf_case(config, weights=None):
    return lambda tmp: _eval(tmp, model=_hf_dir(tmp, config, weights))


case("hf config.json not utf-8", 2, ["config.json, line 1", "not UTF-8"], "traceback", fake_model=False)(
    _hf_case(json.dumps(_LLAMA).encode().replace(b"llama", b"ll\xffama", 1)))

# --- model configs -------------------------------------------------------------------------------------

case("heads not divisible by kv heads", 2, ["n_heads=3 must be a multiple of n_kv_heads=2"], "traceback",
     fake_model=False)(_hf_case({**_LLAMA, "hidden_size": 96, "num_attention_heads": 3}))
case("transformers refuses the config", 2, ["transformers refuses this config", "multiple of the number"],
     "traceback", fake_model=False)(_hf_case({**_LLAMA, "num_attention_heads": 3}))
case("config.json is a list", 2, ["expected a JSON object"], "traceback", fake_model=False)(_hf_case(b"[1, 2]"))
case("only a pickled .bin", 2, ["only pickle checkpoints", "runs whatever code"], "misleading", fake_model=False,
     absent=("from_pretrained",))(_hf_case(_LLAMA, {"pytorch_model.bin": b"\x80\x04pickle"}))
case("malformed safetensors index", 2, ["model.safetensors.index.json", "weight_map"], "traceback",
     fake_model=False)(_hf_case(_LLAMA, {"model.safetensors.index.json": b"[]"}))

# --- GGUF headers, field by field ----------------------------------------------------------------------

_U32, _I32, _F32, _STR, _ARR, _U64 = 4, 5, 6, 8, 9, 10


def _gguf_str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, kind: int, value) -> bytes:
    head = _gguf_str(key) + struct.pack("<I", kind)
    if kind == _STR:
        return head + _gguf_str(value)
    if kind == _ARR:
        element, items = value
        body = b"".join(_gguf_str(v) if element == _STR else struct.pack("<i", v) for v in items)
        return head + struct.pack("<IQ", element, len(items)) + body
    return head + struct.pack({_U32: "<I", _I32: "<i", _F32: "<f", _U64: "<Q"}[kind], value)


def gguf_file(path: Path, *, kvs=None, tensors=None, version=3, magic=b"GGUF", alignment=32, cut=None) -> Path:
    """A small GGUF file: metadata ``kvs``, tensor table ``tensors`` (name, dims, type, offset), data."""
    kvs = kvs if kvs is not None else [("general.architecture", _STR, "llama"), ("general.alignment", _U32, 32)]
    tensors = tensors if tensors is not None else [("token_embd.weight", (8, 4), 0, 0)]
    table = b"".join(_gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", kind, offset) for name, dims, kind, offset in tensors)
    head = magic + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(_kv(*kv) for kv in kvs) + table
    data = head + b"\0" * (-len(head) % max(alignment, 1)) + b"\0" * 128
    path.write_bytes(data[:cut] if cut is not None else data)
    return path


def _gguf_case(**kw):
    return lambda tmp: _eval(tmp, model=gguf_file(tmp / "m.gguf", **kw))


_ARCH = ("general.architecture", _STR, "llama")
case("gguf zero alignment", 2, ["'general.alignment' is 0", "power of two"], "traceback", fake_model=False)(
    _gguf_case(kvs=[_ARCH, ("general.alignment", _U32, 0)], alignment=1))
case("gguf alignment not a power of two", 2, ["'general.alignment' is 24"], "silent", fake_model=False)(
    _gguf_case(kvs=[_ARCH, ("general.alignment", _U32, 24)]))
case("gguf alignment as text", 2, ["'general.alignment' is '32'"], "silent", fake_model=False)(
    _gguf_case(kvs=[_ARCH, ("general.alignment", _STR, "32")]))
case("gguf architecture not text", 2, ["'general.architecture' is 7"], "traceback", fake_model=False)(
    _gguf_case(kvs=[("general.architecture", _U32, 7)]))
case("gguf without architecture", 2, ["no 'general.architecture'"], "clean", fake_model=False)(
    _gguf_case(kvs=[("general.alignment", _U32, 32)]))
case("gguf unknown architecture", 2, ["'lama'", "did you mean 'llama'"], "clean", fake_model=False)(
    _gguf_case(kvs=[("general.architecture", _STR, "lama")]))
case("gguf version 1", 2, ["GGUF version 1"], "clean", fake_model=False)(_gguf_case(version=1))
case("gguf bad magic", 2, ["not a GGUF file"], "clean", fake_model=False)(_gguf_case(magic=b"GGML"))
case("gguf empty file", 2, ["is empty"], "clean", fake_model=False)(_gguf_case(cut=0))
case("gguf truncated header", 2, ["truncated or corrupt"], "clean", fake_model=False)(_gguf_case(cut=40))
case("gguf nine dimensions", 2, ["9 dimensions"], "silent", fake_model=False)(
    _gguf_case(tensors=[("token_embd.weight", (1,) * 9, 0, 0)]))
def _gguf_bad_type(tmp):
    path = gguf_file(tmp / "m.gguf")
    data = path.read_bytes()
    key = _gguf_str("general.alignment")
    at = data.index(key) + len(key)
    path.write_bytes(data[:at] + struct.pack("<I", 99) + data[at + 4:])
    return _eval(tmp, model=path)


case("gguf unknown value type", 2, ["unknown metadata value type 99"], "clean", fake_model=False)(_gguf_bad_type)


case("gguf misaligned tensor", 2, ["not a multiple of the file's alignment 32"], "silent", fake_model=False)(
    _gguf_case(tensors=[("token_embd.weight", (8, 4), 0, 4)]))
case("gguf duplicate tensor", 2, ["appears twice"], "silent", fake_model=False)(
    _gguf_case(tensors=[("token_embd.weight", (2, 4), 0, 0), ("token_embd.weight", (2, 4), 0, 32)]))
case("gguf tensor past the end", 2, ["is truncated: tensor 'token_embd.weight'"], "clean", fake_model=False)(
    _gguf_case(tensors=[("token_embd.weight", (64, 64), 0, 0)]))
case("gguf unknown tensor type", 2, ["unknown ggml type id 999"], "clean", fake_model=False)(
    _gguf_case(tensors=[("token_embd.weight", (8, 4), 999, 0)]))
case("gguf block count as text", 2, ["'llama.block_count' is 'two'", "positive integer"], "traceback",
     fake_model=False)(_gguf_case(kvs=[_ARCH, ("general.alignment", _U32, 32), ("llama.block_count", _STR, "two")]))
case("gguf token types of the wrong length", 2, ["'tokenizer.ggml.token_type'"], "silent", fake_model=False)(
    _gguf_case(kvs=[_ARCH, ("general.alignment", _U32, 32), ("tokenizer.ggml.tokens", _ARR, (_STR, ["a", "b"])),
                    ("tokenizer.ggml.token_type", _ARR, (_I32, [1]))]))
case("gguf negative token id", 2, ["'tokenizer.ggml.bos_token_id' is -1"], "silent", fake_model=False)(
    _gguf_case(kvs=[_ARCH, ("general.alignment", _U32, 32), ("tokenizer.ggml.bos_token_id", _I32, -1)]))

# --- tasks validated at load -------------------------------------------------------------------------

case("targets the pattern rejects", 2, ["record test[0]", "does not match the task's format", "target_template"],
     "silent")(lambda tmp: _eval(tmp, task=_task(tmp, edit=lambda s: s.update(target_template="Answer: {answer}"))))
case("targets that parse to another answer", 2, ["parses as 'A', not the gold 'B'"], "silent")(
    lambda tmp: _eval(tmp, task=_task(tmp, edit=lambda s: (s.update(target_template="A: A or {answer}"),
                                                            s["format"].update(mode="first")))))

# --- prompt files validated at load -----------------------------------------------------------------


def _prompt_file(tmp, array, meta: str | None = None, fmt="spt_jax.prompt/1", name="p.safetensors") -> Path:
    from safetensors.numpy import save_file

    path = tmp / name
    header = {"format": fmt, "spt_jax": meta if meta is not None else json.dumps({"model": "tiny-random"})}
    save_file({"prompt": np.ascontiguousarray(array)}, str(path), metadata=header)
    return path


def _prompt_case(array=None, **kw):
    array = np.zeros((2, 32), np.float32) if array is None else array
    return lambda tmp: _eval(tmp, "--prompt", _prompt_file(tmp, array, **kw), "--modes", "soft_prompt")


case("all-NaN prompt", 2, ["64 of the prompt's 64 values are NaN"], "silent")(
    _prompt_case(np.full((2, 32), np.nan, np.float32)))
case("prompt with an infinity", 2, ["1 of the prompt's 64 values", "first at vector 1"], "silent")(
    _prompt_case(np.where(np.arange(64).reshape(2, 32) == 35, np.inf, 0.0).astype(np.float32)))
case("one-dimensional prompt", 2, ["shape (32,)"], "clean")(_prompt_case(np.zeros(32, np.float32)))
case("empty prompt", 2, ["shape (0, 32)"], "silent")(_prompt_case(np.zeros((0, 32), np.float32)))
case("integer prompt", 2, ["dtype int32"], "silent")(_prompt_case(np.zeros((2, 32), np.int32)))
case("prompt metadata not JSON", 2, ["'spt_jax' metadata is not valid JSON"], "traceback")(
    _prompt_case(meta="{broken"))
case("prompt metadata a list", 2, ["metadata is a list"], "traceback")(_prompt_case(meta="[1]"))
case("prompt of another format", 2, ["format 'other/1'"], "clean")(_prompt_case(fmt="other/1"))
case("prompt file is junk", 2, ["cannot read prompt file"], "clean")(
    lambda tmp: _eval(tmp, "--prompt", _write(tmp / "p.safetensors", b"junk"), "--modes", "soft_prompt"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _prompt_dir(tmp, with_file: bool):
    folder = tmp / "tuned"
    folder.mkdir()
    if with_file:
        _prompt_file(folder, np.zeros((2, 32), np.float32), name=ev.PROMPT_FILE)
    return _eval(tmp, "--prompt", folder, "--modes", "soft_prompt")


case("prompt is a folder", 2, ["is a folder, not a prompt file"], "misleading")(lambda t: _prompt_dir(t, False))
case("prompt is a results folder", 2, ["pass the prompt file in it", ev.PROMPT_FILE], "misleading")(
    lambda t: _prompt_dir(t, True))

# --- results folders: guards --------------------------------------------------------------------------


def _into(kind: str, command: str = "eval", *extra):
    def make(tmp):
        old_results(tmp / "r" / "x", kind)
        base = {"eval": _eval, "run": lambda t, *e: ["run", "--model", "tiny", "--task", _task(t), "--out",
                                                           t / "r", *QUICK_EVAL, "--k", "1", *e],
                "tune": _tune}[command]
        return base(tmp, "--name", "x", *extra)

    return make


case("run into a tune's folder", 2, ["already holds a tuned prompt (tuning.json)", "--overwrite"], "lost")(
    _into("tune", "run"))
case("tune into a run's folder", 2, ["already holds results (results.json)"], "lost")(_into("run", "tune"))
case("eval into a compare folder", 2, ["already holds compare results"], "lost")(_into("compare", "eval"))
case("eval into a folder of partial outputs", 2, ["partial spt_jax outputs"], "lost")(_into("partial", "eval"))
case("eval into a finished eval's folder", 2, ["already holds results"], "clean")(_into("run", "eval"))


def _compare_into_tune(tmp):
    old_results(tmp / "r" / "x", "tune")
    config = tmp / "cmp.yaml"
    config.write_text(yaml.safe_dump({"models": ["tiny"], "tasks": [str(_task(tmp))],
                                      "eval": {"modes": ["zero_shot"], "n_test": 2, "loglik": False}}))
    return ["compare", config, "--out", tmp / "r", "--name", "x", "--quiet"]


case("compare into a tune's folder", 2, ["already holds a tuned prompt"], "lost")(_compare_into_tune)


def _mixed(tmp):
    old_results(tmp / "r" / "x", "compare")
    (tmp / "r" / "x" / "tiny" / "notes.txt").write_text("the user's own notes")
    return _eval(tmp, "--name", "x", "--overwrite")


case("overwrite a folder mixing outputs and user files", 2, ["holds both spt_jax outputs and other files"],
     "lost")(_mixed)
case("--out is a file", 2, ["exists and is not a directory"], "clean")(
    lambda tmp: ["eval", "--model", "tiny", "--task", _task(tmp), "--out", _write(tmp / "r", b"x"), *QUICK_EVAL])
case("--name is a path", 2, ["--name must be a plain folder name"], "clean")(
    lambda tmp: _eval(tmp, "--name", "a/b"))
case("--out below a file", 3, ["a part of the path is a file"], "traceback")(
    lambda tmp: ["eval", "--model", "tiny", "--task", _task(tmp), "--out", _write(tmp / "f", b"x") / "r",
                 *QUICK_EVAL])

# --- checkpoint directories: another model or other settings is said as such, nothing deleted ----------


def _from_checkpoints(*extra, model=None, damage=False):
    def make(tmp):
        shutil.copytree(CHECKPOINTS, tmp / "ck")
        if damage:
            for path in (tmp / "ck").rglob("*"):
                if path.is_file():
                    path.write_bytes(b"damaged")
        if model is not None:
            cli.load_model.model = model()
        return _tune(tmp, "--checkpoint-dir", tmp / "ck", "--checkpoint-every", "1", *extra)

    return make


def wider_lm():
    """The tiny model's twin with d_model 48: the same name, prompts of another width."""
    import jax.numpy as jnp
    from flax import nnx

    from spt_jax.models import LM, DecoderLM

    tiny = make_tiny_lm()
    config = tiny.config.replace(d_model=48, n_heads=3, n_kv_heads=1)
    graphdef, params = nnx.split(DecoderLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return LM(name=tiny.name, config=config, graphdef=graphdef, params=params, tokenizer=tiny.tokenizer,
              dtype=jnp.float32)


CHECKPOINTS: Path  # set by the `checkpoints` fixture: a directory a 2-step tiny tune wrote

case("resume with another model name", 2, ["made for another model", "model 'tiny-random' there, 'other' here",
                                           "kept as it is"], "clean")(
    _from_checkpoints(model=lambda: make_tiny_lm(name="other")))
case("resume with a model of another width", 2, ["made for another model", "d_model 32 there, 48 here"],
     "misleading")(_from_checkpoints(model=wider_lm))
case("resume with another prompt length", 2, ["different settings (prompt_length)"], "misleading")(
    _from_checkpoints("--prompt-length", "3"))
case("resume with fewer steps", 2, ["past TuneConfig.steps=1"], "clean")(_from_checkpoints("--steps", "1"))
case("no checkpoint readable", 2, ["no checkpoint in it can be read", "nothing was deleted"], "misleading")(
    _from_checkpoints(damage=True))
case("checkpoint dir is a file", 2, ["is a file; name a directory"], "traceback")(
    lambda tmp: _tune(tmp, "--checkpoint-dir", _write(tmp / "ck", b"x")))
case("checkpoint dir below a file", 3, ["cannot create the checkpoint directory", "a part of the path is a file"],
     "traceback")(lambda tmp: _tune(tmp, "--checkpoint-dir", _write(tmp / "f", b"x") / "ck"))

# --- flags -------------------------------------------------------------------------------------------------

case("--checkpoint-every negative", 2, ["--checkpoint-every", "an integer >= 0"], "clean")(
    lambda tmp: _tune(tmp, "--checkpoint-every", "-1"))
case("--checkpoint-every not a number", 2, ["--checkpoint-every", "'often'"], "clean")(
    lambda tmp: _tune(tmp, "--checkpoint-every", "often"))

# --- the machine refuses a write: one line naming the folder and what to do, exit 3 ------------------

_ADVICE = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only", errno.ENOSPC: "the disk is full", errno.EDQUOT: "quota",
           errno.EIO: "I/O error", errno.ENAMETOOLONG: "too long", errno.EMFILE: "too many open files"}


def _refused_write(code: int):
    def make(tmp):
        old_results(tmp / "r" / "x")
        FAULTS.append((tmp / "r", code))  # `open` for writing under tmp/r raises OSError(code)
        return _eval(tmp, "--name", "x", "--overwrite")

    return make


FAULTS: list = []
for _code, _text in _ADVICE.items():
    case(f"write refused: {errno.errorcode[_code]}", 3, ["cannot write the results for", _text,
                                                          "is as it was"], "lost")(_refused_write(_code))

# --- a small file system: full or read-only (root only) -------------------------------------------------


def _full_disk(tmp, command="eval", overwrite=False):
    fs = mount_tmpfs(tmp / "r", "size=24k")
    if overwrite:
        old_results(fs / "x")
    extra = ["--name", "x"] + (["--overwrite"] if overwrite else [])
    if command == "eval":
        return _eval(tmp, "--modes", "zero_shot,few_shot", "--k", "1", *extra)
    return _tune(tmp, "--eval-every", "1", "--n-curve", "2", *extra)


case("disk full during eval", 3, ["No space left on device", "is as it was"], "lost", root_only=True)(_full_disk)
case("disk full during eval --overwrite", 3, ["No space left on device"], "lost", root_only=True)(
    lambda tmp: _full_disk(tmp, overwrite=True))
case("disk full during tune", 3, ["No space left on device"], "lost", root_only=True)(
    lambda tmp: _full_disk(tmp, "tune"))


def _full_checkpoints(tmp):
    mount_tmpfs(tmp / "ck", "size=12k")
    return _tune(tmp, "--checkpoint-dir", tmp / "ck" / "run", "--checkpoint-every", "1")


case("disk full under orbax", 3, ["checkpoint", "No space left on device"], "traceback",
     root_only=True, created=("ck/run",))(_full_checkpoints)


def _read_only(tmp, what="results"):
    if what == "results":
        fs = mount_tmpfs(tmp / "r", "size=64k")
        old_results(fs / "x")
        mount_tmpfs(tmp / "r", "ro,remount,size=64k")
        return _eval(tmp, "--name", "x", "--overwrite")
    mount_tmpfs(tmp / "ck", "ro,size=64k")
    return _tune(tmp, "--checkpoint-dir", tmp / "ck" / "run")


case("read-only results folder", 3, ["Read-only file system", "write somewhere writable"], "traceback",
     root_only=True)(_read_only)
case("read-only checkpoint folder", 3, ["Read-only file system", "checkpoint directory"], "traceback",
     root_only=True)(lambda tmp: _read_only(tmp, "checkpoints"))

MOUNTS: list[Path] = []


def mount_tmpfs(where: Path, options: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({done.stderr.decode().strip()})")
    if where not in MOUNTS:
        MOUNTS.append(where)
    return where


# --- Ctrl-C at any moment: exit 130, nothing half-written --------------------------------------------


def _interrupt_in_load(swallowed: bool):
    def make(tmp):
        old_results(tmp / "r" / "x")
        cli.load_model.interrupt = "swallowed" if swallowed else "raised"
        return _eval(tmp, "--name", "x", "--overwrite")

    return make


case("Ctrl-C while the model loads", 130, ["interrupted"], "clean")(_interrupt_in_load(False))
case("Ctrl-C swallowed by a gc callback", 130, ["interrupted"], "wrong-code")(_interrupt_in_load(True))


def _interrupt_in_generation(tmp):
    old_results(tmp / "r" / "x")
    GENERATE_RAISES.append(KeyboardInterrupt)
    return _eval(tmp, "--name", "x", "--overwrite")


GENERATE_RAISES: list = []
case("Ctrl-C during generation with --overwrite", 130, ["interrupted"], "lost")(_interrupt_in_generation)


def _sigint_in_generation(tmp):
    old_results(tmp / "r" / "x")
    GENERATE_RAISES.append("SIGINT")  # a real signal to this process, through the CLI's handler
    return _eval(tmp, "--name", "x", "--overwrite")


case("SIGINT during generation with --overwrite", 130, ["interrupted"], "lost")(_sigint_in_generation)


# --------------------------------------------------------------------------------------------------
# running the table


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model):
    """A checkpoint directory that the CLI's QUICK_TUNE settings resume (2 steps, one per step)."""
    global CHECKPOINTS
    from spt_jax.tune import TuneConfig, tune

    from spt_jax.tasks import get_task

    examples = get_task(str(write_task(tmp_path_factory.mktemp("task")))).examples("train")
    CHECKPOINTS = tmp_path_factory.mktemp("ckpt") / "ck"
    tune(tiny_model, examples, TuneConfig(steps=2, batch_size=2, prompt_length=2, checkpoint_every=1),
         checkpoint_dir=CHECKPOINTS, progress=False)
    return CHECKPOINTS


@pytest.fixture
def faults(monkeypatch):
    """Installs the `open` faults, gc-callback interrupts and generation interrupts cases ask for."""
    FAULTS.clear()
    GENERATE_RAISES.clear()
    real_open = builtins.open

    def faulty_open(file, mode="r", *args, **kwargs):
        for root, code in FAULTS:
            if any(c in mode for c in "wax+") and str(file).startswith(str(root)):
                raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    import spt_jax.generate

    real_generate = spt_jax.generate.generate

    def generate(*args, **kwargs):
        if GENERATE_RAISES == ["SIGINT"]:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises in this thread long before
        elif GENERATE_RAISES:
            raise GENERATE_RAISES[0]
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(builtins, "open", faulty_open)
    monkeypatch.setattr(spt_jax.generate, "generate", generate)
    yield
    for where in reversed(MOUNTS):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
    MOUNTS.clear()


def _interrupting_loader(loader, tiny_model, monkeypatch):
    """The fake loader, extended by the Ctrl-C cases: raise, or be interrupted inside a gc callback."""
    kind = getattr(loader, "interrupt", None)
    if kind is None:
        return

    def load(name, *, dtype="float32", log=None):
        if kind == "raised":
            raise KeyboardInterrupt
        handler = signal.getsignal(signal.SIGINT)

        def callback(phase, info):  # what JAX's gc callback does when Ctrl-C lands inside it
            if phase == "start":
                gc.callbacks.remove(callback)
                handler(signal.SIGINT, None)

        gc.callbacks.append(callback)
        gc.collect()
        return tiny_model

    monkeypatch.setattr(cli, "load_model", load)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault_is_one_line_and_loses_nothing(case, tmp_path, fake_load, checkpoints, faults, capfd, monkeypatch,
                                             tiny_model):
    if case.root_only and os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    work = tmp_path / "w"
    work.mkdir()
    argv = case.make(work)
    _interrupting_loader(fake_load, tiny_model, monkeypatch)
    if not case.fake_model:
        monkeypatch.setattr(cli, "load_model", REAL_LOAD)  # the real loader reads the --model file
    before = {name: snapshot(work / name) for name in ("r", "ck")}
    outcome = run_cli(argv, capfd)
    assert_one_line(outcome, case.code, *case.needles)
    assert not any(text in outcome.err for text in case.absent), outcome.err
    after = {name: snapshot(work / name) for name in ("r", "ck")}
    for entry in case.created:
        top, _, rest = entry.partition("/")
        assert after[top].pop(rest) == "dir"  # an empty directory: no unfinished step is left
    assert after == before, "the results folder or checkpoint directory changed"
    if (work / "offset.txt").exists():  # the jsonl offset case names the exact byte
        assert f"(byte offset {(work / 'offset.txt').read_text()})" in outcome.err
    assert not list(work.glob("r/*.partial-*")) and not list(work.glob("r/*.replaced-*"))


def test_the_table_is_big_enough_and_every_before_is_known():
    assert len(CASES) >= 60
    assert {c.before for c in CASES} <= {"clean", "traceback", "wrong-code", "silent", "lost", "misleading"}
    assert len({c.name for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------------
# what a good run does to an old folder


def test_overwrite_swaps_the_folder_only_when_complete(tmp_path, fake_load, capfd):
    old = old_results(tmp_path / "r" / "x")
    (old / "notes.txt").write_text("the user's own file")
    outcome = run_cli(_eval(tmp_path, "--name", "x", "--overwrite"), capfd)
    assert outcome.code == 0, outcome.err
    results = json.loads((old / ev.RESULTS_FILE).read_text())
    assert results["n"] == 2 and not (old / ev.PROMPT_FILE).exists()  # no stale output survives
    assert (old / "notes.txt").read_text() == "the user's own file"  # other files move across
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["x"]  # no .partial/.replaced/.lock left


def test_a_stale_lock_and_a_killed_runs_partial_folder_do_not_block(tmp_path, fake_load, capfd):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".x.lock").write_text("12345\n")  # left by a killed run: nobody holds its flock
    (tmp_path / "r" / "x.partial-12345").mkdir()
    (tmp_path / "r" / "x.partial-12345" / ev.PREDICTIONS_FILE).write_text("half\n")
    outcome = run_cli(_eval(tmp_path, "--name", "x"), capfd)
    assert outcome.code == 0, outcome.err
    assert (tmp_path / "r" / "x" / ev.RESULTS_FILE).is_file()
    assert (tmp_path / "r" / "x.partial-12345" / ev.PREDICTIONS_FILE).read_text() == "half\n"  # never deleted


def test_a_huge_seed_runs(tmp_path, fake_load, capfd):
    outcome = run_cli(["run", "--model", "tiny", "--task", _task(tmp_path), "--out", tmp_path / "r", "--seed",
                       str(2**40), "--modes", "soft_prompt", *QUICK_TUNE[:-1], "--n-test", "2", "--no-loglik",
                       "--quiet"], capfd)
    assert outcome.code == 0, outcome.err


def test_checkpoint_every_reaches_the_tune_config(tmp_path, fake_load, capfd):
    outcome = run_cli(_tune(tmp_path, "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", "1",
                            "--name", "t"), capfd)
    assert outcome.code == 0, outcome.err
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "2"]
    assert json.loads((tmp_path / "r" / "t" / ev.TUNING_FILE).read_text())["config"]["tune"]["checkpoint_every"] == 1


# --------------------------------------------------------------------------------------------------
# other processes: SIGKILL at random moments, a second writer, a real SIGINT

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from spt_jax import cli
from test_evaluate import make_tiny_lm
lm = make_tiny_lm()
cli.load_model = lambda name, dtype="float32", log=None: lm
print("ready", flush=True)
sys.exit(cli.main(sys.argv[1:]))
"""


def _spawn(argv) -> subprocess.Popen:
    code = DRIVER.format(tests=str(ROOT / "tests"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)


def _wait_for(condition, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _steps(ck: Path) -> list[int]:
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []


def _long_tune(tmp, task, steps: int, *extra) -> list:
    return ["tune", "--model", "tiny", "--task", task, "--out", tmp / "r", "--name", "t", "--steps", str(steps),
            "--tune-batch-size", "2", "--prompt-length", "2", "--eval-every", "0", "--quiet",
            "--checkpoint-dir", tmp / "ck", "--checkpoint-every", "1", *extra]


def _locked(lock_file: Path) -> bool:
    import fcntl

    if not lock_file.exists():
        return False
    with open(lock_file, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_second_writers_are_refused_and_a_sigkilled_run_resumes_to_the_uninterrupted_prompt(
        tmp_path, fake_load, capfd):
    """One tuning subprocess: while it runs, a second writer to its results folder and one to its
    checkpoint directory each get one line (exit 3); then SIGKILL at a random moment after its first
    checkpoint. The resume is not blocked by the dead run's locks or partial folder, continues from
    its checkpoint (the history up to it is the killed run's), and ends at the uninterrupted prompt."""
    from safetensors.numpy import load_file

    rng = random.Random(int(os.environ.get("SPT_FAULT_SEED", "8")))
    task, steps = _task(tmp_path), 40
    proc = _spawn(_long_tune(tmp_path, task, steps))
    try:
        _wait_for(lambda: _locked(tmp_path / "r" / ".t.lock") and _locked(tmp_path / ".ck.lock"), proc)
        same_folder = run_cli(_eval(tmp_path, "--name", "t", task=task), capfd)
        assert_one_line(same_folder, 3, "results folder", "is in use by another spt-jax run", f"pid {proc.pid}",
                        "choose another --name")
        same_checkpoints = run_cli(["tune", "--model", "tiny", "--task", task, "--out", tmp_path / "other",
                                    *QUICK_TUNE, "--checkpoint-dir", tmp_path / "ck"], capfd)
        assert_one_line(same_checkpoints, 3, "checkpoint directory", "in use by another spt-jax run")
        _wait_for(lambda: len(_steps(tmp_path / "ck")) >= 1, proc)
        time.sleep(rng.uniform(0.0, 0.5))
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "r" / "t").exists(), "killed while tuning: no results folder yet"
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    saved = max(_steps(tmp_path / "ck"))
    assert saved < steps
    saved_history = json.loads((tmp_path / "ck" / str(saved) / "meta" / "metadata").read_text())["history"]

    outcome = run_cli(_long_tune(tmp_path, task, steps), capfd)
    assert outcome.code == 0, outcome.err
    summary = json.loads((tmp_path / "r" / "t" / ev.TUNING_FILE).read_text())
    assert len(summary["history"]) == steps
    assert summary["history"][:saved] == saved_history  # resumed, not redone
    outcome = run_cli(["tune", "--model", "tiny", "--task", task, "--out", tmp_path / "reference", "--name", "t",
                       "--steps", str(steps), "--tune-batch-size", "2", "--prompt-length", "2", "--eval-every",
                       "0", "--quiet"], capfd)
    assert outcome.code == 0, outcome.err
    resumed = load_file(str(tmp_path / "r" / "t" / ev.PROMPT_FILE))["prompt"]
    uninterrupted = load_file(str(tmp_path / "reference" / "t" / ev.PROMPT_FILE))["prompt"]
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "r").glob(".*.lock")) and not (tmp_path / ".ck.lock").exists()


# --------------------------------------------------------------------------------------------------
# the tally in BUILD_NOTES.md


def tally() -> dict[str, int]:
    counts = {"cases": len(CASES)}
    for c in CASES:
        counts[c.before] = counts.get(c.before, 0) + 1
    return counts


if __name__ == "__main__":
    print(json.dumps(tally(), indent=2))
