"""Device mesh and shardings for tuning: batch over ``data``, frozen weights over ``model``.

The prompt and optimizer state are tiny ([P, D]) and replicated. Frozen weights are split by the
`ShardRule`s of their model family (``Family.shardings`` in `spt_jax.models.families`): the head /
d_ff axis of the projections that fan out (q, k, v, gate, up), the input axis of the ones that fan in
(o, down), the vocabulary (else d_model) of the embedding and output head; norms and the biases added
after a reduction are replicated, by explicit rule. Every parameter must match exactly one rule: none
or two is a bug in the family's table and raises `ShardingRuleError`, so a renamed parameter cannot
silently stop being sharded. A tensor whose axis does not divide by the ``model`` axis size stays
replicated, so any mesh works for any model.

Generation and scoring use the same mesh (`on_mesh`): batch rows over ``data``, weights by the same
rules, the shared prefix replicated, the KV cache over ``data`` (rows) and ``model`` (kv heads, when
they divide). Any `jax.sharding.Mesh` with ``data`` and ``model`` axes is accepted (`as_mesh`): one
with explicit axis types (``jax.make_mesh``'s default) is turned into the equivalent Auto mesh over
the same devices, and the jitted functions run under it (``jax.set_mesh``), so a caller's own mesh
context cannot leak explicit axes into them. Settings name a mesh by a spec string
(`parse_mesh_spec`: ``"data=4,model=2"``, ``"model=2"``, ``"auto"``), built by `mesh_from_spec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Mapping

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


def default_mesh(*batch_sizes: int) -> Mesh:
    """All devices: as many on ``data`` as divide every batch size, the rest on ``model``."""
    n = jax.device_count()
    data = math.gcd(n, *batch_sizes)
    return make_mesh(data, n // data)


def as_mesh(mesh) -> Mesh:
    """``mesh`` checked to have exactly the ``data`` and ``model`` axes, with Auto axis types.

    A mesh with explicit (or manual) axes, e.g. from ``jax.make_mesh``, becomes the equivalent Auto
    mesh over the same devices in the same order: the library states its shardings itself.
    """
    if not isinstance(mesh, Mesh):
        raise ConfigError(
            f"mesh must be a jax.sharding.Mesh with axes ({DATA!r}, {MODEL!r}), got {type(mesh).__name__}; "
            "build one with spt_jax.tune.make_mesh(data, model) or jax.make_mesh((d, m), ('data', 'model'))"
        )
    names = tuple(mesh.axis_names)
    if sorted(names) != sorted((DATA, MODEL)):
        raise ConfigError(
            f"the mesh has axes {names}; spt_jax needs exactly the axes ({DATA!r}, {MODEL!r}) "
            "(batch rows over 'data', weights over 'model'); size 1 for an axis you do not use"
        )
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, names, axis_types=(AxisType.Auto,) * len(names))


def mesh_context(mesh: Mesh):
    """Run jitted functions under ``mesh`` (an Auto mesh from `as_mesh`): overrides a caller's context."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


_SPEC_HELP = "'data=N,model=M' (either may be left out: the rest of the devices), 'auto', or none"


def parse_mesh_spec(spec):
    """A mesh setting checked and normalized: None, ``"auto"``, ``"data=N,model=M"`` or a `Mesh`.

    Only the text is checked here (no devices are touched); `mesh_from_spec` builds the mesh.
    """
    if spec is None or isinstance(spec, Mesh):
        return as_mesh(spec) if spec is not None else None
    if not isinstance(spec, str):
        raise ConfigError(f"mesh must be {_SPEC_HELP}, got {spec!r}")
    text = spec.strip().lower().replace(" ", "")
    if text in ("auto", ""):
        return "auto" if text else None
    if text in ("none", "single"):
        return None
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if not eq or name not in (DATA, MODEL) or name in sizes or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"mesh {spec!r} is not {_SPEC_HELP} (sizes are positive integers)")
        sizes[name] = int(value)
    return ",".join(f"{name}={sizes[name]}" for name in (DATA, MODEL) if name in sizes)


def mesh_from_spec(spec, batch_sizes: Mapping[str, int] | None = None) -> Mesh | None:
    """The mesh a setting names (None: no mesh), checked to split every batch size over ``data``.

    ``batch_sizes`` maps setting names (for the error message) to the batch sizes that will run on
    the mesh. ``"auto"``: every device, as many on ``data`` as divide all of them, the rest on
    ``model``. ``"data=N,model=M"``: exactly N x M devices (all of them, on every process).
    """
    spec = parse_mesh_spec(spec)
    batch_sizes = dict(batch_sizes or {})
    if spec is None:
        return None
    if isinstance(spec, Mesh):
        mesh = spec
    elif spec == "auto":
        mesh = default_mesh(*batch_sizes.values()) if batch_sizes else make_mesh()
    else:
        sizes = dict(part.split("=") for part in spec.split(","))
        model = int(sizes.get(MODEL, 0)) or None
        data = int(sizes[DATA]) if DATA in sizes else None
        if model is None:
            n = jax.device_count()
            if data is None or n % data:
                raise ConfigError(f"mesh data={data} does not divide the {n} devices")
            model = n // data
        mesh = make_mesh(data, model)
    for what, size in batch_sizes.items():
        check_batch_divides(size, mesh, what=what)
    return mesh


def mesh_spec(mesh: Mesh | None) -> str | None:
    """The spec string of a mesh (what results files record)."""
    return None if mesh is None else f"{DATA}={mesh.shape[DATA]},{MODEL}={mesh.shape[MODEL]}"


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
            "(REPLICATED if it stays whole) to the family's shardings in spt_jax/models/families/"
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
    mesh = as_mesh(mesh)
    model_size = mesh.shape[MODEL]
    family = family_for(config.model_type) if config is not None else None
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, spec_for(_path_name(path), tuple(leaf.shape), model_size, family)
        ),
        state,
    )


def loading_shardings(mesh: Mesh | None):
    """The ``shardings=`` argument of `spt_jax.models.load` that streams the weights onto ``mesh``
    (each process loads only its devices' shards), or None without a mesh or on one device."""
    if mesh is None or mesh.size == 1:
        return None
    mesh = as_mesh(mesh)
    return lambda state: param_shardings(state, mesh)


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
    mesh = as_mesh(mesh)
    return jax.tree.map(_put, params, param_shardings(params, mesh, config))


def _put(x, sharding: NamedSharding):
    """``x`` on ``sharding``: untouched when already there (on a mesh of the same axis types)."""
    current = getattr(x, "sharding", None)
    if current is not None and current.is_equivalent_to(sharding, x.ndim) and (
        not isinstance(current, NamedSharding) or current.mesh == sharding.mesh
    ):
        return x  # (the same layout on an explicit-axis mesh would carry its axis types into jit)
    if jax.process_count() > 1 and getattr(x, "is_fully_addressable", True):
        x = np.asarray(x)  # host-local values (equal on every host) become one global array
    return jax.device_put(x, sharding)


def replicate(tree, mesh: Mesh):
    """Small values (masks, a prefix's KV, a soft prompt) whole on every device of ``mesh``."""
    repl = replicated(mesh)
    return jax.tree.map(lambda x: _put(x, repl), tree)


def placed_params(lm, mesh: Mesh):
    """``lm.params`` on ``mesh`` by its family's rules, placed once per mesh (kept in ``lm.compiled``).

    A model loaded with ``shardings=`` for this mesh is returned as is (no copy). A model loaded
    plainly gets one sharded copy per mesh, kept for its later calls; load with ``shardings=`` to
    avoid holding both.
    """
    mesh = as_mesh(mesh)
    return lm.compiled.memo(("params_on", mesh), lambda: place_params(lm.params, mesh, lm.config))


def kv_cache_shardings(mesh: Mesh, config: ModelConfig) -> tuple[NamedSharding, NamedSharding]:
    """Shardings of a batch's KV cache: ``k``/``v`` ``[L, B, S, K, d]`` (rows over ``data``, kv heads
    over ``model`` when they divide) and ``pos`` ``[B, S]`` (rows over ``data``)."""
    heads = MODEL if mesh.shape[MODEL] > 1 and config.n_kv_heads % mesh.shape[MODEL] == 0 else None
    return (NamedSharding(mesh, PartitionSpec(None, DATA, None, heads, None)),
            NamedSharding(mesh, PartitionSpec(DATA, None)))


@dataclasses.dataclass(frozen=True)
class OnMesh:
    """A generation or scoring call on a mesh: the (Auto) mesh, the weights on it, the batch size."""

    mesh: Mesh
    params: object  # lm.params placed on the mesh

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @property
    def rows(self) -> NamedSharding:
        return batch_sharding(self.mesh)

    def param_shardings(self, lm):
        return param_shardings(lm.params, self.mesh, lm.config)

    def kv_shardings(self, config: ModelConfig):
        return kv_cache_shardings(self.mesh, config)

    def layer_shardings(self, lm) -> tuple:
        """Shardings of `spt_jax.models.unstack_layers`' per-layer weights: each stacked weight's
        sharding without its leading layer axis."""
        drop_layer_axis = lambda s: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))  # noqa: E731
        layers = jax.tree.map(drop_layer_axis, self.param_shardings(lm)["layers"])
        return (layers,) * lm.config.n_layers

    def batch(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Rows over ``data``; each process passes only its own rows (see `global_batch`)."""
        return global_batch(arrays, self.mesh)

    def replicate(self, tree):
        return replicate(tree, self.mesh)

    def context(self):
        return mesh_context(self.mesh)


def on_mesh(lm, mesh, batch_size: int, what: str) -> OnMesh:
    """Check ``mesh`` (`as_mesh`) and that ``batch_size`` (the setting named ``what``) divides its
    ``data`` axis; place the weights (`placed_params`)."""
    mesh = as_mesh(mesh)
    check_batch_divides(batch_size, mesh, what=what)
    return OnMesh(mesh=mesh, params=placed_params(lm, mesh))


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from the full batch every host builds: each host passes only its own rows.

    `jax.make_array_from_process_local_data` takes this process's contiguous slice of rows along
    ``data``; on one host that is the whole batch.
    """
    sharding = batch_sharding(as_mesh(mesh))
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


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "TuneConfig.batch_size") -> None:
    data = mesh.shape[DATA]
    if batch_size % data:
        raise ConfigError(
            f"{what}={batch_size} does not divide over the mesh's data axis of "
            f"size {data}; use a multiple of {data} or a mesh with a smaller data axis"
        )
