"""Device mesh and shardings for tuning: batch over ``data``, frozen weights over ``model``.

The prompt and optimizer state are tiny ([P, D]) and replicated. Frozen weights are split by name:
the head / d_ff axis of the projections that fan out (q, k, v, gate, up), the input axis of the ones
that fan in (o, down), the vocabulary (else d_model) of the embedding and output head. A tensor whose
axis does not divide by the ``model`` axis size stays replicated, so any mesh works for any model.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from spt_jax.errors import ConfigError

DATA, MODEL = "data", "model"

# Parameter name (dotted, as in the model's nnx.State) -> axes to try, counted from the end so one
# rule serves stacked [L, ...] layer weights and unstacked ones alike. The first divisible axis wins.
SHARDING_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"(.*\.)?attn\.(q|k|v)_proj", (-2,)),  # [L, D, H|K, d]: over heads
    (r"(.*\.)?attn\.(q|k|v)_bias", (-2,)),  # [L, H|K, d]
    (r"(.*\.)?attn\.o_proj", (-3,)),  # [L, H, d, D]: over its input heads
    (r"(.*\.)?mlp\.(gate|up)_proj", (-1,)),  # [L, D, F]: over d_ff
    (r"(.*\.)?mlp\.(gate|up)_bias", (-1,)),  # [L, F]
    (r"(.*\.)?mlp\.down_proj", (-2,)),  # [L, F, D]: over its input d_ff
    (r"embed_tokens", (-2, -1)),  # [V, D]: vocabulary, else d_model
    (r"lm_head", (-1, -2)),  # [D, V]
)


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


def spec_for(name: str, shape: tuple[int, ...], model_size: int) -> PartitionSpec:
    """The PartitionSpec of one frozen parameter under `SHARDING_RULES`."""
    for pattern, axes in SHARDING_RULES:
        if re.fullmatch(pattern, name):
            for axis in axes:
                if len(shape) >= -axis and shape[axis] % model_size == 0 and model_size > 1:
                    spec = [None] * len(shape)
                    spec[axis] = MODEL
                    return PartitionSpec(*spec)
            break
    return PartitionSpec()


def param_shardings(state, mesh: Mesh):
    """A pytree like ``state`` (abstract or real nnx.State) holding each leaf's NamedSharding.

    Use it to load straight onto the mesh:
    ``spt_jax.models.load(name, shardings=lambda s: param_shardings(s, mesh))``.
    """
    model_size = mesh.shape[MODEL]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(_path_name(path), tuple(leaf.shape), model_size)),
        state,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``data``; the rest replicated (across ``model``)."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def place_params(params, mesh: Mesh):
    """Frozen weights on their mesh shardings; arrays already placed so are returned untouched.

    Loading with ``shardings=`` avoids any move here; otherwise each tensor moves once, up front.
    """
    shardings = param_shardings(params, mesh)

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
