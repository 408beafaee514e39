"""How an N-D weight is seen as a batch of matrices, and the rank it gets.

A weight ``W`` is used as ``y = x W``: its *reduction* axes (fan-in) contract
with the input, its *output* axes (fan-out) index the output, and every other
axis is a *batch* axis (attention heads kept apart, scan-stacked layers). This
is the convention of ``optax.contrib.MuonDimensionNumbers``; a Flax ``Dense``
kernel ``(fan_in, fan_out)`` is ``DionDimensionNumbers(0, 1)``, the default.

The optimizer works on the *layout view* ``(batch, fan_in, fan_out)``, which is
a free reshape whenever the axes are already ordered batch, reduction, output
(true for Dense kernels, ``(d_model, heads, head_dim)`` query kernels,
``(heads, head_dim, d_model)`` output kernels and ``(layers, d_in, d_out)``
scans). The reference (PyTorch ``(fan_out, fan_in)``) puts the power
iteration's left factor ``P`` on the larger side and the carried right factor
``Q`` on the smaller side, with fan-out as the "large" side of a square matrix;
``MatrixView.small_axis`` records which layout axis that is.

Stacked layers (``nnx.scan`` / ``nnx.vmap``): ``default_dimension_numbers``
treats the ``layer_axes`` leading axes of a leaf with ``2 + layer_axes`` axes
as batch axes, so each layer's ``(fan_in, fan_out)`` slice is its own matrix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple, Sequence

import jax
import numpy as np
from optax.contrib import MuonDimensionNumbers

Axes = Sequence[int] | int


class DionDimensionNumbers(NamedTuple):
  """Which axes of a weight are its fan-in (reduction) and fan-out (output).

  All remaining axes are batch axes: each slice is its own matrix with its own
  momentum and right factor. Example: a query kernel ``(d_model, heads,
  head_dim)`` is ``DionDimensionNumbers(reduction_axis=0, output_axis=(1, 2))``;
  a scan-stacked ``(layers, d_in, d_out)`` kernel is
  ``DionDimensionNumbers(reduction_axis=1, output_axis=2)``.
  """
  reduction_axis: Axes = 0
  output_axis: Axes = 1


def is_dimension_numbers_leaf(x: Any) -> bool:
  """Whether ``x`` is one leaf's entry of a dimension-numbers tree.

  ``optax.contrib.MuonDimensionNumbers`` has the same fields and meaning and
  is accepted wherever ``DionDimensionNumbers`` is.
  """
  return x is None or isinstance(x, (DionDimensionNumbers,
                                     MuonDimensionNumbers))


def default_dimension_numbers(ndim: int, layer_axes: int
                              ) -> DionDimensionNumbers | None:
  """A Dense kernel ``(fan_in, fan_out)``, optionally stacked: the last two
  axes of a 2-D leaf or of a ``(2 + layer_axes)``-D one; None otherwise."""
  if ndim == 2:
    return DionDimensionNumbers()
  if layer_axes and ndim == 2 + layer_axes:
    return DionDimensionNumbers(layer_axes, layer_axes + 1)
  return None


def _as_axes(axes: Axes, ndim: int, what: str, path: str) -> tuple[int, ...]:
  if isinstance(axes, (int, np.integer)):
    axes = (axes,)
  elif isinstance(axes, (tuple, list)):
    axes = tuple(axes)
  else:
    raise ValueError(f"{path}: {what} must be an int or a tuple of ints, got "
                     f"{axes!r}.")
  if not axes:
    raise ValueError(f"{path}: {what} is empty; a matrix needs at least one.")
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
      raise ValueError(f"{path}: {what} {a!r} is not an axis of a {ndim}-D "
                       "array.")
    out.append(int(a) % ndim)
  return tuple(out)


def rank_for(small: int, *, rank: int | None, rank_fraction: float,
             rank_multiple_of: int) -> int:
  """r = rank, or ceil(rank_fraction * small) rounded up to a multiple of
  rank_multiple_of; clipped to [1, small]."""
  if rank is None:
    r = math.ceil(rank_fraction * small)
    r = rank_multiple_of * math.ceil(r / rank_multiple_of)
  else:
    r = rank
  return max(1, min(r, small))


Scale = Literal["spectral", "rms"] | float | None


def update_scale(fan_in: int, fan_out: int, scale: Scale) -> float:
  """The factor s in X <- X - lr * s * P Q^T."""
  if scale == "spectral":
    return math.sqrt(fan_out / fan_in)
  if scale == "rms":
    return 0.2 * math.sqrt(max(fan_in, fan_out))
  if scale is None:
    return 1.0
  return float(scale)


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """Static facts about one weight leaf seen as a batch of matrices."""
  path: str
  shape: tuple[int, ...]
  permutation: tuple[int, ...]   # to (batch..., reduction..., output...)
  batch_shape: tuple[int, ...]
  fan_in: int
  fan_out: int
  rank: int
  scale: float
  # Layout axis of the right factor Q, the smaller side of the whole matrix
  # (fan-out is "large" on a tie). Kept when the view is localized to one
  # device's block, whose own sides may compare the other way.
  small_axis: Literal["in", "out"]
  reduction_ndim: int            # how many axes make up fan-in

  @property
  def small(self) -> int:
    return self.fan_in if self.small_axis == "in" else self.fan_out

  def localized(self, shape: Sequence[int]) -> "MatrixView":
    """The same matrices seen through one device's block of shape ``shape``.

    Rank, scale and orientation stay those of the whole weight; only the
    sizes change (used inside ``shard_map``).
    """
    permuted = tuple(shape[a] for a in self.permutation)
    nb = len(self.batch_shape)
    return dataclasses.replace(
        self, shape=tuple(shape), batch_shape=permuted[:nb],
        fan_in=math.prod(permuted[nb:nb + self.reduction_ndim]),
        fan_out=math.prod(permuted[nb + self.reduction_ndim:]))

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def right_factor_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.small, self.rank)

  @property
  def is_identity_permutation(self) -> bool:
    return self.permutation == tuple(range(len(self.shape)))

  def to_layout(self, x: jax.Array) -> jax.Array:
    """(batch, fan_in, fan_out) view of a leaf (a reshape for usual layouts)."""
    if not self.is_identity_permutation:
      x = x.transpose(self.permutation)
    return x.reshape(-1, self.fan_in, self.fan_out)

  def from_layout(self, x: jax.Array) -> jax.Array:
    """Inverse of ``to_layout``."""
    permuted_shape = tuple(self.shape[a] for a in self.permutation)
    x = x.reshape(permuted_shape)
    if not self.is_identity_permutation:
      x = x.transpose(np.argsort(self.permutation))
    return x


def matrix_view(
    path: str,
    shape: tuple[int, ...],
    dims: DionDimensionNumbers | MuonDimensionNumbers,
    *,
    rank: int | None,
    rank_fraction: float,
    rank_multiple_of: int,
    scale: Scale,
) -> MatrixView:
  """Validates ``dims`` against a leaf's shape and derives its MatrixView.

  Raises:
    ValueError: naming ``path``, when the leaf cannot be seen as matrices.
  """
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f"{path}: a leaf of shape {shape} cannot be treated as a matrix (it "
        "needs at least 2 axes). Route it to AdamW with a None in "
        "weight_dimension_numbers, or use the orth_dion alias, which does so.")
  red = _as_axes(dims.reduction_axis, ndim, "reduction_axis", path)
  out = _as_axes(dims.output_axis, ndim, "output_axis", path)
  if set(red) & set(out) or len(set(red)) != len(red) or len(
      set(out)) != len(out):
    raise ValueError(f"{path}: reduction_axis {red} and output_axis {out} "
                     "must be distinct axes.")
  batch = tuple(a for a in range(ndim) if a not in red + out)
  fan_in = math.prod(shape[a] for a in red)
  fan_out = math.prod(shape[a] for a in out)
  if fan_in == 0 or fan_out == 0:
    raise ValueError(f"{path}: empty matrix of shape {shape}.")
  r = rank_for(min(fan_in, fan_out), rank=rank, rank_fraction=rank_fraction,
               rank_multiple_of=rank_multiple_of)
  return MatrixView(
      path=path,
      shape=tuple(shape),
      permutation=batch + red + out,
      batch_shape=tuple(shape[a] for a in batch),
      fan_in=fan_in,
      fan_out=fan_out,
      rank=r,
      scale=update_scale(fan_in, fan_out, scale),
      small_axis="out" if fan_out < fan_in else "in",
      reduction_ndim=len(red),
  )
