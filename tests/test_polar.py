"""The polar right factor: exact against a float64 SVD, safe on rank-deficient
input, and at least as aligned as the QR step on a real training trajectory.

``polar(R) = V U^T`` for ``R = V S U^T``: the closest matrix with orthonormal
columns, and the one with the largest ``<R, Q>`` (``||R||_*``). The package
computes it from ``r x r`` pieces (``orth_dion_jax/polar_factor.py``); the
reference here is NumPy's float64 SVD of the whole matrix.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import orth_dion_jax
import reference
from examples import data as data_lib
from examples import model as model_lib

METHODS = orth_dion_jax.ORTHOGONALIZE_METHODS


def _with_spectrum(rng, k, singular_values):
  r = len(singular_values)
  v, _ = np.linalg.qr(rng.standard_normal((k, r)))
  u, _ = np.linalg.qr(rng.standard_normal((r, r)))
  return (v * singular_values) @ u.T


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e4])
def test_polar_matches_float64_svd(method, condition):
  """Accurate in float32 up to the condition number: the error bound of the
  polar factor grows like cond(R) eps (Higham, ch. 8), and the route through
  the triangular factor does not square it as a Gram matrix would."""
  rng = np.random.default_rng(0)
  for k, r in [(64, 16), (96, 32)]:
    a = _with_spectrum(rng, k, np.geomspace(1.0, 1.0 / condition, r))
    q = np.asarray(orth_dion_jax.polar(jnp.asarray(a, jnp.float32), method,
                                       key=jax.random.key(0)), np.float64)
    expected = reference.polar(a)
    assert np.max(np.abs(q - expected)) <= 2e-6 * condition
    np.testing.assert_allclose(q.T @ q, np.eye(r), atol=5e-6)
    # The alignment <A, Q> = ||A||_*, to float32 rounding.
    nuclear = np.sum(np.linalg.svd(a, compute_uv=False))
    assert abs(np.sum(q * a) - nuclear) <= 1e-6 * nuclear


@pytest.mark.parametrize("method", METHODS)
def test_zero_singular_values_give_zero_directions(method):
  """Rank 3 of 6 columns: three unit singular values and three zeros, never
  NaN; an all-zero matrix gives zeros."""
  rng = np.random.default_rng(1)
  a = _with_spectrum(rng, 40, np.array([2.0, 1.0, 0.5, 0.0, 0.0, 0.0]))
  q = orth_dion_jax.polar(jnp.asarray(a, jnp.float32), method,
                          key=jax.random.key(0))
  chex.assert_tree_all_finite(q)
  s = np.linalg.svd(np.asarray(q, np.float64), compute_uv=False)
  np.testing.assert_allclose(s, [1, 1, 1, 0, 0, 0], atol=1e-5)
  np.testing.assert_allclose(np.asarray(q, np.float64), reference.polar(a),
                             atol=1e-5)
  zero = orth_dion_jax.polar(jnp.zeros((12, 4)), method, key=jax.random.key(0))
  np.testing.assert_array_equal(zero, np.zeros((12, 4)))


def test_large_and_tiny_scales_stay_finite():
  """One scalar rescaling of R before its r x r products: no overflow at
  1e30, no underflow at 1e-30, and the same factor."""
  rng = np.random.default_rng(2)
  a = _with_spectrum(rng, 32, np.geomspace(1.0, 0.1, 8))
  base = np.asarray(orth_dion_jax.polar(jnp.asarray(a, jnp.float32)))
  for scale in (1e30, 1e-30):
    q = np.asarray(orth_dion_jax.polar(jnp.asarray(a * scale, jnp.float32)))
    np.testing.assert_allclose(q, base, atol=1e-5)


def test_optimizer_step_with_a_rank_deficient_gradient_is_finite():
  """A rank-1 gradient at rank 4: the update has one unit singular value,
  nothing from the zero directions, and the state stays finite."""
  params = {"w": jnp.zeros((32, 16))}
  tx = orth_dion_jax.orth_dion(1.0, rank=4, right_factor="polar",
                               weight_decay=0.0)
  state = tx.init(params)
  rng = np.random.default_rng(3)
  g = np.outer(rng.standard_normal(32), rng.standard_normal(16))
  for _ in range(3):
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state,
                               params)
    chex.assert_tree_all_finite((updates, state))
    s = np.linalg.svd(np.asarray(updates["w"], np.float64), compute_uv=False)
    scale = np.sqrt(16 / 32)   # the spectral scale sqrt(fan_out / fan_in)
    np.testing.assert_allclose(s[:2], [scale, 0.0], atol=1e-5)
  assert int(orth_dion_jax.diagnostics_summary(state)["nonfinite_skips"]) == 0


def _language_model():
  """The example's transformer (small) on real text: its parameters, their
  dimension numbers, a jitted gradient and the batches."""
  config = model_lib.ModelConfig(d_model=64, n_layers=2, n_heads=2)
  model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  train, _ = data_lib.load_corpus(max_bytes=200_000)
  batches = data_lib.Batches(train, batch_size=8, seq_len=64, seed=0)
  dims = functools.partial(model_lib.dimension_numbers,
                           numbers_class=orth_dion_jax.DionDimensionNumbers)

  def loss(p, inputs, targets):
    return model_lib.cross_entropy(nnx.merge(graphdef, p), inputs, targets)

  return params, dims, jax.jit(jax.grad(loss)), batches


@pytest.mark.parametrize("form", orth_dion_jax.ERROR_FEEDBACK_FORMS)
def test_polar_step_is_at_least_as_aligned_as_qr_on_a_real_trajectory(form):
  """Every step of 15 on the example's transformer: from the same state and
  gradient, the polar step's alignment <B, P Q^T> / ||P^T B||_* is 1 and at
  least the QR step's, and its nu is 1."""
  params, dims, grad_fn, batches = _language_model()
  make = lambda right_factor: orth_dion_jax.orth_dion(
      0.02, rank_fraction=0.25, right_factor=right_factor,
      error_feedback=form, weight_dimension_numbers=dims)
  polar_tx, qr_tx = make("polar"), make("qr")
  state = polar_tx.init(params)
  polar_update, qr_update = jax.jit(polar_tx.update), jax.jit(qr_tx.update)
  for step in range(15):
    grads = grad_fn(params, *next(batches))
    # Both take the same state: the polar trajectory's.
    _, qr_state = qr_update(grads, state, params)
    updates, state = polar_update(grads, state, params)
    params = optax.apply_updates(params, updates)
    polar_aligned = orth_dion_jax.matrix_diagnostics(state)
    qr_aligned = orth_dion_jax.matrix_diagnostics(qr_state)
    for path, d in polar_aligned.items():
      np.testing.assert_allclose(d.alignment, 1.0, atol=2e-4,
                                 err_msg=f"step {step} {path}")
      np.testing.assert_allclose(d.nu, 1.0, atol=1e-5,
                                 err_msg=f"step {step} {path}")
      assert np.all(d.alignment >= qr_aligned[path].alignment - 1e-5), (
          step, path, d.alignment, qr_aligned[path].alignment)
  # QR is strictly less aligned somewhere: the comparison is not vacuous.
  assert min(float(np.min(d.alignment)) for d in qr_aligned.values()) < 0.999
