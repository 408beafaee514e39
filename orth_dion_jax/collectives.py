"""Where the partial results of a sharded low-rank step are completed.

Inside ``jax.shard_map`` every device holds a block of each weight, seen in
the layout view ``(batch, fan_in, fan_out)``. The power iteration's factors
inherit that split: ``P`` (big x r) is split like the weight's big side, ``Q``
and ``R`` (small x r) like its small side. Every quantity the step needs is
then a local product completed by a sum of small pieces (docs/design.md,
"What crosses devices"):

* ``B Q``: local product, summed over the small side's axes -> (big x r);
* ``B^T P``: local product, summed over the big side's axes -> (small x r);
* Gram matrices ``A^T A`` and column norms of a factor: summed over the axes
  that split that factor's rows -> (r x r) or (1 x r);
* compressed data parallelism: ``B Q`` and ``B^T P`` averaged over replicas.

No device ever needs a whole weight, gradient or momentum. ``AxisGroup()``
(no axes) is the identity, so the same code runs on one device.
"""

from __future__ import annotations

import dataclasses
import math

import jax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AxisGroup:
  """The mesh axes over which an array's rows are split (or replicated).

  Hashable, so factors with the same groups can be batched together. With no
  axes every method is the identity.

  Attributes:
    axes: mesh axis names, major to minor, in the order a ``PartitionSpec``
      entry lists them (the order that lays the blocks out in the array).
  """
  axes: tuple[str, ...] = ()

  def sum(self, x: Array) -> Array:
    return jax.lax.psum(x, self.axes) if self.axes else x

  def max(self, x: Array) -> Array:
    return jax.lax.pmax(x, self.axes) if self.axes else x

  def mean(self, x: Array) -> Array:
    return jax.lax.pmean(x, self.axes) if self.axes else x

  def size(self) -> int:
    """Number of blocks (devices along these axes)."""
    return math.prod(jax.lax.axis_size(a) for a in self.axes)

  def gather(self, x: Array, axis: int) -> Array:
    """All blocks of ``x`` along ``axis``, in order (an all-gather)."""
    if not self.axes:
      return x
    return jax.lax.all_gather(x, self.axes, axis=axis, tiled=True)

  def local(self, x: Array, axis: int) -> Array:
    """This device's block of ``x``, an array every device holds whole."""
    if not self.axes:
      return x
    size = x.shape[axis] // self.size()
    start = jax.lax.axis_index(self.axes) * size
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


NO_AXES = AxisGroup()


@dataclasses.dataclass(frozen=True)
class Collectives:
  """The axis groups of one weight's low-rank step.

  Attributes:
    big: axes splitting the big side (rows of ``P``).
    small: axes splitting the small side (rows of ``Q`` and ``R``).
    replicas: data-parallel axes whose replicas keep their own momentum and
      gradient (compressed data parallelism); ``B Q`` and ``B^T P`` are
      averaged over them.
  """
  big: AxisGroup = NO_AXES
  small: AxisGroup = NO_AXES
  replicas: AxisGroup = NO_AXES

  @property
  def matrix(self) -> AxisGroup:
    """All axes that split one matrix (big then small side)."""
    return AxisGroup(self.big.axes + self.small.axes)

  @property
  def everything(self) -> AxisGroup:
    """The matrix's axes and the replicas: for flags all must agree on."""
    return AxisGroup(self.big.axes + self.small.axes + self.replicas.axes)


SINGLE_DEVICE = Collectives()
