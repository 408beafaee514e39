"""Diagnostics of the low-rank steps, cheap enough for a jitted train step.

The paper's dual-norm measure is ``nu = ||P Q^T||_op``. ``P`` has orthonormal
columns, so ``nu = ||Q||_op``: it is read off the right factor in the state,
with no extra work in the optimizer step. Orth-Dion gives nu = 1 (Q is
orthonormal), Dion nu in [1, sqrt(r)] (its columns only have unit norm); a
matrix whose last step moved nothing (a zero buffer, a skipped step, or no
step yet) reports nu = 0 and captured fraction 0.

The alignment is ``<B, P Q^T> / (nu ||P^T B||_*)``, the step's inner product
with the buffer against the largest any update ``P Q^T`` of spectral norm nu
can have (Hoelder: ``<B, P Q^T> = <P^T B, Q^T> <= ||Q||_op ||P^T B||_*``).
It is 1 exactly for the polar right factor (``P Q^T = polar(P P^T B)``),
``trace(T) / ||T||_*`` for the QR one (``R = Q T``) and below 1 for Dion.
The step computes ``<B, P Q^T> / ||P^T B||_*`` from ``r x r`` quantities
(``low_rank.alignment``) and keeps it in the state; dividing by nu here makes
Dion's figure comparable (its undivided ratio can exceed 1, as its spectral
norm does).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from orth_dion_jax.lapack_calls import per_matrix
from orth_dion_jax.transform import LowRankState, OrthDionState

Array = jax.Array


class MatrixDiagnostics(NamedTuple):
  """Per weight leaf; each array has the leaf's batch shape."""
  nu: Array                 # ||P Q^T||_op of the last step
  rank: int                 # r in use
  captured_fraction: Array  # ||P R^T||_F^2 / ||B||_F^2 of the last step
  alignment: Array          # <B, P Q^T> / (nu ||P^T B||_*) of the last step
  nonfinite_count: Array    # steps skipped by the non-finite guard (a bad
                            # gradient, schedule, buffer or factor, an
                            # overflowing momentum, a repaired Q)
  effective_rank: Array | None = None   # adaptive_rank: the smoothed
                                        # estimate (0 before a step)


def _array(x: Any) -> Array:
  # nnx.Optimizer wraps state leaves in Variables; look through them.
  return x.value if hasattr(x, "value") and not isinstance(x, jax.Array) else x


def _is_state(x: Any) -> bool:
  return isinstance(x, (OrthDionState, LowRankState))


def _gram(q: Array) -> Array:
  """Q^T Q of each (k, r) matrix, laid out whole on every device.

  Over an Explicit mesh the type of a sharded ``Q`` says how its rows are
  split, and a product over split rows has no implied layout: it is asked
  for, replicated (r x r pieces), as the eigenvalue call needs them whole.
  """
  sharding = jax.typeof(q).sharding
  spec = getattr(sharding, "spec", None)
  if spec is not None and any(axis is not None for axis in spec):
    return jnp.einsum("...kr,...ks->...rs", q, q,
                      out_sharding=jax.sharding.NamedSharding(
                          sharding.mesh, jax.sharding.PartitionSpec()))
  return jnp.einsum("...kr,...ks->...rs", q, q)


def _spectral_norms(qs: list[Array]) -> list[Array]:
  """The largest singular value of each array of ``qs`` (from its r x r
  Grams)."""
  out = []
  for q in qs:
    gram = _gram(q.astype(jnp.float32))
    r = gram.shape[-1]
    top = per_matrix(jnp.linalg.eigvalsh, gram.reshape(-1, r, r))[:, -1]
    out.append(jnp.sqrt(jnp.maximum(top, 0.0)).reshape(gram.shape[:-2]))
  return out


def matrix_diagnostics(opt_state: Any) -> dict[str, MatrixDiagnostics]:
  """Diagnostics of every low-rank matrix in an optimizer state, by path.

  Args:
    opt_state: a state holding ``OrthDionState`` / ``LowRankState`` (any
      chain or partition of them; NNX ``Variable`` boxes are unwrapped).

  Returns:
    ``{path: MatrixDiagnostics}`` for every low-rank weight, each array with
    the weight's batch shape. Cheap under jit: r x r work per matrix.
  """
  paths, qs, captured, aligned, skipped, estimates = [], [], [], [], [], []
  for state in jax.tree.leaves(opt_state, is_leaf=_is_state):
    if not _is_state(state):
      continue
    flat = jax.tree_util.tree_leaves_with_path(state.right_factor)
    paths += [jax.tree_util.keystr(path) for path, _ in flat]
    qs += [_array(q) for _, q in flat]
    captured += [_array(c) for c in jax.tree.leaves(state.captured_fraction)]
    aligned += [_array(a) for a in jax.tree.leaves(state.alignment)]
    skipped += [_array(s) for s in jax.tree.leaves(state.nonfinite_count)]
    estimates += ([None] * len(flat) if state.effective_rank is None else
                  [_array(e) for e in jax.tree.leaves(state.effective_rank)])
  # A step that captured nothing had P = 0 or was skipped (zero buffer, the
  # guard, or no step yet): its update was 0, whatever the kept Q is.
  return {
      path: MatrixDiagnostics(
          nu=jnp.where(c > 0, nu, 0.0), rank=q.shape[-1],
          captured_fraction=c,
          alignment=jnp.where(c > 0, a / jnp.where(nu > 0, nu, 1.0), 0.0),
          nonfinite_count=s, effective_rank=e)
      for path, q, nu, c, a, s, e in zip(paths, qs, _spectral_norms(qs),
                                         captured, aligned, skipped,
                                         estimates)}


def diagnostics_summary(opt_state: Any) -> dict[str, Array]:
  """Scalars over all low-rank matrices: nu, alignment, captured, skips.

  Args:
    opt_state: as in ``matrix_diagnostics``.

  Returns:
    ``nu_mean``, ``nu_max``, ``alignment_mean``, ``alignment_min``,
    ``captured_fraction_mean``, ``nonfinite_skips`` (total matrix-steps
    skipped) and ``rank_mean`` (the ranks held, over matrices), as scalar
    arrays, and with ``adaptive_rank`` ``effective_rank_mean``; an empty
    dict if the state has no low-rank
    matrices. Like nu, a matrix that did not step (no step yet, a zero
    buffer, a skipped step) counts 0 in the means; ``alignment_min`` is the
    least over the matrices that stepped (0 if none did).

  Example:
    >>> import jax.numpy as jnp
    >>> from orth_dion_jax import orth_dion
    >>> params = {"w": jnp.eye(8, 4)}
    >>> tx = orth_dion(0.1)
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> round(float(diagnostics_summary(state)["nu_max"]), 4)
    1.0
  """
  per_matrix = matrix_diagnostics(opt_state)
  if not per_matrix:
    return {}
  # Reduced leaf by leaf, then combined: leaves split over different mesh
  # axes (an Explicit mesh) cannot be concatenated, their scalars can.
  matrices = sum(d.nu.size for d in per_matrix.values())
  stepped = sum(jnp.sum(d.captured_fraction > 0) for d in per_matrix.values())
  over = lambda reduce, field: [reduce(getattr(d, field))
                                for d in per_matrix.values()]
  summary = {
      "nu_mean": sum(over(jnp.sum, "nu")) / matrices,
      "nu_max": functools.reduce(jnp.maximum, over(jnp.max, "nu")),
      "alignment_mean": sum(over(jnp.sum, "alignment")) / matrices,
      # Over the matrices that stepped (2 is above any alignment); 0, like
      # the rest, when none did.
      "alignment_min": jnp.where(stepped > 0, functools.reduce(jnp.minimum, [
          jnp.min(jnp.where(d.captured_fraction > 0, d.alignment, 2.0))
          for d in per_matrix.values()]), 0.0),
      "captured_fraction_mean": sum(over(jnp.sum, "captured_fraction"))
                                / matrices,
      "nonfinite_skips": sum(over(jnp.sum, "nonfinite_count")),
      "rank_mean": jnp.asarray(sum(d.rank * d.nu.size
                                   for d in per_matrix.values()) / matrices,
                               jnp.float32),
  }
  if all(d.effective_rank is not None for d in per_matrix.values()):
    summary["effective_rank_mean"] = sum(over(jnp.sum, "effective_rank")
                                         ) / matrices
  return summary
