"""TFDS benchmarks end to end, offline: upstream-format raw files -> the real TFDS builders (download
patched to the files) -> ArrayRecord -> tfds.data_source -> our preprocessing -> Task prompts/parsing.

No TensorFlow is installed here; that is the point (every builder below prepares and reads without it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from etils import epath  # noqa: E402

from spt_jax.errors import DataError  # noqa: E402
from spt_jax.tasks import benchmarks as bm  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Upstream raw files, written in each dataset's original release format
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arc_question(qid, stem, texts, answer_key, labels=None):
    labels = labels or list("ABCDE"[: len(texts)])
    return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]},
            "answerKey": answer_key}


ARC_TEST = [
    arc_question("Mercury_1", "Which gas do plants take in for photosynthesis?",
                 ["oxygen", "carbon dioxide", "nitrogen", "helium"], "B"),
    arc_question("NYSEDREGENTS_2", "Which object is a conductor?", ["rubber", "glass", "copper", "wood"], "3",
                 labels=["1", "2", "3", "4"]),
]
ARC_TRAIN = [arc_question(f"train_{i}", f"Train question {i}?", ["a", "b", "c", "d"], "ABCD"[i % 4]) for i in range(6)]
ARC_CHALLENGE_TEST = [arc_question("Chal_1", "Which is a mammal?", ["shark", "trout", "whale", "squid", "crab"], "C")]


def write_arc(root: Path) -> Path:
    base = root / "ARC-V1-Feb2018-2"
    for config, test in (("ARC-Easy", ARC_TEST), ("ARC-Challenge", ARC_CHALLENGE_TEST)):
        write_jsonl(base / config / f"{config}-Train.jsonl", ARC_TRAIN)
        write_jsonl(base / config / f"{config}-Dev.jsonl", ARC_TRAIN[:2])
        write_jsonl(base / config / f"{config}-Test.jsonl", test)
    return root


GSM8K_TEST = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
                 "friends in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1200 pens a day. How many pens does it sell in 3 days?",
     "answer": "It sells 1200*3 = <<1200*3=3600>>3600 pens.\n#### 3600"},
]
GSM8K_TRAIN = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
               for i in range(1, 6)]


def write_gsm8k(root: Path) -> dict[str, Path]:
    return {"train.jsonl": write_jsonl(root / "train.jsonl", GSM8K_TRAIN),
            "test.jsonl": write_jsonl(root / "test.jsonl", GSM8K_TEST),
            "train_socratic.jsonl": write_jsonl(root / "train_socratic.jsonl", GSM8K_TRAIN[:2]),
            "test_socratic.jsonl": write_jsonl(root / "test_socratic.jsonl", GSM8K_TEST[:1])}


BOOLQ_DEV = [
    {"question": "is france the same timezone as the uk", "title": "Time in France", "answer": False,
     "passage": "Metropolitan France uses Central European Time (UTC+01:00)."},
    {"question": "do iran and afghanistan speak the same language", "title": "Persian language", "answer": True,
     "passage": "Persian is spoken in Iran, Afghanistan and Tajikistan."},
]
BOOLQ_TRAIN = [{"question": f"is {i} even", "title": "Parity", "answer": i % 2 == 0, "passage": f"{i} is a number."}
               for i in range(5)]


def write_boolq(root: Path) -> dict[str, Path]:
    return {"train.jsonl": write_jsonl(root / "train.jsonl", BOOLQ_TRAIN),
            "dev.jsonl": write_jsonl(root / "dev.jsonl", BOOLQ_DEV)}


def trivia_item(qid, question, value=None, aliases=()):
    item = {"EntityPages": [{"DocSource": "TagMe", "Filename": f"{qid}.txt", "Title": "X"}],
            "Question": question, "QuestionId": qid, "QuestionSource": "http://www.quiz.example/",
            "SearchResults": []}
    if value is not None:
        item["Answer"] = {"Aliases": list(aliases), "NormalizedAliases": [a.lower() for a in aliases],
                          "NormalizedValue": value.lower(), "Type": "WikipediaEntity", "Value": value,
                          "MatchedWikiEntityName": value, "NormalizedMatchedWikiEntityName": value.lower()}
    return item


TRIVIA_DEV = [trivia_item("tc_1", "Which city is the capital of France", "Paris", ["Paris", "Paris, France"]),
              trivia_item("tc_2", "Who wrote Hamlet", "William Shakespeare",
                          ["William Shakespeare", "Shakespeare", "The Bard"])]
TRIVIA_TRAIN = [trivia_item(f"tr_{i}", f"Train question {i}", f"Answer {i}", [f"Answer {i}"]) for i in range(4)]


def write_trivia_file(path: Path, items) -> None:
    # The catalog builder parses the release's layout line by line (8-space indented records).
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"Data": items, "Domain": "Wikipedia", "Version": 1.0}, indent=4), encoding="utf-8")


def write_triviaqa(root: Path) -> Path:
    write_trivia_file(root / "qa" / "wikipedia-train.json", TRIVIA_TRAIN)
    write_trivia_file(root / "qa" / "wikipedia-dev.json", TRIVIA_DEV)
    write_trivia_file(root / "qa" / "wikipedia-test-without-answers.json", [trivia_item("tt_1", "Unanswered?")])
    return root


def hellaswag_item(ind, activity, ctx_a, ctx_b, endings, label, source="activitynet~v_1", split_type="indomain"):
    item = {"ind": ind, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}".strip(), "split": "val", "split_type": split_type, "endings": endings,
            "source_id": source}
    if label is not None:
        item["label"] = label
    return item


def hellaswag_fillers(label):
    # TFDS splits HellaSwag further by source (activitynet/wikihow) and domain (indomain/zeroshot) and
    # refuses an empty split, so each file needs one item of every kind.
    return [hellaswag_item(100 + i, "Filler", "Someone does something.", "Then", ["a.", "b.", "c.", "d."],
                           label, source=f"{source}~x", split_type=split_type)
            for i, (source, split_type) in enumerate((s, t) for s in ("activitynet", "wikihow")
                                                       for t in ("indomain", "zeroshot"))]


HELLASWAG_VAL = [
    hellaswag_item(24, "Roof shingle removal", "A man is sitting on a roof.", "he",
                   ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    hellaswag_item(92, "Making a cake", "[header] How to bake a cake [title] Preheat the oven.", "",
                   ["[step] Mix the flour.", "Eat the oven.", "Sing to the eggs.", "Paint the table."], 0,
                   source="wikihow~1"),
    *hellaswag_fillers(1),
]
HELLASWAG_TRAIN = [hellaswag_item(i, "Running", f"A person runs {i} miles.", "They",
                                  ["stop.", "fly.", "swim.", "sleep."], i % 4) for i in range(5)]
HELLASWAG_TRAIN += hellaswag_fillers(2)


def write_hellaswag(root: Path) -> dict[str, Path]:
    return {"hellaswag_train.jsonl": write_jsonl(root / "hellaswag_train.jsonl", HELLASWAG_TRAIN),
            "hellaswag_val.jsonl": write_jsonl(root / "hellaswag_val.jsonl", HELLASWAG_VAL),
            "hellaswag_test.jsonl": write_jsonl(root / "hellaswag_test.jsonl", hellaswag_fillers(None))}


PIQA_DEV = [({"id": "dev-1", "goal": "How do I ready a guinea pig cage for its new occupants?",
              "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
              "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material."},
             0)]
PIQA_TRAIN = [({"id": f"train-{i}", "goal": f"Goal {i}", "sol1": "first way", "sol2": "second way"}, i % 2)
              for i in range(4)]


def write_piqa(root: Path) -> Path:
    base = root / "physicaliqa-train-dev"
    for name, rows in (("train", PIQA_TRAIN), ("dev", PIQA_DEV)):
        write_jsonl(base / f"{name}.jsonl", [r for r, _ in rows])
        (base / f"{name}-labels.lst").write_text("".join(f"{label}\n" for _, label in rows))
    return root


WINO_DEV = [{"qID": "dev-1", "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
             "option1": "Sarah", "option2": "Maria", "answer": "1"}]
WINO_TRAIN = [{"qID": f"t-{i}", "sentence": f"The cup did not fit in the box because _ was too big {i}.",
               "option1": "the cup", "option2": "the box", "answer": "1" if i % 2 else "2"} for i in range(4)]


def write_winogrande(root: Path) -> Path:
    base = root / "winogrande_1.1"
    for size in ("xs", "s", "m", "l", "xl"):
        write_jsonl(base / f"train_{size}.jsonl", WINO_TRAIN)
    write_jsonl(base / "dev.jsonl", WINO_DEV)
    write_jsonl(base / "test.jsonl", [{k: v for k, v in WINO_DEV[0].items() if k != "answer"} | {"qID": "test-1"}])
    return root


def obqa_item(qid, stem, texts, key):
    return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, "ABCD")]},
            "fact1": "the sun is the source of energy for physical cycles on Earth", "humanScore": 1.0,
            "clarity": 2.0, "turkIdAnonymized": "b356d338b7", "answerKey": key}


OBQA_TEST = [obqa_item("8-343", "A person wants to start saving money so that they can afford a nice vacation",
                       ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                        "have lunch with friends"], "B")]
OBQA_TRAIN = [obqa_item(f"t{i}", f"Stem {i}", ["w", "x", "y", "z"], "ABCD"[i % 4]) for i in range(4)]


def write_openbookqa(root: Path) -> Path:
    base = root / "OpenBookQA-V1-Sep2018" / "Data" / "Additional"
    write_jsonl(base / "train_complete.jsonl", OBQA_TRAIN)
    write_jsonl(base / "dev_complete.jsonl", OBQA_TRAIN[:2])
    write_jsonl(base / "test_complete.jsonl", OBQA_TEST)
    return root


MMLU_ROWS = {
    "anatomy": [["What is the embryological origin of the hyoid bone?", "The first pharyngeal arch",
                 "The first and second pharyngeal arches", "The second pharyngeal arch",
                 "The second and third pharyngeal arches", "D"]],
    "high_school_mathematics": [["If 3x + 2 = 11, what is x?\nGive the exact value, please.", "1", "2", "3", "4", "C"]],
}


def write_mmlu(root: Path) -> Path:
    for folder in ("dev", "val", "test"):
        for subject, rows in MMLU_ROWS.items():
            path = root / "data" / folder / f"{subject}_{folder}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = rows if folder == "test" else [[f"{subject} {folder} q{i}", "a", "b", "c", "d", "ABCD"[i]]
                                                  for i in range(4)]
            with path.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
    return root


# --------------------------------------------------------------------------------------------------
# Preparing through the real builders with the download step pointed at the files above
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_downloads(files: dict[str, Path]):
    """DownloadManager.download/download_and_extract answer with local files, keyed by URL basename
    (an archive's key maps to the folder it would extract to); yields the URLs asked for."""
    asked: list[str] = []

    def resolve(self, url_or_urls):
        if isinstance(url_or_urls, dict):
            return {k: resolve(self, v) for k, v in url_or_urls.items()}
        if isinstance(url_or_urls, (list, tuple)):
            return [resolve(self, v) for v in url_or_urls]
        asked.append(url_or_urls)
        return epath.Path(files[url_or_urls.rstrip("/").rsplit("/", 1)[-1]])

    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", resolve), \
            mock.patch.object(tfds.download.DownloadManager, "download", resolve):
        yield asked


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One TFDS data_dir with every tested benchmark prepared from the raw files."""
    raw = tmp_path_factory.mktemp("raw")
    out = tmp_path_factory.mktemp("tfds")
    preparations = {
        "arc_easy": {"ARC-V1-Feb2018.zip": write_arc(raw / "arc")},
        "arc_challenge": {"ARC-V1-Feb2018.zip": raw / "arc"},
        "gsm8k": write_gsm8k(raw / "gsm8k"),
        "boolq": write_boolq(raw / "boolq"),
        "triviaqa": {"triviaqa-rc.tar.gz": write_triviaqa(raw / "triviaqa")},
        "hellaswag": write_hellaswag(raw / "hellaswag"),
        "piqa": {"physicaliqa-train-dev.zip": write_piqa(raw / "piqa")},
        "winogrande": {"winogrande_1.1.zip": write_winogrande(raw / "winogrande")},
        "openbookqa": {"OpenBookQA-V1-Sep2018.zip": write_openbookqa(raw / "openbookqa")},
    }
    for name, files in preparations.items():
        with fake_downloads(files) as asked:
            bm.prepare(name, data_dir=out)
        assert asked, f"{name}: the builder never asked for its raw files"
    bm.prepare("mmlu", data_dir=out, manual_dir=write_mmlu(raw / "mmlu"))
    assert "tensorflow" not in sys.modules
    return out
