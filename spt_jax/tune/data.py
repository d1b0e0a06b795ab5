"""Tuning data: (input, target) pairs, their encoding into rows, and the seeded data order.

Rows follow `spt_jax.sequence`'s layout (P is the soft prompt, filled in by the train step):

    [BOS]? [P x prompt slot] [pad ...] [input tokens] [target tokens] [EOS]

(BOS and the prompt are every row's shared prefix, which the train step runs once.)

`spt_jax.sequence.Layout` owns the row rules (tokenization of the parts, buckets, widths, left
truncation); this module adds what only tuning needs: pairs from examples, lazy encoding with a
count of the inputs cut, and the data order. Over-long examples lose the *left* end of their input,
never the target or the prompt; the first such cut warns, all are counted.

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
from spt_jax.sequence import Encoded, Layout, closed_buckets, fit_buckets, round_up

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


def tuning_layout(lm, config) -> Layout:
    """The row layout of a `TuneConfig`: its prompt length, max length, buckets and EOS policy."""
    return Layout.for_model(lm, prompt_length=config.prompt_length, max_length=config.max_length,
                            append_eos=config.append_eos, buckets=config.length_buckets)


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
        input_text, target_text = self.pairs[index]
        encoded = self.layout.encode_example(self.tokenizer, input_text, target_text, where=f"example {index}")
        if encoded.truncated:
            if self.n_truncated == 0:
                kept = len(encoded.input_ids)
                warnings.warn(
                    f"example {index}: input of {kept + encoded.truncated} tokens cut from the left to "
                    f"{kept} to fit max_length={self.layout.max_length}; later cuts are counted in "
                    "metadata['truncated_inputs']",
                    stacklevel=3,
                )
            self.n_truncated += 1
        return encoded

    def batch(self, indices: Sequence[int]) -> dict:
        """The training arrays of these examples (`Layout.training_batch`)."""
        return self.layout.training_batch([self(i) for i in indices])

    def fit_buckets_to(self, order: DataOrder, steps: int, batch_size: int) -> tuple[int, ...]:
        """Pad the next ``steps`` batches of ``order`` to buckets fitted to their own longest rows,
        and their target tokens to one head size: the most any of them has, rounded up to a
        multiple of ``batch_size`` (so a mesh's ``data`` axis divides it).

        The order is a pure function of its state, so the plan reads the batches ahead without
        drawing them (and every host plans the same buckets). Returns the buckets now in use.
        """
        ahead = DataOrder(order.n_examples, order.seed, order.next_index)
        batches = [[self(i) for i in ahead.take(batch_size)] for _ in range(steps)]
        if not batches:
            return self.layout.buckets
        longest = [max(map(self.layout.row_length, rows)) for rows in batches]
        most_targets = max(sum(len(r.target_ids) for r in rows) for rows in batches)
        self.layout = dataclasses.replace(self.layout,
                                          buckets=closed_buckets(fit_buckets(longest), self.layout.max_length),
                                          head_rows=round_up(most_targets, batch_size))
        return self.layout.buckets


def shuffle_seed(seed: int) -> int:
    """A 31-bit seed drawn from ``seed``: neighbouring user seeds give unrelated epoch seeds."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0] >> 1)


@dataclasses.dataclass
class DataOrder:
    """Seeded epoch-reshuffled order over ``n_examples``; ``next_index`` counts examples drawn.

    Example k of the stream is ``grain.MapDataset.range(n).shuffle(shuffle_seed(seed)).repeat()[k]``
    (random access), so resuming needs only ``(seed, next_index)``, and every host computes the same
    order. grain reshuffles epoch e with seed + e, so the user's seed is spread first: with it used
    as is, seed s in epoch e would replay seed s + 1's epoch e - 1.
    """

    n_examples: int
    seed: int
    next_index: int = 0

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"the data-order seed must be an integer >= 0, got {self.seed!r}")
        self._order = grain.MapDataset.range(self.n_examples).shuffle(seed=shuffle_seed(self.seed)).repeat()

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
