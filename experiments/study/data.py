"""The world's word-level tokenizer and the token rows of pre-training and post-training.

The tokenizer is built offline with `tokenizers` and wrapped in `transformers.PreTrainedTokenizerFast`
(as tests/conftest.py does), so the library's `LM`, generation and tuning use it like any other.
Words are split on spaces, ``\\n`` is a word of its own (the benchmark's stop sequence must be a token
a model can emit), and decoding joins words with single spaces, so ``"Answer: Arvel"`` round-trips.
"""

from __future__ import annotations

import numpy as np

from . import world as w

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


def split_words(text: str) -> list[str]:
    """The words a text tokenizes into (what the pre-tokenizer does, in Python, for the vocabulary)."""
    return [part for part in text.replace("\n", " \n ").split(" ") if part]


def world_words(world: w.World, extra_texts: tuple[str, ...] = ()) -> list[str]:
    """Every word any biography, question, answer or ``extra_texts`` (the instruction) can contain."""
    words: set[str] = {"\n", "Question:", "Answer:", "She", "He", "her", "his"}
    for templates in w.SENTENCES.values():
        for template in templates:
            words |= {t for t in split_words(template) if "{" not in t}
    for template in w.QUESTIONS.values():
        words |= {t for t in split_words(template) if "{" not in t}
    for values in w.VALUES.values():
        for value in values:
            words |= set(split_words(value))
    for person in world.people:
        words |= {person.first, person.last}
    for text in extra_texts + tuple(qa_text(r) for r in w.general_qa_records(world)):
        words |= set(split_words(text))
    return sorted(words)


def build_tokenizer(words: list[str]):
    """A `PreTrainedTokenizerFast` over ``<pad> <s> </s> <unk>`` + ``words`` (ids in that order)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"),
        pre_tokenizers.Split("\n", behavior="isolated"),
    ])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                                unk_token=UNK, pad_token=PAD, clean_up_tokenization_spaces=False)


def encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens); ValueError if a word is outside the vocabulary."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    for text, row in zip(texts, ids):
        if unk in row:
            raise ValueError(f"text has words outside the world's vocabulary: {text!r}")
    return [list(r) for r in ids]


# --------------------------------------------------------------------------------------------------
# pre-training rows


def pack_documents(docs: list[list[int]], seq_len: int, eos: int, rng: np.random.Generator):
    """Documents in a shuffled order, each followed by EOS, greedily packed whole into rows.

    No document is split across rows (a biography's name stays with its facts); the rest of a row
    is padding. Returns tokens ``[N, T]`` int32 and valid ``[N, T]`` bool.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    for i in rng.permutation(len(docs)):
        doc = docs[int(i)] + [eos]
        if len(doc) > seq_len:
            raise ValueError(f"a document of {len(doc)} tokens (EOS included) does not fit seq_len={seq_len}")
        if len(current) + len(doc) > seq_len:
            rows.append(current)
            current = []
        current = current + doc
    if current:
        rows.append(current)
    tokens = np.zeros((len(rows), seq_len), np.int32)
    valid = np.zeros((len(rows), seq_len), bool)
    for r, row in enumerate(rows):
        tokens[r, : len(row)] = row
        valid[r, : len(row)] = True
    return tokens, valid


def qa_text(record: dict) -> str:
    """A QA pair as pre-training text, in exactly the benchmark's input + target form."""
    return f"Question: {record['question']}\nAnswer: {record['answer']}"


def pretraining_documents(world: w.World, style: w.BioStyle, qa_share: float, seed: int,
                          general_share: float = 0.0) -> list[str]:
    """The recipe's corpus: biographies of everyone, plus QA text about the post-training half
    making up ``qa_share`` of the words (Allen-Zhu & Li's mixed training; the benchmark half never),
    plus general QA text about the world (`world.general_qa_records`), ``general_share`` of the words."""
    bios = w.biographies(world, style, seed)
    if not (0 <= qa_share and 0 <= general_share and qa_share + general_share < 1):
        raise ValueError(f"qa_share={qa_share} and general_share={general_share} must be >= 0 with a sum below 1")
    bio_words = sum(len(split_words(b)) for b in bios)
    rest = 1 - qa_share - general_share
    rng = np.random.default_rng([world.seed, seed, 7])
    docs = list(bios)
    for share, records in ((qa_share, w.qa_records(world.group("train"))), (general_share, w.general_qa_records(world))):
        if share <= 0:
            continue
        texts = [qa_text(r) for r in records]
        n = int(round(share / rest * bio_words / np.mean([len(split_words(t)) for t in texts])))
        docs += [texts[int(i)] for i in rng.choice(len(texts), size=n, replace=n > len(texts))]
    return docs


# --------------------------------------------------------------------------------------------------
# post-training (SFT) rows


def sft_rows(tokenizer, pairs: list[tuple[str, str]], multiple: int = 8):
    """(prompt, target) pairs as right-padded rows whose loss covers the target and EOS only.

    Returns tokens, valid, loss_mask, each ``[N, T]`` (T the longest row rounded up to ``multiple``).
    """
    prompts = encode_all(tokenizer, [p for p, _ in pairs])
    targets = encode_all(tokenizer, [t for _, t in pairs])
    eos = tokenizer.eos_token_id
    lengths = [len(p) + len(t) + 1 for p, t in zip(prompts, targets)]
    T = -(-max(lengths) // multiple) * multiple
    tokens = np.zeros((len(pairs), T), np.int32)
    valid = np.zeros((len(pairs), T), bool)
    loss_mask = np.zeros((len(pairs), T), bool)
    for r, (p, t) in enumerate(zip(prompts, targets)):
        row = p + t + [eos]
        tokens[r, : len(row)] = row
        valid[r, : len(row)] = True
        loss_mask[r, len(p) : len(row)] = True  # a token is scored where it is predicted (shifted in the loss)
    return tokens, valid, loss_mask
