"""Orth-Dion behaves like any optax optimizer.

It composes with ``optax.chain``, ``inject_hyperparams`` (schedules for the
learning rate, mu or beta and weight decay), ``MultiSteps``, ``apply_if_finite`` and
masks; it accepts extra arguments; it keeps parameter dtypes and a stable
state; jit does not change its results; its right factors can be read and
written with ``optax.tree``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orth_dion_jax
import reference
from core_helpers import as_reference
from core_helpers import gradient_steps
from core_helpers import kernel_tree
from core_helpers import run_against_reference

SHAPES = {"tall": (16, 40), "wide": (40, 16)}
STEPS = 10


def _model(dtype=jnp.float32):
  """A kernel, a bias and an embedding: low-rank and AdamW leaves."""
  rng = np.random.default_rng(7)
  return {
      "dense": {"kernel": jnp.asarray(rng.standard_normal((16, 24)), dtype),
                "bias": jnp.zeros((24,), dtype)},
      "embed": jnp.asarray(rng.standard_normal((32, 16)), dtype),
  }


def _grads_like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _run(tx, params, grad_seeds, update=None, state=None):
  """Applies ``tx`` to one gradient per seed; returns (params, state)."""
  state = tx.init(params) if state is None else state
  update = update or jax.jit(tx.update)
  for seed in grad_seeds:
    updates, state = update(_grads_like(params, seed), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_chain_after_gradient_clipping_matches_reference():
  rng = np.random.default_rng(8)
  params = kernel_tree(rng, SHAPES)
  grads = gradient_steps(rng, SHAPES, STEPS)
  max_norm = 1.0

  def clipped(g):
    factor = min(1.0, max_norm / float(optax.tree.norm(g)))
    return jax.tree.map(lambda x: x * factor, g)

  tx = optax.chain(optax.clip_by_global_norm(max_norm),
                   orth_dion_jax.orth_dion(0.05, rank=4, weight_decay=0.0))
  run_against_reference(tx, params, grads,
                        reference_grads=[clipped(g) for g in grads],
                        learning_rate=0.05)


LR = optax.linear_schedule(0.08, 0.02, STEPS)
MU = optax.linear_schedule(0.5, 0.95, STEPS)
WD = optax.exponential_decay(0.2, STEPS, 0.1)


@pytest.mark.parametrize("form,right_factor", [
    ("mu", "qr"), ("beta", "qr"), ("beta", "polar")])
@pytest.mark.parametrize("injected", [True, False],
                         ids=["inject_hyperparams", "schedules"])
def test_schedules_for_learning_rate_decay_and_weight_decay(injected, form,
                                                             right_factor):
  """mu (mu-form) or beta (beta-form) as a schedule, or injected."""
  rng = np.random.default_rng(9)
  params = kernel_tree(rng, SHAPES)
  if injected:
    factory = optax.inject_hyperparams(
        orth_dion_jax.orth_dion, static_args=orth_dion_jax.STATIC_ARGS)
  else:
    factory = orth_dion_jax.orth_dion
  decay = "mu" if form == "mu" else "beta"
  tx = factory(learning_rate=LR, **{decay: MU}, weight_decay=WD, rank=4,
               error_feedback=form, right_factor=right_factor)
  state = run_against_reference(
      tx, params, gradient_steps(rng, SHAPES, STEPS), form=form,
      right_factor=right_factor, rebase=form == "beta",
      hyperparams=lambda t: dict(learning_rate=float(LR(t)),
                                 decay=float(MU(t)), weight_decay=float(WD(t))),
      learning_rate=None)
  if injected:   # numeric hyperparameters live in the state, static ones not
    np.testing.assert_allclose(state.hyperparams[decay], MU(STEPS - 1))
    assert "rank" not in state.hyperparams
    assert "error_feedback" not in state.hyperparams


def test_multi_steps_equals_a_step_on_the_mean_gradient():
  params = _model()
  tx = orth_dion_jax.orth_dion(0.05, rank=4)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  multi_state = multi.init(params)
  multi_update = jax.jit(multi.update)
  expected, state = params, tx.init(params)
  update = jax.jit(tx.update)
  for step in range(3):
    g1, g2 = _grads_like(params, 2 * step), _grads_like(params, 2 * step + 1)
    u1, multi_state = multi_update(g1, multi_state, params)
    chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, u1))
    u2, multi_state = multi_update(g2, multi_state, params)
    params = optax.apply_updates(params, u2)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    updates, state = update(mean, state, expected)
    expected = optax.apply_updates(expected, updates)
    chex.assert_trees_all_close(params, expected, rtol=1e-5, atol=1e-6)


def test_apply_if_finite_skips_the_step_and_then_continues():
  params = _model()
  tx = optax.apply_if_finite(orth_dion_jax.orth_dion(0.05, rank=4),
                             max_consecutive_errors=3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads_like(params, 0))
  updates, skipped = update(bad, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
  chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)
  assert int(skipped.notfinite_count) == 1
  # A skipped step leaves no trace: as if the bad gradient never came.
  after_skip, _ = _run(tx, params, [1, 2], update, state=skipped)
  never_bad, _ = _run(tx, params, [1, 2], update)
  chex.assert_trees_all_close(after_skip, never_bad, rtol=1e-6)


def test_masked_leaves_pass_through_untouched():
  params = _model()
  mask = {"dense": {"kernel": True, "bias": False}, "embed": False}
  tx = optax.masked(orth_dion_jax.scale_by_orth_dion(rank=4), mask)
  alone = orth_dion_jax.scale_by_orth_dion(rank=4)
  grads = _grads_like(params, 0)
  updates, state = tx.update(grads, tx.init(params), params)
  kernel = {"kernel": params["dense"]["kernel"]}
  expected, _ = alone.update({"kernel": grads["dense"]["kernel"]},
                             alone.init(kernel))
  chex.assert_trees_all_close(updates["dense"]["kernel"], expected["kernel"],
                              rtol=1e-6)
  chex.assert_trees_all_equal(updates["dense"]["bias"], grads["dense"]["bias"])
  chex.assert_trees_all_equal(updates["embed"], grads["embed"])
  assert optax.tree.get(state, "right_factor")["embed"] == optax.MaskedNode()


def _scale_by_extra_arg() -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by the ``loss_scale`` keyword of ``update``."""
  def update_fn(updates, state, params=None, *, loss_scale=1.0, **extra):
    del params, extra
    return jax.tree.map(lambda u: u * loss_scale, updates), state
  return optax.GradientTransformationExtraArgs(
      lambda _: optax.EmptyState(), update_fn)


def test_extra_args_reach_the_chain_and_are_ignored_by_orth_dion():
  params = _model()
  grads = _grads_like(params, 0)
  tx = orth_dion_jax.orth_dion(0.05, rank=4)
  plain, _ = tx.update(grads, tx.init(params), params)
  with_extra, _ = tx.update(grads, tx.init(params), params, loss_scale=3.0)
  chex.assert_trees_all_close(with_extra, plain, rtol=1e-6)
  chained = optax.chain(tx, _scale_by_extra_arg())
  scaled, _ = chained.update(grads, chained.init(params), params,
                             loss_scale=3.0)
  chex.assert_trees_all_close(scaled, jax.tree.map(lambda u: 3 * u, plain),
                              rtol=1e-6)


@pytest.mark.parametrize("dtype,momentum_dtype,expected_momentum_dtype", [
    (jnp.float32, None, jnp.float32),
    (jnp.bfloat16, None, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),
], ids=["float32", "bfloat16", "float32-bfloat16_momentum"])
def test_parameter_dtypes_and_state_are_stable(dtype, momentum_dtype,
                                               expected_momentum_dtype):
  params = _model(dtype)
  tx = orth_dion_jax.orth_dion(0.05, rank=4, momentum_dtype=momentum_dtype)
  initial_state = tx.init(params)
  new_params, state = _run(tx, params, range(3))
  chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, initial_state)
  chex.assert_tree_all_finite(new_params)
  assert not np.allclose(new_params["dense"]["kernel"],
                         params["dense"]["kernel"])
  kernel_state = lambda key: optax.tree.get(state, key)["dense"]["kernel"]
  assert kernel_state("momentum").dtype == expected_momentum_dtype
  assert kernel_state("right_factor").dtype == jnp.float32   # QR in float32


def test_jit_and_eager_agree():
  params = _model()
  tx = orth_dion_jax.orth_dion(0.05, rank=4)
  jitted, jitted_state = _run(tx, params, range(2))
  eager, eager_state = _run(tx, params, range(2), update=tx.update)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jitted_state, eager_state, rtol=1e-5, atol=1e-5)


def test_tree_get_and_set_right_factor_on_the_full_state():
  params = _model()
  tx = orth_dion_jax.orth_dion(0.05, rank=4, weight_decay=0.0)
  state = tx.init(params)
  factors = optax.tree.get(state, "right_factor")
  chex.assert_shape(factors["dense"]["kernel"], (16, 4))
  assert factors["embed"] == optax.MaskedNode()   # AdamW leaf: no factor
  rng = np.random.default_rng(10)
  q = np.linalg.qr(rng.standard_normal((16, 4)))[0]
  new_state = optax.tree.set(
      state, right_factor={**factors, "dense": {
          "kernel": jnp.asarray(q, jnp.float32),
          "bias": factors["dense"]["bias"]}})
  chex.assert_trees_all_equal_structs(new_state, state)
  chex.assert_trees_all_close(
      optax.tree.get(new_state, "right_factor")["dense"]["kernel"], q,
      atol=1e-7)
  # The next step warm-starts from the factor that was set.
  grads = _grads_like(params, 0)
  updates, _ = tx.update(grads, new_state, params)
  name = "['kernel']#0"
  ref = reference.ReferenceDion(
      as_reference({"kernel": params["dense"]["kernel"]}), {name: q},
      learning_rate=0.05)
  expected = ref.step(as_reference({"kernel": grads["dense"]["kernel"]}))
  chex.assert_trees_all_close(
      as_reference({"kernel": updates["dense"]["kernel"]})[name],
      expected[name].update, rtol=1e-4, atol=1e-7)


def test_initial_right_factors_depend_only_on_the_seed():
  """Every replica that builds the optimizer with one seed starts alike."""
  params = _model()
  factors = lambda seed: optax.tree.get(
      orth_dion_jax.orth_dion(0.05, seed=seed).init(params),
      "right_factor")["dense"]["kernel"]
  chex.assert_trees_all_equal(factors(3), factors(3))
  assert not np.allclose(factors(3), factors(4))
