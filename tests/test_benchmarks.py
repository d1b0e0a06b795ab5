"""TFDS benchmarks end to end, offline: upstream-format raw files -> the real TFDS builders (download
patched to the files) -> ArrayRecord -> tfds.data_source -> our preprocessing -> Task prompts/parsing.

No TensorFlow is installed here; that is the point (every builder below prepares and reads without it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path
from unittest import mock

import pytest

import tensorflow_datasets as tfds
from etils import epath

from spt_jax.errors import DataError
from spt_jax.tasks import benchmarks as bm

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
              "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
                      "material."},
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


# --------------------------------------------------------------------------------------------------
# Each benchmark through its Task: records, rendered prompts and targets, parsing of the gold target
# --------------------------------------------------------------------------------------------------


def check_gold_round_trip(task, record):
    """The gold target, fed back as a model output, parses to the gold answer and scores correct."""
    target = task.render_target(record)
    parsed, correct = task.score(target, record)
    assert parsed.valid and correct, (target, parsed)
    return parsed


def by(records, field, value):
    (match,) = [r for r in records if r[field] == value]
    return match


def test_arc_easy_records_prompt_and_letters(data_dir):
    task = bm.benchmark_task("arc_easy", data_dir)
    test = task.records("test")
    assert len(test) == 2 and len(task.records("train")) == 6 and len(task.records("validation")) == 2
    photo = by(test, "id", "Mercury_1")
    assert photo == {"id": "Mercury_1", "question": "Which gas do plants take in for photosynthesis?",
                     "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "answer": "B"}
    assert task.render_input(photo) == ("Question: Which gas do plants take in for photosynthesis?\n"
                                        "A. oxygen\nB. carbon dioxide\nC. nitrogen\nD. helium\nAnswer:")
    assert task.render_target(photo) == " B"
    assert task.zero_shot_prompt(photo).startswith(
        "The following are multiple choice questions (with answers) about science.\n\nQuestion: ")
    # numeric labels ('1'..'4', answerKey '3') become letters
    assert by(test, "id", "NYSEDREGENTS_2")["answer"] == "C"
    assert check_gold_round_trip(task, photo).answer == "B"
    assert task.score(" (b).", photo)[1]  # case and punctuation ignored, like lm-eval's exact_match
    assert task.score(" C", photo) == (task.parse(" C"), False)
    assert not task.parse(" B because plants breathe").valid
    assert task.choice_continuations(photo) == ([" A", " B", " C", " D"], 1)


def test_arc_challenge_five_choices(data_dir):
    task = bm.benchmark_task("arc_challenge", data_dir)
    (record,) = task.records("test")
    assert record["choices"][-1] == "crab" and record["answer"] == "C"
    assert task.render_input(record).endswith("D. squid\nE. crab\nAnswer:")
    assert task.parse(" E").valid and not task.parse(" F").valid
    check_gold_round_trip(task, record)


def test_gsm8k_records_prompt_and_strict_match(data_dir):
    task = bm.benchmark_task("gsm8k", data_dir)
    assert set(task.split_names) == {"train", "test"}
    test = task.records("test")
    clips = by(test, "answer", "72")
    assert clips["question"] == GSM8K_TEST[0]["question"]
    assert task.render_input(clips) == f"Question: {GSM8K_TEST[0]['question']}\nAnswer:"
    assert task.render_target(clips) == " " + GSM8K_TEST[0]["answer"]  # lm-eval's target: the whole solution
    assert check_gold_round_trip(task, clips).answer == "72"
    # lm-eval strict-match: the first '#### <number>' anywhere; commas and '$' do not matter for the value
    pens = by(test, "answer", "3600")
    assert task.score("He computes 1200*3.\n#### 3,600\n\nQuestion: next", pens)[1]
    assert not task.parse("The answer is 3600.").valid  # no '####': a format failure
    assert task.score("#### 3601", pens) == (task.parse("#### 3601"), False)
    assert "Question:" in task.stop_sequences
    assert len(task.fewshot_prefix(2, seed=0).split("Question:")) == 3
    with pytest.raises(DataError, match="has no split 'validation'; it has"):
        bm.read_split("gsm8k", data_dir, "validation")


def test_boolq_records_prompt_and_yes_no(data_dir):
    task = bm.benchmark_task("boolq", data_dir)
    assert task.split_names["test"] == "validation"  # the split lm-eval reports
    test = task.records("test")
    france = by(test, "title", "Time in France")
    assert france["answer"] is False
    assert task.render_input(france) == ("Metropolitan France uses Central European Time (UTC+01:00).\n"
                                         "Question: is france the same timezone as the uk?\nAnswer:")
    assert task.render_target(france) == " no"
    check_gold_round_trip(task, france)
    persian = by(test, "title", "Persian language")
    assert task.render_target(persian) == " yes"
    assert task.score(" Yes.", persian)[1] and not task.score(" no", persian)[1]
    assert not task.parse(" maybe").valid


def test_triviaqa_records_aliases_and_stops(data_dir):
    task = bm.benchmark_task("triviaqa", data_dir)
    test = task.records("test")  # the validation split: TriviaQA's test answers are not public
    assert {r["id"] for r in test} == {"tc_1", "tc_2"}
    hamlet = by(test, "id", "tc_2")
    assert hamlet["aliases"] == ["William Shakespeare", "Shakespeare", "The Bard"]
    assert task.render_input(hamlet) == "Question: Who wrote Hamlet?\nAnswer:"  # lm-eval appends the '?'
    assert task.render_target(hamlet) == " William Shakespeare"
    check_gold_round_trip(task, hamlet)
    assert task.score(" the bard. He wrote it in 1600", hamlet)[1]  # cut at '.', alias, case ignored
    assert task.score(" Shakespeare, of course", hamlet)[1]  # cut at ','
    assert not task.score(" Marlowe", hamlet)[1]
    paris = by(test, "id", "tc_1")
    assert task.score(" Paris\nQuestion: ...", paris)[1]
    assert len(task.records("train")) == 4


def test_hellaswag_preprocessing_and_prompt(data_dir):
    task = bm.benchmark_task("hellaswag", data_dir)
    test = task.records("test")  # validation, all 2 + 4 filler items
    assert len(test) == 6
    roof = by(test, "source_id", "activitynet~v_1")
    assert roof["question"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert roof["answer"] == "D"
    cake = by(test, "source_id", "wikihow~1")
    assert cake["question"] == "Making a cake: How to bake a cake. Preheat the oven."
    assert cake["choices"][0] == "Mix the flour."
    assert task.render_input(cake) == ("Making a cake: How to bake a cake. Preheat the oven.\n"
                                       "A. Mix the flour.\nB. Eat the oven.\nC. Sing to the eggs.\n"
                                       "D. Paint the table.\nAnswer:")
    check_gold_round_trip(task, cake)


def test_piqa_winogrande_openbookqa(data_dir):
    piqa = bm.benchmark_task("piqa", data_dir)
    (goal,) = piqa.records("test")
    assert goal["answer"] == "A" and goal["choices"][1].endswith("ripped jeans material.")
    assert piqa.render_input(goal).startswith("Question: How do I ready a guinea pig cage")
    check_gold_round_trip(piqa, goal)
    assert [r["answer"] for r in sorted(piqa.records("train"), key=lambda r: r["id"])] == ["A", "B", "A", "B"]

    wino = bm.benchmark_task("winogrande", data_dir)
    (sentence,) = wino.records("test")
    assert sentence["choices"] == ["Sarah", "Maria"] and sentence["answer"] == "A"
    assert wino.render_input(sentence) == (WINO_DEV[0]["sentence"] + "\nA. Sarah\nB. Maria\nAnswer:")
    assert {r["answer"] for r in wino.records("train")} == {"A", "B"}  # train_xl
    check_gold_round_trip(wino, sentence)

    obqa = bm.benchmark_task("openbookqa", data_dir)
    (saving,) = obqa.records("test")
    assert saving["answer"] == "B" and saving["choices"][1] == "quit eating lunch out"
    assert obqa.render_input(saving).startswith("A person wants to start saving money")
    check_gold_round_trip(obqa, saving)


def test_mmlu_builder_over_csvs(data_dir):
    task = bm.benchmark_task("mmlu", data_dir)
    test = task.records("test")
    assert sorted(r["subject"] for r in test) == ["anatomy", "high_school_mathematics"]
    math = by(test, "subject", "high_school_mathematics")
    assert math["question"] == "If 3x + 2 = 11, what is x?\nGive the exact value, please."  # quoted newline kept
    assert math["choices"] == ["1", "2", "3", "4"] and math["answer"] == "C"
    assert task.render_input(math) == (
        "If 3x + 2 = 11, what is x?\nGive the exact value, please.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    check_gold_round_trip(task, math)
    assert list((data_dir / "mmlu" / "1.0.0").glob("mmlu-test.array_record-*"))  # a real TFDS dataset
    assert len(task.records("train")) == 8 and len(task.records("validation")) == 8  # dev, val

    anatomy = bm.benchmark_task("mmlu:anatomy", data_dir)
    (bone,) = anatomy.records("test")
    assert bone["answer"] == "D" and all(r["subject"] == "anatomy" for r in anatomy.records("train"))
    assert anatomy.zero_shot_prompt(bone).startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert bm.benchmark_task("mmlu:high_school_mathematics", data_dir).instruction.endswith(
        "about high school mathematics.")


# --------------------------------------------------------------------------------------------------
# Errors, registry, command line
# --------------------------------------------------------------------------------------------------


def test_unprepared_dataset_says_what_and_how(tmp_path):
    task = bm.benchmark_task("gsm8k", tmp_path)
    with pytest.raises(DataError) as info:
        task.records("test")
    message = str(info.value)
    assert "'gsm8k'" in message and str(tmp_path) in message
    assert f"python -m spt_jax.tasks.benchmarks prepare gsm8k --data-dir {tmp_path}" in message
    with pytest.raises(DataError, match=r"MMLU CSVs .*--manual-dir"):
        bm.benchmark_task("mmlu", tmp_path).records("test")
    with pytest.raises(DataError, match="prepare triviaqa --data-dir"):  # read by TFDS name
        bm.read_split("trivia_qa/rc.nocontext", tmp_path, "train")
    assert not (tmp_path / "gsm8k").exists()  # looking did not download or create anything


def test_prepare_mmlu_without_csvs_names_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"expected folders dev/, val/ and test/"):
        bm.prepare("mmlu", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "nothing")
    (tmp_path / "csv" / "data" / "test").mkdir(parents=True)
    (tmp_path / "csv" / "data" / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,E\n")
    for folder in ("dev", "val"):
        (tmp_path / "csv" / "data" / folder).mkdir()
        (tmp_path / "csv" / "data" / folder / f"anatomy_{folder}.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(DataError, match=r"anatomy_test.csv row 1: answer column is 'E'"):
        bm.prepare("mmlu", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "csv")


def test_prepare_offline_says_so(tmp_path):
    import requests

    def offline(self, url_or_urls):
        raise requests.exceptions.ConnectionError("Failed to resolve 'raw.githubusercontent.com'")

    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", offline), \
            pytest.raises(DataError, match=r"preparing benchmark 'gsm8k' .* failed: Failed to resolve .*offline"):
        bm.prepare("gsm8k", data_dir=tmp_path)


def test_unknown_names():
    with pytest.raises(DataError, match="did you mean 'arc_easy'"):
        bm.benchmark_task("arc_esay")
    with pytest.raises(DataError, match="mmlu:<subject>"):
        bm.benchmark_task("mmlu:astrology")


def test_registry_lists_benchmarks_and_reads_tfds_data_dir(monkeypatch, tmp_path):
    import spt_jax.tasks as tasks_module
    from spt_jax.tasks import get_task, list_tasks

    # a private registry whose lazy benchmark hook has not run yet, whatever other tests did
    monkeypatch.setattr(tasks_module, "_REGISTRY", dict(tasks_module._REGISTRY))
    monkeypatch.setattr(tasks_module, "_benchmarks_loaded", False)
    names = list_tasks()
    for name in ("arc_easy", "arc_challenge", "gsm8k", "boolq", "triviaqa", "hellaswag", "piqa", "winogrande",
                 "openbookqa", "mmlu", "mmlu:anatomy"):
        assert name in names
    assert len([n for n in names if n.startswith("mmlu:")]) == 57
    # registered tasks resolve the data_dir when they load: $TFDS_DATA_DIR counts even if set later
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=f"not prepared in data_dir {tmp_path}"):
        get_task("piqa").records("test")


def test_main_lists_and_reports_errors_in_one_line(capsys, tmp_path):
    assert bm.main(["list"]) == 0
    assert "mmlu:virology" in capsys.readouterr().out.split()
    assert bm.main(["prepare", "mmlu", "--data-dir", str(tmp_path), "--manual-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MMLU CSVs not found") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# Pure preprocessing
# --------------------------------------------------------------------------------------------------


def test_arc_letter_and_record():
    assert [bm.arc_letter(x) for x in ("1", "2", "5", "A", "d")] == ["A", "B", "E", "A", "D"]
    raw = {"id": "x", "question": "Q?", "choices": {"text": ["p", "q", "r"], "label": ["1", "2", "3"]},
           "answerKey": "2"}
    assert bm.arc_record(raw) == {"id": "x", "question": "Q?", "choices": ["p", "q", "r"], "answer": "B"}
    with pytest.raises(DataError, match="answerKey 'D'"):
        bm.arc_record({**raw, "answerKey": "D"})


def test_gsm8k_record_from_upstream_line_and_tfds_example():
    line = {"question": "Q", "answer": "2+2 = <<2+2=4>>4\n#### 4"}
    from_line = bm.gsm8k_record(line)
    from_tfds = bm.gsm8k_record({**line, "annotation": "2+2 = <<2+2=4>>4\n", "short_answer": "4"})
    assert from_line == from_tfds == {"question": "Q", "reasoning": "2+2 = <<2+2=4>>4\n", "answer": "4",
                                      "solution": line["answer"]}
    with pytest.raises(DataError, match="####"):
        bm.gsm8k_record({"question": "Q", "answer": "4"})


def test_hellaswag_preprocess_matches_lm_eval():
    # exactly lm-eval's output, including the space a removed leading tag leaves behind
    assert bm.hellaswag_preprocess(" [header] How to tie a tie [title] Cross the ends.  ") == \
        " How to tie a tie. Cross the ends."
    assert bm.hellaswag_preprocess("A  man [step] walks.") == "A man walks."
    record = bm.hellaswag_record({"activity_label": "Act", "context": "ctx", "endings": ["e [x]"] * 4,
                                  "label": -1, "source_id": "s"})
    assert record["answer"] is None and record["choices"] == ["e"] * 4  # unlabelled test item


def test_small_record_mappers():
    assert bm.winogrande_record({"sentence": "s _", "option1": "a", "option2": "b", "label": "2"})["answer"] == "B"
    assert bm.winogrande_record({"sentence": "s _", "option1": "a", "option2": "b", "label": None})["answer"] is None
    assert bm.piqa_record({"id": "i", "goal": "g", "sol1": "x", "sol2": "y", "label": "1"})["answer"] == "B"
    assert bm.boolq_record({"question": "q", "passage": "p", "answer": 1})["answer"] is True
    obqa = bm.openbookqa_record({"question": {"stem": "s", **{f"choice_{c}": c.lower() for c in "ABCD"}},
                                 "answerKey": "C"})
    assert obqa == {"question": "s", "choices": ["a", "b", "c", "d"], "answer": "C"}
    trivia = bm.triviaqa_record({"question_id": "q1", "question": "Q",
                                 "answer": {"value": "V", "aliases": ["V", "v2"]}})
    assert trivia == {"id": "q1", "question": "Q", "answer": "V", "aliases": ["V", "v2"]}


def test_decode_feature_class_labels_and_sequences():
    import numpy as np

    features = tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["1", "2"]),
        "choices": tfds.features.Sequence({"text": tfds.features.Text(),
                                           "label": tfds.features.ClassLabel(names=["A", "B"])}),
        "score": np.float32,
    })
    value = {"text": b"caf\xc3\xa9", "label": np.int64(-1), "score": np.float32(0.5),
             "choices": {"text": np.array([b"x", b"y"], dtype=object), "label": np.array([1, 0])}}
    assert bm.decode_feature(value, features) == {"text": "café", "label": None, "score": 0.5,
                                                  "choices": {"text": ["x", "y"], "label": ["B", "A"]}}
