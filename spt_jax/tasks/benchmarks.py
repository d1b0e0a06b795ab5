"""Real benchmarks through tensorflow-datasets, read without TensorFlow.

Every benchmark is a TFDS dataset prepared once, in ArrayRecord format, under a data_dir (default
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) and read through TFDS's data-source API
(``tfds.data_source``, i.e. ``builder.as_data_source``) -- the TFDS read path that needs neither
TensorFlow nor the network. Nothing here downloads at evaluation time: an unprepared
dataset raises a ``DataError`` that says how to prepare it (``prepare()`` below, or
``python -m spt_jax.tasks.benchmarks prepare NAME``). MMLU, absent from the TFDS catalog, comes from the
library-owned builder in ``spt_jax.tasks.mmlu`` over the user's CSV files.

How each benchmark becomes a Task (its lm-eval prompt, answer format and cloze form) lives in
`spt_jax.tasks.benchmark_prompts`.

The small ``*_record`` functions turn one TFDS example (decoded to plain Python) into one task record;
they are pure so each benchmark's preprocessing can be tested on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from spt_jax.errors import DataError, MissingPackageError, SptError, close_names
from spt_jax.tasks import benchmark_prompts as prompts
from spt_jax.tasks.answers import LETTERS
from spt_jax.tasks.task import Task

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - tensorflow-datasets is a core dependency
    raise MissingPackageError(f"the TFDS benchmarks need tensorflow-datasets "
                              f"(pip install tensorflow-datasets): {e}") from e

from spt_jax.tasks import mmlu as mmlu_builder

PREPARE_MODULE = "spt_jax.tasks.benchmarks"
_READ_CHUNK = 4096
_PROGRESS_FROM = 20_000  # show a progress bar for splits at least this large

# --------------------------------------------------------------------------------------------------
# Record preprocessing: one decoded TFDS example -> one task record (pure functions)
# --------------------------------------------------------------------------------------------------


def arc_letter(label: str) -> str:
    """An ARC choice label as a letter: a few ARC questions are labelled '1'..'5' instead of 'A'..'E'."""
    label = str(label).strip()
    if label.isdigit() and 1 <= int(label) <= 5:
        return LETTERS[int(label) - 1]
    return label.upper()


def arc_record(raw: Mapping) -> dict:
    """ARC: the gold letter is the answerKey's position among the choice labels (lm-eval's target)."""
    labels = [arc_letter(label) for label in raw["choices"]["label"]]
    key = arc_letter(raw["answerKey"])
    if key not in labels:
        raise DataError(f"ARC record {raw.get('id')!r}: answerKey {raw['answerKey']!r} is not one of the "
                        f"choice labels {raw['choices']['label']!r}")
    return {"id": raw["id"], "question": raw["question"], "choices": list(raw["choices"]["text"]),
            "answer": LETTERS[labels.index(key)]}


def gsm8k_record(raw: Mapping) -> dict:
    """GSM8K: split the solution into its reasoning and the final number after '#### '.

    Accepts the TFDS example (which already carries ``annotation``/``short_answer``) or an upstream
    JSONL line (only ``answer``); the target re-joins them, so it equals the upstream answer text.
    """
    solution = raw["answer"]
    if "short_answer" in raw and "annotation" in raw:
        reasoning, final = raw["annotation"], raw["short_answer"]
    else:
        reasoning, sep, final = solution.rpartition("#### ")
        if not sep:
            raise DataError(f"GSM8K answer has no '#### <number>' line: {solution[-80:]!r}")
    return {"question": raw["question"], "reasoning": reasoning, "answer": final.strip(), "solution": solution}


def boolq_record(raw: Mapping) -> dict:
    return {"question": raw["question"], "passage": raw["passage"], "title": raw.get("title", ""),
            "answer": bool(raw["answer"])}


def triviaqa_record(raw: Mapping) -> dict:
    """TriviaQA: the answer's value is the gold, its aliases (lm-eval's targets) are also accepted."""
    answer = raw["answer"]
    return {"id": raw["question_id"], "question": raw["question"], "answer": answer["value"],
            "aliases": list(answer["aliases"])}


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow '[title]' markers become '. ', other [tags] go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_record(raw: Mapping) -> dict:
    """HellaSwag: query '<activity>: <context>' and cleaned endings, as lm-eval's process_docs.

    TFDS keeps the raw ``ctx`` (ctx_a + ' ' + ctx_b) but not ctx_a/ctx_b, so lm-eval's
    ``ctx_b.capitalize()`` cannot be applied; the context is otherwise identical.
    """
    label = raw["label"]
    return {"source_id": raw.get("source_id", ""),
            "question": hellaswag_preprocess(raw["activity_label"] + ": " + raw["context"]),
            # stripped too: a WikiHow ending starting with '[step]' would otherwise keep a leading space
            "choices": [hellaswag_preprocess(e).strip() for e in raw["endings"]],
            "answer": LETTERS[int(label)] if label is not None and int(label) >= 0 else None}


def piqa_record(raw: Mapping) -> dict:
    label = raw["label"]  # ClassLabel name '0' or '1'
    return {"id": raw["id"], "question": raw["goal"], "choices": [raw["sol1"], raw["sol2"]],
            "answer": LETTERS[int(label)] if label is not None else None}


def winogrande_record(raw: Mapping) -> dict:
    label = raw["label"]  # ClassLabel name '1' or '2'; None on the unlabelled test split
    return {"question": raw["sentence"], "choices": [raw["option1"], raw["option2"]],
            "answer": LETTERS[int(label) - 1] if label is not None else None}


def openbookqa_record(raw: Mapping) -> dict:
    q = raw["question"]
    return {"question": q["stem"], "choices": [q[f"choice_{c}"] for c in "ABCD"], "answer": raw["answerKey"]}


def mmlu_record(raw: Mapping) -> dict:
    return {"subject": raw["subject"], "question": raw["question"].strip(), "choices": list(raw["choices"]),
            "answer": raw["answer"]}


# --------------------------------------------------------------------------------------------------
# Reading prepared TFDS data
# --------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Where TFDS data lives unless told otherwise: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def decode_feature(value: Any, feature: Any) -> Any:
    """A decoded TFDS value as plain Python, guided by its feature: Text -> str, ClassLabel -> its name
    (None for the -1 of unlabelled splits), numpy -> Python numbers/lists, nested dicts/sequences."""
    if isinstance(feature, tfds.features.FeaturesDict):
        return {k: decode_feature(value[k], f) for k, f in feature.items()}
    if isinstance(feature, tfds.features.Sequence):
        inner = feature.feature
        if isinstance(inner, tfds.features.FeaturesDict):  # stored as a dict of equal-length lists
            return {k: [decode_feature(v, f) for v in value[k]] for k, f in inner.items()}
        return [decode_feature(v, inner) for v in value]
    if isinstance(feature, tfds.features.ClassLabel):
        index = int(value)
        return feature.int2str(index) if index >= 0 else None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [decode_feature(v, None) for v in value.tolist()] if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _prepare_command(benchmark: str, data_dir: Path) -> str:
    extra = " --manual-dir /path/to/mmlu" if benchmark == "mmlu" else ""
    return f"python -m {PREPARE_MODULE} prepare {benchmark} --data-dir {data_dir}{extra}"


def _benchmark_of(tfds_name: str) -> str | None:
    return next((spec.name for spec in BENCHMARKS.values() if spec.tfds_name == tfds_name), None)


def _prepare_hint(tfds_name: str, data_dir: Path) -> str:
    benchmark = _benchmark_of(tfds_name)
    if benchmark is None:
        return f"prepare it with TFDS, file_format='array_record', into {data_dir}"
    if benchmark == "mmlu":
        return (f"put the MMLU CSVs (data/dev/<subject>_dev.csv, data/val/<subject>_val.csv, "
                f"data/test/<subject>_test.csv) in a folder and run: {_prepare_command(benchmark, data_dir)}")
    return f"prepare it once (downloads the raw files) with: {_prepare_command(benchmark, data_dir)}"


def tfds_builder(tfds_name: str, data_dir: Path, **kwargs):
    """The TFDS builder of a catalog dataset, or of our own MMLU builder (kept out of the TFDS registry)."""
    if tfds_name == mmlu_builder.Mmlu.name:
        return mmlu_builder.Mmlu(data_dir=os.fspath(data_dir), **kwargs)
    return tfds.builder(tfds_name, data_dir=os.fspath(data_dir), **kwargs)


def open_prepared(benchmark: str, tfds_name: str, data_dir: Path):
    """The TFDS builder of a dataset prepared in ``data_dir`` as ArrayRecord; DataError otherwise."""
    builder = tfds_builder(tfds_name, data_dir)
    if not builder.is_prepared():
        raise DataError(f"benchmark {benchmark!r} needs the TFDS dataset {tfds_name!r}, which is not prepared "
                        f"in data_dir {data_dir} (looked in {builder.data_dir}); "
                        f"{_prepare_hint(tfds_name, data_dir)}; or point $TFDS_DATA_DIR / data_dir at a folder "
                        "where it is prepared (in array_record format)")
    file_format = builder.info.file_format
    if file_format is not None and file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DataError(f"benchmark {benchmark!r}: TFDS dataset {tfds_name!r} in {builder.data_dir} was "
                        f"prepared as {file_format.value}, but reading without TensorFlow needs array_record; "
                        f"{_prepare_hint(tfds_name, data_dir)} (into another data_dir)")
    return builder


def read_split(tfds_name: str, data_dir: str | os.PathLike, split: str, benchmark: str | None = None
               ) -> tuple[dict, ...]:
    """Every example of one prepared split, decoded to plain Python."""
    benchmark = benchmark or tfds_name
    builder = open_prepared(benchmark, tfds_name, Path(data_dir))
    if split not in builder.info.splits:
        raise DataError(f"benchmark {benchmark!r}: TFDS dataset {tfds_name!r} in {builder.data_dir} has no "
                        f"split {split!r}; it has {', '.join(builder.info.splits)}")
    source = builder.as_data_source(split=split)  # what tfds.data_source(name, split, data_dir) returns
    features = builder.info.features
    records = []
    # Batched reads are about twice as fast as one record at a time (TFDS parses ~0.5 ms a record
    # either way, so the largest split, TriviaQA train, takes about a minute).
    with tqdm(total=len(source), desc=f"reading {tfds_name} {split}", unit=" records",
              disable=len(source) < _PROGRESS_FROM, leave=False) as progress:
        for start in range(0, len(source), _READ_CHUNK):
            batch = source.__getitems__(list(range(start, min(start + _READ_CHUNK, len(source)))))
            records.extend(decode_feature(example, features) for example in batch)
            progress.update(len(batch))
    return tuple(records)


@functools.lru_cache(maxsize=4)
def _read_split_shared(tfds_name: str, data_dir: str, split: str, benchmark: str) -> tuple[dict, ...]:
    # The 57 'mmlu:<subject>' tasks each filter the same split: read it once, not 57 times.
    return read_split(tfds_name, data_dir, split, benchmark)


@dataclasses.dataclass(frozen=True, eq=False)
class BenchmarkSource:
    """A benchmark's records from its prepared TFDS dataset: read, decode, preprocess, optionally filter.

    ``data_dir`` None means the default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), looked up at
    load time so setting the variable after import still counts.
    """

    benchmark: str
    tfds_name: str
    splits: tuple[str, ...]
    preprocess: Callable[[Mapping], dict]
    data_dir: str | os.PathLike | None = None
    keep: Callable[[dict], bool] | None = None

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir is not None else default_data_dir()

    def load(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise DataError(f"benchmark {self.benchmark!r} has no split {split!r}; "
                            f"splits: {', '.join(self.splits)}")
        data_dir = os.fspath(self.resolved_data_dir().resolve())
        if self.keep is None:  # the Task caches what it loads, so a second copy here would only cost memory
            return [self.preprocess(r) for r in read_split(self.tfds_name, data_dir, split, self.benchmark)]
        base = self.benchmark.split(":", 1)[0]
        raw = _read_split_shared(self.tfds_name, data_dir, split, base)
        return [record for record in map(self.preprocess, raw) if self.keep(record)]


# --------------------------------------------------------------------------------------------------
# The benchmarks: lm-eval-compatible task definitions
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """What a benchmark reads (TFDS name, its splits, the preprocessing) and how it becomes a Task."""

    name: str
    tfds_name: str
    tfds_splits: tuple[str, ...]
    split_names: Mapping[str, str]  # Task split -> TFDS split (test = the split lm-eval reports)
    preprocess: Callable[[Mapping], dict]
    make_task: Callable[..., Task]
    lm_eval: str  # the lm-evaluation-harness task this one mirrors


_TEST_IS_VALIDATION = "test = the validation split, which lm-eval reports (the test labels are not public)"

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec for spec in (
        BenchmarkSpec("arc_easy", "ai2_arc/ARC-Easy", ("train", "validation", "test"),
                      {"train": "train", "validation": "validation", "test": "test"}, arc_record, prompts.arc_task,
                      "arc_easy (letter form of its prompt; MMLU-generative answer format)"),
        BenchmarkSpec("arc_challenge", "ai2_arc/ARC-Challenge", ("train", "validation", "test"),
                      {"train": "train", "validation": "validation", "test": "test"}, arc_record, prompts.arc_task,
                      "arc_challenge (letter form of its prompt; MMLU-generative answer format)"),
        BenchmarkSpec("gsm8k", "gsm8k", ("train", "test", "train_socratic", "test_socratic"),
                      {"train": "train", "test": "test"}, gsm8k_record, prompts.gsm8k_task,
                      "gsm8k v3 (strict-match)"),
        BenchmarkSpec("boolq", "bool_q", ("train", "validation"),
                      {"train": "train", "test": "validation"}, boolq_record, prompts.boolq_task,
                      f"boolq-seq2seq; {_TEST_IS_VALIDATION}"),
        BenchmarkSpec("triviaqa", "trivia_qa/rc.nocontext", ("train", "validation", "test"),
                      {"train": "train", "test": "validation"}, triviaqa_record, prompts.triviaqa_task,
                      f"triviaqa v3; {_TEST_IS_VALIDATION}"),
        BenchmarkSpec("hellaswag", "hellaswag", ("train", "validation", "test"),
                      {"train": "train", "test": "validation"}, hellaswag_record, prompts.hellaswag_task,
                      f"hellaswag (its preprocessing; letter form); {_TEST_IS_VALIDATION}"),
        BenchmarkSpec("piqa", "piqa", ("train", "validation"),
                      {"train": "train", "test": "validation"}, piqa_record, prompts.piqa_task,
                      f"piqa (letter form of its prompt); {_TEST_IS_VALIDATION}"),
        BenchmarkSpec("winogrande", "winogrande",
                      ("train_xs", "train_s", "train_m", "train_l", "train_xl", "validation", "test"),
                      {"train": "train_xl", "test": "validation"}, winogrande_record, prompts.winogrande_task,
                      f"winogrande (winogrande_xl train; letter form); {_TEST_IS_VALIDATION}"),
        BenchmarkSpec("openbookqa", "openbookqa", ("train", "validation", "test"),
                      {"train": "train", "validation": "validation", "test": "test"}, openbookqa_record,
                      prompts.openbookqa_task, "openbookqa (letter form of its prompt)"),
        BenchmarkSpec("mmlu", "mmlu", ("dev", "validation", "test"),
                      {"train": "dev", "validation": "validation", "test": "test"}, mmlu_record, prompts.mmlu_task,
                      "mmlu_generative (train = the 5-per-subject dev split, lm-eval's few-shot split)"),
    )
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The spec of a benchmark name ('mmlu:<subject>' -> 'mmlu'); DataError with close names if unknown."""
    base = name.split(":", 1)[0]
    if base not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}{close_names(name, benchmark_names())}; "
                        f"benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[base]


def benchmark_names() -> list[str]:
    """Every benchmark task name, per-subject MMLU tasks ('mmlu:<subject>') included."""
    return [*BENCHMARKS, *(f"mmlu:{s}" for s in mmlu_builder.MMLU_SUBJECTS)]


def _subject_filter(subject: str) -> Callable[[dict], bool]:
    return lambda record: record["subject"] == subject


def benchmark_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """The Task of one benchmark (e.g. 'arc_easy', 'mmlu', 'mmlu:anatomy') reading from ``data_dir``."""
    spec = benchmark_spec(name)
    subject = None
    if ":" in name:
        subject = name.split(":", 1)[1]
        if spec.name != "mmlu" or subject not in mmlu_builder.MMLU_SUBJECTS:
            raise DataError(f"unknown benchmark {name!r}{close_names(name, benchmark_names())}; only MMLU "
                            "has per-subject tasks, named 'mmlu:<subject>'")
    source = BenchmarkSource(benchmark=name, tfds_name=spec.tfds_name, splits=spec.tfds_splits,
                             preprocess=spec.preprocess, data_dir=data_dir,
                             keep=_subject_filter(subject) if subject else None)
    description = (f"{name}: TFDS {spec.tfds_name}, mirrors lm-evaluation-harness {spec.lm_eval}"
                   + (f", subject {subject}" if subject else ""))
    if subject:
        return prompts.mmlu_task(name, source, spec.split_names, description, subject=subject)
    return spec.make_task(name, source, spec.split_names, description)


def register_benchmarks(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Register every benchmark task (data is read only when a split is first asked for)."""
    from spt_jax.tasks import register_task

    names = benchmark_names()
    for name in names:
        register_task(benchmark_task(name, data_dir))
    return names


# --------------------------------------------------------------------------------------------------
# Preparing (downloading and converting once, outside evaluation)
# --------------------------------------------------------------------------------------------------


def _trivia_qa_builder_cls():
    """The catalog TriviaQA builder, minus its one TensorFlow use (``tf.io.gfile.glob`` on the
    extracted files, which fails without TensorFlow); the data it writes is the catalog's own."""
    from etils import epath
    from tensorflow_datasets.datasets.trivia_qa import trivia_qa_dataset_builder as upstream

    class TriviaQaWithoutTensorflow(upstream.Builder, skip_registration=True):
        name = "trivia_qa"
        pkg_dir_path = upstream.Builder._get_pkg_dir_path()  # README/checksums of the catalog builder
        code_path = upstream.Builder.code_path

        def _split_generators(self, dl_manager):
            cfg = self.builder_config
            if cfg.unfiltered or not cfg.exclude_context:
                raise DataError(f"only trivia_qa/rc.nocontext can be prepared without TensorFlow, not "
                                f"trivia_qa/{cfg.name}")
            rc = epath.Path(dl_manager.download_and_extract({"rc": upstream._DOWNLOAD_URL_TMPL.format("rc")})["rc"])

            def files(pattern):
                return sorted(os.fspath(p) for p in (rc / "qa").glob(pattern))

            return [
                tfds.core.SplitGenerator(name=split, gen_kwargs={"files": files(pattern), "web_dir": None,
                                                                 "wiki_dir": None})
                for split, pattern in ((tfds.Split.TRAIN, upstream._TRAIN_FILE_FORMAT),
                                       (tfds.Split.VALIDATION, upstream._VALIDATION_FILE_FORMAT),
                                       (tfds.Split.TEST, upstream._TEST_FILE_FORMAT))
            ]

    return TriviaQaWithoutTensorflow


def _builder_for_prepare(tfds_name: str, data_dir: Path):
    if tfds_name.startswith("trivia_qa/"):
        cls = _trivia_qa_builder_cls()
        return cls(data_dir=os.fspath(data_dir), config=tfds_name.split("/", 1)[1], file_format="array_record")
    return tfds_builder(tfds_name, data_dir, file_format="array_record")


def prepare(name: str, data_dir: str | os.PathLike | None = None, download_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> Path:
    """Download (or, for MMLU, read from ``manual_dir``) and write one benchmark as ArrayRecord files.

    Returns the prepared dataset's folder. Already prepared data is left as it is. MMLU's CSVs are
    looked for in ``manual_dir`` (default ``<data_dir>/downloads/manual``).
    """
    spec = benchmark_spec(name)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if spec.tfds_name == "mmlu":
        manual_dir = Path(manual_dir) if manual_dir is not None else data_dir / "downloads" / "manual"
        mmlu_builder.find_mmlu_root(manual_dir)  # a clear error before TFDS starts
    builder = _builder_for_prepare(spec.tfds_name, data_dir)
    config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
        try_download_gcs=False,  # GCS holds TFRecord copies; we need ArrayRecord
    )
    try:
        builder.download_and_prepare(download_dir=os.fspath(download_dir) if download_dir is not None else None,
                                     download_config=config, file_format="array_record")
    except OSError as e:  # network and file errors (requests' errors are OSErrors too)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"preparing benchmark {name!r} (TFDS {spec.tfds_name!r}) into {data_dir} failed: {first}. "
                        "This step downloads the raw files once; on an offline machine, prepare on one "
                        f"with network access and copy {data_dir / spec.tfds_name.split('/')[0]} over") from e
    _read_split_shared.cache_clear()
    return Path(os.fspath(builder.data_dir))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spt_jax.tasks.benchmarks prepare NAME [--data-dir D] [--manual-dir M]`` or ``list``."""
    parser = argparse.ArgumentParser(prog=f"python -m {PREPARE_MODULE}", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="download/convert a benchmark into a TFDS data_dir")
    prep.add_argument("name", help=f"one of: {', '.join(BENCHMARKS)}")
    prep.add_argument("--data-dir", help="TFDS data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    prep.add_argument("--download-dir", help="where raw downloads go (default <data_dir>/downloads)")
    prep.add_argument("--manual-dir", help="MMLU only: the folder with the CSVs (data/dev, data/val, data/test)")
    commands.add_parser("list", help="list benchmark task names")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(benchmark_names()))
        else:
            path = prepare(args.name, args.data_dir, args.download_dir, args.manual_dir)
            print(f"prepared {args.name} in {path}")
    except SptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
