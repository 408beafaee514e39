"""Orth-Dion trains: the loss falls steadily on two small full-batch problems.

Each run is one jitted ``lax.scan`` over the training steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import orth_dion_jax
from core_helpers import well_conditioned


def _train(loss_fn, params, tx, steps):
  """Losses before each step, and the loss after the last one."""
  def step(carry, _):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  def run(params):
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       length=steps)
    return losses, loss_fn(params)

  losses, final = run(params)
  return np.asarray(losses), float(final)


def test_linear_regression_loss_falls_at_every_step():
  """Target weights with singular values 1 .. 0.1; rank r = 4 of 8."""
  rng = np.random.default_rng(17)
  x = jnp.asarray(rng.standard_normal((256, 16)), jnp.float32)
  y = x @ jnp.asarray(well_conditioned(rng, (16, 8)), jnp.float32)
  steps = 100
  tx = orth_dion_jax.orth_dion(optax.cosine_decay_schedule(0.03, steps),
                               rank_fraction=0.5, weight_decay=0.0)
  losses, final = _train(lambda p: jnp.mean((x @ p["w"] - y) ** 2),
                         {"w": jnp.zeros((16, 8))}, tx, steps)
  assert np.all(np.diff(losses) < 0), losses
  assert final < 0.02 * losses[0], (final, losses[0])


def test_mlp_loss_falls_steadily():
  """A tanh MLP fits a random teacher; kernels get Orth-Dion, biases AdamW."""
  rng = np.random.default_rng(18)
  normal = lambda *shape: jnp.asarray(
      rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)

  def mlp(p, x):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]

  teacher = {"hidden": {"kernel": normal(8, 32), "bias": jnp.zeros(32)},
             "out": {"kernel": normal(32, 4), "bias": jnp.zeros(4)}}
  x = normal(512, 8) * np.sqrt(512)
  y = mlp(teacher, x)
  params = {"hidden": {"kernel": normal(8, 32), "bias": jnp.zeros(32)},
            "out": {"kernel": normal(32, 4), "bias": jnp.zeros(4)}}
  steps = 300
  tx = orth_dion_jax.orth_dion(optax.cosine_decay_schedule(0.05, steps),
                               rank_fraction=0.5, adam_learning_rate=0.01)
  losses, final = _train(lambda p: jnp.mean((mlp(p, x) - y) ** 2), params,
                         tx, steps)
  checkpoints = losses[::25]
  assert np.all(np.diff(checkpoints) < 0), checkpoints
  assert final < 0.03 * losses[0], (final, losses[0])
