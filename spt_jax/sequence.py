"""The one sequence layout, owned here and used by tuning, generation and scoring alike:

    [BOS]? [soft prompt: P vectors]? [prefix text]? [input text] [target text + EOS]?

BOS appears only when the tokenizer adds one to plain text; the soft prompt sits right after it and
directly before the text (by position: padding slots between them hold none); every text is
tokenized without special tokens.
Positions count valid slots only, so padding (between the prefix and the text, in training rows and
generation batches alike) never shifts a position.

This module owns the rules a row is built by: tokenization of the parts (`encode`, `split_pair`),
BOS/EOS/pad resolution (`Layout`), the length buckets of each purpose and the one rule past the
largest (`bucket_length`), power-of-two widths, left padding, left truncation, where the prompt goes
(`prompt_index` + `place_prompt`) and where a generation stops (`cut_at_stop`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np

from spt_jax.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------------
# length buckets: padded lengths, one compilation each

# Generation and scoring inputs. From 24 tokens on, neighbouring buckets differ by at most 4/3, so an
# input pads by at most a third (powers of two would double it). Prefill dominates generation time
# on CPU and scales with the padded length; one task's prompts touch two or three of these buckets.
GENERATION_BUCKETS: tuple[int, ...] = (
    16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024,
    1280, 1536, 2048, 2560, 3072, 4096,
)  # fmt: skip
MIN_TUNING_BUCKET = 32
MIN_ANSWER_WIDTH = 8  # target slots of a tuning row
MIN_CONTINUATION_WIDTH = 4  # scored continuation slots of a scoring row
NEW_TOKEN_ROUNDING = 16  # max_new_tokens rounds up to this for shapes, so 10 and 16 share a compile


def tuning_buckets(max_length: int) -> tuple[int, ...]:
    """32, 48, 64, 96, 128, 192, ... (powers of two and the midpoints between), then ``max_length``.

    Midpoints cap padding waste at a third instead of a half, for one extra compile per octave.
    """
    buckets, size = [], MIN_TUNING_BUCKET
    while size < max_length:
        buckets += [size, size * 3 // 2]
        size *= 2
    return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


# What a new padded length costs to compile, in steps at the run's typical length (a CPU tuning
# step of SmolLM2-135M takes ~2 s, its compilation ~5 s; on accelerators a step is cheaper still).
BUCKET_COMPILE_STEPS = 3.0


def fit_buckets(lengths: Sequence[int], compile_steps: float = BUCKET_COMPILE_STEPS) -> tuple[int, ...]:
    """The padded lengths that minimise the work of a run whose steps have these longest rows.

    A step padded to length T costs ~T (a tuning step's FLOPs grow linearly in T at these sizes),
    and each bucket costs one compilation, ``compile_steps`` steps at the mean length. Buckets are
    chosen among the lengths themselves by exact dynamic programming over their sorted distinct
    values, so the longest row of every step fits and no step pads past the next distinct length
    the plan kept.
    """
    if not len(lengths):
        raise ConfigError("fit_buckets needs the length of at least one step")
    values, counts = np.unique(np.asarray(lengths, np.int64), return_counts=True)
    penalty = compile_steps * float(np.mean(lengths))
    cum = np.concatenate([[0], np.cumsum(counts)])
    # best[j]: least cost covering values[:j]; the bucket values[j-1] covers values[i:j]
    best, cut = np.zeros(len(values) + 1), np.zeros(len(values) + 1, np.int64)
    for j in range(1, len(values) + 1):
        costs = [best[i] + values[j - 1] * (cum[j] - cum[i]) + penalty for i in range(j)]
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    chosen, j = [], len(values)
    while j > 0:
        chosen.append(int(values[j - 1]))
        j = cut[j]
    return tuple(sorted(chosen))


def check_buckets(buckets: Sequence[int]) -> None:
    if not buckets or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1
                          for b in buckets):
        raise ConfigError(f"length_buckets must be positive integer lengths, got {tuple(buckets)!r}")


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` slots; past the largest, an error.

    Callers keep lengths within the largest bucket: tuning rows and the generation prefix close
    their tables with the length limit itself (`closed_buckets`), generation and scoring inputs are
    cut from the left to the largest bucket.
    """
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ConfigError(f"a sequence of {n} slots exceeds the largest length bucket {max(buckets)}")


def closed_buckets(buckets: Sequence[int], limit: int) -> tuple[int, ...]:
    """``buckets`` up to ``limit``, closed by ``limit`` itself, so every length <= limit has one."""
    kept = tuple(sorted(b for b in buckets if b <= limit))
    return kept if kept and kept[-1] == limit else (*kept, limit)


def pow2_width(n: int, minimum: int) -> int:
    """The smallest power of two >= ``max(n, minimum)``: widths that change rarely recompile rarely."""
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


# --------------------------------------------------------------------------------------------------
# tokenization of the parts


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_ids(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer prepends BOS to plain text, else ``[]``."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(with_special) > len(without) and with_special[0] == bos:
        return [bos]
    return []


def eos_ids(lm) -> list[int]:
    """Every id that ends a generation: the config's EOS ids and the tokenizer's EOS."""
    ids = list(lm.config.eos_token_ids)
    eos = lm.tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids.append(eos)
    return ids


def pad_id(lm) -> int:
    """The id written into padding slots (masked out everywhere, so only its range matters)."""
    for candidate in (lm.tokenizer.pad_token_id, lm.config.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness splits them (``_encode_pair``).

    Trailing spaces of the context move to the continuation; the pair is tokenized whole and the
    continuation is what follows the context's tokens.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return whole[: len(context_ids)], whole[len(context_ids) :]


def truncate_left(ids: Sequence[int], limit: int) -> tuple[list[int], int]:
    """The last ``limit`` ids and how many were cut: over-long text loses its *left* end (the
    question's start, usually boilerplate), never the prompt, the target or the continuation."""
    cut = max(0, len(ids) - limit)
    return list(ids[cut:]), cut


def truncate_all_left(encoded: list[list[int]], limit: int, *, what: str) -> list[list[int]]:
    """`truncate_left` over a batch of sequences, warning once when any was cut."""
    cut = [truncate_left(e, limit) for e in encoded]
    n_long = sum(n > 0 for _, n in cut)
    if n_long:
        warnings.warn(
            f"{n_long} of {len(encoded)} {what} are longer than {limit} tokens (the largest length "
            f"bucket or the model's context after the prefix); kept their last {limit} tokens",
            stacklevel=3,
        )
    return [ids for ids, _ in cut]


def cut_at_stop(text: str, stop_sequences: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stop_sequences:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[B, length]`` right-aligned, and the validity mask ``[B, length]``."""
    ids = np.full((len(seqs), length), pad, np.int32)
    valid = np.zeros((len(seqs), length), bool)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, length - len(seq) :] = seq
            valid[row, length - len(seq) :] = True
    return ids, valid


# --------------------------------------------------------------------------------------------------
# where the soft prompt goes


def place_prompt(embeds, prompt, prompt_index):
    """Token embeddings ``[B, T, D]`` with the prompt ``[P, D]`` written where ``prompt_index``
    ``[B, T]`` holds 0..P-1 (and left alone where it holds -1). Tuning rows and the generation prefix
    both mark their prompt slots this way, so both place the prompt by the same rule."""
    import jax.numpy as jnp  # here, so tasks (which cut at stop sequences) import this without JAX
    if prompt.shape[0] == 0:  # no soft prompt: no slot holds an index (shapes are static)
        return embeds
    from_prompt = jnp.take(prompt.astype(embeds.dtype), jnp.maximum(prompt_index, 0), axis=0)
    return jnp.where((prompt_index >= 0)[..., None], from_prompt, embeds)


# --------------------------------------------------------------------------------------------------
# rows


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tuning example's token ids after the over-long policy was applied."""

    input_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # EOS included when the layout appends it
    truncated: int  # input tokens dropped from the left


@dataclasses.dataclass(frozen=True)
class Layout:
    """The per-model constants of a row: BOS, EOS (appended to targets), pad id, prompt length."""

    bos: tuple[int, ...]
    eos: tuple[int, ...]
    pad_id: int
    prompt_length: int
    max_length: int
    buckets: tuple[int, ...]
    # Rows the vocabulary projection runs on, the batch's target tokens packed into them (`tune`
    # fits it to the run's batches); None: one per slot of a B x answer-width grid.
    head_rows: int | None = None

    @classmethod
    def for_model(cls, lm, *, prompt_length: int, max_length: int, append_eos: bool = True,
                  buckets: Sequence[int] | None = None) -> Layout:
        """The layout of ``lm``'s rows; ``buckets`` default to `tuning_buckets`, the last is max_length."""
        eos = ()
        if append_eos:
            tok_eos = lm.tokenizer.eos_token_id
            ids = [tok_eos] if tok_eos is not None else eos_ids(lm)
            if not ids:
                raise ConfigError(f"model {lm.name!r} defines no EOS token; set TuneConfig(append_eos=False)")
            eos = (int(ids[0]),)
        max_length = min(max_length, lm.config.max_position_embeddings)
        buckets = closed_buckets(buckets or tuning_buckets(max_length), max_length)
        return cls(tuple(bos_ids(lm.tokenizer)), eos, pad_id(lm), prompt_length, max_length, buckets)

    @property
    def n_fixed(self) -> int:
        """Slots before the text: BOS and the prompt."""
        return len(self.bos) + self.prompt_length

    def row_length(self, ex: Encoded) -> int:
        return self.n_fixed + len(ex.input_ids) + len(ex.target_ids)

    def encode_example(self, tokenizer, input_text: str, target_text: str, *, where: str) -> Encoded:
        """Input and target tokenized apart (as generation sees the input, then produces the target),
        EOS appended, the input cut from the left to fit ``max_length``."""
        input_ids = encode(tokenizer, input_text)
        target_ids = encode(tokenizer, target_text) + list(self.eos)
        room = self.max_length - self.n_fixed - len(target_ids)
        if room < 0:
            raise DataError(
                f"{where}: the target alone takes {len(target_ids)} tokens, more than "
                f"max_length={self.max_length} leaves after BOS and a {self.prompt_length}-vector "
                "prompt; raise TuneConfig.max_length or shorten the target"
            )
        input_ids, cut = truncate_left(input_ids, room)
        return Encoded(tuple(input_ids), tuple(target_ids), cut)

    def training_batch(self, rows: Sequence[Encoded]) -> dict[str, np.ndarray]:
        """Arrays for a batch of encoded rows: the prefix ``[BOS]? [prompt]`` (H = `n_fixed` slots,
        the same in every row, so tuning runs it once: `DecoderLM.prefixed_rows`), then each row's
        text, left-padded so that prefix and text together fill the length bucket.

        Returns (B rows, H prefix slots, T = bucket - H text slots, N = `head_rows`, or B x the
        answer width when unset or too few for this batch), the target tokens packed row after row
        into the first N slots:
          prefix_tokens [B, H] int32        BOS, then the pad id on the prompt slots (every row alike)
          prefix_prompt_index [B, H] int32  0..P-1 on the prompt slots, -1 on BOS
          tokens [B, T] int32               text ids (input, then target), the pad id on padding
          valid [B, T] bool                 False on padding
          target_row [N] int32              the row of each target token
          target_index [N] int32            the slot of the row ``[prefix | text]`` whose hidden
                                            state predicts it
          target_ids [N] int32              the target tokens (EOS included), 0 past the last
          target_mask [N] bool              True on real target tokens
        """
        lengths = [self.row_length(r) for r in rows]
        H = self.n_fixed
        T = bucket_length(max(lengths), self.buckets) - H
        B = len(rows)
        n_targets = sum(len(r.target_ids) for r in rows)
        N = self.head_rows
        if N is None or N < n_targets:
            N = B * pow2_width(max(len(r.target_ids) for r in rows), MIN_ANSWER_WIDTH)
        prefix_tokens, prefix_prompt_index = (np.repeat(a, B, axis=0) for a in self.prefix_row((), H))
        texts = [row.input_ids + row.target_ids for row in rows]
        tokens, valid = left_pad(texts, T, self.pad_id)
        target_row, target_index, target_ids = (np.zeros(N, np.int32) for _ in range(3))
        target_mask = np.arange(N) < n_targets
        at = 0
        for b, row in enumerate(rows):
            n_tgt = len(row.target_ids)
            target_row[at : at + n_tgt] = b
            target_index[at : at + n_tgt] = np.arange(H + T - n_tgt, H + T) - 1
            target_ids[at : at + n_tgt] = row.target_ids
            at += n_tgt
        return dict(prefix_tokens=prefix_tokens, prefix_prompt_index=prefix_prompt_index, tokens=tokens,
                    valid=valid, target_row=target_row, target_index=target_index, target_ids=target_ids,
                    target_mask=target_mask)

    @staticmethod
    def row_length_of(batch: dict) -> int:
        """The padded row length of a `training_batch`: its prefix slots and its text slots."""
        return int(batch["prefix_tokens"].shape[1] + batch["tokens"].shape[1])

    def prefix_row(self, text_ids: Sequence[int], bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """``[BOS]? [prompt] [prefix text]`` right-padded to ``bucket``: ids ``[1, bucket]`` and
        prompt_index ``[1, bucket]`` (the shared prefix that generation and scoring cache)."""
        ids = np.full((1, bucket), self.pad_id, np.int32)
        prompt_index = np.full((1, bucket), -1, np.int32)
        nb = len(self.bos)
        ids[0, :nb] = self.bos
        prompt_index[0, nb : nb + self.prompt_length] = np.arange(self.prompt_length)
        ids[0, self.n_fixed : self.n_fixed + len(text_ids)] = text_ids
        return ids, prompt_index


# --------------------------------------------------------------------------------------------------
# chat templates


_SENTINEL = "\u2063SPT_JAX_CONTENT\u2063"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A post-trained model's chat template around one user turn: ``head + content + tail``.

    ``tail`` ends with the assistant turn's opening, so generation continues as the assistant. A BOS
    the template writes as text is dropped from ``head``: the layout adds BOS itself.
    """

    head: str
    tail: str

    def wrap(self, content: str) -> str:
        return self.head + content + self.tail


def chat_format(lm) -> ChatFormat:
    """The `ChatFormat` of ``lm``'s tokenizer (its chat template from the tokenizer config or GGUF)."""
    tokenizer = lm.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model {lm.name!r} has no chat template (neither its tokenizer config nor its GGUF "
                          "metadata has one); evaluate it without --chat-template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ConfigError(f"model {lm.name!r}: its chat template does not place the user's message once")
    head, tail = text.split(_SENTINEL)
    bos = tokenizer.bos_token
    if bos and head.startswith(bos):
        head = head[len(bos):]
    return ChatFormat(head=head, tail=tail)
