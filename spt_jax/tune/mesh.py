"""Device mesh and shardings for tuning: batch over ``data``, frozen weights over ``model``.

The prompt and optimizer state are tiny ([P, D]) and replicated. Frozen weights are split by the
`ShardRule`s of their model family (``Family.shardings`` in `spt_jax.models.families`): the head /
d_ff axis of the projections that fan out (q, k, v, gate, up), the input axis of the ones that fan in
(o, down), the vocabulary (else d_model) of the embedding and output head; norms and the biases added
after a reduction are replicated, by explicit rule. Every parameter must match exactly one rule: none
or two is a bug in the family's table and raises `ShardingRuleError`, so a renamed parameter cannot
silently stop being sharded. A tensor whose axis does not divide by the ``model`` axis size stays
replicated, so any mesh works for any model.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from spt_jax.errors import ConfigError
from spt_jax.models.config import ModelConfig
from spt_jax.models.families import ANY_FAMILY_SHARDINGS, Family, ShardRule, family_for

DATA, MODEL = "data", "model"

def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over all devices (of every process); ``data`` defaults to the rest."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if model < 1 or n % model:
        raise ConfigError(f"model axis size {model} does not divide the {n} devices")
    data = n // model if data is None else data
    if data * model != n:
        raise ConfigError(f"mesh data={data} x model={model} needs {data * model} devices, found {n}")
    return jax.make_mesh(
        (data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def default_mesh(batch_size: int) -> Mesh:
    """All devices: as many on ``data`` as divide the batch, the rest on ``model``."""
    n = jax.device_count()
    data = math.gcd(n, batch_size)
    return make_mesh(data, n // data)


def _path_name(path) -> str:
    keys = [getattr(k, "key", None) for k in path]
    return ".".join(str(k) for k in keys if k is not None)


class ShardingRuleError(LookupError):
    """A parameter that no sharding rule, or more than one, of its family matches (a table bug)."""


def shard_rule(name: str, family: Family | None = None) -> ShardRule:
    """The one `ShardRule` of ``family`` (of every family when None) that matches ``name``."""
    if family is None:
        label, rules = "any family", ANY_FAMILY_SHARDINGS
    else:
        label, rules = f"family {family.name!r}", family.shardings
    matches = [rule for rule in rules if re.fullmatch(rule.pattern, name)]
    if not matches:
        raise ShardingRuleError(
            f"parameter {name!r} matches no sharding rule of {label}; add a ShardRule "
            "(REPLICATED if it stays whole) to the family's shardings in spt_jax/models/families.py"
        )
    if len(matches) > 1:
        raise ShardingRuleError(
            f"parameter {name!r} matches {len(matches)} sharding rules of {label} "
            f"({', '.join(repr(r.pattern) for r in matches)}); each parameter needs exactly one"
        )
    return matches[0]


def spec_for(
    name: str, shape: tuple[int, ...], model_size: int, family: Family | None = None
) -> PartitionSpec:
    """The PartitionSpec of one frozen parameter under its family's rule (see `shard_rule`)."""
    for axis in shard_rule(name, family).axes:
        if len(shape) >= -axis and shape[axis] % model_size == 0 and model_size > 1:
            spec = [None] * len(shape)
            spec[axis] = MODEL
            return PartitionSpec(*spec)
    return PartitionSpec()  # replicated by rule, or no axis divides by the model axis size


def param_shardings(state, mesh: Mesh, config: ModelConfig | None = None):
    """A pytree like ``state`` (abstract or real nnx.State) holding each leaf's NamedSharding.

    ``config`` picks the family whose rules apply (by ``config.model_type``); without it every
    family's rules are used, which still refuses a parameter no rule names. Use it to load straight
    onto the mesh: ``spt_jax.models.load(name, shardings=lambda s: param_shardings(s, mesh))``.
    """
    model_size = mesh.shape[MODEL]
    family = family_for(config.model_type) if config is not None else None
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, spec_for(_path_name(path), tuple(leaf.shape), model_size, family)
        ),
        state,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``data``; the rest replicated (across ``model``)."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def place_params(params, mesh: Mesh, config: ModelConfig | None = None):
    """Frozen weights on their mesh shardings; arrays already placed so are returned untouched.

    Loading with ``shardings=`` avoids any move here; otherwise each tensor moves once, up front.
    ``config`` picks the family's sharding rules, as in `param_shardings`.
    """
    shardings = param_shardings(params, mesh, config)

    def place(x, s):
        if getattr(x, "sharding", None) is not None and x.sharding.is_equivalent_to(s, x.ndim):
            return x
        if jax.process_count() > 1 and getattr(x, "is_fully_addressable", True):
            x = np.asarray(x)  # host-local values (equal on every host) become one global array
        return jax.device_put(x, s)

    return jax.tree.map(place, params, shardings)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from the full batch every host builds: each host passes only its own rows.

    `jax.make_array_from_process_local_data` takes this process's contiguous slice of rows along
    ``data``; on one host that is the whole batch.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, array in batch.items():
        rows = _local_rows(sharding, array.shape)
        out[name] = jax.make_array_from_process_local_data(sharding, array[rows], array.shape)
    return out


def _local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """This process's rows of a ``data``-sharded array (contiguous for a mesh from `make_mesh`)."""
    index_map = sharding.addressable_devices_indices_map(shape)
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [idx[0].stop if idx[0].stop is not None else shape[0] for idx in index_map.values()]
    lo, hi = min(starts), max(stops)
    covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
    if covered != hi - lo:
        raise ConfigError(
            "this process's batch rows are not contiguous on the mesh; build the mesh with "
            "spt_jax.tune.make_mesh so each host's devices hold neighbouring rows"
        )
    return slice(lo, hi)


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    data = mesh.shape[DATA]
    if batch_size % data:
        raise ConfigError(
            f"TuneConfig.batch_size={batch_size} does not divide over the mesh's data axis of "
            f"size {data}; use a multiple of {data} or a mesh with a smaller data axis"
        )
