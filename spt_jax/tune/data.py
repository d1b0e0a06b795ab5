"""Tuning batches: (input, target) texts -> fixed-shape, left-padded token arrays.

One row follows `spt_jax.tokens`' layout (P is the soft prompt, filled in by the train step):

    [pad ...] [BOS]? [P x prompt slot] [input tokens] [target tokens] [EOS]

Input and target are tokenized separately and without special tokens, exactly as generation sees
the input and then produces the target. Rows are padded on the left to one of a few length
*buckets*, and the target width to a power of two, so a whole run compiles once per bucket.
The loss reads hidden states only at the slots that predict target tokens (``target_index``).

Over-long examples lose the *left* end of their input (the question's start, usually few-shot-like
boilerplate), never the target or the prompt; the first such cut warns, all are counted.

The data order is grain's seeded, random-access shuffle (reshuffled every epoch), so the whole
order is a pure function of ``(seed, next_index)``: that pair is the resumable data state.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import grain
import numpy as np

from spt_jax.errors import ConfigError, DataError
from spt_jax.tokens import bos_ids, encode

MIN_BUCKET = 32
MIN_ANSWER_WIDTH = 8


def as_pairs(examples) -> list[tuple[str, str]]:
    """(input, target) string pairs from tuples or objects with ``.input`` / ``.target``."""
    pairs = []
    for i, ex in enumerate(examples):
        if hasattr(ex, "input") and hasattr(ex, "target"):
            pair = (ex.input, ex.target)
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            pair = tuple(ex)
        else:
            raise DataError(
                f"example {i}: expected an (input_text, target_text) pair or an object with "
                f".input and .target, got {type(ex).__name__}"
            )
        if not all(isinstance(s, str) for s in pair):
            kinds = tuple(type(s).__name__ for s in pair)
            raise DataError(f"example {i}: input and target must be strings, got {kinds}")
        if not pair[1]:
            raise DataError(f"example {i}: empty target text (there is nothing to learn from it)")
        pairs.append(pair)
    if not pairs:
        raise DataError("no tuning examples (expected a non-empty sequence of (input, target) pairs)")
    return pairs


def default_buckets(max_length: int) -> tuple[int, ...]:
    """32, 48, 64, 96, 128, 192, ... (powers of two and the midpoints between), then max_length.

    Midpoints cap padding waste at a third instead of a half, for one extra compile per octave.
    """
    buckets, size = [], MIN_BUCKET
    while size < max_length:
        buckets += [size, size * 3 // 2]
        size *= 2
    return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` (buckets are sorted; the last is max_length)."""
    for b in buckets:
        if b >= length:
            return b
    raise ConfigError(f"sequence of {length} slots exceeds the largest length bucket {buckets[-1]}")


def answer_width(n_targets: int) -> int:
    """Target slots per row: a power of two >= 8, so answer-length changes rarely recompile."""
    return max(MIN_ANSWER_WIDTH, 1 << (int(n_targets) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One example's token ids after the over-long policy was applied."""

    input_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # EOS included when the run appends it
    truncated: int  # input tokens dropped from the left


@dataclasses.dataclass(frozen=True)
class Layout:
    """The per-model constants of a row: BOS, EOS, the pad id and the prompt length."""

    bos: tuple[int, ...]
    eos: tuple[int, ...]
    pad_id: int
    prompt_length: int
    max_length: int
    buckets: tuple[int, ...]

    @classmethod
    def for_model(cls, lm, config) -> Layout:
        from spt_jax.tokens import eos_ids

        eos = ()
        if config.append_eos:
            tok_eos = lm.tokenizer.eos_token_id
            ids = [tok_eos] if tok_eos is not None else eos_ids(lm)
            if not ids:
                raise ConfigError(
                    f"model {lm.name!r} defines no EOS token; set TuneConfig(append_eos=False)"
                )
            eos = (int(ids[0]),)
        pad = lm.tokenizer.pad_token_id
        pad = pad if pad is not None else (lm.config.pad_token_id or 0)
        max_length = min(config.max_length, lm.config.max_position_embeddings)
        buckets = config.length_buckets or default_buckets(max_length)
        buckets = tuple(b for b in buckets if b <= max_length)
        if not buckets or buckets[-1] < max_length:
            buckets = (*buckets, max_length)
        return cls(tuple(bos_ids(lm.tokenizer)), eos, int(pad), config.prompt_length, max_length, buckets)

    def row_length(self, ex: Encoded) -> int:
        return len(self.bos) + self.prompt_length + len(ex.input_ids) + len(ex.target_ids)


class ExampleEncoder:
    """Tokenizes examples on first use (an 80-step run reads only 640 of them) and caches them."""

    def __init__(self, tokenizer, pairs: Sequence[tuple[str, str]], layout: Layout):
        self.tokenizer, self.pairs, self.layout = tokenizer, pairs, layout
        self._cache: dict[int, Encoded] = {}
        self.n_truncated = 0

    def __call__(self, index: int) -> Encoded:
        if index not in self._cache:
            self._cache[index] = self._encode(index)
        return self._cache[index]

    def _encode(self, index: int) -> Encoded:
        lay = self.layout
        input_text, target_text = self.pairs[index]
        input_ids = encode(self.tokenizer, input_text)
        target_ids = encode(self.tokenizer, target_text) + list(lay.eos)
        room = lay.max_length - len(lay.bos) - lay.prompt_length - len(target_ids)
        if room < 0:
            raise DataError(
                f"example {index}: the target alone takes {len(target_ids)} tokens, more than "
                f"max_length={lay.max_length} leaves after BOS and a {lay.prompt_length}-vector "
                "prompt; raise TuneConfig.max_length or shorten the target"
            )
        cut = max(0, len(input_ids) - room)
        if cut:
            if self.n_truncated == 0:
                warnings.warn(
                    f"example {index}: input of {len(input_ids)} tokens cut from the left to {room} "
                    f"to fit max_length={lay.max_length}; later cuts are counted in "
                    "metadata['truncated_inputs']",
                    stacklevel=3,
                )
            self.n_truncated += 1
            input_ids = input_ids[cut:]
        return Encoded(tuple(input_ids), tuple(target_ids), cut)


def collate(rows: Sequence[Encoded], layout: Layout) -> dict[str, np.ndarray]:
    """Left-padded arrays for a batch of encoded rows.

    Returns (B rows, T = length bucket, A = answer width):
      tokens [B, T] int32        text ids; pad id on padding and prompt slots
      valid [B, T] bool          False on padding
      prompt_index [B, T] int32  0..P-1 on the prompt slots, -1 elsewhere
      target_index [B, A] int32  the slot whose hidden state predicts each target token
      target_ids [B, A] int32    the target tokens (EOS included), 0 past the end
      target_mask [B, A] bool    True on real target tokens
    """
    lengths = [layout.row_length(r) for r in rows]
    T = bucket_for(max(lengths), layout.buckets)
    A = answer_width(max(len(r.target_ids) for r in rows))
    B, P = len(rows), layout.prompt_length
    tokens = np.full((B, T), layout.pad_id, np.int32)
    valid = np.zeros((B, T), bool)
    prompt_index = np.full((B, T), -1, np.int32)
    target_index = np.zeros((B, A), np.int32)
    target_ids = np.zeros((B, A), np.int32)
    target_mask = np.zeros((B, A), bool)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        start = T - n
        valid[b, start:] = True
        nb = len(layout.bos)
        tokens[b, start : start + nb] = layout.bos
        prompt_start = start + nb
        prompt_index[b, prompt_start : prompt_start + P] = np.arange(P)
        text = np.asarray(row.input_ids + row.target_ids, np.int32)
        tokens[b, prompt_start + P :] = text
        n_tgt = len(row.target_ids)
        target_ids[b, :n_tgt] = row.target_ids
        target_mask[b, :n_tgt] = True
        target_index[b, :n_tgt] = np.arange(T - n_tgt, T) - 1
    return dict(
        tokens=tokens,
        valid=valid,
        prompt_index=prompt_index,
        target_index=target_index,
        target_ids=target_ids,
        target_mask=target_mask,
    )


@dataclasses.dataclass
class DataOrder:
    """Seeded epoch-reshuffled order over ``n_examples``; ``next_index`` counts examples drawn.

    Example k of the stream is ``grain.MapDataset.range(n).shuffle(seed).repeat()[k]`` (random
    access), so resuming needs only ``(seed, next_index)``, and every host computes the same order.
    """

    n_examples: int
    seed: int
    next_index: int = 0

    def __post_init__(self):
        self._order = grain.MapDataset.range(self.n_examples).shuffle(seed=self.seed).repeat()

    def take(self, count: int) -> list[int]:
        """The next ``count`` example indices (crossing epoch boundaries as needed)."""
        out = [int(self._order[k]) for k in range(self.next_index, self.next_index + count)]
        self.next_index += count
        return out

    @property
    def epoch(self) -> int:
        return self.next_index // self.n_examples

    def state(self) -> dict:
        return {
            "seed": self.seed,
            "next_index": self.next_index,
            "epoch": self.epoch,
            "n_examples": self.n_examples,
        }

    @classmethod
    def from_state(cls, state: dict, n_examples: int) -> DataOrder:
        if int(state["n_examples"]) != n_examples:
            raise ConfigError(
                f"checkpoint's data order covers {state['n_examples']} examples but {n_examples} "
                "were given; resume with the same examples or use a new checkpoint_dir"
            )
        return cls(n_examples, int(state["seed"]), int(state["next_index"]))
