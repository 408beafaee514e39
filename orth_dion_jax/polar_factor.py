"""The polar factor of tall-skinny matrices, from ``r x r`` pieces only.

For ``A`` of shape ``(k, r)``, ``k >= r``, with singular value decomposition
``A = V S U^T``, the polar factor is ``polar(A) = V U^T = A (A^T A)^(-1/2)``.
Of all ``k x r`` matrices with orthonormal columns it is the closest to ``A``
and the one with the largest inner product ``<A, Q> = trace(S) = ||A||_*``.

Why Orth-Dion wants it (docs/design.md, "The polar right factor"): with
``R = B^T P`` and ``Q = polar(R)``, the update ``P Q^T = polar(P P^T B)`` is
the step Muon would take on the rank-r approximation of the buffer, with
alignment ``<B, P Q^T> = ||R||_*``. The QR right factor ``R = Q_R T`` has
alignment ``trace(T) <= ||R||_*``; the two coincide only when ``R``'s columns
are already orthogonal (a converged power iteration).

The route, ``polar(A) = Q_A polar(T)``:

1. ``A = Q_A T`` with the sign-safe QR of ``orthogonalize`` (any method);
2. ``T = Q_A^T A`` (``r x r``; under sharding one ``r x r`` sum);
3. ``polar(T) = U_T W^T`` from the SVD ``T = U_T S W^T`` of the small matrix.

``T`` has the condition number of ``A``; the Gram matrix ``A^T A`` has its
square, so a polar factor taken from an eigendecomposition of the float32
Gram loses the directions of small singular values
(``benchmarks/polar_routes.py`` measures the routes against a float64 SVD).

Rank deficiency: singular values at or below ``r * eps * s_max`` (float32
``eps``, numpy's ``matrix_rank`` tolerance) count as zero and their
directions are dropped: ``polar(A)`` then has orthonormal columns on the
range of ``A`` and zero elsewhere, so it never divides by a vanishing
singular value and an all-zero ``A`` gives an all-zero, finite result.

References:
  Higham, Functions of Matrices, SIAM 2008, chapter 8 (the polar
  decomposition).
  Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from orth_dion_jax import orthogonalize
from orth_dion_jax import validation
from orth_dion_jax.collectives import AxisGroup, NO_AXES
from orth_dion_jax.lapack_calls import per_matrix
from orth_dion_jax.scaling import abs_max, unit_scaled

Array = jax.Array


def small_polar(t: Array) -> Array:
  """``polar(T)`` of a batch of ``r x r`` matrices, zero on their null space.

  ``T = U S W^T`` gives ``U diag(S > tol) W^T`` with
  ``tol = r * eps * max(S)``.
  """
  u, s, wt = per_matrix(jnp.linalg.svd, t)
  r = t.shape[-1]
  tol = r * np.finfo(np.float32).eps * s[..., :1]
  kept = (s > tol).astype(t.dtype)
  return jnp.einsum("nij,nj,njk->nik", u, kept, wt)


def polar_many(arrays: Sequence[Array], method: orthogonalize.Method, *,
               key: Array | None = None,
               rows: AxisGroup = NO_AXES) -> list[Array]:
  """``polar(A)`` of factors ``(n_i, k_i, r)`` that share ``r``, in float32.

  Their QR runs as in ``orthogonalize.orthonormalize_many``; the ``r x r``
  matrices ``T`` are summed across ``rows`` in one reduction and their SVDs
  run as one batched call.
  """
  arrays = [a.astype(jnp.float32) for a in arrays]
  qs = orthogonalize.orthonormalize_many(arrays, method, key=key, rows=rows)
  # polar(c A) = polar(A) for c > 0: A is scaled by its largest magnitude
  # so that T neither overflows nor underflows. (The QR's column scaling
  # would change the polar factor; one scalar per matrix does not.)
  ts = []
  for a, q in zip(arrays, qs):
    largest = rows.max(abs_max(a, axis=(-2, -1), keepdims=True))
    ts.append(jnp.einsum("nkr,nks->nrs", q, unit_scaled(a, largest)))
  sizes = np.cumsum([t.shape[0] for t in ts])[:-1]
  ws = jnp.split(small_polar(rows.sum(jnp.concatenate(ts, axis=0))), sizes)
  return [jnp.einsum("nkr,nrs->nks", q, w) for q, w in zip(qs, ws)]


def polar(a: Array, method: orthogonalize.Method = "cholesky_qr", *,
          key: Array | None = None, rows: AxisGroup = NO_AXES) -> Array:
  """The polar factor of ``a`` (``(..., k, r)``, ``k >= r``), float32.

  Args:
    a: the matrices; any float dtype (upcast to float32).
    method: the QR of the first stage (``orthogonalize.METHODS``).
    key: PRNG key of the randomized sketch (that method only).
    rows: the mesh axes splitting the rows of ``a`` (none on one device).

  Returns:
    ``Q`` shaped like ``a``: ``Q^T Q = I`` on the range of ``a``,
    ``Q^T a`` symmetric positive semi-definite.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0]])
    >>> q = polar(a)
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-6))
    True
    >>> s = q.T @ a                # symmetric: <a, q> is the nuclear norm
    >>> bool(jnp.allclose(s, s.T, atol=1e-5))
    True
  """
  validation.check_tall_matrices("polar", a)
  k, r = a.shape[-2:]
  [q] = polar_many([a.reshape(-1, k, r)], method, key=key, rows=rows)
  return q.reshape(a.shape)
