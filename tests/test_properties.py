"""Property tests over random shapes, ranks, dtypes and methods (hypothesis).

Whatever the matrix: outputs are finite, shapes and dtypes are kept, the
right factor has the documented shape and rank, Orth-Dion's nu is 1 and
Dion's lies in [1, sqrt(r)].
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import orth_dion_jax
import reference

METHODS = orth_dion_jax.ORTHOGONALIZE_METHODS
# Every example compiles a step for a new shape: keep the count small.
FEW = settings(max_examples=6, deadline=None, derandomize=True)


@st.composite
def matrix_problems(draw):
  fan_in = draw(st.integers(2, 24))
  fan_out = draw(st.integers(2, 24))
  layers = draw(st.one_of(st.none(), st.integers(1, 3)))
  return dict(
      shape=(fan_in, fan_out) if layers is None else (layers, fan_in, fan_out),
      rank=draw(st.integers(1, min(fan_in, fan_out))),
      dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
      right_factor=draw(st.sampled_from(["qr", "column"])),
      orthogonalize=draw(st.sampled_from(METHODS)),
      seed=draw(st.integers(0, 2**16)),
  )


@FEW
@given(matrix_problems())
def test_steps_are_finite_keep_shapes_and_bound_nu(problem):
  shape, r, dtype = problem["shape"], problem["rank"], problem["dtype"]
  fan_in, fan_out = shape[-2:]
  dims = orth_dion_jax.DionDimensionNumbers(len(shape) - 2, len(shape) - 1)
  tx = orth_dion_jax.scale_by_orth_dion(
      rank=r, right_factor=problem["right_factor"],
      orthogonalize=problem["orthogonalize"], seed=problem["seed"],
      weight_dimension_numbers={"w": dims})
  rng = np.random.default_rng(problem["seed"])
  params = {"w": jnp.asarray(rng.standard_normal(shape), dtype)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(2):
    grads = {"w": jnp.asarray(rng.standard_normal(shape), dtype)}
    updates, new_state = update(grads, state, params)
    chex.assert_tree_all_finite((updates, new_state))
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    chex.assert_shape(new_state.right_factor["w"],
                      shape[:-2] + (min(fan_in, fan_out), r))
    state = new_state
  nu = np.asarray(orth_dion_jax.matrix_diagnostics(state)["['w']"].nu)
  direction = np.asarray(updates["w"], np.float64) / math.sqrt(
      fan_out / fan_in)
  spectral = np.linalg.norm(direction.reshape((-1, fan_in, fan_out)), 2,
                            axis=(-2, -1))
  if problem["right_factor"] == "qr":
    np.testing.assert_allclose(nu, 1.0, atol=1e-3)
  else:
    assert np.all(nu > 1 - 1e-3) and np.all(nu <= math.sqrt(r) + 1e-3), nu
  # The update is nu-bounded too, up to its own dtype's rounding.
  np.testing.assert_allclose(spectral, np.ravel(nu),
                             rtol=2e-2 if dtype == jnp.bfloat16 else 1e-4)


@FEW
@given(k=st.integers(1, 40), r=st.integers(1, 8),
       method=st.sampled_from(METHODS), seed=st.integers(0, 2**16))
def test_orthonormalize_is_the_positive_diagonal_qr(k, r, method, seed):
  k = max(k, r)
  a = np.random.default_rng(seed).standard_normal((k, r))
  orthonormalize = jax.jit(orth_dion_jax.orthonormalize, static_argnums=1)
  q = np.asarray(orthonormalize(jnp.asarray(a, jnp.float32), method,
                                key=jax.random.key(seed)), np.float64)
  chex.assert_trees_all_close(q.T @ q, np.eye(r), atol=1e-5)
  t = q.T @ a
  chex.assert_trees_all_close(np.tril(t, -1), np.zeros((r, r)), atol=1e-4)
  assert np.all(np.diag(t) > 0)
  chex.assert_trees_all_close(q, reference.qr_pos(a), atol=1e-3)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(fan_in=st.integers(1, 64), fan_out=st.integers(1, 64),
       rank_fraction=st.floats(0.01, 1.0), rank_multiple_of=st.integers(1, 16),
       rank=st.one_of(st.none(), st.integers(1, 80)))
def test_rank_rule(fan_in, fan_out, rank_fraction, rank_multiple_of, rank):
  """r = rank, or ceil(fraction * min) rounded up to the multiple; in [1, min]."""
  small = min(fan_in, fan_out)
  if rank is None:
    expected = rank_multiple_of * math.ceil(
        math.ceil(rank_fraction * small) / rank_multiple_of)
  else:
    expected = rank
  expected = max(1, min(expected, small))
  tx = orth_dion_jax.scale_by_orth_dion(
      rank=rank, rank_fraction=rank_fraction,
      rank_multiple_of=rank_multiple_of)
  state = jax.eval_shape(tx.init, {"w": jnp.zeros((fan_in, fan_out))})
  chex.assert_shape(state.right_factor["w"], (small, expected))
