"""Orthonormalization of tall-skinny matrices: where the QR of Orth-Dion lives.

Every function here maps a batch of tall matrices ``A`` of shape ``(..., k, r)``
with ``k >= r`` to ``Q`` of the same shape with orthonormal columns, such that
``A = Q T`` for an upper-triangular ``T`` with a *positive* diagonal. That
factorization is unique when ``A`` has full column rank, so every method below
returns the same ``Q`` up to rounding; they differ in speed and robustness.

Why the positive diagonal matters (ALGORITHM.md section 3): Orth-Dion's new
right factor is ``Q = qr(R)`` with ``R = B^T P``, and its alignment with the
buffer is ``<B, P Q^T> = trace(T)``. A plain Householder QR returns diagonal
entries of either sign, so some modes would step uphill.

Sharding: ``sum_rows`` sums over the devices that hold different rows of ``A``
(identity on one device). Cholesky-based methods only ever sum ``r x r`` Gram
matrices and ``s x r`` sketches across devices, never ``A`` itself.

References:
  Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  Fukaya et al., CholeskyQR2, https://doi.org/10.1109/ScalA.2014.11
  Ahn et al., Dion (randomized Cholesky QR), https://arxiv.org/abs/2504.05295
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp

Array = jax.Array
RowSum = Callable[[Array], Array]
Method = Literal["householder", "cholesky_qr", "randomized_cholesky_qr"]
METHODS = ("householder", "cholesky_qr", "randomized_cholesky_qr")

# A second CholeskyQR pass restores orthogonality to machine precision only
# when the first pass came out reasonably conditioned (cond(A) below about
# u^(-1/2)); beyond this Gram deviation we fall back to Householder.
_MAX_GRAM_DEVIATION = 0.5


def _identity(x: Array) -> Array:
  return x


def _transpose(a: Array) -> Array:
  return jnp.swapaxes(a, -1, -2)


def _gram(a: Array, sum_rows: RowSum) -> Array:
  return sum_rows(jnp.einsum("...kr,...ks->...rs", a, a))


def _positive_diagonal_signs(t: Array) -> Array:
  """Signs of diag(t), with 0 counted as +1 (the column is kept as is)."""
  d = jnp.diagonal(t, axis1=-2, axis2=-1)
  return jnp.where(d < 0, -1.0, 1.0).astype(t.dtype)


def _times_inverse_upper(a: Array, upper: Array) -> Array:
  """A T^-1 for upper-triangular T (r x r).

  The r x r inverse comes from a triangular solve against the identity and is
  then applied as a matmul: on every backend a (k x r x r) matmul runs near
  peak, while a k-row triangular solve is latency-bound. This is stable here
  because CholeskyQR's second pass (or the fallback check) absorbs the error.
  """
  r = upper.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(r, dtype=upper.dtype), upper.shape)
  inverse = jax.lax.linalg.triangular_solve(
      upper, eye, left_side=True, lower=False)
  return jnp.einsum("...kr,...rs->...ks", a, inverse)


def column_prescale(a: Array, max_rows: RowSum = _identity) -> Array:
  """Divides each column by its largest magnitude.

  Column scaling by positive numbers leaves ``Q`` of ``A = Q T`` unchanged (it
  only rescales ``T``), and it keeps the Gram matrix finite for gradients at
  1e30 scale and away from underflow at 1e-30.
  """
  col_max = max_rows(jnp.max(jnp.abs(a), axis=-2, keepdims=True))
  return a / jnp.where(col_max > 0, col_max, 1.0)


def householder_qr(a: Array) -> Array:
  """Householder QR with the sign fix: Q of A = Q T with diag(T) >= 0."""
  q, t = jnp.linalg.qr(a, mode="reduced")
  return q * _positive_diagonal_signs(t)[..., None, :]


def _cholesky_qr_pass(a: Array, sum_rows: RowSum) -> tuple[Array, Array]:
  """One CholeskyQR pass; returns (Q, Gram of A)."""
  gram = _gram(a, sum_rows)
  lower = jnp.linalg.cholesky(gram)
  return _times_inverse_upper(a, _transpose(lower)), gram


def _cholesky_qr2(a: Array, sum_rows: RowSum) -> tuple[Array, Array]:
  """CholeskyQR2; returns (Q, ok) where ok flags a trustworthy result."""
  q1, _ = _cholesky_qr_pass(a, sum_rows)
  q2, gram1 = _cholesky_qr_pass(q1, sum_rows)
  return q2, _trustworthy(q2, gram1)


def _trustworthy(q: Array, gram: Array) -> Array:
  """The last pass started from a nearly orthonormal matrix, and is finite.

  ``gram`` is the Gram matrix the last CholeskyQR pass factored; close to I it
  means that pass was well conditioned, so its result is orthonormal to
  working precision.
  """
  r = gram.shape[-1]
  deviation = jnp.max(jnp.abs(gram - jnp.eye(r, dtype=gram.dtype)))
  ok = jnp.isfinite(deviation) & (deviation < _MAX_GRAM_DEVIATION)
  return ok & jnp.all(jnp.isfinite(q))


def _with_householder_fallback(q: Array, ok: Array, a: Array) -> Array:
  # lax.cond on a scalar keeps the fallback free unless some matrix in the
  # batch actually failed (a Cholesky NaN or a badly conditioned first pass).
  return jax.lax.cond(ok, lambda: q, lambda: householder_qr(a))


def cholesky_qr(a: Array, *, sum_rows: RowSum = _identity) -> Array:
  """CholeskyQR2 with a branch-free Householder fallback.

  ``T = chol(A^T A)^T``, ``Q = A T^{-1}``, done twice. Positive diagonal by
  construction. Only matmuls and an ``r x r`` factorization: fast on
  accelerators, and only the Gram matrix crosses devices.
  """
  q, ok = _cholesky_qr2(a, sum_rows)
  return _with_householder_fallback(q, ok, a)


def sketch_rows(rank: int, oversample: float = 1.25) -> int:
  """Rows of the randomized sketch: oversample * r, rounded up to 128."""
  return 128 * math.ceil(oversample * rank / 128)


def randomized_cholesky_qr(
    a: Array, key: Array, *, sum_rows: RowSum = _identity) -> Array:
  """Randomized Cholesky QR: a Gaussian sketch preconditions one CholeskyQR.

  ``S`` is ``(s, k)`` with entries N(0, 1/s); ``S A = Q_s T_s`` (sign-fixed),
  ``A <- A T_s^{-1}`` is then well conditioned with high probability, and one
  CholeskyQR pass finishes the job. Both triangular factors have positive
  diagonals, so their product does too. ``key`` must be identical on every
  replica (derive it from a seed and the step, never from device randomness).
  Under row sharding each device sketches its own rows (using the key folded
  with its row offset is the caller's job) and the ``s x r`` sketches are summed.
  """
  k, r = a.shape[-2:]
  s = sketch_rows(r)
  sketch = jax.random.normal(key, (s, k), dtype=a.dtype) / math.sqrt(s)
  sketched = sum_rows(jnp.einsum("sk,...kr->...sr", sketch, a))
  _, t = jnp.linalg.qr(sketched, mode="reduced")
  t = t * _positive_diagonal_signs(t)[..., :, None]
  # With high probability A T_s^-1 is well conditioned (cond ~ 1), so one
  # CholeskyQR pass is enough; the check below catches the rare bad sketch.
  q, gram = _cholesky_qr_pass(_times_inverse_upper(a, t), sum_rows)
  return _with_householder_fallback(q, _trustworthy(q, gram), a)


def orthonormalize(
    a: Array,
    method: Method,
    *,
    key: Array | None = None,
    sum_rows: RowSum = _identity,
    max_rows: RowSum = _identity,
) -> Array:
  """Q with orthonormal columns and A = Q T, diag(T) > 0, computed in float32.

  Args:
    a: ``(..., k, r)`` with ``k >= r``; any float dtype (upcast to float32).
    method: ``"householder"``, ``"cholesky_qr"`` or ``"randomized_cholesky_qr"``.
    key: PRNG key for the randomized sketch (required by that method only).
    sum_rows: sum over devices holding other rows of ``a``.
    max_rows: max over devices holding other rows of ``a``.

  Returns:
    float32 array shaped like ``a``. All-zero columns stay finite.
  """
  a = column_prescale(a.astype(jnp.float32), max_rows)
  if method == "householder":
    return householder_qr(a)
  if method == "cholesky_qr":
    return cholesky_qr(a, sum_rows=sum_rows)
  if method == "randomized_cholesky_qr":
    if key is None:
      raise ValueError("orthonormalize: method 'randomized_cholesky_qr' "
                       "needs a key.")
    return randomized_cholesky_qr(a, key, sum_rows=sum_rows)
  raise ValueError(f"orthonormalize: unknown method {method!r}; expected one "
                   f"of {METHODS}.")


def normalize_columns(
    a: Array,
    eps: float | Array,
    *,
    sum_rows: RowSum = _identity,
    max_rows: RowSum = _identity,
) -> Array:
  """Dion's right factor: each column divided by (its 2-norm + eps), float32.

  The norm is taken of the column scaled by its largest magnitude and scaled
  back, so that it neither overflows at 1e30 nor underflows at 1e-30.
  """
  a = a.astype(jnp.float32)
  col_max = max_rows(jnp.max(jnp.abs(a), axis=-2, keepdims=True))
  safe_max = jnp.where(col_max > 0, col_max, 1.0)
  norms = safe_max * jnp.sqrt(
      sum_rows(jnp.sum(jnp.square(a / safe_max), axis=-2, keepdims=True)))
  return a / (norms + eps)
