"""A first use that works like ``optax.adamw``: what a new user writes, as they write it.

* A model sharded over a ``jax.make_mesh`` mesh (Explicit axes) trains with ``orth_dion(lr)``
  and no ``mesh=``: the mesh is read from the parameters, the result equals one device's and
  the bytes equal those with ``mesh=`` given.
* On a mesh with Auto axes, under jit, that is impossible: a clear error says to pass ``mesh=``
  and ``param_specs=``, naming a parameter.
* Layers stacked by ``nnx.vmap`` / ``nnx.scan``: norm scales and biases never get the low-rank
  step; ``layer_axes=1`` makes every stacked kernel a batch of matrices; without it a warning
  names ``layer_axes``. ``optax.contrib.MuonDimensionNumbers`` is accepted; ``routing_summary``
  shows each leaf's route.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

import orth_dion_jax as od
from orth_dion_jax import communication

# Shardings under which an Explicit-mesh forward pass needs no out_sharding annotations.
UP_SPEC, DOWN_SPEC = ("fsdp", "tensor"), (None, "fsdp")


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, sharded: bool):
    init = nnx.initializers.lecun_normal()
    part = (lambda spec: nnx.with_partitioning(init, spec)) if sharded else (lambda _: init)
    self.up = nnx.Linear(32, 64, kernel_init=part(UP_SPEC), rngs=rngs)
    self.down = nnx.Linear(64, 32, kernel_init=part(DOWN_SPEC), rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


def _assert_same_weights(model: nnx.Module, expected: nnx.Module) -> None:
  weights = lambda m: jax.device_get(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  chex.assert_trees_all_close(weights(model), weights(expected), rtol=1e-5, atol=1e-6)


def _mesh(axis_type):
  return jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(axis_type,) * 2)


def _sharded_model(mesh) -> MLP:
  model = MLP(nnx.Rngs(0), sharded=True)
  state = nnx.state(model)
  specs = nnx.get_partition_spec(state)
  nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                                 state, specs))
  return model


def _train(model: MLP, tx, steps: int = 3):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(steps):
    step(model, optimizer)
  return optimizer


def test_explicit_mesh_without_mesh_argument_matches_one_device():
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    model = _sharded_model(mesh)
    optimizer = _train(model, od.orth_dion(0.02))
  single = MLP(nnx.Rngs(0), sharded=False)
  _train(single, od.orth_dion(0.02))
  _assert_same_weights(model, single)
  # The sharded step ran: the up kernel's right factor (its fan-in side, 32 x r) is split
  # like that side of the weight.
  factors = optax.tree.get(nnx.as_pure(optimizer.opt_state), "right_factor")
  q = factors["up"]["kernel"]
  assert isinstance(q.sharding, NamedSharding) and q.sharding.spec == P("fsdp", None)


def _update_bytes(on, **kwargs) -> dict:
  params = {"up": jax.device_put(jnp.ones((32, 64)), NamedSharding(on, P(*UP_SPEC))),
            "down": jax.device_put(jnp.ones((64, 32)), NamedSharding(on, P(*DOWN_SPEC)))}
  tx = od.scale_by_orth_dion(**kwargs)
  state = tx.init(params)
  compiled = jax.jit(tx.update).lower(params, state, params).compile()
  return communication.bytes_by_axes(communication.collective_ops(compiled, on))


def test_inferred_mesh_moves_the_bytes_of_the_given_mesh():
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    inferred = _update_bytes(mesh)
    given = _update_bytes(mesh, mesh=mesh)
  assert inferred == given
  assert sum(given.values()) > 0


@pytest.mark.parametrize("jitted", [True, False], ids=["jit", "eager"])
def test_auto_mesh_without_mesh_argument_raises_a_clear_error(jitted):
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    model = _sharded_model(mesh)
    params = nnx.state(model, nnx.Param)
    tx = od.orth_dion(0.02)
    init = jax.jit(tx.init) if jitted else tx.init
    with pytest.raises(ValueError, match=r"\['(up|down)'\]\['kernel'\].*Auto axes.*mesh=.*"
                                         r"param_specs="):
      init(params)


def test_auto_mesh_with_mesh_and_specs_trains():
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    model = _sharded_model(mesh)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    _train(model, od.orth_dion(0.02, mesh=mesh, param_specs=specs))
  single = MLP(nnx.Rngs(0), sharded=False)
  _train(single, od.orth_dion(0.02))
  _assert_same_weights(model, single)


class Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.down = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class ScannedModel(nnx.Module):
  """The MaxText / Gemma layout: the blocks' weights stacked on a leading layer axis."""

  def __init__(self, layers: int, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)
    self.blocks = create(rngs)
    self.embed = nnx.Embed(10, 16, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)
    return self.head(body(self.embed(tokens), self.blocks))


LAYERS = 3


def test_scanned_model_with_layer_axes_routes_every_stacked_kernel_to_low_rank():
  params = nnx.state(ScannedModel(LAYERS, nnx.Rngs(0)), nnx.Param)
  routes = {r.path: r for r in od.routing_summary(params, layer_axes=1)}
  low_rank = {p for p, r in routes.items() if r.route == "low_rank"}
  assert low_rank == {"['blocks']['up']['kernel']", "['blocks']['down']['kernel']"}
  up = routes["['blocks']['up']['kernel']"]
  assert (up.matrices, up.fan_in, up.fan_out, up.rank) == (LAYERS, 16, 32, 4)
  assert up.right_factor_shape == (LAYERS, 16, 4)
  text = str(od.routing_summary(params, layer_axes=1))
  assert all(path in text for path in routes)


def test_scanned_model_by_default_sends_no_norm_or_bias_to_low_rank_and_warns_once():
  params = nnx.state(ScannedModel(LAYERS, nnx.Rngs(0)), nnx.Param)
  # The (layers, d) norm scales and biases are 2-D, but never matrices of a linear map.
  assert all(r.route == "adam" for r in od.routing_summary(params))
  tx = od.orth_dion(0.02)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = tx.init(params)
    jax.jit(tx.update)(params, state, params)
  messages = [str(w.message) for w in caught if "orth_dion_jax" in str(w.message)]
  assert len(messages) == 1, messages
  assert "layer_axes=1" in messages[0] and "['blocks']" in messages[0]


def test_scanned_model_trains_with_layer_axes():
  model = ScannedModel(LAYERS, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, od.orth_dion(0.02, layer_axes=1), wrt=nnx.Param)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 10, (4, 8)))

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      logits = m(tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  q = optax.tree.get(nnx.as_pure(optimizer.opt_state), "right_factor")
  assert q["blocks"]["up"]["kernel"].shape == (LAYERS, 16, 4)


def _stacked_updates(**kwargs):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((LAYERS, 16, 24)), jnp.float32)}
  tx = od.scale_by_orth_dion(rank=4, **kwargs)
  state = tx.init(params)
  for _ in range(3):
    grads = {"w": jnp.asarray(rng.standard_normal((LAYERS, 16, 24)), jnp.float32)}
    updates, state = tx.update(grads, state, params)
  return updates, state


@pytest.mark.parametrize("kwargs", [
    dict(layer_axes=1),
    dict(weight_dimension_numbers={"w": MuonDimensionNumbers(reduction_axis=1, output_axis=2)}),
], ids=["layer_axes", "MuonDimensionNumbers"])
def test_layer_axes_and_muon_dimension_numbers_mean_the_batch_axes_they_say(kwargs):
  expected = _stacked_updates(
      weight_dimension_numbers={"w": od.DionDimensionNumbers(reduction_axis=1, output_axis=2)})
  chex.assert_trees_all_equal(_stacked_updates(**kwargs), expected)


def test_layer_axes_applies_only_to_leaves_of_its_rank():
  """A plain matrix next to stacked ones stays one matrix; a 4-D leaf is not guessed."""
  params = {"stacked": jnp.ones((LAYERS, 16, 24)), "plain": jnp.ones((16, 24)),
            "conv": jnp.ones((3, 3, 16, 24))}
  with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    routes = {r.path: r for r in od.routing_summary(params, layer_axes=1)}
  assert routes["['stacked']"].matrices == LAYERS
  assert routes["['plain']"].matrices == 1
  assert routes["['conv']"].route == "adam"
