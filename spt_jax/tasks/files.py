"""Tasks defined without code: a YAML/JSON task file over local JSONL/CSV data (or built-in/TFDS data).

The file mirrors the ``Task`` fields; ``source`` says where records come from and maps our field names
onto the data's columns. Every error names the task file (or data file), the field and, for data,
the line, because the person reading it is editing those files by hand. See docs/tasks.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spt_jax.errors import ConfigError, DataError, SptError, close_names
from spt_jax.system import decode_lines, decode_text, read_text
from spt_jax.tasks.answers import AnswerSpec, FormatSpec
from spt_jax.tasks.task import ClozeSpec, FewShotForm, Task

FieldMap = Mapping[str, "str | Sequence[str]"]

# --------------------------------------------------------------------------------------------------
# Field mapping
# --------------------------------------------------------------------------------------------------


def _check_field_map(fields: Any, origin: str) -> dict[str, str | tuple[str, ...]]:
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{origin}: source field 'fields' must map our field names to data columns, "
                          f"got {fields!r}")
    checked = {}
    for ours, column in fields.items():
        if isinstance(column, str) and column:
            checked[str(ours)] = column
        elif (isinstance(column, Sequence) and not isinstance(column, str) and column
              and all(isinstance(c, str) and c for c in column)):
            checked[str(ours)] = tuple(column)
        else:
            raise ConfigError(f"{origin}: source field 'fields.{ours}' must be a column name or a list of "
                              f"column names, got {column!r}")
    return checked


def _lookup(raw: Mapping, column: str) -> Any:
    """A column by exact name, else by a dotted path into nested objects; KeyError when absent."""
    if column in raw:
        return raw[column]
    value: Any = raw
    for part in column.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(column)
    return value


def apply_field_map(raw: Mapping, fields: Mapping[str, str | tuple[str, ...]], *, where: str,
                    drop_empty: bool = False) -> dict:
    """The raw record's columns plus our field names mapped onto them (a list of columns -> a list)."""
    record = dict(raw)
    for ours, column in fields.items():
        columns = (column,) if isinstance(column, str) else column
        values = []
        for col in columns:
            try:
                values.append(_lookup(raw, col))
            except KeyError:
                raise DataError(f"{where}: field {ours!r} maps to column {col!r}, which this record lacks; "
                                f"columns: {', '.join(map(str, raw)) or 'none'}") from None
        if isinstance(column, str):
            record[ours] = values[0]
        else:
            record[ours] = [v for v in values if not (drop_empty and v in ("", None))]
    return record


# --------------------------------------------------------------------------------------------------
# Local file sources
# --------------------------------------------------------------------------------------------------


def _split_paths(paths: Mapping[str, str | os.PathLike], base_dir: Path | None) -> dict[str, Path]:
    base = Path(base_dir) if base_dir is not None else None
    out = {}
    for split, path in paths.items():
        p = Path(os.path.expanduser(os.fspath(path)))
        out[str(split)] = p if p.is_absolute() or base is None else base / p
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class JsonlSource:
    """One JSON-lines file per split; ``fields`` maps our field names to keys (dotted for nested)."""

    paths: Mapping[str, str | os.PathLike]
    fields: FieldMap = dataclasses.field(default_factory=dict)
    base_dir: str | os.PathLike | None = None

    def __post_init__(self):
        object.__setattr__(self, "paths", _split_paths(self.paths, self.base_dir))
        object.__setattr__(self, "fields", _check_field_map(self.fields, "JsonlSource"))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.paths)

    def load(self, split: str) -> list[dict]:
        path = _path_for(self.paths, split)
        records = []
        # decoded line by line, so a byte that is not UTF-8 is reported with its line and offset
        for line_no, line in decode_lines(path, _read_bytes(path, split), "data file"):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(raw, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object per line, "
                                f"got {type(raw).__name__}")
            records.append(apply_field_map(raw, self.fields, where=f"{path}, line {line_no}"))
        return records


@dataclasses.dataclass(frozen=True, eq=False)
class CsvSource:
    """One CSV (or .tsv) file per split with a header row; a list of columns becomes a list field
    (empty cells dropped), which is how choices and aliases are given in a flat table."""

    paths: Mapping[str, str | os.PathLike]
    fields: FieldMap = dataclasses.field(default_factory=dict)
    base_dir: str | os.PathLike | None = None
    delimiter: str | None = None  # None: tab for .tsv files, comma otherwise

    def __post_init__(self):
        object.__setattr__(self, "paths", _split_paths(self.paths, self.base_dir))
        object.__setattr__(self, "fields", _check_field_map(self.fields, "CsvSource"))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.paths)

    def load(self, split: str) -> list[dict]:
        path = _path_for(self.paths, split)
        delimiter = self.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
        records = []
        with io.StringIO(decode_text(path, _read_bytes(path, split), "data file"), newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if not reader.fieldnames:
                raise DataError(f"{path}: no header row (the first line must name the columns)")
            try:
                for row in reader:
                    if None in row:
                        raise DataError(f"{path}, line {reader.line_num}: more cells than the "
                                        f"{len(reader.fieldnames)} header columns")
                    where = f"{path}, line {reader.line_num}"
                    missing = [k for k, v in row.items() if v is None]
                    if missing:
                        raise DataError(f"{where}: fewer cells than header columns (missing {', '.join(missing)})")
                    records.append(apply_field_map(row, self.fields, where=where, drop_empty=True))
            except csv.Error as e:
                raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
        return records


def _path_for(paths: Mapping[str, Path], split: str) -> Path:
    if split not in paths:
        raise DataError(f"no data file for split {split!r}; files are given for: {', '.join(paths) or 'none'}")
    return paths[split]


def _read_bytes(path: Path, split: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} for split {split!r} does not exist") from None
    except OSError as e:
        raise DataError(f"data file {path} for split {split!r} cannot be read: {e}") from None


# --------------------------------------------------------------------------------------------------
# TFDS source (prepared data only; nothing downloads)
# --------------------------------------------------------------------------------------------------


def tfds_value(value: Any) -> Any:
    """A TFDS feature value as plain Python: bytes -> str, numpy scalars/arrays -> numbers/lists."""
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [tfds_value(v) for v in value.tolist()] if value.ndim else tfds_value(value.item())
    if isinstance(value, np.generic):
        return tfds_value(value.item())
    if isinstance(value, Mapping):
        return {k: tfds_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tfds_value(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
    """A TFDS dataset already prepared in array_record format under ``data_dir``."""

    name: str
    splits: tuple[str, ...] = ("train", "validation", "test")
    data_dir: str | None = None
    fields: FieldMap = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "fields", _check_field_map(self.fields, f"TfdsSource {self.name!r}"))

    def load(self, split: str) -> list[dict]:
        from spt_jax.errors import MissingPackageError

        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise MissingPackageError(f"TFDS task data {self.name!r} needs tensorflow-datasets: {e}") from None
        try:
            source = tfds.data_source(self.name, split=split, data_dir=self.data_dir, download=False)
        except Exception as e:  # tfds raises many types for "not prepared here"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"TFDS dataset {self.name!r} split {split!r} is not readable from data_dir "
                            f"{self.data_dir or '(default)'}: {first}. Prepare it first with "
                            f"file_format=array_record") from None
        where = f"TFDS {self.name}[{split}]"
        return [apply_field_map(tfds_value(dict(source[i])), self.fields, where=f"{where} record {i}")
                for i in range(len(source))]


# --------------------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------------------

_TASK_KEYS = {f.name for f in dataclasses.fields(Task) if f.init}
_REQUIRED = ("name", "source", "input_template", "target_template", "format", "answer")
_FORMAT_KEYS = {f.name for f in dataclasses.fields(FormatSpec) if f.init}
_ANSWER_KEYS = {f.name for f in dataclasses.fields(AnswerSpec) if f.init}
_CLOZE_KEYS = {f.name for f in dataclasses.fields(ClozeSpec) if f.init} - {"pairs"}
_LM_EVAL_KEYS = {f.name for f in dataclasses.fields(FewShotForm) if f.init}
_SOURCE_TYPES = ("jsonl", "csv", "builtin", "tfds")


def _section(spec: Mapping, key: str, allowed: set[str], origin: str) -> dict:
    value = spec[key]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{origin}: field {key!r} must be a mapping, got {value!r}")
    for k in value:
        if k not in allowed:
            raise ConfigError(f"{origin}: unknown field '{key}.{k}'{close_names(str(k), allowed)}; "
                              f"allowed: {', '.join(sorted(allowed))}")
    return dict(value)


def _build(kind, kwargs: dict, field: str, origin: str):
    try:
        return kind(**kwargs)
    except SptError as e:
        raise type(e)(f"{origin}: field {field!r}: {e}") from None


def source_from_spec(spec: Mapping, *, base_dir: Path | None, origin: str, split_names: Sequence[str]):
    """A data source from a task file's ``source`` mapping."""
    kind = spec.get("type")
    if kind not in _SOURCE_TYPES:
        raise ConfigError(f"{origin}: field 'source.type' is {kind!r}; expected one of {', '.join(_SOURCE_TYPES)}")
    allowed = {"jsonl": {"type", "path", "paths", "fields"},
               "csv": {"type", "path", "paths", "fields", "delimiter"},
               "builtin": {"type", "name"},
               "tfds": {"type", "name", "data_dir", "fields"}}[kind]
    for k in spec:
        if k not in allowed:
            raise ConfigError(f"{origin}: unknown field 'source.{k}' for source type {kind!r}"
                              f"{close_names(str(k), allowed)}; allowed: {', '.join(sorted(allowed))}")
    fields = _check_field_map(spec.get("fields"), origin)
    if kind == "builtin":
        from spt_jax.tasks import get_task

        name = spec.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{origin}: field 'source.name' must name a registered task, got {name!r}")
        try:
            return get_task(name).source
        except SptError as e:
            raise ConfigError(f"{origin}: field 'source.name': {e}") from None
    if kind == "tfds":
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{origin}: field 'source.name' must be a TFDS dataset name, got {name!r}")
        data_dir = spec.get("data_dir")
        if data_dir is not None:
            data_dir = str(base_dir / os.path.expanduser(data_dir)) if base_dir else os.path.expanduser(data_dir)
        return TfdsSource(name=name, splits=tuple(split_names), data_dir=data_dir, fields=fields)
    if ("path" in spec) == ("paths" in spec):
        raise ConfigError(f"{origin}: give exactly one of 'source.path' (with a {{split}} placeholder) "
                          "or 'source.paths' (a mapping from split to file)")
    if "paths" in spec:
        paths = spec["paths"]
        if not isinstance(paths, Mapping) or not paths or not all(isinstance(p, str) for p in paths.values()):
            raise ConfigError(f"{origin}: field 'source.paths' must map split names to files, got {paths!r}")
        paths = {str(k): v for k, v in paths.items()}
    else:
        pattern = spec["path"]
        if not isinstance(pattern, str) or "{split}" not in pattern:
            raise ConfigError(f"{origin}: field 'source.path' must be a file name containing {{split}}, "
                              f"e.g. 'data/{{split}}.jsonl', got {pattern!r}")
        paths = {s: pattern.replace("{split}", s) for s in split_names}
    if kind == "jsonl":
        return JsonlSource(paths=paths, fields=fields, base_dir=base_dir)
    delimiter = spec.get("delimiter")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
        raise ConfigError(f"{origin}: field 'source.delimiter' must be one character, got {delimiter!r}")
    return CsvSource(paths=paths, fields=fields, base_dir=base_dir, delimiter=delimiter)


def task_from_dict(spec: Mapping, *, base_dir: str | os.PathLike | None = None, origin: str = "task spec") -> Task:
    """A Task from a parsed task file (``origin`` names that file in every error)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{origin}: a task file must hold a mapping of fields, got {type(spec).__name__}")
    for key in spec:
        if key not in _TASK_KEYS:
            raise ConfigError(f"{origin}: unknown field {key!r}{close_names(str(key), _TASK_KEYS)}; "
                              f"allowed: {', '.join(sorted(_TASK_KEYS))}")
    for key in _REQUIRED:
        if key not in spec:
            raise ConfigError(f"{origin}: missing required field {key!r}")
    kwargs = {k: v for k, v in spec.items() if k not in ("source", "format", "answer", "cloze", "lm_eval")}
    format_spec = _build(FormatSpec, _section(spec, "format", _FORMAT_KEYS, origin), "format", origin)
    answer_spec = _build(AnswerSpec, _section(spec, "answer", _ANSWER_KEYS, origin), "answer", origin)
    if spec.get("cloze") is not None:  # templates only: a callable `pairs` is for code
        kwargs["cloze"] = _build(ClozeSpec, _section(spec, "cloze", _CLOZE_KEYS, origin), "cloze", origin)
    if spec.get("lm_eval") is not None:
        kwargs["lm_eval"] = _build(FewShotForm, _section(spec, "lm_eval", _LM_EVAL_KEYS, origin), "lm_eval", origin)
    split_names = spec.get("split_names") or {"train": "train", "validation": "validation", "test": "test"}
    if not isinstance(split_names, Mapping):
        raise ConfigError(f"{origin}: field 'split_names' must map our split names to the data's, got {split_names!r}")
    base = Path(base_dir) if base_dir is not None else None
    if not isinstance(spec["source"], Mapping):
        raise ConfigError(f"{origin}: field 'source' must be a mapping with a 'type', got {spec['source']!r}")
    source_spec = dict(spec["source"])  # keys are checked per source type
    source = source_from_spec(source_spec, base_dir=base, origin=origin,
                              split_names=[str(v) for v in split_names.values()])
    kwargs.update(source=source, format=format_spec, answer=answer_spec)
    try:
        return Task(**kwargs)
    except SptError as e:
        raise type(e)(f"{origin}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{origin}: {e}") from None


def read_mapping_file(path: str | os.PathLike, what: str = "task file") -> dict:
    """The mapping in a .yaml/.yml/.json file; ConfigError naming ``what``, the file and the line."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{what} {path} must end in .yaml, .yml or .json")
    try:
        text = read_text(path, what)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} {path}, line {e.lineno}: malformed JSON ({e.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{what} {path}{line}: malformed YAML ({problem})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} {path} must hold a mapping of fields, got {type(data).__name__}")
    return dict(data)


def load_task_file(path: str | os.PathLike) -> Task:
    """A Task from a YAML/JSON file; data paths are relative to the file's folder."""
    path = Path(path)
    return task_from_dict(read_mapping_file(path), base_dir=path.resolve().parent, origin=f"task file {path}")
