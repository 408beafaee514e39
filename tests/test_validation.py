"""What the optimizers accept, and what they refuse with a clear error.

Hyperparameters that cannot be right (NaN, Inf, negative learning rates, an
integer momentum dtype, a seed JAX would truncate) fail at construction,
naming the argument. A gradient leaf shaped unlike its weight fails in
``update``, naming its path. The AdamW leaves take every dtype combination
``optax.adamw`` takes, with the same result, and still skip a non-finite
step. A tree of Flax NNX ``Variable``s goes through ``init`` and ``update``
as it does with optax's own optimizers.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import orth_dion_jax

NAN, INF = float("nan"), float("inf")

# Arguments shared by orth_dion, dion and scale_by_orth_dion.
BAD_SHARED = [
    (dict(scale=INF), ValueError, "scale"),
    (dict(scale=NAN), ValueError, "scale"),
    (dict(eps=INF), ValueError, "eps"),
    (dict(eps=NAN), ValueError, "eps"),
    (dict(mu=NAN), ValueError, "mu"),
    (dict(seed=2**32), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(momentum_dtype=jnp.int8), ValueError, "momentum_dtype"),
    (dict(momentum_dtype=jnp.uint8), ValueError, "momentum_dtype"),
    (dict(momentum_dtype=jnp.int32), ValueError, "momentum_dtype"),
    (dict(momentum_dtype=jnp.bool_), ValueError, "momentum_dtype"),
    (dict(momentum_dtype=jnp.complex64), ValueError, "momentum_dtype"),
    (dict(momentum_dtype="not a dtype"), TypeError, "momentum_dtype"),
    (dict(momentum_dtype=jnp.float8_e4m3fn), ValueError, "momentum_dtype"),
]
# Arguments only the orth_dion / dion aliases have.
BAD_ALIAS = [
    (dict(learning_rate=NAN), ValueError, "learning_rate"),
    (dict(learning_rate=INF), ValueError, "learning_rate"),
    (dict(learning_rate=-0.1), ValueError, "learning_rate"),
    (dict(learning_rate=jnp.float32(NAN)), ValueError, "learning_rate"),
    (dict(learning_rate="0.1"), TypeError, "learning_rate"),
    (dict(learning_rate=True), TypeError, "learning_rate"),
    (dict(adam_learning_rate=NAN), ValueError, "adam_learning_rate"),
    (dict(adam_learning_rate=INF), ValueError, "adam_learning_rate"),
    (dict(adam_learning_rate=-0.1), ValueError, "adam_learning_rate"),
    (dict(weight_decay=NAN), ValueError, "weight_decay"),
    (dict(weight_decay=INF), ValueError, "weight_decay"),
    (dict(adam_weight_decay=INF), ValueError, "adam_weight_decay"),
    (dict(adam_eps=INF), ValueError, "adam_eps"),
    (dict(adam_eps=NAN), ValueError, "adam_eps"),
    (dict(adam_b1=NAN), ValueError, "adam_b1"),
    (dict(adam_b2=NAN), ValueError, "adam_b2"),
]
BAD_ERROR_FEEDBACK = [
    (dict(residual_decay=NAN), ValueError, "residual_decay"),
    (dict(captured_decay=NAN), ValueError, "captured_decay"),
    (dict(momentum_dtype=jnp.int8), ValueError, "momentum_dtype"),
    (dict(momentum_dtype=jnp.bool_), ValueError, "momentum_dtype"),
    (dict(momentum_dtype=jnp.complex64), ValueError, "momentum_dtype"),
]
BAD_COMPRESSOR = [
    (dict(scale=INF), ValueError, "scale"),
    (dict(scale=NAN), ValueError, "scale"),
    (dict(eps=INF), ValueError, "eps"),
    (dict(seed=2**32), ValueError, "seed"),
    (dict(seed=2**40 + 3), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
]


def _ids(cases):
  return [",".join(f"{k}={v!r}" for k, v in kwargs.items())
          for kwargs, _, _ in cases]


def _alias(factory):
  return lambda **kw: factory(**{"learning_rate": 0.01, **kw})


@pytest.mark.parametrize("kwargs,error,name", BAD_SHARED,
                         ids=_ids(BAD_SHARED))
@pytest.mark.parametrize("factory", [
    _alias(orth_dion_jax.orth_dion), _alias(orth_dion_jax.dion),
    orth_dion_jax.scale_by_orth_dion,
], ids=["orth_dion", "dion", "scale_by_orth_dion"])
def test_invalid_value_names_the_argument(factory, kwargs, error, name):
  with pytest.raises(error, match=rf"\b{name}\b"):
    factory(**kwargs)


@pytest.mark.parametrize("kwargs,error,name", BAD_ALIAS, ids=_ids(BAD_ALIAS))
@pytest.mark.parametrize("factory", [orth_dion_jax.orth_dion,
                                     orth_dion_jax.dion],
                         ids=["orth_dion", "dion"])
def test_invalid_alias_value_names_the_argument(factory, kwargs, error,
                                                name):
  with pytest.raises(error, match=rf"\b{name}\b"):
    _alias(factory)(**kwargs)


@pytest.mark.parametrize("kwargs,error,name", BAD_ERROR_FEEDBACK,
                         ids=_ids(BAD_ERROR_FEEDBACK))
def test_invalid_error_feedback_value_names_the_argument(kwargs, error,
                                                         name):
  with pytest.raises(error, match=rf"\b{name}\b"):
    orth_dion_jax.scale_by_error_feedback(**kwargs)


@pytest.mark.parametrize("kwargs,error,name", BAD_COMPRESSOR,
                         ids=_ids(BAD_COMPRESSOR))
def test_invalid_compressor_value_names_the_argument(kwargs, error, name):
  """The compressor is what scale_by_low_rank_orthogonalization is given."""
  with pytest.raises(error, match=rf"\b{name}\b"):
    orth_dion_jax.scale_by_low_rank_orthogonalization(
        orth_dion_jax.LowRankCompressor(**kwargs))


@pytest.mark.parametrize("kwargs", [
    dict(learning_rate=0.0),
    dict(learning_rate=jnp.float32(0.1)),
    dict(learning_rate=optax.cosine_decay_schedule(0.1, 100)),
    dict(adam_learning_rate=optax.constant_schedule(0.1)),
    dict(seed=2**32 - 1),
    dict(scale=1e-3),
    dict(momentum_dtype=jnp.bfloat16),
    dict(momentum_dtype="float16"),
], ids=["lr=0", "lr=array", "lr=schedule", "adam_lr=schedule",
        "seed=2**32-1", "scale=1e-3", "momentum_dtype=bfloat16",
        "momentum_dtype='float16'"])
def test_edge_values_are_accepted(kwargs):
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,))}
  tx = _alias(orth_dion_jax.orth_dion)(**kwargs)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  chex.assert_tree_all_finite(updates)


def test_seeds_past_32_bits_are_not_silently_truncated():
  """2**32 used to give the right factors of seed 0."""
  params = {"w": jnp.ones((8, 4))}
  factors = lambda seed: orth_dion_jax.scale_by_orth_dion(
      seed=seed).init(params).right_factor["w"]
  assert not np.array_equal(factors(2**32 - 1), factors(0))
  with pytest.raises(ValueError, match="seed"):
    factors(2**32)


def test_traced_hyperparameters_are_checked_where_they_run():
  """Under jit, inject_hyperparams hands the factory tracers: let through."""
  tx = optax.inject_hyperparams(orth_dion_jax.orth_dion,
                                static_args=orth_dion_jax.STATIC_ARGS)(
                                    learning_rate=0.1, weight_decay=0.01)
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,))}
  state = jax.jit(tx.init)(params)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state,
                                  params)
  chex.assert_tree_all_finite(updates)


# -- AdamW leaves: every dtype combination optax.adamw takes ----------------

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
LR = 0.01


def _dtype_id(dtype):
  return jnp.dtype(dtype).name


def _adam_state(state):
  """The AdamW leaves' ApplyIfFiniteState inside orth_dion's state."""
  return state.inner_states["adam"].inner_state


def _adam_reference():
  """The AdamW that orth_dion runs on its non-matrix leaves."""
  return optax.adamw(LR, b1=0.95, b2=0.98, eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("grad_dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("param_dtype", DTYPES, ids=_dtype_id)
def test_adam_leaves_take_what_optax_adamw_takes(param_dtype, grad_dtype):
  """Same updates and state dtypes as optax.adamw; a NaN step is skipped."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((16, 8)), param_dtype),
            "b": jnp.asarray(rng.standard_normal(8), param_dtype)}
  grads = [jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), grad_dtype), params)
           for _ in range(3)]
  tx, ref = orth_dion_jax.orth_dion(LR, rank=2), _adam_reference()
  update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
  state, ref_state = tx.init(params), ref.init({"b": params["b"]})

  def step(g, state, ref_state):
    updates, state = update(g, state, params)
    ref_updates, ref_state = ref_update({"b": g["b"]}, ref_state,
                                        {"b": params["b"]})
    assert updates["b"].dtype == ref_updates["b"].dtype
    # Rounding may differ by an ulp where the update is computed in a narrow
    # dtype (the two programs fuse differently).
    rtol = max(1e-6, 2 * float(jnp.finfo(updates["b"].dtype).eps))
    chex.assert_trees_all_close(updates["b"], ref_updates["b"], rtol=rtol)
    for ours, theirs in zip(jax.tree.leaves(_adam_state(state).inner_state),
                            jax.tree.leaves(ref_state)):
      assert ours.dtype == theirs.dtype
    return state, ref_state

  state, ref_state = step(grads[0], state, ref_state)
  # A NaN in the bias: nothing moves but the step counters, the skip is
  # counted.
  poisoned = {**grads[1], "b": grads[1]["b"].at[2].set(jnp.nan)}
  updates, skipped = update(poisoned, state, params)
  chex.assert_trees_all_equal(updates["b"], jnp.zeros_like(updates["b"]))
  counted = lambda tree: jax.tree.map(
      lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.integer) else x, tree)
  chex.assert_trees_all_equal(_adam_state(skipped).inner_state,
                              counted(_adam_state(state).inner_state))
  chex.assert_tree_all_finite(skipped)
  assert int(_adam_state(skipped).total_notfinite) == 1
  # And the next finite step is AdamW's with the same moments, one count on.
  step(grads[2], skipped, counted(ref_state))


# -- Gradient shapes are checked against the state ---------------------------

PARAMS = {"block": {"kernel": (16, 8)}, "out": (12, 6)}


def _zeros(shapes, lead=()):
  return jax.tree.map(lambda s: jnp.zeros(lead + s), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


@pytest.mark.parametrize("bad", [(8, 16), (16, 4), (16, 8, 1), (128,)],
                         ids=["transposed", "narrower", "extra_axis",
                              "flattened"])
@pytest.mark.parametrize("make,pass_params", [
    (lambda: orth_dion_jax.scale_by_orth_dion(rank=2), False),
    (lambda: orth_dion_jax.scale_by_low_rank_orthogonalization(
        orth_dion_jax.LowRankCompressor(rank=2)), True),
    (lambda: orth_dion_jax.orth_dion(LR, rank=2), True),
], ids=["scale_by_orth_dion", "scale_by_low_rank_orthogonalization",
        "orth_dion"])
def test_gradient_shape_mismatch_names_the_path(make, pass_params, bad):
  tx = make()
  params = _zeros(PARAMS)
  state = tx.init(params)
  grads = {**_zeros(PARAMS), "block": {"kernel": jnp.ones(bad)}}
  with pytest.raises(ValueError) as info:
    tx.update(grads, state, params if pass_params else None)
  message = str(info.value)
  assert "['block']['kernel']" in message
  assert str(bad) in message and "(16, 8)" in message


def test_shape_mismatch_without_momentum_or_params_is_caught_by_the_factor():
  """No weight-shaped state and no params: the right factor still tells."""
  tx = orth_dion_jax.scale_by_low_rank_orthogonalization(
      orth_dion_jax.LowRankCompressor(rank=2))
  state = tx.init(_zeros(PARAMS))
  grads = {**_zeros(PARAMS), "block": {"kernel": jnp.ones((16, 12))}}
  with pytest.raises(ValueError, match=r"\['block'\]\['kernel'\].*\(8, 2\)"):
    tx.update(grads, state)


def test_gradient_tree_unlike_the_state_is_refused():
  tx = orth_dion_jax.scale_by_orth_dion(rank=2)
  state = tx.init(_zeros(PARAMS))
  with pytest.raises(ValueError, match="does not match"):
    tx.update({"block": {"kernel": jnp.ones((16, 8))}}, state)


@pytest.mark.parametrize("bad,good", [((2, 8, 16), False),
                                      ((16, 8), False),
                                      ((2, 16, 8), True)],
                         ids=["transposed", "no_replica_axis", "right"])
def test_compressed_mode_gradients_carry_the_replica_axis(bad, good):
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  tx = orth_dion_jax.scale_by_orth_dion(rank=2, mesh=mesh, data_axis="data")
  with jax.set_mesh(mesh):
    params = _zeros(PARAMS)
    state = tx.init(params)
    grads = {**_zeros(PARAMS, (2,)), "block": {"kernel": jnp.ones(bad)}}
    if good:
      # Jitted: run eagerly, the sharded step dispatches op by op (70 s).
      updates, _ = jax.jit(tx.update)(grads, state, params)
      assert updates["block"]["kernel"].shape == (16, 8)
      return
    with pytest.raises(ValueError) as info:
      tx.update(grads, state, params)
  message = str(info.value)
  assert "['block']['kernel']" in message
  assert str(bad) in message and "(2, 16, 8)" in message


# -- Flax NNX Variable trees --------------------------------------------------

class _Mlp(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


def _loss(model, x):
  return jnp.mean(model(x) ** 2)


@pytest.mark.parametrize("factory", [orth_dion_jax.orth_dion,
                                     orth_dion_jax.dion],
                         ids=["orth_dion", "dion"])
def test_nnx_variable_trees_go_through_init_and_update(factory):
  """As with optax.adamw: Variables in, Variables out, nnx can apply them."""
  model = _Mlp(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((32, 8)),
                  jnp.float32)
  tx = factory(0.05, rank=2)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  pure_params = nnx.to_pure_dict(params)
  pure_state = tx.init(pure_params)
  loss_before = _loss(model, x)
  for _ in range(3):
    grads = nnx.grad(_loss)(model, x)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    # The same numbers as on the bare arrays.
    pure_updates, pure_state = tx.update(nnx.to_pure_dict(grads), pure_state,
                                         pure_params)
    chex.assert_trees_all_close(nnx.to_pure_dict(updates), pure_updates,
                                rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, updates)
    pure_params = optax.apply_updates(pure_params, pure_updates)
    nnx.update(model, params)
  assert _loss(model, x) < loss_before


# -- Every leaf's gradient, AdamW's too, is checked against its parameter ---

@pytest.mark.parametrize("bad", [(15,), (1,), ()], ids=str)
def test_adam_leaf_gradient_of_another_shape_names_the_path(bad):
  params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros((16,))}
  tx = orth_dion_jax.orth_dion(LR, rank=2)
  state = tx.init(params)
  grads = {"w": jnp.ones((16, 8)), "b": jnp.ones(bad)}
  with pytest.raises(ValueError, match=r"\['b'\].*\(16,\)"):
    tx.update(grads, state, params)


def test_unknown_param_label_names_the_path():
  params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros((16,))}
  tx = orth_dion_jax.orth_dion(LR, param_labels={"w": "lowrank", "b": "adam"})
  with pytest.raises(ValueError, match=r"\['w'\].*'lowrank'"):
    tx.init(params)
