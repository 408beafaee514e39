"""The geometry Orth-Dion is about (docs/design.md: the sign of the QR, the geometry).

Orth-Dion's direction ``D = P Q^T`` is an exact rank-r partial isometry
(nu = ||D||_op = 1), aligned with the buffer mode by mode (the QR of
``R = B^T P`` has a positive diagonal); Dion's column-normalized ``Q`` gives
nu > 1 on the same inputs. Repeated power iterations on a fixed matrix reach
the rank-r polar factor ``U_r V_r^T``.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orth_dion_jax
import reference
from core_helpers import gradient_steps
from core_helpers import kernel_tree

SHAPES = {"tall": (16, 48), "wide": (48, 16)}   # Flax (fan_in, fan_out)
RANK = 4
STEPS = 10
METHODS = orth_dion_jax.ORTHOGONALIZE_METHODS


def _directions(right_factor: str):
  """Per step and matrix: (oriented buffer B, oriented D = P Q^T, Q, nu).

  ``nu`` is the package's diagnostic; ``B = M + G`` is rebuilt from the
  momentum before the step, ``D`` from the update divided by its scale.
  """
  rng = np.random.default_rng(3)
  params = kernel_tree(rng, SHAPES)
  # Householder: the method whose raw QR has mixed-sign diagonals.
  tx = orth_dion_jax.scale_by_orth_dion(rank=RANK, right_factor=right_factor,
                                        orthogonalize="householder")
  state = tx.init(params)
  update = jax.jit(tx.update)
  steps = []
  for g in gradient_steps(rng, SHAPES, STEPS):
    buffers = jax.tree.map(lambda m, g: np.asarray(m + g, np.float64),
                           state.momentum, g)
    updates, state = update(g, state, params)
    diagnostics = orth_dion_jax.matrix_diagnostics(state)
    per_matrix = {}
    for name, (fan_in, fan_out) in SHAPES.items():
      scale = math.sqrt(fan_out / fan_in)
      per_matrix[name] = (
          reference.oriented(buffers[name].T),
          reference.oriented(np.asarray(updates[name], np.float64).T / scale),
          np.asarray(state.right_factor[name], np.float64),
          float(diagnostics[f"['{name}']"].nu))
    steps.append(per_matrix)
  return steps, state


@pytest.fixture(scope="module")
def orth_dion_steps():
  return _directions("qr")


@pytest.fixture(scope="module")
def dion_steps():
  return _directions("column")


def test_orth_dion_update_is_a_rank_r_partial_isometry(orth_dion_steps):
  steps, _ = orth_dion_steps
  for t, per_matrix in enumerate(steps):
    for name, (_, d, _, nu) in per_matrix.items():
      singular_values = np.linalg.svd(d, compute_uv=False)
      np.testing.assert_allclose(singular_values[:RANK], 1.0, atol=1e-3,
                                 err_msg=f"step {t}, {name}")
      np.testing.assert_allclose(singular_values[RANK:], 0.0, atol=1e-3,
                                 err_msg=f"step {t}, {name}")
      assert abs(nu - 1.0) < 1e-3, (t, name, nu)


def test_orth_dion_aligns_with_the_buffer_mode_by_mode(orth_dion_steps):
  """T = Q^T B^T D Q is the triangular factor of R = B^T P = Q T.

  Upper triangular with a positive diagonal: every one of the r modes steps
  downhill, so <B, D> = trace(T) > 0 (the sign pitfall of section 3).
  """
  steps, _ = orth_dion_steps
  for t, per_matrix in enumerate(steps):
    for name, (b, d, q, _) in per_matrix.items():
      tri = q.T @ b.T @ d @ q
      scale = np.max(np.abs(tri))
      np.testing.assert_allclose(np.tril(tri, -1), 0.0, atol=1e-4 * scale,
                                 err_msg=f"step {t}, {name}")
      assert np.all(np.diag(tri) > 0), (t, name, np.diag(tri))
      assert np.sum(b * d) > 0, (t, name)


def test_dion_leaves_the_unit_ball_on_the_same_inputs(dion_steps):
  """nu > 1 (column normalization is not orthonormalization), nu <= sqrt(r),
  and the diagnostic nu = ||Q||_op equals the update's spectral norm."""
  steps, _ = dion_steps
  for t, per_matrix in enumerate(steps):
    for name, (_, d, q, nu) in per_matrix.items():
      np.testing.assert_allclose(np.linalg.norm(q, axis=0), 1.0, atol=1e-5)
      assert 1.01 < nu <= math.sqrt(RANK) + 1e-5, (t, name, nu)
      np.testing.assert_allclose(np.linalg.norm(d, 2), nu, rtol=1e-4)


def test_diagnostics_summary_is_jittable_and_reports_the_geometry(
    orth_dion_steps, dion_steps):
  orth_summary = jax.jit(orth_dion_jax.diagnostics_summary)(orth_dion_steps[1])
  dion_summary = jax.jit(orth_dion_jax.diagnostics_summary)(dion_steps[1])
  np.testing.assert_allclose(orth_summary["nu_max"], 1.0, atol=1e-3)
  assert dion_summary["nu_mean"] > 1.01
  for summary in (orth_summary, dion_summary):
    assert 0.0 < summary["captured_fraction_mean"] < 1.0
    assert summary["nonfinite_skips"] == 0
  for d in orth_dion_jax.matrix_diagnostics(orth_dion_steps[1]).values():
    assert d.rank == RANK


def test_many_power_iterations_reach_the_rank_r_polar_factor():
  """On a fixed matrix with distinct singular values, orthogonal iteration
  converges to the top singular vectors, so P Q^T -> U_r V_r^T."""
  rng = np.random.default_rng(4)
  u, _ = np.linalg.qr(rng.standard_normal((40, 20)))
  v, _ = np.linalg.qr(rng.standard_normal((20, 20)))
  kernel = (u * 0.8 ** np.arange(20)) @ v.T        # (fan_in 40, fan_out 20)
  params = {"w": jnp.asarray(kernel, jnp.float32)}
  polar = u[:, :RANK] @ v[:, :RANK].T
  errors = {}
  for power_iters in (1, 30):
    tx = orth_dion_jax.scale_by_low_rank_orthogonalization(
        orth_dion_jax.LowRankCompressor(
            rank=RANK, power_iters=power_iters, orthogonalize="householder",
            scale=None))
    direction, _ = jax.jit(tx.update)(params, tx.init(params))
    errors[power_iters] = np.max(np.abs(direction["w"] - polar))
  assert errors[1] > 1e-2 and errors[30] < 2e-4, errors


@pytest.mark.parametrize("method", METHODS)
def test_orthonormalize_gives_the_positive_diagonal_qr(method):
  """Q^T A is upper triangular with a positive diagonal, for every method,
  on a batch whose plain Householder QR has negative diagonal entries."""
  rng = np.random.default_rng(5)
  a = rng.standard_normal((3, 30, 6))
  assert np.any(np.diagonal(np.linalg.qr(a)[1], axis1=-2, axis2=-1) < 0)
  q = np.asarray(orth_dion_jax.orthonormalize(
      jnp.asarray(a, jnp.float32), method, key=jax.random.key(0)), np.float64)
  for qi, ai in zip(q, a):
    chex.assert_trees_all_close(qi, reference.qr_pos(ai), atol=1e-5)
    t = qi.T @ ai
    chex.assert_trees_all_close(np.tril(t, -1), np.zeros((6, 6)), atol=1e-5)
    assert np.all(np.diag(t) > 0)


@pytest.mark.parametrize("method", ("cholesky_qr", "randomized_cholesky_qr"))
def test_cholesky_methods_stay_orthonormal_on_ill_conditioned_input(method):
  """cond(A) = 1e7: a float32 Cholesky of A^T A fails; the fallback keeps
  the columns orthonormal and the span of A."""
  rng = np.random.default_rng(6)
  u, _ = np.linalg.qr(rng.standard_normal((64, 8)))
  v, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  a = (u * np.geomspace(1.0, 1e-7, 8)) @ v.T
  q = np.asarray(orth_dion_jax.orthonormalize(
      jnp.asarray(a, jnp.float32), method, key=jax.random.key(0)), np.float64)
  chex.assert_tree_all_finite(q)
  chex.assert_trees_all_close(q.T @ q, np.eye(8), atol=1e-5)
  chex.assert_trees_all_close(q @ (q.T @ a), a, atol=1e-5)
