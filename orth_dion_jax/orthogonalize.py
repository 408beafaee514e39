"""Orthonormalization of tall-skinny matrices: where the QR of Orth-Dion lives.

Every function here maps a batch of tall matrices ``A`` of shape ``(..., k, r)``
with ``k >= r`` to ``Q`` of the same shape with orthonormal columns, such that
``A = Q T`` for an upper-triangular ``T`` with a *positive* diagonal. That
factorization is unique when ``A`` has full column rank, so every method below
returns the same ``Q`` up to rounding; they differ in speed and robustness.

Why the positive diagonal matters (docs/design.md, "The sign of the QR"): Orth-Dion's new
right factor is ``Q = qr(R)`` with ``R = B^T P``, and its alignment with the
buffer is ``<B, P Q^T> = trace(T)``. A plain Householder QR returns diagonal
entries of either sign, so some modes would step uphill.

Batching: ``orthonormalize_many`` takes the factors of many weights that share
``r`` (their row counts ``k`` may differ). The ``k x r`` products run per
factor, where they are large matmuls already; what is small and
latency-bound, the ``r x r`` Gram matrices, their Cholesky factorizations and
triangular inverses, runs as one batched call for all of them, and the
factors themselves are never stacked (no ``k x r`` copies).

CPU: every QR, Cholesky and triangular solve goes through
``lapack_calls.per_matrix``, one matrix per call, since batched calls running
at once can deadlock XLA:CPU.

Sharding: ``rows`` (a ``collectives.AxisGroup``) names the mesh axes over which
the rows of ``A`` are split (none on one device). Across devices the
Cholesky-based methods only exchange ``r x r`` Gram matrices, ``s x r``
sketches, ``1 x r`` column maxima (the prescaling) and the fallback's
one-flag agreement; only
the Householder method (and the rare fallback to it) gathers the ``k x r``
factor, never a weight-sized array.

References:
  Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  Fukaya et al., CholeskyQR2, https://doi.org/10.1109/ScalA.2014.11
  Ahn et al., Dion (randomized Cholesky QR), https://arxiv.org/abs/2504.05295
"""

from __future__ import annotations

import functools
import math
import typing
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from orth_dion_jax import validation
from orth_dion_jax.collectives import AxisGroup, NO_AXES
from orth_dion_jax.lapack_calls import per_matrix
from orth_dion_jax.scaling import abs_max, unit_scaled

Array = jax.Array
Method = Literal["householder", "cholesky_qr", "randomized_cholesky_qr"]
METHODS = typing.get_args(Method)

# A second CholeskyQR pass restores orthogonality to machine precision only
# when the first pass came out reasonably conditioned (cond(A) below about
# u^(-1/2)); beyond this Gram deviation we fall back to Householder.
_MAX_GRAM_DEVIATION = 0.5


def _transpose(a: Array) -> Array:
  return jnp.swapaxes(a, -1, -2)


def _stacked(arrays: Sequence[Array]) -> Array:
  """Concatenates small per-factor arrays along the leading batch axis."""
  return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=0)


def _unstacked(stacked: Array, like: Sequence[Array]) -> list[Array]:
  """Splits the leading axis back into one piece per array of ``like``."""
  if len(like) == 1:
    return [stacked]
  offsets = np.cumsum([a.shape[0] for a in like])[:-1]
  return list(jnp.split(stacked, offsets, axis=0))


def _grams(arrays: Sequence[Array], rows: AxisGroup) -> Array:
  """A^T A of every factor, stacked: (sum of batches, r, r), one reduction
  across ``rows`` for all of them."""
  return rows.sum(_stacked(
      [jnp.einsum("nkr,nks->nrs", a, a) for a in arrays]))


def _positive_diagonal_signs(t: Array) -> Array:
  """Signs of diag(t), with 0 counted as +1 (the column is kept as is)."""
  d = jnp.diagonal(t, axis1=-2, axis2=-1)
  return jnp.where(d < 0, -1.0, 1.0).astype(t.dtype)


def _inverse_upper(upper: Array) -> Array:
  """T^-1 of a batch of upper-triangular r x r matrices.

  Applied afterwards as a matmul: on every backend a (k x r x r) matmul runs
  near peak, while a k-row triangular solve is latency-bound. This is stable
  here because CholeskyQR's second pass (or the fallback check) absorbs the
  error.
  """
  eye = jnp.eye(upper.shape[-1], dtype=upper.dtype)
  return per_matrix(lambda u: jax.lax.linalg.triangular_solve(
      u, jnp.broadcast_to(eye, u.shape), left_side=True, lower=False), upper)


def _times(arrays: Sequence[Array], stacked_square: Array) -> list[Array]:
  """A_i M_i for each factor and its r x r piece of the stacked M."""
  return [jnp.einsum("nkr,nrs->nks", a, m)
          for a, m in zip(arrays, _unstacked(stacked_square, arrays))]


def column_prescale(a: Array, rows: AxisGroup = NO_AXES) -> Array:
  """Divides each column by (the power of two of) its largest magnitude.

  Column scaling by positive numbers leaves ``Q`` of ``A = Q T`` unchanged (it
  only rescales ``T``), and it keeps the Gram matrix finite for gradients at
  1e30 scale and away from underflow at 1e-30.
  """
  col_max = rows.max(abs_max(a, axis=-2, keepdims=True))
  return unit_scaled(a, col_max)


def _householder_one(a: Array, rows: AxisGroup) -> Array:
  q, t = per_matrix(functools.partial(jnp.linalg.qr, mode="reduced"),
                    rows.gather(a, axis=-2))
  return rows.local(q * _positive_diagonal_signs(t)[..., None, :], axis=-2)


def householder_qr(arrays: Sequence[Array],
                   rows: AxisGroup = NO_AXES) -> list[Array]:
  """Householder QR with the sign fix: Q of A = Q T with diag(T) >= 0.

  Householder reflections need every row at once, so a row-split ``A`` is
  gathered (a ``k x r`` factor, not a weight) and each device keeps its block.
  Factors of the same shape are stacked into one batched call.
  """
  by_shape: dict[tuple[int, ...], list[int]] = {}
  for i, a in enumerate(arrays):
    by_shape.setdefault(a.shape[1:], []).append(i)
  out: list[Array | None] = [None] * len(arrays)
  for members in by_shape.values():
    group = [arrays[i] for i in members]
    for i, q in zip(members, _unstacked(
        _householder_one(_stacked(group), rows), group)):
      out[i] = q
  return out


def _cholesky_qr_pass(arrays: Sequence[Array], rows: AxisGroup
                      ) -> tuple[list[Array], Array]:
  """One CholeskyQR pass; returns (Q per factor, the stacked Grams)."""
  grams = _grams(arrays, rows)
  upper = _transpose(per_matrix(jnp.linalg.cholesky, grams))
  return _times(arrays, _inverse_upper(upper)), grams


def _trustworthy(qs: Sequence[Array], gram: Array, rows: AxisGroup) -> Array:
  """The last pass started from nearly orthonormal matrices, and is finite.

  ``gram`` holds the Gram matrices the last CholeskyQR pass factored; close
  to I they mean that pass was well conditioned, so its result is orthonormal
  to working precision. The flag is the same on every device of ``rows`` (the
  Gram matrices are already summed; the finiteness of ``Q`` is agreed on), as
  the branch it selects may contain collectives.
  """
  r = gram.shape[-1]
  deviation = abs_max(gram - jnp.eye(r, dtype=gram.dtype), axis=None)
  ok = jnp.isfinite(deviation) & (deviation < _MAX_GRAM_DEVIATION)
  q_bad = functools.reduce(jnp.logical_or,
                           [jnp.any(~jnp.isfinite(q)) for q in qs])
  return ok & (rows.max(q_bad.astype(jnp.int32)) == 0)


def _with_householder_fallback(qs: list[Array], ok: Array,
                               arrays: Sequence[Array],
                               rows: AxisGroup) -> list[Array]:
  # lax.cond on a scalar keeps the fallback free unless some matrix of the
  # batch actually failed (a Cholesky NaN or a badly conditioned first pass).
  return jax.lax.cond(ok, lambda: qs, lambda: householder_qr(arrays, rows))


def cholesky_qr(arrays: Sequence[Array], *,
                rows: AxisGroup = NO_AXES) -> list[Array]:
  """CholeskyQR2 with a Householder fallback under ``lax.cond``.

  ``T = chol(A^T A)^T``, ``Q = A T^{-1}``, done twice. Positive diagonal by
  construction. Only matmuls and ``r x r`` factorizations: fast on
  accelerators, and across devices only the ``r x r`` Gram matrices, the
  ``1 x r`` column maxima and the fallback flag.
  """
  q1, _ = _cholesky_qr_pass(arrays, rows)
  q2, gram1 = _cholesky_qr_pass(q1, rows)
  return _with_householder_fallback(q2, _trustworthy(q2, gram1, rows),
                                    arrays, rows)


def sketch_rows(rank: int, oversample: float = 1.25) -> int:
  """Rows of the randomized sketch: oversample * r, rounded up to 128."""
  return 128 * math.ceil(oversample * rank / 128)


def randomized_cholesky_qr(
    arrays: Sequence[Array], key: Array, *,
    rows: AxisGroup = NO_AXES) -> list[Array]:
  """Randomized Cholesky QR: a Gaussian sketch preconditions one CholeskyQR.

  ``S`` is ``(s, k)`` with entries N(0, 1/s); ``S A = Q_s T_s`` (sign-fixed),
  ``A <- A T_s^{-1}`` is then well conditioned with high probability, and one
  CholeskyQR pass finishes the job. Both triangular factors have positive
  diagonals, so their product does too. ``key`` must be identical on every
  replica (derive it from a seed and the step, never from device randomness).
  Under row sharding every device draws the whole ``(s, k)`` sketch from the
  shared key and applies its own columns to its rows; the ``s x r`` partial
  sketches are summed, so the result equals the single-device one.
  """
  s = sketch_rows(arrays[0].shape[-1])
  sketched = []
  for i, a in enumerate(arrays):
    sketch = jax.random.normal(jax.random.fold_in(key, i),
                               (s, a.shape[-2] * rows.size()),
                               dtype=a.dtype) / math.sqrt(s)
    sketched.append(jnp.einsum("sk,nkr->nsr", rows.local(sketch, axis=-1), a))
  t = per_matrix(functools.partial(jnp.linalg.qr, mode="r"),
                 rows.sum(_stacked(sketched)))
  t = t * _positive_diagonal_signs(t)[..., :, None]
  # With high probability A T_s^-1 is well conditioned (cond ~ 1), so one
  # CholeskyQR pass is enough; the check below catches the rare bad sketch.
  qs, gram = _cholesky_qr_pass(_times(arrays, _inverse_upper(t)), rows)
  return _with_householder_fallback(qs, _trustworthy(qs, gram, rows),
                                    arrays, rows)


def orthonormalize_many(
    arrays: Sequence[Array],
    method: Method,
    *,
    key: Array | None = None,
    rows: AxisGroup = NO_AXES,
) -> list[Array]:
  """``orthonormalize`` of factors ``(n_i, k_i, r)`` that share ``r``.

  Their ``r x r`` work (Gram matrices, Cholesky factorizations, inverses, the
  sketches' QR) runs as one batched computation; one fallback check covers
  them all.
  """
  if method not in METHODS:
    raise ValueError(f"orthonormalize: unknown method {method!r}; expected "
                     f"one of {METHODS}.")
  if method == "randomized_cholesky_qr" and key is None:
    raise ValueError("orthonormalize: method 'randomized_cholesky_qr' needs "
                     "a key.")
  if len({a.shape[-1] for a in arrays}) != 1:
    raise ValueError("orthonormalize_many: the factors must share r; got "
                     f"shapes {[a.shape for a in arrays]}.")
  arrays = [column_prescale(a.astype(jnp.float32), rows) for a in arrays]
  if method == "householder":
    return householder_qr(arrays, rows)
  if method == "cholesky_qr":
    return cholesky_qr(arrays, rows=rows)
  return randomized_cholesky_qr(arrays, key, rows=rows)


def orthonormalize(
    a: Array,
    method: Method,
    *,
    key: Array | None = None,
    rows: AxisGroup = NO_AXES,
) -> Array:
  """Q with orthonormal columns and A = Q T, diag(T) >= 0, computed in float32.

  The diagonal is positive when ``A`` has full column rank; a column that is
  a combination of the previous ones gets a zero diagonal entry, not a sign
  flip.

  Args:
    a: ``(..., k, r)`` with ``k >= r``; any float dtype (upcast to float32).
    method: ``"householder"``, ``"cholesky_qr"`` or ``"randomized_cholesky_qr"``.
    key: PRNG key for the randomized sketch (required by that method only).
    rows: the mesh axes splitting the rows of ``a`` (none on one device).

  Returns:
    float32 array shaped like ``a``. All-zero columns stay finite.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[2.0, 1.0], [0.0, -3.0], [0.0, 0.0]])
    >>> q = orthonormalize(a, "householder")
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-6))
    True
    >>> bool(jnp.all(jnp.diag(q.T @ a) > 0))    # T's diagonal is positive
    True
  """
  validation.check_tall_matrices("orthonormalize", a)
  k, r = a.shape[-2:]
  [q] = orthonormalize_many([a.reshape(-1, k, r)], method, key=key, rows=rows)
  return q.reshape(a.shape)


def normalize_columns(
    a: Array,
    eps: float | Array,
    *,
    rows: AxisGroup = NO_AXES,
) -> Array:
  """Dion's right factor: each column divided by (its 2-norm + eps), float32.

  The norm is taken of the column scaled by its largest magnitude and scaled
  back, so that it neither overflows at 1e30 nor underflows at 1e-30.
  """
  a = a.astype(jnp.float32)
  col_max = rows.max(abs_max(a, axis=-2, keepdims=True))
  # a / (||a|| + eps) = a' / (||a'|| + eps') for a' = a / 2^e, eps' = eps / 2^e:
  # every term stays a normal float32 at either end of the range.
  scaled = unit_scaled(a, col_max)
  norms = jnp.sqrt(rows.sum(jnp.sum(jnp.square(scaled), axis=-2,
                                    keepdims=True)))
  eps = unit_scaled(jnp.asarray(eps, jnp.float32), col_max)
  return scaled / (norms + eps)
