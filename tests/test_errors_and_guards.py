"""Bad input gets a clear error, and nothing is lost.

Invalid hyperparameters fail at construction naming the argument; a leaf
that is not a matrix fails naming its path. A non-finite gradient never
reaches the parameters or the state: that matrix skips its step (zero
update, momentum and right factor kept, ``nonfinite_count`` incremented).
An all-zero gradient gives a zero update and keeps the right factor.
Gradients at 1e-30 and 1e30 scale stay finite and, for Orth-Dion, give the
same direction as at unit scale.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orth_dion_jax
from core_helpers import gradient_steps
from core_helpers import kernel_tree
from core_helpers import run_against_reference

BAD_HYPERPARAMETERS = [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-3), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(rank_fraction=0.0), ValueError, "rank_fraction"),
    (dict(rank_fraction=1.5), ValueError, "rank_fraction"),
    (dict(rank_multiple_of=0), ValueError, "rank_multiple_of"),
    (dict(mu=1.0), ValueError, "mu"),
    (dict(mu=-0.1), ValueError, "mu"),
    (dict(orthogonalize="svd"), ValueError, "orthogonalize"),
    (dict(scale="unit"), ValueError, "scale"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(power_iters=0), ValueError, "power_iters"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(seed=0.5), TypeError, "seed"),
]
ALIAS_ONLY = [
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(adam_b1=1.0), ValueError, "adam_b1"),
    (dict(adam_b2=-0.5), ValueError, "adam_b2"),
    (dict(adam_weight_decay=-1.0), ValueError, "adam_weight_decay"),
    (dict(adam_eps=-1e-8), ValueError, "adam_eps"),
]


def _ids(cases):
  return [",".join(f"{k}={v!r}" for k, v in kwargs.items())
          for kwargs, _, _ in cases]


@pytest.mark.parametrize("kwargs,error,name", BAD_HYPERPARAMETERS,
                         ids=_ids(BAD_HYPERPARAMETERS))
@pytest.mark.parametrize("factory", [
    lambda **kw: orth_dion_jax.orth_dion(0.01, **kw),
    lambda **kw: orth_dion_jax.dion(0.01, **kw),
    orth_dion_jax.scale_by_orth_dion,
], ids=["orth_dion", "dion", "scale_by_orth_dion"])
def test_invalid_hyperparameters_name_the_argument(factory, kwargs, error,
                                                   name):
  with pytest.raises(error, match=rf"\b{name}\b"):
    factory(**kwargs)


@pytest.mark.parametrize("right_factor", ["qr", "polar"])
def test_dion_fixes_its_right_factor(right_factor):
  """dion(right_factor="qr") would silently be Orth-Dion: it is refused."""
  with pytest.raises(TypeError, match=r"\bright_factor\b.*dion fixes the "
                     r"column-normalized right factor"):
    orth_dion_jax.dion(0.01, right_factor=right_factor)


def test_orth_dion_refuses_dions_right_factor():
  with pytest.raises(TypeError, match=r"right_factor='column'.*use dion"):
    orth_dion_jax.orth_dion(0.01, right_factor="column")


@pytest.mark.parametrize("factory", [orth_dion_jax.orth_dion,
                                     orth_dion_jax.dion])
@pytest.mark.parametrize("kwargs,unused", [
    (dict(beta=0.9), "beta"),
    (dict(error_feedback="mu", beta=0.9), "beta"),
    (dict(error_feedback="beta", mu=0.9), "mu"),
])
def test_a_decay_of_the_other_form_is_refused(factory, kwargs, unused):
  """beta with the mu-form would be silently ignored: it is an error."""
  with pytest.raises(ValueError, match=rf"^{unused} applies to "
                     rf"error_feedback='{unused}'"):
    factory(0.01, **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(error_feedback="nesterov"), "error_feedback"),
    (dict(error_feedback="beta", beta=1.5), "beta"),
    (dict(error_feedback="beta", beta=float("nan")), "beta"),
    (dict(mu=1.0), "mu"),
])
def test_invalid_error_feedback_settings_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    orth_dion_jax.orth_dion(0.01, **kwargs)


@pytest.mark.parametrize("name", ["mu", "beta", "error_feedback"])
def test_error_feedback_takes_its_decays_not_a_form(name):
  with pytest.raises(TypeError, match=rf"'{name}': give residual_decay"):
    orth_dion_jax.scale_by_error_feedback(**{name: 0.5})


def test_invalid_right_factor_names_the_argument():
  with pytest.raises(ValueError, match=r"\bright_factor\b"):
    orth_dion_jax.scale_by_orth_dion(right_factor="rows")


@pytest.mark.parametrize("kwargs,error,name", ALIAS_ONLY,
                         ids=_ids(ALIAS_ONLY))
def test_invalid_alias_hyperparameters_name_the_argument(kwargs, error, name):
  with pytest.raises(error, match=rf"\b{name}\b"):
    orth_dion_jax.orth_dion(0.01, **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(residual_decay=1.5), "residual_decay"),
    (dict(captured_decay=-0.5), "captured_decay"),
])
def test_invalid_error_feedback_decays_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    orth_dion_jax.scale_by_error_feedback(**kwargs)


def test_invalid_compressor_names_the_argument():
  with pytest.raises(ValueError, match="rank"):
    orth_dion_jax.LowRankCompressor(rank=0)
  with pytest.raises(ValueError, match="orthogonalize"):
    orth_dion_jax.LowRankCompressor(orthogonalize="qr")


@pytest.mark.parametrize("kwargs,name", [(dict(rank=2), "rank"),
                                         (dict(rank_fraction=0.5),
                                          "rank_fraction")])
def test_shape_arguments_under_inject_hyperparams_need_static_args(kwargs,
                                                                   name):
  """inject_hyperparams turns numbers into arrays; a rank cannot be one."""
  tx = optax.inject_hyperparams(orth_dion_jax.orth_dion)(learning_rate=0.1,
                                                         **kwargs)
  with pytest.raises(TypeError, match=rf"{name}.*STATIC_ARGS"):
    tx.init({"w": jnp.ones((8, 4))})


@pytest.mark.parametrize("leaf,path", [
    ({"layer": {"bias": jnp.zeros(3)}}, "['layer']['bias']"),
    ({"blocks": [jnp.zeros((2, 3, 4))]}, "['blocks'][0]"),
    ({"scale": jnp.float32(1.0)}, "['scale']"),
])
@pytest.mark.parametrize("transformation", [
    orth_dion_jax.scale_by_orth_dion,
    orth_dion_jax.scale_by_low_rank_orthogonalization,
], ids=["scale_by_orth_dion", "scale_by_low_rank_orthogonalization"])
def test_non_matrix_leaf_error_names_its_path(transformation, leaf, path):
  params = {"kernel": jnp.ones((8, 4)), **leaf}
  with pytest.raises(ValueError) as info:
    transformation().init(params)
  assert path in str(info.value)


def test_bad_dimension_numbers_error_names_the_path():
  tx = orth_dion_jax.scale_by_orth_dion(weight_dimension_numbers={
      "ok": orth_dion_jax.DionDimensionNumbers(1, 2),
      "bad": orth_dion_jax.DionDimensionNumbers(0, 3)})
  with pytest.raises(ValueError, match=r"\['bad'\].*output_axis"):
    tx.init({"ok": jnp.ones((2, 4, 4)), "bad": jnp.ones((2, 4, 4))})


def test_orthonormalize_rejects_unknown_method_and_missing_key():
  a = jnp.ones((8, 2))
  with pytest.raises(ValueError, match="svd"):
    orth_dion_jax.orthonormalize(a, "svd")
  with pytest.raises(ValueError, match="key"):
    orth_dion_jax.orthonormalize(a, "randomized_cholesky_qr")


SHAPES = {"a": (16, 24), "b": (24, 16)}
LR = 0.1


def _low_rank_tx(right_factor="qr", **kwargs):
  return optax.chain(
      orth_dion_jax.scale_by_orth_dion(rank=4, right_factor=right_factor,
                                       **kwargs),
      optax.scale_by_learning_rate(LR))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_skips_only_that_matrix(bad):
  rng = np.random.default_rng(11)
  params = kernel_tree(rng, SHAPES)
  g1, g2 = gradient_steps(rng, SHAPES, 2)
  tx = orth_dion_jax.scale_by_orth_dion(rank=4)
  update = jax.jit(tx.update)
  _, state = update(g1, tx.init(params), params)
  poisoned = {**g2, "a": g2["a"].at[3, 5].set(bad)}
  updates, new_state = update(poisoned, state, params)
  chex.assert_tree_all_finite(updates)
  chex.assert_tree_all_finite(new_state)
  chex.assert_trees_all_equal(updates["a"], jnp.zeros_like(updates["a"]))
  chex.assert_trees_all_equal(new_state.momentum["a"], state.momentum["a"])
  chex.assert_trees_all_equal(new_state.right_factor["a"],
                              state.right_factor["a"])
  assert int(new_state.nonfinite_count["a"]) == 1
  assert int(new_state.nonfinite_count["b"]) == 0
  # The healthy matrix steps exactly as if it had been alone.
  clean, _ = update(g2, state, params)
  chex.assert_trees_all_close(updates["b"], clean["b"], rtol=1e-6)
  assert orth_dion_jax.diagnostics_summary(new_state)["nonfinite_skips"] == 1


# Large enough that XLA:CPU reduces each matrix with its vectorized max,
# which drops a NaN (4096 entries or more; scaling.abs_max), and stepped as
# one megabatch of three leaves.
LARGE = {name: (128, 160) for name in ("a", "b", "c")}


@pytest.mark.parametrize("size", [1000, 4096, 20000])
def test_abs_max_is_inf_wherever_an_entry_is_not_finite(size):
  from orth_dion_jax.scaling import abs_max
  rng = np.random.default_rng(15)
  x = rng.standard_normal((3, size)).astype(np.float32)
  x[0, 0], x[1, size - 1], x[2, size // 2] = np.nan, np.nan, -np.inf
  largest = jax.jit(lambda a: abs_max(a, axis=-1))
  np.testing.assert_array_equal(np.asarray(largest(x)), [np.inf] * 3)
  finite = rng.standard_normal((3, size)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(largest(finite)),
                                np.max(np.abs(finite), axis=-1))


def test_non_finite_entries_of_large_matrices_skip_only_their_leaf(
    megabatch_form):
  rng = np.random.default_rng(14)
  params = kernel_tree(rng, LARGE)
  g1, g2 = gradient_steps(rng, LARGE, 2)
  tx = orth_dion_jax.scale_by_orth_dion(rank=8)
  update = jax.jit(tx.update)
  _, state = update(g1, tx.init(params), params)
  clean, _ = update(g2, state, params)
  zeros = jnp.zeros_like(clean["b"])
  # The first, an inner and the last entry: where a NaN was dropped, or
  # turned the maximum into -Inf.
  for position in [(0, 0), (64, 77), (127, 159)]:
    for bad in [np.nan, np.inf]:
      where = f"{bad} at {position}"
      poisoned = {**g2, "b": g2["b"].at[position].set(bad)}
      updates, after = update(poisoned, state, params)
      chex.assert_tree_all_finite((updates, after))
      chex.assert_trees_all_equal(updates["b"], zeros, custom_message=where)
      chex.assert_trees_all_equal(after.momentum["b"], state.momentum["b"],
                                  custom_message=where)
      chex.assert_trees_all_equal(after.right_factor["b"],
                                  state.right_factor["b"],
                                  custom_message=where)
      np.testing.assert_array_equal(
          [int(after.nonfinite_count[k]) for k in "abc"], [0, 1, 0],
          err_msg=where)
      for k in "ac":
        np.testing.assert_allclose(updates[k], clean[k], rtol=1e-5,
                                   atol=1e-7, err_msg=where)
      # A corrupt momentum: B itself is not finite, so it is reset.
      corrupt = state._replace(momentum={
          **state.momentum, "b": state.momentum["b"].at[position].set(bad)})
      updates, after = update(g2, corrupt, params)
      chex.assert_tree_all_finite((updates, after))
      chex.assert_trees_all_equal(updates["b"], zeros, custom_message=where)
      chex.assert_trees_all_equal(after.momentum["b"], zeros,
                                  custom_message=where)
      assert int(after.nonfinite_count["b"]) == 1, where
      for k in "ac":
        np.testing.assert_allclose(updates[k], clean[k], rtol=1e-5,
                                   atol=1e-7, err_msg=where)


def test_non_finite_gradient_skips_only_its_batch_slice():
  dims = {"w": orth_dion_jax.DionDimensionNumbers(1, 2)}
  shapes = {"w": (3, 8, 12)}
  rng = np.random.default_rng(12)
  params = kernel_tree(rng, shapes, dims)
  (g,) = gradient_steps(rng, shapes, 1, dims)
  tx = orth_dion_jax.scale_by_orth_dion(rank=2, weight_dimension_numbers=dims)
  state = tx.init(params)
  update = jax.jit(tx.update)
  clean, _ = update(g, state, params)
  updates, new_state = update({"w": g["w"].at[1, 0, 0].set(jnp.nan)}, state,
                              params)
  chex.assert_trees_all_equal(updates["w"][1], jnp.zeros((8, 12)))
  # Rounding only: one failed Cholesky sends the whole batch to Householder.
  chex.assert_trees_all_close(updates["w"][::2], clean["w"][::2], atol=1e-6)
  chex.assert_trees_all_equal(new_state.right_factor["w"][1],
                              state.right_factor["w"][1])
  np.testing.assert_array_equal(new_state.nonfinite_count["w"], [0, 1, 0])


def test_orth_dion_alias_keeps_nan_out_of_every_leaf():
  """Low-rank leaf: only decoupled weight decay applies. AdamW leaf: its
  whole step is skipped by apply_if_finite."""
  rng = np.random.default_rng(13)
  params = {"kernel": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
            "bias": jnp.ones((24,), jnp.float32)}
  lr, wd = 0.1, 0.5
  tx = orth_dion_jax.orth_dion(lr, rank=4, weight_decay=wd)
  update = jax.jit(tx.update)
  state = tx.init(params)
  grads = {"kernel": jnp.full((16, 24), jnp.nan), "bias": jnp.ones((24,))}
  updates, state = update(grads, state, params)
  new = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(new["kernel"], (1 - lr * wd) * params["kernel"],
                              rtol=1e-6)
  assert not np.allclose(new["bias"], params["bias"])   # AdamW stepped
  grads = {"kernel": jnp.ones((16, 24)), "bias": jnp.full((24,), jnp.inf)}
  updates, state = update(grads, state, new)
  newer = optax.apply_updates(new, updates)
  chex.assert_trees_all_equal(newer["bias"], new["bias"])
  chex.assert_tree_all_finite((newer, state))
  assert int(optax.tree.get(state, "notfinite_count")) == 1


@pytest.mark.parametrize("right_factor", ["qr", "column"])
def test_zero_gradient_gives_zero_update_and_keeps_the_right_factor(
    right_factor):
  params = {"a": jnp.ones((16, 24)), "b": jnp.ones((24, 16))}
  tx = orth_dion_jax.scale_by_orth_dion(rank=4, right_factor=right_factor)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, new_state = jax.jit(tx.update)(zeros, state, params)
  chex.assert_trees_all_equal(updates, zeros)
  chex.assert_trees_all_equal(new_state.right_factor, state.right_factor)
  chex.assert_trees_all_equal(new_state.momentum, zeros)
  chex.assert_tree_all_finite(new_state)
  # The update is zero, so its spectral norm nu is 0, not that of the kept Q.
  for diag in orth_dion_jax.matrix_diagnostics(new_state).values():
    np.testing.assert_array_equal(np.asarray(diag.nu), 0.0)


ORTH_DION = _low_rank_tx("qr")
DION = _low_rank_tx("column")


def _updates_at_scale(tx, scale):
  rng = np.random.default_rng(14)
  params = kernel_tree(rng, SHAPES)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in gradient_steps(rng, SHAPES, 3):
    updates, state = update(jax.tree.map(lambda x: x * scale, g), state,
                            params)
    chex.assert_tree_all_finite((updates, state))
    out.append(updates)
  return out


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_orth_dion_direction_is_scale_invariant(scale):
  chex.assert_trees_all_close(_updates_at_scale(ORTH_DION, scale),
                              _updates_at_scale(ORTH_DION, 1.0),
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("tx,right_factor", [(ORTH_DION, "qr"),
                                             (DION, "column")],
                         ids=["orth_dion", "dion"])
def test_extreme_gradient_scales_match_reference(tx, right_factor, scale):
  """Also Dion at 1e-30, where its eps dominates the column norms."""
  rng = np.random.default_rng(15)
  params = kernel_tree(rng, SHAPES)
  grads = [jax.tree.map(lambda x: x * scale, g)
           for g in gradient_steps(rng, SHAPES, 3)]
  run_against_reference(tx, params, grads, learning_rate=LR,
                        right_factor=right_factor)
