"""MMLU as a TFDS dataset, built from the CSV files a user already has.

The TFDS catalog has no MMLU, so this library owns a small ``GeneratorBasedBuilder`` over the original
Hendrycks release (``data/{dev,val,test}/<subject>_{dev,val,test}.csv``; columns question, A, B, C, D,
answer; no header). It never downloads: the CSVs come from ``manual_dir``. Going through TFDS keeps
every benchmark on one read path (ArrayRecord files + ``tfds.data_source``), so MMLU records look and
load like the catalog benchmarks'.

The builder stays out of the TFDS registry (``skip_registration``): a future TFDS release with its own
``mmlu`` must not clash with it, so callers use the class itself: ``Mmlu(data_dir=...)``.
"""

from __future__ import annotations

import csv
import io
import os

from etils import epath
import tensorflow_datasets as tfds

from spt_jax.errors import DataError
from spt_jax.system import decode_text

MMLU_LETTERS = ("A", "B", "C", "D")

# Our split name -> the folder and file suffix of the original release.
MMLU_SPLIT_FOLDERS = {"dev": "dev", "validation": "val", "test": "test"}

MANUAL_INSTRUCTIONS = """\
Put the original MMLU CSV files (Hendrycks et al., https://people.eecs.berkeley.edu/~hendrycks/data.tar,
unpacked) in manual_dir, laid out as
    <manual_dir>/data/dev/<subject>_dev.csv
    <manual_dir>/data/val/<subject>_val.csv
    <manual_dir>/data/test/<subject>_test.csv
(the `data/` level may be left out). Each CSV has no header and six columns: question, A, B, C, D,
answer (a letter A-D).
"""


# The same, on one line, for error messages (the CLI prints an error as one line).
LAYOUT_HINT = ("expected <manual_dir>/data/{dev,val,test}/<subject>_{dev,val,test}.csv (the data/ level optional; "
               "columns question, A, B, C, D, answer; no header), as unpacked from "
               "https://people.eecs.berkeley.edu/~hendrycks/data.tar")


def mmlu_subject_title(subject: str) -> str:
    """'high_school_biology' -> 'high school biology' (how lm-eval names a subject in its prompt)."""
    return subject.replace("_", " ")


def find_mmlu_root(manual_dir: os.PathLike | str) -> epath.Path:
    """The folder holding dev/ val/ test/ (manual_dir itself or its data/); DataError if neither does."""
    manual_dir = epath.Path(manual_dir)
    for root in (manual_dir / "data", manual_dir):
        if all((root / folder).is_dir() for folder in MMLU_SPLIT_FOLDERS.values()):
            return root
    raise DataError(f"MMLU CSVs not found in {manual_dir}: expected folders dev/, val/ and test/ in it "
                    f"or in its data/ folder; {LAYOUT_HINT}")


def mmlu_csv_files(root: epath.Path, split: str) -> dict[str, epath.Path]:
    """Subject -> CSV file for one split, sorted by subject; DataError when the folder has none."""
    folder = MMLU_SPLIT_FOLDERS[split]
    suffix = f"_{folder}.csv"
    files = {p.name[: -len(suffix)]: p for p in (root / folder).iterdir() if p.name.endswith(suffix)}
    if not files:
        raise DataError(f"MMLU folder {root / folder} has no '<subject>{suffix}' files; {LAYOUT_HINT}")
    return dict(sorted(files.items()))


def parse_mmlu_row(row: list[str], *, where: str) -> dict:
    """One CSV row (question, A, B, C, D, answer) -> {'question', 'choices', 'answer'}; DataError if bad."""
    if len(row) != 6:
        raise DataError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
    question, *choices, answer = row
    answer = answer.strip().upper()
    if answer not in MMLU_LETTERS:
        raise DataError(f"{where}: answer column is {row[5]!r}, expected one of A, B, C, D")
    return {"question": question, "choices": choices, "answer": answer}


def read_mmlu_csv(path: epath.Path, subject: str):
    """(key, example) pairs of one subject CSV, keyed by subject and row so keys are unique."""
    # Questions may hold quoted commas and newlines; newline="" leaves those to the csv module.
    rows = csv.reader(io.StringIO(decode_text(path, path.read_bytes(), "MMLU CSV"), newline=""))
    for i, row in enumerate(rows):
        if not row:
            continue
        example = parse_mmlu_row(row, where=f"{path} row {i + 1}")
        yield f"{subject}-{i}", {**example, "subject": subject}


class Mmlu(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MMLU (57 subjects, 4 choices) from the user's copy of the original CSV release."""

    name = "mmlu"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Hendrycks CSV layout; splits dev, validation, test."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Measuring Massive Multitask Language Understanding (Hendrycks et al., 2021).",
            features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                "choices": tfds.features.Sequence(tfds.features.Text(), length=len(MMLU_LETTERS)),
                "answer": tfds.features.ClassLabel(names=list(MMLU_LETTERS)),
                "subject": tfds.features.Text(),
            }),
            supervised_keys=None,
            homepage="https://github.com/hendrycks/test",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = find_mmlu_root(dl_manager.manual_dir)
        return {split: self._generate_examples(mmlu_csv_files(root, split)) for split in MMLU_SPLIT_FOLDERS}

    def _generate_examples(self, files: dict[str, epath.Path]):
        for subject, path in files.items():
            yield from read_mmlu_csv(path, subject)


# The 57 subjects of the original release (the CSV file stems), for the per-subject task names.
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)
