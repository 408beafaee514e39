"""NaN and Inf from any source never reach the parameters or the state.

A small regression model (two hidden matrices on the low-rank route, a bias
on AdamW) trains with ``orth_dion`` (QR or polar right factor) / ``dion``; at one step a fault is
injected at its source: the gradient, the momentum (a corrupt checkpoint),
the right factor, a float16 or float32 momentum overflowing on a finite
gradient, finite gradients near float32's maximum, a schedule returning NaN, the
AdamW leaf's gradient and learning rate. For each, as the README's "Failure
behaviour" section promises: parameters and state stay finite at every step,
the event is counted in the state, and training goes on to lower the loss.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orth_dion_jax

FAULT_STEP = 8
STEPS = 30
LR = 0.02


def _problem():
  """A two-layer regression problem with a learnable teacher."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
  teacher = jnp.asarray(rng.standard_normal((16, 8)) / 4, jnp.float32)
  y = jnp.tanh(x @ teacher)
  params = {"w1": jnp.asarray(rng.standard_normal((16, 32)) / 4, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((32, 8)) / 6, jnp.float32),
            "b": jnp.zeros((8,), jnp.float32)}

  def loss_fn(p):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"] - y) ** 2)
  return params, loss_fn


def _at_fault(count, value, fault_value):
  return jnp.where(count == FAULT_STEP, fault_value, value)


def _low_rank_states(opt_state):
  is_state = lambda s: isinstance(s, orth_dion_jax.OrthDionState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_state)
          if is_state(s)]


def _corrupt_low_rank(field: str, name: str, fn):
  """A fault: ``fn`` applied to one matrix's momentum or right factor."""
  def visit(s):
    if not isinstance(s, orth_dion_jax.OrthDionState):
      return s
    tree = dict(getattr(s, field))
    tree[name] = fn(tree[name])
    return s._replace(**{field: tree})
  return lambda opt_state: jax.tree.map(
      visit, opt_state,
      is_leaf=lambda s: isinstance(s, orth_dion_jax.OrthDionState))


def _corrupt_adam_first_moment(opt_state):
  """A fault: a NaN in AdamW's first moment of the bias."""
  def visit(s):
    if not isinstance(s, optax.ScaleByAdamState):
      return s
    return s._replace(mu={**s.mu, "b": s.mu["b"].at[0].set(jnp.nan)})
  return jax.tree.map(visit, opt_state,
                      is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


def _skip_count(opt_state) -> int:
  """Every skip counter in the state: per matrix, per schedule, AdamW's."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    name = jax.tree_util.keystr(path)
    if "nonfinite_count" in name or "total_notfinite" in name:
      total += int(np.sum(leaf))
  return total


def _matrices_scaled_to(grads, largest: float):
  """The matrices' gradients scaled so that their largest entry is
  ``largest`` (finite in float32)."""
  return {k: v * (largest / jnp.max(jnp.abs(v))) if v.ndim == 2 else v
          for k, v in grads.items()}


# name -> (optimizer kwargs, gradient fault, state fault)
FAULTS = {
    "nan_gradient": (
        {}, lambda g: {**g, "w1": g["w1"].at[0, 0].set(jnp.nan)}, None),
    "inf_gradient": (
        {}, lambda g: {**g, "w2": g["w2"].at[3, 1].set(-jnp.inf)}, None),
    "gradient_near_float32_max": (
        {}, lambda g: _matrices_scaled_to(g, 8e37), None),
    "float16_momentum_overflow": (
        {"momentum_dtype": jnp.float16},
        lambda g: _matrices_scaled_to(g, 1e5), None),
    "nan_in_momentum": (
        {}, None, _corrupt_low_rank("momentum", "w1",
                                    lambda m: m.at[2, 5].set(jnp.nan))),
    "inf_in_right_factor": (
        {}, None, _corrupt_low_rank("right_factor", "w2",
                                    lambda q: q.at[0, 0].set(jnp.inf))),
    "zero_right_factor": (
        {}, None, _corrupt_low_rank("right_factor", "w1", jnp.zeros_like)),
    "nan_in_adamw_moment": ({}, None, _corrupt_adam_first_moment),
    "mu_schedule_nan": (
        {"mu": lambda c: _at_fault(c, 0.95, jnp.nan)}, None, None),
    "beta_schedule_nan": (
        {"error_feedback": "beta",
         "beta": lambda c: _at_fault(c, 0.95, jnp.nan)}, None, None),
    "eps_schedule_nan": (
        {"eps": lambda c: _at_fault(c, 1e-8, jnp.nan)}, None, None),
    "learning_rate_schedule_nan": (
        {"learning_rate": lambda c: _at_fault(c, LR, jnp.nan)}, None, None),
    "weight_decay_schedule_inf": (
        {"weight_decay": lambda c: _at_fault(c, 0.01, jnp.inf)}, None, None),
    "nan_adamw_gradient": (
        {}, lambda g: {**g, "b": g["b"].at[1].set(jnp.nan)}, None),
    "adamw_huge_gradient": (
        {}, lambda g: {**g, "b": g["b"] * 3e38}, None),
    "adam_learning_rate_schedule_nan": (
        {"adam_learning_rate": lambda c: _at_fault(c, LR, jnp.nan)}, None,
        None),
}


# What each optimizer configuration adds to a fault's settings.
OPTIMIZERS = {
    "orth_dion": (orth_dion_jax.orth_dion, {}),
    "dion": (orth_dion_jax.dion, {}),
    "polar": (orth_dion_jax.orth_dion, {"right_factor": "polar"}),
}


# Faults that only AdamW's leaves or the shared schedules see: the low-rank
# step's kind does not enter their path, so one optimizer covers them.
ADAMW_ONLY = ("nan_in_adamw_moment", "nan_adamw_gradient",
              "adamw_huge_gradient", "adam_learning_rate_schedule_nan",
              "learning_rate_schedule_nan", "weight_decay_schedule_inf")
CASES = [(fault, optimizer) for fault in sorted(FAULTS)
         for optimizer in sorted(OPTIMIZERS)
         if fault not in ADAMW_ONLY or optimizer == "orth_dion"]


@pytest.mark.parametrize("fault,optimizer", CASES)
def test_fault_never_reaches_params_or_state_and_training_recovers(
    optimizer, fault):
  kwargs, grad_fault, state_fault = FAULTS[fault]
  factory, chosen = OPTIMIZERS[optimizer]
  tx = factory(**{"learning_rate": LR, "rank": 4, **chosen, **kwargs})
  params, loss_fn = _problem()
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, faulty):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    if grad_fault is not None:
      grads = jax.tree.map(lambda bad, good: jnp.where(faulty, bad, good),
                           grad_fault(grads), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses, skips_after_fault = [], None
  for i in range(STEPS):
    faulty = i == FAULT_STEP
    if faulty and state_fault is not None:
      opt_state = state_fault(opt_state)
    params, opt_state, loss = step(params, opt_state, faulty)
    losses.append(float(loss))
    chex.assert_tree_all_finite(params)
    chex.assert_tree_all_finite(opt_state)
    if faulty:
      skips_after_fault = _skip_count(opt_state)
  # Counted at the fault, and nothing skipped before or after it.
  assert skips_after_fault >= 1
  assert _skip_count(opt_state) == skips_after_fault
  # Training recovers: the loss keeps falling after the fault.
  assert math.isfinite(losses[-1])
  assert losses[-1] < 0.8 * losses[FAULT_STEP]


def test_a_float16_momentum_that_would_overflow_is_reset_not_stored_as_inf():
  tx = orth_dion_jax.orth_dion(LR, rank=4, momentum_dtype=jnp.float16)
  params, loss_fn = _problem()
  opt_state = tx.init(params)
  grads = _matrices_scaled_to(jax.grad(loss_fn)(params), 1e5)
  _, opt_state = tx.update(grads, opt_state, params)
  [state] = _low_rank_states(opt_state)
  # The float32 step was finite but its momentum does not fit float16: the
  # matrix is skipped and its momentum starts afresh from zero.
  for name in ("w1", "w2"):
    assert state.momentum[name].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(state.momentum[name]), 0)
    assert int(state.nonfinite_count[name]) == 1


@pytest.mark.parametrize("form", orth_dion_jax.ERROR_FEEDBACK_FORMS)
@pytest.mark.parametrize("right_factor", ["qr", "polar"])
def test_a_float32_momentum_that_would_overflow_is_reset_not_stored_as_inf(
    form, right_factor):
  """Every entry of B finite, but B - P R^T beyond float32's maximum (mixed
  signs near 3e38 in the column the step captures): the bound on the new
  momentum skips the matrix instead of storing -Inf."""
  params = {"w": jnp.zeros((64, 32), jnp.float32)}
  tx = orth_dion_jax.scale_by_orth_dion(
      rank=1, error_feedback=form, right_factor=right_factor,
      **({"mu": 0.0} if form == "mu" else {"beta": 0.95}))
  state = tx.init(params)
  state = state._replace(right_factor={"w": jnp.eye(32, 1)})
  g = np.zeros((64, 32), np.float32)
  g[:4, 0] = 5e37
  g[:4, 1] = [3e38, -3e38, 3e38, 3e38]
  updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
  chex.assert_tree_all_finite((updates, state))
  assert int(state.nonfinite_count["w"]) == 1


def test_entries_near_float32_max_keep_their_direction():
  """Rescaling by a largest entry of 1e38 is exact (no reciprocal that
  flushes to zero): the QR of such a column is the column's direction."""
  a = jnp.full((4, 1), 1e38, jnp.float32)
  for method in orth_dion_jax.ORTHOGONALIZE_METHODS:
    q = orth_dion_jax.orthonormalize(a, method, key=jax.random.key(0))
    np.testing.assert_allclose(q, 0.5, rtol=1e-6)
  np.testing.assert_allclose(orth_dion_jax.polar(a), 0.5, rtol=1e-6)


def test_a_nan_gradient_keeps_the_momentum_and_factor_exactly():
  tx = orth_dion_jax.orth_dion(LR, rank=4)
  params, loss_fn = _problem()
  opt_state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  _, opt_state = tx.update(grads, opt_state, params)
  bad = {**grads, "w1": grads["w1"].at[0, 0].set(jnp.nan)}
  updates, new_state = tx.update(bad, opt_state, params)
  [before], [after] = _low_rank_states(opt_state), _low_rank_states(new_state)
  np.testing.assert_array_equal(after.momentum["w1"], before.momentum["w1"])
  np.testing.assert_array_equal(after.right_factor["w1"],
                                before.right_factor["w1"])
  # Only the decoupled weight decay moves the skipped matrix.
  np.testing.assert_allclose(updates["w1"], -LR * 0.01 * params["w1"],
                             rtol=1e-6)
  assert int(after.nonfinite_count["w1"]) == 1
  assert int(after.nonfinite_count["w2"]) == 0
