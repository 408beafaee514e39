"""The math of one Dion / Orth-Dion step on a batch of matrices (pure functions).

In the reference's notation, with the buffer ``B`` oriented so that its rows
are the larger side (docs/design.md, "The step")::

    P = orth(B Q)              # (big, r), orthonormal columns
    R = B^T P                  # (small, r)
    Q' = qr_pos(R)             # Orth-Dion: an exact rank-r partial isometry
    Q' = polar(R)              # its polar variant: P Q'^T = polar(P P^T B)
    Q' = R / (|R|_col + eps)   # Dion: column normalization
    update = P Q'^T;  feedback: M <- B - (1 - mu) P R^T

Here ``B`` is held in the layout view ``(batch, fan_in, fan_out)``
(``matrix_view``) and never transposed or copied: each product contracts the
right axis of the layout array directly. ``small_axis`` says which layout axis
carries ``Q``. A megabatch's ``B`` is held as its members' own arrays (or,
for small matrices, one joined array: ``megabatch.Parts``): the products and
reductions over ``B`` are taken array by array and their thin results
joined, so that the factors are orthonormalized as one batch without a
large ``B`` being copied into one.

Where the sums happen is a parameter (``collectives.Collectives``): on one
device they are identities; under ``shard_map`` they become ``psum``s over the
mesh axes that shard the rows or columns of ``B`` and the ``pmean`` over
data-parallel replicas. This is the single implementation of the step used
everywhere.

References:
  Ahn et al., Dion, https://arxiv.org/abs/2504.05295 (Algorithm 1)
  Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from orth_dion_jax import orthogonalize as orth
from orth_dion_jax import polar_factor
from orth_dion_jax.collectives import Collectives, SINGLE_DEVICE
from orth_dion_jax.lapack_calls import per_matrix
from orth_dion_jax.megabatch import Parts
from orth_dion_jax.scaling import abs_max, scaled_by, unit_scale, unit_scaled

Array = jax.Array
RightFactor = Literal["qr", "polar", "column"]
RIGHT_FACTORS = typing.get_args(RightFactor)


class LowRankFactors(NamedTuple):
  """One step's factors; leading axis is the batch of matrices.

  ``left`` and ``projected`` are never masked (a masked copy of ``P`` would
  be a second ``big x r`` array): consumers weight ``P R^T`` and ``P Q^T`` by
  ``moved``, a per-matrix scalar that the compiler folds into the
  elementwise pass that consumes the product.
  """
  left: Array          # P, (batch, big, r) float32, orthonormal columns
  projected: Array     # R = B^T P, (batch, small, r) float32
  right: Array         # new Q, (batch, small, r) float32 (the old Q if ~moved)
  moved: Array         # (batch, 1, 1) float32: 1, or 0 where B Q = 0


def _contract(b: Array, f: Array, axis: Literal["in", "out"]) -> Array:
  """Contracts the layout array b (n, i, o) with f along ``axis``.

  The (k x r) factor is cast to B's dtype, never B to the factor's, so that
  no weight-sized copy of B is made for the product. B is float32 whenever
  there is a momentum (``matrix_step._prepare``); a bfloat16 B is a bare
  bfloat16 gradient, met by a bfloat16 factor with float32 accumulation.
  """
  f = f.astype(b.dtype)
  if axis == "in":
    return jnp.einsum("nio,nir->nor", b, f,
                      preferred_element_type=jnp.float32)
  return jnp.einsum("nio,nor->nir", b, f, preferred_element_type=jnp.float32)


def _products(b: Parts, f: Array, axis: Literal["in", "out"]) -> Array:
  """``_contract`` of each of B's arrays with its rows of the joined factor
  ``f``, joined: the products of a megabatch without joining its B."""
  return b.joined_each(lambda member, g: _contract(member, g, axis), f)


def _other(axis: Literal["in", "out"]) -> Literal["in", "out"]:
  return "out" if axis == "in" else "in"


def outer(left: Array, projected: Array,
          small_axis: Literal["in", "out"]) -> Array:
  """P R^T (or P Q^T) in the layout view (n, fan_in, fan_out), float32."""
  if small_axis == "in":   # P on fan-out, R on fan-in
    return jnp.einsum("nir,nor->nio", projected, left)
  return jnp.einsum("nir,nor->nio", left, projected)


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
  """Static choices of the low-rank step (``LowRankCompressor.step_config``
  fills them from the settings, whose defaults they are)."""
  right_factor: RightFactor
  orthogonalize: orth.Method
  power_iters: int


class MatrixTask(NamedTuple):
  """One megabatch's input to the power iteration."""
  buffer: Parts                     # B, layout view (n_i, fan_in, fan_out)
  right_factor: Array               # previous Q, (n, small, r)
  small_axis: Literal["in", "out"]  # layout axis that Q lives on
  collectives: Collectives = SINGLE_DEVICE


def _grouped_orthonormalize(
    arrays: Sequence[Array],
    collectives: Sequence[Collectives],
    *,
    on_big_side: bool,
    method: str,
    right_factor: str | None,
    eps,
    key: Array,
) -> list[Array]:
  """Orthonormalizes (QR, polar, or column-normalizes) (n, k, r) factors.

  Factors of the same r and the same collectives are done together
  (``orthogonalize.orthonormalize_many``): one batched Cholesky / inverse for
  all the matrices of a model that share a rank, instead of a small kernel
  each, without copying a factor into a stack.
  """
  rows = [c.big if on_big_side else c.small for c in collectives]
  if right_factor == "column":
    return [orth.normalize_columns(a, eps, rows=axes)
            for a, axes in zip(arrays, rows)]
  groups: dict[tuple, list[int]] = {}
  for i, (a, c) in enumerate(zip(arrays, collectives)):
    groups.setdefault((a.shape[-1], c), []).append(i)
  orthonormalize_many = (polar_factor.polar_many if right_factor == "polar"
                         else orth.orthonormalize_many)
  out: list[Array | None] = [None] * len(arrays)
  for g, members in enumerate(groups.values()):
    results = orthonormalize_many(
        [arrays[i] for i in members], method, key=jax.random.fold_in(key, g),
        rows=rows[members[0]])
    for i, q in zip(members, results):
      out[i] = q
  return out


def power_iteration(
    tasks: Sequence[MatrixTask],
    *,
    config: LowRankConfig,
    eps: float | Array,
    key: Array,
) -> list[LowRankFactors]:
  """Warm-started power iteration(s) on every matrix of a model at once.

  The products with ``B`` are per member of a megabatch (they contract each
  member's ``B`` in place); the orthonormalizations are batched over
  same-shaped factors.

  Args:
    tasks: one ``MatrixTask`` per megabatch.
    config: right-factor kind, orthogonalization method, power iterations.
    eps: Dion's column-normalization epsilon.
    key: PRNG key for randomized sketches, identical on all replicas.

  Returns:
    ``LowRankFactors`` per task: ``P``, ``R``, ``Q'`` and the 0/1 flag
    ``moved`` (whether the buffer was nonzero). An all-zero buffer gives ``P = 0``,
    ``R = 0`` and keeps ``Q' = q`` (docs/design.md, "Zero buffers").
  """
  colls = [t.collectives for t in tasks]
  qs = [t.right_factor.astype(jnp.float32) for t in tasks]
  for it in range(config.power_iters):
    # orth(B Q) does not depend on the scale of Q's columns; unit-max columns
    # keep B Q from underflowing when Dion's Q is tiny (R / (|R| + eps) with
    # |R| << eps).
    ys = [c.replicas.mean(c.small.sum(_products(
        t.buffer, orth.column_prescale(q, c.small), t.small_axis)))
          for t, q, c in zip(tasks, qs, colls)]
    if it == config.power_iters - 1:
      # Taken now, so that nothing holds on to B Q once it is orthonormalized.
      zeros = [_all_zero(y, c) for y, c in zip(ys, colls)]
    ps = _grouped_orthonormalize(
        ys, colls, on_big_side=True, method=config.orthogonalize,
        right_factor=None, eps=eps, key=jax.random.fold_in(key, 2 * it))
    rs = [c.replicas.mean(c.big.sum(_products(
        t.buffer, p, _other(t.small_axis)))) for t, p, c in zip(tasks, ps, colls)]
    qs = _grouped_orthonormalize(
        rs, colls, on_big_side=False, method=config.orthogonalize,
        right_factor=config.right_factor, eps=eps,
        key=jax.random.fold_in(key, 2 * it + 1))
  results = []
  for t, zero, p, r, q in zip(tasks, zeros, ps, rs, qs):
    # A zero buffer has no direction to follow: step nowhere, keep the warm
    # start (else P would be an arbitrary basis).
    results.append(LowRankFactors(
        left=p, projected=r,
        right=jnp.where(zero, t.right_factor.astype(jnp.float32), q),
        moved=jnp.where(zero, 0.0, 1.0)))
  return results


def _all_zero(y: Array, collectives: Collectives) -> Array:
  """(n, 1, 1) mask of matrices whose B Q is exactly zero.

  B Q = 0 with Q of full column rank (the case after any finite step) means
  B has no component in span(Q); then P would be arbitrary.
  """
  return collectives.big.max(
      abs_max(y, axis=(-2, -1), keepdims=True)) == 0


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
  The decays may be per-matrix arrays broadcastable to ``(n, 1, 1)``.
  Returned in ``b``'s dtype and the layout view (the caller casts it to the
  momentum's); written as
  ``a B - (a - c) moved P R^T`` so that ``B``'s buffer can be updated in place
  and ``P R^T`` is the only weight-sized temporary (the scalars join the
  elementwise pass).
  """
  captured = outer(factors.left, factors.projected, small_axis)
  coefficient = (residual_decay - captured_decay) * factors.moved
  new = residual_decay * b.astype(jnp.float32) - coefficient * captured
  return new.astype(b.dtype)


def largest_magnitude(b: Parts, collectives: Collectives = SINGLE_DEVICE
                      ) -> Array:
  """max |B| per matrix, (n,) float32, agreed by every block and replica.

  +Inf exactly when some entry of some replica's ``B`` is NaN or infinite
  (``scaling.abs_max``): it is both the non-finite guard's test of ``B`` and
  the captured fraction's scale, from one reduction per member and one
  collective per megabatch.
  """
  return collectives.everything.max(b.joined_each(
      lambda member: abs_max(member, axis=(-2, -1)).astype(
          jnp.float32)))


def all_finite(factor: Array, collectives: Collectives = SINGLE_DEVICE
               ) -> Array:
  """(n,) bool: a factor (n, k, r) is finite on every block and replica.

  Applied to ``R = B^T P``, it also tests ``P``: every row of ``P`` is summed
  into every row of ``R``, so a non-finite ``P`` shows in ``R``.
  """
  return jnp.isfinite(collectives.everything.max(
      abs_max(factor, axis=(-2, -1))))


def captured_fraction(b: Parts, factors: LowRankFactors, b_max: Array,
                      collectives: Collectives = SINGLE_DEVICE) -> Array:
  """||P R^T||_F^2 / ||B||_F^2 per matrix (= ||R||_F^2 / ||B||_F^2).

  The share of the buffer's energy the rank-r approximation captured; 1 means
  nothing is left for the error feedback. 0 for an all-zero buffer. With
  compressed data parallelism, ``||B||_F^2`` is the replicas' mean. ``b_max`` is
  ``largest_magnitude(b)``: both sums are taken of entries scaled by it, so
  that they neither overflow nor underflow.
  """
  c = collectives
  scale = b_max[:, None, None]
  total = c.replicas.mean(c.matrix.sum(b.joined_each(
      lambda member, s: jnp.sum(jnp.square(scaled_by(
          member.astype(jnp.float32), s)), axis=(-2, -1)),
      unit_scale(scale))))
  kept = c.small.sum(jnp.sum(
      jnp.square(unit_scaled(factors.projected, scale)), axis=(-2, -1)))
  kept = kept * factors.moved.reshape(kept.shape)
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 0.0)


class Spectrum(NamedTuple):
  """What the step learns about ``R = B^T P`` from ``r x r`` work."""
  alignment: Array     # (n,) <B, P Q'^T> / ||P^T B||_*, see ``spectrum``
  eigenvalues: Array   # (n, r) of R^T R / max|R|^2, ascending
  right_energy: Array | None   # (n, r, r) G / trace(G), G = C C^T with
                               # C = Q'^T R; None unless asked for


def spectrum(factors: LowRankFactors, collectives: Collectives = SINGLE_DEVICE,
             *, right_energy: bool = False) -> Spectrum:
  """The alignment, the squared singular values of ``R`` and (for adaptive
  rank) the energy Gram of the new right factor's directions, from ``r x r``
  quantities.

  Alignment: ``<B, P Q'^T> = trace(Q'^T R)`` and ``||P^T B||_* = ||R||_*``,
  the sum of the square roots of the eigenvalues of the Gram ``R^T R``: no
  weight-sized work, and under sharding only ``r x r`` sums. Any update
  ``P Q^T`` with ``||Q||_op <= 1`` has alignment at most 1; the polar right
  factor attains it, the QR one reaches ``trace(T) / ||T||_*``. Dion's
  ``||Q||_op`` (nu) exceeds 1 and so can this ratio (``diagnostics`` divides
  by nu). 0 for an all-zero ``R``.

  Right energy: the captured part ``P R^T`` has energy ``||R^T v||^2`` along
  a unit direction ``v`` of the small side. With ``C = Q'^T R`` and ``Q'``
  orthonormal spanning ``R`` (QR and polar), ``v = Q' w`` has energy
  ``w^T C C^T w``: the top eigenvectors of ``G = C C^T`` are the rotation of
  ``Q'`` that keeps the most energy in fewer columns (``adaptive_rank``).
  Normalized to trace 1 (0 for an all-zero ``R``).
  """
  rows = collectives.small
  r = factors.projected
  largest = rows.max(abs_max(r, axis=(-2, -1)))
  # Every term is homogeneous in R: scaling it by its largest magnitude keeps
  # the Grams finite and changes nothing else.
  r = unit_scaled(r, largest[:, None, None])
  gram = rows.sum(jnp.einsum("nkr,nks->nrs", r, r))
  eigenvalues = per_matrix(jnp.linalg.eigvalsh, gram)
  nuclear = jnp.sum(jnp.sqrt(jnp.maximum(eigenvalues, 0.0)), axis=-1)
  energy = None
  if right_energy:
    c = rows.sum(jnp.einsum("nkr,nks->nrs", factors.right, r))
    inner = jnp.trace(c, axis1=-2, axis2=-1)
    g = jnp.einsum("nrs,nts->nrt", c, c)
    total = jnp.trace(g, axis1=-2, axis2=-1)[:, None, None]
    energy = jnp.where(total > 0, g / jnp.where(total > 0, total, 1.0), 0.0)
  else:
    inner = rows.sum(jnp.sum(factors.right * r, axis=(-2, -1)))
  aligned = jnp.where(nuclear > 0, inner / jnp.where(nuclear > 0, nuclear, 1.0),
                      0.0)
  return Spectrum(aligned, eigenvalues, energy)


def energy_rank(eigenvalues: Array, captured: Array, share: float,
                small: int) -> Array:
  """(n,) float32: how many directions hold ``share`` of ``B``'s energy.

  ``eigenvalues`` (ascending, any common scale) are the squared singular
  values of ``R``; ``captured = ||R||_F^2 / ||B||_F^2`` is the share they
  hold together. Their cumulative shares, largest first, give the crossing
  of ``share``, interpolated linearly inside the direction that crosses it
  (so that the estimate moves smoothly). When the r directions hold less
  than ``share``, the missing energy is assumed to continue at the level of
  the weakest one: ``r + (share - captured) / (captured p_r)``, capped at
  ``small``: what lets a rank grow. With the exact top r singular values of
  ``B`` this would underestimate a decaying tail; one warm-started power
  iteration converges slowest on its weakest direction (it holds 74% of
  ``B``'s r-th squared singular value in the mu-form, about half in the
  beta-form, on the example's transformer), so the estimate reads high, by
  1.5-2 directions at rank 1/4 in the mu-form and about 11 in the beta-form
  (``benchmarks/rank_estimate.py``). 0 where nothing was captured.
  """
  s = jnp.maximum(eigenvalues[:, ::-1], 0.0)           # descending
  total = jnp.sum(s, axis=-1, keepdims=True)
  p = s / jnp.where(total > 0, total, 1.0)
  shares = captured[:, None] * jnp.cumsum(p, axis=-1)
  below = jnp.sum(shares < share, axis=-1)               # directions before
  r = s.shape[-1]
  crossing = jnp.minimum(below, r - 1)
  before = jnp.where(below > 0, jnp.take_along_axis(
      shares, jnp.maximum(below - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
  step = captured * jnp.take_along_axis(p, crossing[:, None], axis=-1)[:, 0]
  safe_step = jnp.where(step > 0, step, 1.0)
  # below < r: the crossing is inside direction below + 1 (1-based), whose
  # share is step: the estimate is below + the part of it needed.
  inside = below + jnp.clip((share - before) / safe_step, 0.0, 1.0)
  beyond = r + (share - captured) / safe_step
  estimate = jnp.where(below < r, inside,
                       jnp.where(step > 0, beyond, float(small)))
  estimate = jnp.minimum(estimate, float(small))
  return jnp.where((captured > 0) & (total[:, 0] > 0), estimate, 0.0)
