"""Generation on a device mesh: the one home of the sharding rules.

Arrays say which of their axes hold batch rows and which hold channels with *logical*
`PartitionSpec`s, whose entries are `models.interface.BATCH` ("batch"), `CHANNELS`
("channels") or None: model families say it of their parameters and carry
(`param_partition`, `carry_partition`), strategies of their tables and states
(`table_layout`, `state_layout`). A `Sharding` maps those names onto a `jax.sharding.Mesh`
(batch rows on its data axis, channels on its model axis) and

- places arrays (`place`: `jax.device_put` with `NamedSharding`s),
- pins what a compiled program returns (`constrain`: `with_sharding_constraint`), so that a
  state keeps its sharding from one call to the next,
- runs a channel-independent function on local shards (`local`: `jax.shard_map`): the long
  convolutions' mixing needs no communication, while XLA, left to itself, all-gathers the
  inputs of an FFT along an unsharded axis (jax issue 15680).

Every function here takes `sharding=None` (one device) and then does nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import cpu_kernels
from lcsm_jax.models.interface import BATCH, CHANNELS

Array = jax.Array
Layout = Any  # a pytree of logical PartitionSpecs (a prefix of the arrays' pytree)

REPLICATED = PartitionSpec()
TIME_MAJOR = PartitionSpec(None, None, BATCH, CHANNELS)  # (positions, streams, batch, channels)
STREAMS = PartitionSpec(None, BATCH, CHANNELS)           # (streams, batch, channels)
TAPS = PartitionSpec(None, None, CHANNELS)               # (positions, streams, channels)
ROWS = PartitionSpec(BATCH)                              # (batch, ...)
ROW_CHANNELS = PartitionSpec(BATCH, CHANNELS)            # (batch, channels)
SPECTRA = PartitionSpec(None, CHANNELS)                  # (streams, channels, ...)
WINDOW_SPECTRA = PartitionSpec(None, None, CHANNELS)     # (windows, streams, channels, ...)
STATES = PartitionSpec(None, BATCH, CHANNELS)            # (streams, batch, channels, ...)
MODES = PartitionSpec(None, BATCH, None, CHANNELS)       # (streams, batch, modes, channels)
STEP_PLANES = PartitionSpec(None, None, None, CHANNELS)  # (planes, streams, modes, channels)


def is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


@dataclasses.dataclass(frozen=True)
class Sharding:
  """A mesh and which of its axes hold batch rows and channels (hashable: a static argument).

  Attributes:
    mesh: the devices.
    data: the mesh axis of batch rows (None: rows are not split).
    model: the mesh axis of channels (None: channels are not split).
  """

  mesh: Mesh
  data: str | None = "data"
  model: str | None = "model"

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}.")
    names = tuple(self.mesh.axis_names)
    for role, name in (("data", self.data), ("model", self.model)):
      if name is not None and name not in names:
        raise ValueError(f"the {role} axis {name!r} is not an axis of the mesh {names}; pass "
                         f"mesh_axes=(data axis, model axis) naming its axes (None: not split).")
    if self.data is not None and self.data == self.model:
      raise ValueError(f"the data and model axes must differ, got {self.data!r} twice.")

  @property
  def data_size(self) -> int:
    return 1 if self.data is None else int(self.mesh.shape[self.data])

  @property
  def model_size(self) -> int:
    return 1 if self.model is None else int(self.mesh.shape[self.model])

  def describe(self) -> str:
    return ", ".join(f"{name}={size}" for name, size in self.mesh.shape.items())

  def check(self, *, batch: int | None = None, width: int | None = None) -> None:
    """ValueError unless `batch` divides over the data axis and `width` over the model axis."""
    if batch is not None and batch % self.data_size:
      raise ValueError(f"batch size {batch} is not divisible by the mesh's data axis "
                       f"{self.data!r} of size {self.data_size} (mesh {self.describe()}): use a "
                       f"batch that is a multiple of {self.data_size}, or a mesh whose data "
                       "axis divides it.")
    if width is not None and width % self.model_size:
      raise ValueError(f"the model's width (channels) {width} is not divisible by the mesh's "
                       f"model axis {self.model!r} of size {self.model_size} (mesh "
                       f"{self.describe()}): use a model axis that divides {width}.")

  # -- logical specs to the mesh --

  def spec(self, logical: PartitionSpec) -> PartitionSpec:
    """The mesh's PartitionSpec for a logical one ("batch" -> data axis, "channels" -> model
    axis; other names are refused)."""
    names = {BATCH: self.data, CHANNELS: self.model, None: None}
    for entry in logical:
      if entry not in names:
        raise ValueError(f"logical partition entries are {BATCH!r}, {CHANNELS!r} or None, got "
                         f"{entry!r} in {logical}.")
    return PartitionSpec(*(names[entry] for entry in logical))

  def named(self, logical: PartitionSpec) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical))

  def specs(self, layout: Layout) -> Any:
    """The mesh PartitionSpecs of a logical layout (same pytree)."""
    return jax.tree.map(self.spec, layout, is_leaf=is_spec)


def create(mesh: Mesh | None, mesh_axes: tuple[str | None, str | None] = ("data", "model")
           ) -> Sharding | None:
  """The `Sharding` of `mesh` (None for None), its axes named by mesh_axes = (data, model).

  The mesh's axes are taken as `AxisType.Auto` (XLA partitions the model's step; a mesh from
  `jax.make_mesh`, whose axes are Explicit by default, is re-made over the same devices)."""
  if mesh is None:
    return None
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  auto = (AxisType.Auto,) * len(mesh.axis_names)
  if tuple(mesh.axis_types) != auto:
    mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
  if isinstance(mesh_axes, Sharding):
    raise TypeError("pass the mesh and mesh_axes, not a Sharding.")
  if not isinstance(mesh_axes, (tuple, list)) or len(mesh_axes) != 2:
    raise ValueError(f"mesh_axes must be (data axis, model axis), got {mesh_axes!r}.")
  return Sharding(mesh, *mesh_axes)


def _full(layout: Layout, tree: Any) -> Any:
  """`layout` broadcast to every leaf of `tree` (a layout may be a prefix of the tree)."""
  return jax.tree.map(lambda spec, sub: jax.tree.map(lambda _: spec, sub), layout, tree,
                      is_leaf=lambda x: is_spec(x) or x is None)


def _fit(spec: PartitionSpec, x: Any) -> PartitionSpec:
  """A spec no longer than x's rank (trailing entries past it dropped; scalars replicated)."""
  return PartitionSpec(*tuple(spec)[:len(jax.numpy.shape(x))])


def shardings(sharding: Sharding, tree: Any, layout: Layout) -> Any:
  """The `NamedSharding` of every leaf of `tree` under `layout` (a prefix of tree's pytree)."""
  specs = _full(layout, tree)
  return jax.tree.map(lambda spec, x: sharding.named(_fit(spec, x)), specs, tree,
                      is_leaf=is_spec)


def place(sharding: Sharding | None, tree: Any, layout: Layout = REPLICATED) -> Any:
  """`tree` on the mesh by `layout` (default: replicated); on one device, `jax.device_put`."""
  if sharding is None:
    return jax.device_put(tree)
  return jax.device_put(tree, shardings(sharding, tree, layout))


def constrain(sharding: Sharding | None, tree: Any, layout: Layout) -> Any:
  """Inside a traced program: `tree` with the sharding of `layout` (what the program returns
  keeps it). No-op without a mesh."""
  if sharding is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, shardings(sharding, tree, layout))


def local(sharding: Sharding | None, fn: Callable, in_layouts: tuple, out_layout: Layout
          ) -> Callable:
  """`fn` run on every device's shards (`jax.shard_map` over the whole mesh): each device
  sees its own batch rows and channels, so `fn` must treat them independently (the long
  convolutions' mixing does) and needs no communication. `in_layouts` has one layout per
  positional argument. Without a mesh, `fn` itself."""
  if sharding is None:
    return fn

  def on_shards(*args):
    with cpu_kernels.on_local_shards():  # one device's shards: a custom call is not split
      return fn(*args)

  def run(*args):
    in_specs = tuple(jax.tree.map(lambda spec, x: sharding.spec(_fit(spec, x)), _full(l, a), a,
                                  is_leaf=is_spec) for l, a in zip(in_layouts, args))
    out_shape = jax.eval_shape(fn, *args)
    out_specs = jax.tree.map(lambda spec, x: sharding.spec(_fit(spec, x)),
                             _full(out_layout, out_shape), out_shape, is_leaf=is_spec)
    mapped = jax.shard_map(on_shards, mesh=sharding.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
    return mapped(*args)

  return run
