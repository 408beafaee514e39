"""The math of one Dion / Orth-Dion step on a batch of matrices (pure functions).

In the reference's notation, with the buffer ``B`` oriented so that its rows
are the larger side (ALGORITHM.md section 2)::

    P = orth(B Q)              # (big, r), orthonormal columns
    R = B^T P                  # (small, r)
    Q' = qr_pos(R)             # Orth-Dion: an exact rank-r partial isometry
    Q' = R / (|R|_col + eps)   # Dion: column normalization
    update = P Q'^T;  feedback: B <- B - (1 - mu) P R^T

Here ``B`` is held in the layout view ``(batch, fan_in, fan_out)``
(``matrix_view``) and never transposed or copied: each product contracts the
right axis of the layout array directly. ``small_axis`` says which layout axis
carries ``Q``.

Where the sums happen is a parameter (``Collectives``): on one device they are
identities; under ``shard_map`` they become ``psum``s over the mesh axes that
shard the rows or columns of ``B`` and the ``pmean`` over data-parallel
replicas. This is the single implementation of the step used everywhere.

References:
  Ahn et al., Dion, https://arxiv.org/abs/2504.05295 (Algorithm 1)
  Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from orth_dion_jax import orthogonalize as orth

Array = jax.Array
RightFactor = Literal["qr", "column"]
RIGHT_FACTORS = ("qr", "column")


def _identity(x: Array) -> Array:
  return x


@dataclasses.dataclass(frozen=True)
class Collectives:
  """Where the partial sums of a sharded step are completed.

  Attributes:
    sum_big: sum over devices holding other slices of the big side (rows of
      ``P``); completes ``P^T P`` Gram matrices and ``B^T P``.
    max_big: max over the same devices (column prescaling before a QR).
    sum_small: sum over devices holding other slices of the small side (rows
      of ``Q``); completes ``B Q`` and the Gram matrices of ``R``.
    max_small: max over the same devices.
    mean_replicas: mean over data-parallel replicas that keep their own
      (decoupled) momentum: applied to ``B Q`` and ``B^T P`` only.
  """
  sum_big: Callable[[Array], Array] = _identity
  max_big: Callable[[Array], Array] = _identity
  sum_small: Callable[[Array], Array] = _identity
  max_small: Callable[[Array], Array] = _identity
  mean_replicas: Callable[[Array], Array] = _identity


SINGLE_DEVICE = Collectives()


class LowRankFactors(NamedTuple):
  """One step's factors; leading axis is the batch of matrices."""
  left: Array          # P, (batch, big, r) float32, orthonormal columns
  projected: Array     # R = B^T P, (batch, small, r) float32
  right: Array         # new Q, (batch, small, r) float32


def _contract(b: Array, f: Array, axis: Literal["in", "out"]) -> Array:
  """Contracts the layout array b (n, i, o) with f along ``axis``."""
  if axis == "in":
    return jnp.einsum("nio,nir->nor", b, f,
                      preferred_element_type=jnp.float32)
  return jnp.einsum("nio,nor->nir", b, f, preferred_element_type=jnp.float32)


def _other(axis: Literal["in", "out"]) -> Literal["in", "out"]:
  return "out" if axis == "in" else "in"


def outer(left: Array, projected: Array, small_axis: Literal["in", "out"],
          dtype) -> Array:
  """P R^T (or P Q^T) in the layout view (n, fan_in, fan_out)."""
  if small_axis == "in":   # P on fan-out, R on fan-in
    return jnp.einsum("nir,nor->nio", projected, left).astype(dtype)
  return jnp.einsum("nir,nor->nio", left, projected).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
  """Static choices of the low-rank step."""
  right_factor: RightFactor = "qr"
  orthogonalize: orth.Method = "cholesky_qr"
  power_iters: int = 1


def power_iteration(
    b: Array,
    q: Array,
    *,
    small_axis: Literal["in", "out"],
    config: LowRankConfig,
    eps: float | Array,
    key: Array,
    collectives: Collectives = SINGLE_DEVICE,
) -> LowRankFactors:
  """Warm-started power iteration(s) on the buffer ``b``.

  Args:
    b: buffer ``B`` in layout view ``(n, fan_in, fan_out)``, any float dtype.
    q: previous right factor ``(n, small, r)``.
    small_axis: layout axis that ``q`` lives on.
    config: right-factor kind, orthogonalization method, power iterations.
    eps: Dion's column-normalization epsilon.
    key: PRNG key for randomized sketches, identical on all replicas.
    collectives: where partial sums are completed (see ``Collectives``).

  Returns:
    ``LowRankFactors(P, R, Q')``. An all-zero ``b`` gives ``P = 0``, ``R = 0``
    and keeps ``Q' = q`` (ALGORITHM.md section 5).
  """
  c = collectives
  big_axis = _other(small_axis)
  q_new = q.astype(jnp.float32)
  for it in range(config.power_iters):
    y = c.mean_replicas(c.sum_small(_contract(b, q_new, small_axis)))
    p = orth.orthonormalize(
        y, config.orthogonalize, key=jax.random.fold_in(key, 2 * it),
        sum_rows=c.sum_big, max_rows=c.max_big)
    r = c.mean_replicas(c.sum_big(_contract(b, p, big_axis)))
    if config.right_factor == "qr":
      q_new = orth.orthonormalize(
          r, config.orthogonalize, key=jax.random.fold_in(key, 2 * it + 1),
          sum_rows=c.sum_small, max_rows=c.max_small)
    else:
      q_new = orth.normalize_columns(
          r, eps, sum_rows=c.sum_small, max_rows=c.max_small)
  # A zero buffer has no direction to follow: step nowhere, keep the warm start.
  zero = _all_zero(y, c.max_big)
  p = jnp.where(zero, 0.0, p)
  r = jnp.where(zero, 0.0, r)
  q_new = jnp.where(zero, q.astype(jnp.float32), q_new)
  return LowRankFactors(left=p, projected=r, right=q_new)


def _all_zero(y: Array, max_big: Callable[[Array], Array]) -> Array:
  """(n, 1, 1) mask of matrices whose B Q is exactly zero.

  B Q = 0 with Q of full column rank (the case after any finite step) means
  B has no component in span(Q); then P would be arbitrary.
  """
  return max_big(jnp.max(jnp.abs(y), axis=(-2, -1), keepdims=True)) == 0


def error_feedback(
    b: Array,
    factors: LowRankFactors,
    *,
    small_axis: Literal["in", "out"],
    residual_decay: float | Array,
    captured_decay: float | Array,
) -> Array:
  """New momentum: the part of B the rank-r step missed, plus a decayed rest.

  ``M' = residual_decay * (B - P R^T) + captured_decay * P R^T``.
  The reference mu-form is ``(1, mu)``: ``M' = B - (1 - mu) P R^T``; the
  paper's analysed beta-form is ``(beta, 0)``: ``E' = beta (B - P P^T B)``.
  Returned in ``b``'s dtype and layout view.
  """
  captured = outer(factors.left, factors.projected, small_axis, jnp.float32)
  new = residual_decay * b.astype(jnp.float32) - (
      residual_decay - captured_decay) * captured
  return new.astype(b.dtype)


def captured_fraction(b: Array, factors: LowRankFactors,
                      collectives: Collectives = SINGLE_DEVICE) -> Array:
  """||P R^T||_F^2 / ||B||_F^2 per matrix (= ||R||_F^2 / ||B||_F^2).

  The share of the buffer's energy the rank-r approximation captured; 1 means
  nothing is left for the error feedback. 0 for an all-zero buffer.
  """
  c = collectives
  b32 = b.astype(jnp.float32)
  scale = c.max_big(c.max_small(jnp.max(jnp.abs(b32), axis=(-2, -1))))
  scale = jnp.where(scale > 0, scale, 1.0)
  total = c.sum_big(c.sum_small(
      jnp.sum(jnp.square(b32 / scale[:, None, None]), axis=(-2, -1))))
  kept = c.sum_small(jnp.sum(
      jnp.square(factors.projected / scale[:, None, None]), axis=(-2, -1)))
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 0.0)
