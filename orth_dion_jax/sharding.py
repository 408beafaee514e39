"""How each weight's sharding over a mesh becomes its low-rank step's plan.

A weight sharded with a ``PartitionSpec`` over a ``jax.make_mesh`` mesh is
seen, per device, as a block of its layout view ``(batch, fan_in, fan_out)``.
``leaf_plan`` reads which mesh axes split the fan-in, the fan-out and the batch
axes, and from that derives

* the ``Collectives`` of the step (which axes complete ``B Q``, ``B^T P`` and
  the Gram matrices, docs/design.md, "What crosses devices");
* the ``PartitionSpec`` of every state leaf, each fitting its own shape: the
  right factor ``Q`` (batch..., small, r) is split like the weight's small
  side, never like the weight itself;
* whether the weight uses compressed data parallelism (each replica keeps its
  own momentum; only ``(m + n) r`` numbers cross the data axis), which pays
  only when ``(m + n) r < m n``.

Every check runs while tracing, so a mesh or axis name that does not fit the
parameters fails before any computation, with the parameter's path.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
from jax.sharding import PartitionSpec

from orth_dion_jax.collectives import AxisGroup, Collectives
from orth_dion_jax.matrix_view import MatrixView

Array = jax.Array
SpecEntry = Any   # None | str | tuple[str, ...]


class LeafPlan(NamedTuple):
  """One weight's place on the mesh."""
  weight_spec: PartitionSpec    # the weight's (its update's)
  collectives: Collectives
  right_factor_spec: PartitionSpec   # Q: batch..., small side, r
  batch_spec: PartitionSpec     # per-matrix scalars (captured fraction, ...)
  compressed: bool              # per-replica momentum over the data axis

  @property
  def momentum_spec(self) -> PartitionSpec:
    """The momentum's and the gradient's: the weight's, behind a leading
    replica axis over the data axis in compressed mode."""
    if self.compressed:
      return PartitionSpec(self.collectives.replicas.axes, *self.weight_spec)
    return self.weight_spec


def _entry_axes(entry: SpecEntry) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _entry(axes: tuple[str, ...]) -> SpecEntry:
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def normalized_spec(spec: PartitionSpec | None, ndim: int,
                    path: str) -> tuple[SpecEntry, ...]:
  """The spec's entries, one per axis of the weight (missing ones None)."""
  entries = tuple(spec) if spec is not None else ()
  if len(entries) > ndim:
    raise ValueError(f"{path}: PartitionSpec {spec} has {len(entries)} "
                     f"entries for a {ndim}-D parameter.")
  return tuple(_entry(_entry_axes(e)) for e in entries) + (None,) * (
      ndim - len(entries))


def _check_axes(spec: tuple[SpecEntry, ...], shape: Sequence[int],
                mesh: jax.sharding.Mesh, path: str) -> None:
  seen = []
  for dim, entry in enumerate(spec):
    axes = _entry_axes(entry)
    for a in axes:
      if a not in mesh.axis_names:
        raise ValueError(
            f"{path}: its sharding names mesh axis {a!r}, but the mesh given "
            f"to the optimizer has axes {tuple(mesh.axis_names)}. Pass the "
            "mesh the parameters are sharded over.")
      if a in seen:
        raise ValueError(f"{path}: mesh axis {a!r} appears twice in its "
                         f"PartitionSpec {PartitionSpec(*spec)}.")
      seen.append(a)
    blocks = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % blocks:
      raise ValueError(
          f"{path}: axis {dim} of size {shape[dim]} is split over mesh axes "
          f"{axes} ({blocks} devices), which does not divide it.")


def _group_axes(spec, dims: Sequence[int], what: str, path: str
                ) -> tuple[str, ...]:
  """Mesh axes splitting a group of weight axes flattened into one side.

  Only the group's leading axis may be split: then each device's block of the
  flattened side is one contiguous range of rows, as the factors need.
  """
  leading, *rest = dims
  for d in rest:
    if spec[d] is not None:
      raise ValueError(
          f"{path}: axis {d} is sharded over {spec[d]!r}, but it is not the "
          f"leading axis of the {what} axes {tuple(dims)}; only the leading "
          f"one (axis {leading}) may be sharded.")
  return _entry_axes(spec[leading])


def compresses(view: MatrixView) -> bool:
  """Whether ``(m + n) r < m n``: the factors are smaller than the matrix."""
  return (view.fan_in + view.fan_out) * view.rank < (
      view.fan_in * view.fan_out)


def leaf_plan(view: MatrixView, spec: PartitionSpec | None,
              mesh: jax.sharding.Mesh, data_axis: str | None) -> LeafPlan:
  """The plan of one weight (``view``, global shapes) sharded by ``spec``."""
  path, ndim = view.path, len(view.shape)
  entries = normalized_spec(spec, ndim, path)
  _check_axes(entries, view.shape, mesh, path)
  nb = len(view.batch_shape)
  perm = view.permutation
  batch_dims = perm[:nb]
  in_dims = perm[nb:nb + view.reduction_ndim]
  out_dims = perm[nb + view.reduction_ndim:]
  in_axes = _group_axes(entries, in_dims, "fan-in", path)
  out_axes = _group_axes(entries, out_dims, "fan-out", path)
  compressed = False
  replicas = AxisGroup()
  if data_axis is not None:
    used = [a for e in entries for a in _entry_axes(e)]
    if data_axis in used:
      raise ValueError(
          f"{path}: it is sharded over the data axis {data_axis!r}. With "
          "compressed data parallelism (data_axis=...) weights are replicated "
          "over the data axis; shard them over other mesh axes.")
    compressed = compresses(view)
    if compressed:
      replicas = AxisGroup((data_axis,))
  small_in = view.small_axis == "in"
  small_axes = in_axes if small_in else out_axes
  collectives = Collectives(
      big=AxisGroup(out_axes if small_in else in_axes),
      small=AxisGroup(small_axes), replicas=replicas)
  batch = tuple(entries[d] for d in batch_dims)
  return LeafPlan(
      weight_spec=PartitionSpec(*entries),
      collectives=collectives,
      right_factor_spec=PartitionSpec(*batch, _entry(small_axes), None),
      batch_spec=PartitionSpec(*batch),
      compressed=compressed)


def has_auto_axes(mesh) -> bool:
  return any(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def replica_count(mesh: jax.sharding.Mesh, data_axis: str) -> int:
  if data_axis not in mesh.axis_names:
    raise ValueError(f"data_axis {data_axis!r} is not an axis of the mesh "
                     f"{tuple(mesh.axis_names)}.")
  return mesh.shape[data_axis]

