"""Megabatches: the matrices of many leaves stepped as one batch.

An unscanned model holds one leaf per weight per layer: hundreds of leaves,
most of a handful of shapes. ``matrix_step`` steps the leaves that share a
block shape, rank, scale, sharding and dtypes as one batch (a megabatch):
their products, factorizations and collectives are each one batched op, as
for the stacked leaf of a scanned model. This module forms the megabatches,
joins the leaves' arrays along one batch axis and takes the results apart.

Taking them apart is where the compile time goes. Each leaf's output is its
own buffer, written by its own compiled kernel; XLA compiles a kernel once
for all the identical ones, but a slice at a constant offset makes every
leaf's kernel different (on XLA:CPU each distinct kernel costs about 10 ms
of compilation, whatever its size: 6 outputs x 288 leaves of a 48-layer
model was most of its compile time). So ``parted`` slices at offsets that
are runtime values (``runtime_offsets``): the kernels of all leaves of a
shape are then one kernel, compiled once (docs/design.md, "Megabatching").
"""

from __future__ import annotations

from typing import Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Megabatch(NamedTuple):
  """Leaves whose matrices are stepped as one batch."""
  members: list[int]   # leaf indices, in tree order
  sizes: list[int]     # matrices of each member (its batch size)


def megabatches(keys: Sequence[Hashable], sizes: Sequence[int]
                ) -> list[Megabatch]:
  """Groups the leaves by ``keys`` (equal keys: one megabatch), in order of
  first appearance; ``sizes``: each leaf's number of matrices."""
  groups: dict[Hashable, list[int]] = {}
  for i, key in enumerate(keys):
    groups.setdefault(key, []).append(i)
  return [Megabatch(members, [sizes[i] for i in members])
          for members in groups.values()]


def joined(arrays: Sequence[Array]) -> Array:
  """The members' arrays along their leading (batch) axis."""
  return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=0)


def runtime_offsets(batches: Sequence[Megabatch], predicate: Array
                    ) -> list[list[Array]]:
  """Each member's first row in its megabatch, as int32 scalars that the
  compiler cannot see as constants: one list per megabatch.

  Both branches of the ``lax.cond`` return the same numbers, so the
  ``predicate`` (any boolean scalar computed at run time) does not change
  them; it only hides them from constant folding, so that the slicing
  kernels of equally sized members are identical. One ``cond`` serves
  every megabatch.
  """
  starts = [[int(s) for s in np.cumsum([0, *batch.sizes[:-1]])]
            for batch in batches]

  def constants():
    return [tuple(jnp.int32(s) for s in batch) for batch in starts]
  return [list(batch) for batch in jax.lax.cond(predicate, constants,
                                                constants)]


def parted(x: Array | None, sizes: Sequence[int],
           offsets: Sequence[Array]) -> list[Array | None]:
  """Inverse of ``joined``: each member's rows of ``x`` (None: Nones).

  ``offsets``: the megabatch's list from ``runtime_offsets``.
  """
  if x is None:
    return [None] * len(sizes)
  if len(sizes) == 1:
    return [x]
  return [jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)
          for start, size in zip(offsets, sizes)]
