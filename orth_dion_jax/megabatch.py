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

The thin arrays are joined: the factors, the guard's flags and the
diagnostics. The weight-sized arrays of a megabatch (the buffer ``B``, the
update, the new momentum) stay its members' own arrays (``Parts``), and
each product with them is taken member by member: a joined ``B`` would be a
fresh weight-sized temporary, where each member's ``B`` can reuse its
donated momentum's memory. Small matrices, whose own products would cost
more compile time than their share of the memory saves, are joined
(``kept_apart``).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple, Sequence

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
  # The offsets are never negative: no wrap-around of negative indices to
  # trace and compile for every slice.
  return [jax.lax.dynamic_slice_in_dim(x, start, size, axis=0,
                                       allow_negative_indices=False)
          for start, size in zip(offsets, sizes)]


class Parts(NamedTuple):
  """A megabatch's weight-sized array: its members' own arrays, or (for
  small matrices, ``kept_apart``) one joined array.

  ``sizes``: each member's number of matrices; ``offsets``: the megabatch's
  ``runtime_offsets``, where each member's rows start in a joined array.
  """
  arrays: list[Array]
  sizes: list[int]
  offsets: list[Array]

  @classmethod
  def of(cls, arrays: Sequence[Array], offsets: Sequence[Array]) -> "Parts":
    """The members' ``arrays``, kept apart or joined (``kept_apart``)."""
    sizes = [a.shape[0] for a in arrays]
    if not kept_apart(arrays[0].shape[-2:]):
      arrays = [joined(arrays)]
    return cls(list(arrays), sizes, list(offsets))

  def rows(self, i: int, x: Array | None) -> Array | None:
    """Array ``i``'s rows of a joined array (None: None)."""
    if x is None or len(self.arrays) == 1:
      return x
    return jax.lax.dynamic_slice_in_dim(x, self.offsets[i], self.sizes[i],
                                        axis=0, allow_negative_indices=False)

  def each(self, fn: Callable[..., Any], *batched: Any) -> list[Any]:
    """``fn(array, its rows of each of batched)`` for each of ``arrays``.

    ``batched``: joined arrays, or pytrees of them (None leaves stay None).
    """
    return [fn(a, *jax.tree.map(lambda x, i=i: self.rows(i, x), batched))
            for i, a in enumerate(self.arrays)]

  def joined_each(self, fn: Callable[..., Array], *batched: Any) -> Array:
    """``each``'s results joined along the batch axis: for ``fn`` with a
    thin result (a product with a factor, a per-matrix reduction)."""
    return joined(self.each(fn, *batched))

  def members(self, arrays: list[Array] | None) -> list[Array | None]:
    """Each member's array of a weight-sized result of ``each`` (None:
    Nones)."""
    if arrays is None or len(arrays) == len(self.sizes):
      return arrays or [None] * len(self.sizes)
    return parted(arrays[0], self.sizes, self.offsets)


# Matrices of fewer entries than this (smaller than 128 x 128) are joined
# into their megabatch; larger ones are kept apart (benchmarks/README.md,
# "Scale").
JOIN_BELOW = 2 ** 14


def kept_apart(matrix_shape: Sequence[int]) -> bool:
  """Whether the members' weight-sized arrays stay apart (``Parts``).

  Joined, a megabatch's ``B`` and outer products are fresh temporaries of
  all its members, which cost a copy and fresh memory in proportion to
  their size (on XLA:CPU at 48 layers, 1.10 to 1.18 times the scanned step
  at widths 128 and 256, mostly page faults on that memory). Apart, each
  member's ``B`` can take its donated momentum's place, but each member has
  its own products and reductions: about 25 ms more compilation each on
  XLA:CPU, whatever its size. At width 64 that buys nothing (the step is
  per-operation overhead either way), from width 128 on it brings the step
  to the scanned one's: matrices of ``JOIN_BELOW`` entries or more are kept
  apart.
  """
  return int(np.prod(matrix_shape)) >= JOIN_BELOW
