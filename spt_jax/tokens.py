"""Token-level conventions shared by tuning and generation.

Every sequence spt_jax builds has one layout, in training and in generation alike:

    [BOS]? [soft prompt: P vectors]? [prefix text]? [input text] [target text + EOS]?

BOS appears only when the tokenizer adds one; the soft prompt sits right after it, directly before
the text and never before padding; all texts are tokenized without special tokens. Positions count
valid slots only, so padding (left in training, between prefix and input in a cached generation
batch) never shifts a position. A cached prefix text keeps its trailing whitespace back and carries
it onto each input (`generate.PrefixCache.carry`), so split tokenization equals the joined text's.
"""

from __future__ import annotations


def bos_ids(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer prepends BOS to plain text, else ``[]``."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(with_special) > len(without) and with_special[0] == bos:
        return [bos]
    return []


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_ids(lm) -> list[int]:
    """Every id that ends a generation: the config's EOS ids and the tokenizer's EOS."""
    ids = list(lm.config.eos_token_ids)
    eos = lm.tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids.append(eos)
    return ids
