"""Fill a model's parameters from a stream of Hugging Face-named tensors.

One code path for safetensors and GGUF: tensors arrive one at a time (already in Hugging Face
names and layouts), are matched against the family's `WeightRule` table, reshaped, cast straight to
the target dtype and written into that parameter's host buffer. Every problem (unknown, missing or
mis-shaped tensors) is collected and raised once, so a user fixes a checkpoint in one pass.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import jax
import numpy as np
from flax import nnx

from spt_jax.errors import WeightsError
from spt_jax.models.families import Family, WeightRule


def _source_shape(rule: WeightRule, target: tuple[int, ...]) -> tuple[int, ...]:
    """The tensor shape a rule expects in the checkpoint, given our parameter's (per-layer) shape."""
    prod = math.prod
    return {
        "copy": target,
        "flat": (prod(target),),
        "in_out": (prod(target[1:]), target[0]),
        "out_in": (target[-1], prod(target[:-1])),
        "conv_out": (prod(target[:-1]), target[-1]),
        "conv_qkv": (target[0], 3 * prod(target[1:])),
        "qkv_bias": (3 * prod(target),),
    }[rule.layout]


def _to_targets(rule: WeightRule, array: np.ndarray, target: tuple[int, ...]) -> list[np.ndarray]:
    if rule.layout in ("in_out", "out_in"):
        return [array.T.reshape(target)]
    if rule.layout in ("conv_qkv", "qkv_bias"):
        return [part.reshape(target) for part in np.split(array, 3, axis=-1)]
    return [array.reshape(target)]


def _path_name(path) -> str:
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def load_params(
    abstract_state: nnx.State,
    family: Family,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    source: str,
    n_layers: int,
    shardings=None,
) -> nnx.State:
    """Stream ``tensors`` into a state shaped like ``abstract_state`` (from `nnx.eval_shape`).

    Stacked layer parameters carry a leading ``[L]`` axis; a rule's ``layer`` group picks the slot.
    ``shardings``, a matching pytree of `jax.sharding.Sharding`, places each parameter on its
    devices the moment its last slot is filled, and its host buffer is dropped then, so host memory
    holds the unfinished stacked parameters and one source tensor, never a second full copy.
    """
    leaves = {
        _path_name(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
    }
    flat_shardings = (
        {_path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
        if shardings is not None
        else {}
    )
    compiled = [(re.compile(rule.pattern), rule) for rule in family.rules]
    ignored = [re.compile(p) for p in family.ignore]
    buffers: dict[str, np.ndarray] = {}
    placed: dict[str, jax.Array] = {}
    filled: dict[str, set[int]] = {}
    unexpected, shape_errors = [], []

    def slots(path: str) -> set[int]:
        return set(range(n_layers)) if path.startswith("layers.") else {0}

    for name, array in tensors:
        match = next(((m, r) for pat, r in compiled if (m := pat.fullmatch(name))), None)
        if match is None or any(t not in leaves for t in match[1].targets):
            if not any(p.fullmatch(name) for p in ignored):
                unexpected.append(name)
            continue
        m, rule = match
        layer = int(m.group("layer")) if "layer" in m.groupdict() else None
        stacked = rule.targets[0].startswith("layers.")
        if stacked and layer >= n_layers:
            unexpected.append(f"{name} (layer {layer} >= n_layers {n_layers})")
            continue
        full_shape = tuple(leaves[rule.targets[0]].shape)
        target_shape = full_shape[1:] if stacked else full_shape
        expected = _source_shape(rule, target_shape)
        if tuple(array.shape) != expected:
            shape_errors.append(f"{name}: checkpoint shape {tuple(array.shape)}, expected {expected}")
            for path in rule.targets:  # reported once, as mis-shaped, not again as missing
                filled.setdefault(path, set()).add(layer if stacked else 0)
            continue
        for path, part in zip(rule.targets, _to_targets(rule, array, target_shape)):
            leaf = leaves[path]
            if path in placed:  # a duplicate tensor: keep the first, report it
                unexpected.append(f"{name} (second tensor for {path})")
                continue
            if stacked:
                buf = buffers.get(path)
                if buf is None:
                    buf = buffers[path] = np.empty(leaf.shape, leaf.dtype)
                buf[layer] = part
            else:  # no staging buffer: cast (a no-op when the dtype already matches) and place
                buffers[path] = np.asarray(part, leaf.dtype)
            done = filled.setdefault(path, set())
            done.add(layer if stacked else 0)
            if done == slots(path):
                placed[path] = jax.device_put(buffers.pop(path), flat_shardings.get(path))
        del array, part  # drop the source tensor (and views of it) before reading the next

    missing = []
    for path in leaves:
        gaps = sorted(slots(path) - filled.get(path, set()))
        if gaps:
            missing.append(path + (f" (layers {_ranges(gaps)})" if path.startswith("layers.") else ""))
    problems = (
        [f"missing: {m}" for m in missing]
        + [f"unexpected: {u}" for u in unexpected]
        + [f"wrong shape: {s}" for s in shape_errors]
    )
    if problems:
        raise WeightsError(
            f"{source}: {len(problems)} problem(s) loading weights:\n  " + "\n  ".join(problems)
        )
    return jax.tree_util.tree_map_with_path(lambda path, _: placed[_path_name(path)], abstract_state)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
