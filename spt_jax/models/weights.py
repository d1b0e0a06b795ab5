"""Fill a model's parameters from a stream of Hugging Face-named tensors.

One code path for safetensors and GGUF: tensors arrive one at a time (already in Hugging Face
names and layouts), are matched against the family's `WeightRule` table, reshaped, cast straight to
the target dtype and written into that parameter's host buffer. Every problem (unknown, missing or
mis-shaped tensors) is collected and raised once, so a user fixes a checkpoint in one pass.

Loaded onto a mesh (``shardings``), a stacked ``[L, ...]`` parameter is never assembled on the host:
each layer's tensor goes straight into its slot of the sharded device array (every process sends
only the shards its own devices hold), so host memory holds one source tensor at a time, whatever
the order of the tensors in the files (safetensors files interleave the layers).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

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
    devices: a stacked one layer by layer into its sharded device array (a `NamedSharding` that
    does not split the layer axis, as `spt_jax.tune.mesh.param_shardings` gives), so host memory
    holds one source tensor; others (and stacked ones under other shardings) the moment their last
    slot is filled, when their host buffer is dropped.
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
    on_device: dict[str, jax.Array] = {}  # stacked parameters filled layer by layer on their devices
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
            sharding = flat_shardings.get(path)
            if stacked and _layer_slices(sharding) is not None:
                if path not in on_device:
                    on_device[path] = _zeros(tuple(leaf.shape), np.dtype(leaf.dtype), sharding)
                on_device[path] = _write_layer(on_device[path], _global(np.asarray(part, leaf.dtype),
                                                                        _layer_slices(sharding)),
                                               np.int32(layer), sharding)
            elif stacked:
                buf = buffers.get(path)
                if buf is None:
                    buf = buffers[path] = np.empty(leaf.shape, leaf.dtype)
                buf[layer] = part
            else:  # no staging buffer: cast (a no-op when the dtype already matches) and place
                buffers[path] = np.asarray(part, leaf.dtype)
            done = filled.setdefault(path, set())
            done.add(layer if stacked else 0)
            if done == slots(path):
                if path in on_device:  # the same buffers, labelled with the exact sharding asked for
                    full = on_device.pop(path)
                    placed[path] = jax.make_array_from_single_device_arrays(
                        full.shape, sharding, [shard.data for shard in full.addressable_shards])
                else:
                    placed[path] = jax.device_put(buffers.pop(path), sharding)
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


def _layer_slices(sharding) -> NamedSharding | None:
    """The sharding of one layer's slice of a stacked parameter placed by ``sharding``, or None when
    it is not a `NamedSharding` that leaves the layer axis whole (the parameter is staged on the host)."""
    if not isinstance(sharding, NamedSharding) or (len(sharding.spec) and sharding.spec[0] is not None):
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def _global(part: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host tensor as a global array: each process sends only its own devices' shards."""
    return jax.make_array_from_callback(part.shape, sharding, lambda index: part[index])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(shape, dtype, sharding):
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _write_layer(stacked, part, layer, sharding):
    """``stacked`` with slot ``layer`` set to ``part``, in place (donated), on its own sharding."""
    return jax.lax.with_sharding_constraint(jax.lax.dynamic_update_index_in_dim(stacked, part, layer, 0), sharding)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
