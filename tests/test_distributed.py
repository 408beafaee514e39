"""The sharded step against the single-device step, on 8 simulated devices.

Every run trains 10 steps on the same gradients twice: once on one device,
once with parameters sharded over a ``("data", "fsdp", "tensor")`` mesh. The
single-device path is itself checked against the float64 reference in
``test_reference_match``; here the sharded parameters and states must equal
it within 1e-5 (relative to each array's largest entry). Compressed data
parallelism is compared with "average the gradients first".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import orth_dion_jax as od
from orth_dion_jax import communication
from orth_dion_jax import data_parallel
from orth_dion_jax.data_parallel import ReplicaMomenta
from core_helpers import alias_for

AXES = ("data", "fsdp", "tensor")
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
STEPS = 10
# Relative to the largest entry, after 10 float32 steps. The polar factor's
# sensitivity grows as 1 / sigma_r of R: in the beta-form, whose momentum
# keeps the residual, "square_2" reaches 1.1e-5 (the others at most 9e-6);
# a wrong slice or a missing sum is off by O(1).
TOL = 2e-5

# Shapes and shardings of a small transformer-like parameter set: tall, wide
# and square matrices split both ways, a per-head (batched) kernel, and
# leaves that go to AdamW. "attn_2" and "square_2" share the shape and
# sharding of "attn" and "square": each pair is stepped as one megabatch.
SHAPES = {
    "attn": (32, 64),
    "attn_2": (32, 64),
    "square_2": (32, 32),
    "mlp_out": (64, 32),
    "square": (32, 32),
    "heads": (4, 16, 32),
    "bias": (64,),
    "embed": (40, 32),
}
SPECS = {
    "attn": P("fsdp", "tensor"),
    "attn_2": P("fsdp", "tensor"),
    "square_2": P(("fsdp", "tensor"), None),
    "mlp_out": P("tensor", "fsdp"),
    "square": P(("fsdp", "tensor"), None),
    "heads": P("tensor", None, "fsdp"),
    "bias": P("tensor"),
    "embed": P(None, "fsdp"),
}
DIMS = {
    "attn": od.DionDimensionNumbers(0, 1),
    "attn_2": od.DionDimensionNumbers(0, 1),
    "square_2": od.DionDimensionNumbers(0, 1),
    "mlp_out": od.DionDimensionNumbers(0, 1),
    "square": od.DionDimensionNumbers(0, 1),
    "heads": od.DionDimensionNumbers(1, 2),
    "bias": None,
    "embed": None,
}
LOW_RANK = [k for k, d in DIMS.items() if d is not None]


def _arrays(seed: int, lead: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(lead + s).astype(np.float32)
          for k, s in SHAPES.items()}


def _gradients(replicas: int) -> list[dict[str, np.ndarray]]:
  """Per-replica gradients of each step, (replicas, *shape)."""
  return [_arrays(100 + t, (replicas,)) for t in range(STEPS)]


def _mesh(shape, axis_type=AxisType.Explicit):
  return jax.make_mesh(shape, AXES, axis_types=(axis_type,) * 3)


def _put(tree, mesh, lead=False):
  prefix = ("data",) if lead else ()
  return {k: jax.device_put(v, NamedSharding(mesh, P(*prefix, *SPECS[k])))
          for k, v in tree.items()}


def _optimizer(right_factor="qr", **kw):
  return alias_for(right_factor, learning_rate=0.05, rank_fraction=0.25,
                   weight_dimension_numbers=DIMS, **kw)


def _train(tx, params, grads, *, per_replica: bool, put=lambda t, lead: t):
  """10 steps; returns (params, state). ``put`` places each step's input."""
  def step(p, s, g):
    if not per_replica:
      g = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  step = jax.jit(step)
  params = put(params, False)
  state = jax.jit(tx.init)(params)
  for g in grads:
    params, state = step(params, state, put(g, True))
  return params, state


@functools.cache
def _single_device(replicas: int, right_factor: str, method: str,
                   form: str = "mu"):
  tx = _optimizer(right_factor=right_factor, orthogonalize=method,
                  error_feedback=form)
  params, state = _train(tx, _arrays(0), _gradients(replicas),
                         per_replica=False)
  return jax.device_get((params, state))


def _low_rank_state(state):
  return state.inner_states["low_rank"].inner_state[0]


def _mean_momentum(m):
  if isinstance(m, ReplicaMomenta):
    return np.asarray(m.per_replica).mean(axis=0)
  return np.asarray(m)


def _assert_close(actual, expected, what):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  err = float(np.max(np.abs(actual - expected))) / scale
  assert err <= TOL, f"{what}: relative error {err:.2e}"


def _assert_matches_single_device(params, state, replicas, right_factor,
                                  method, form="mu"):
  ref_params, ref_state = _single_device(replicas, right_factor, method, form)
  for k in SHAPES:
    _assert_close(params[k], ref_params[k], f"params[{k}]")
  lr, ref_lr = _low_rank_state(state), _low_rank_state(ref_state)
  assert int(lr.count) == int(ref_lr.count) == STEPS
  for k in LOW_RANK:
    _assert_close(_mean_momentum(lr.momentum[k]), ref_lr.momentum[k],
                  f"momentum[{k}]")
    _assert_close(lr.right_factor[k], ref_lr.right_factor[k],
                  f"right_factor[{k}]")
    _assert_close(lr.alignment[k], ref_lr.alignment[k], f"alignment[{k}]")
    np.testing.assert_array_equal(lr.nonfinite_count[k],
                                  ref_lr.nonfinite_count[k])
  adam, ref_adam = (s.inner_states["adam"] for s in (state, ref_state))
  for a, b in zip(jax.tree.leaves(adam), jax.tree.leaves(ref_adam)):
    _assert_close(a, b, "AdamW state")


def _run_sharded(mesh_shape, *, compressed, right_factor="qr",
                 method="cholesky_qr", form="mu",
                 axis_type=AxisType.Explicit):
  mesh = _mesh(mesh_shape, axis_type)
  specs = SPECS if axis_type == AxisType.Auto else None
  tx = _optimizer(right_factor=right_factor, orthogonalize=method,
                  error_feedback=form, mesh=mesh,
                  param_specs=specs, data_axis="data" if compressed else None)
  replicas = mesh_shape[0]
  with jax.set_mesh(mesh):
    params, state = _train(
        tx, _arrays(0), _gradients(replicas), per_replica=compressed,
        put=lambda t, lead: _put(t, mesh, lead))
  return mesh, params, state


@pytest.mark.parametrize("compressed", [False, True],
                         ids=["sharded", "compressed_dp"])
@pytest.mark.parametrize("mesh_shape", MESHES,
                         ids=["x".join(map(str, m)) for m in MESHES])
def test_matches_single_device(mesh_shape, compressed):
  mesh, params, state = _run_sharded(mesh_shape, compressed=compressed)
  _assert_matches_single_device(params, state, mesh_shape[0], "qr",
                                "cholesky_qr")
  # Every leaf keeps the layout it was created with, and fits its shape.
  with jax.set_mesh(mesh):
    fresh = jax.jit(_optimizer(
        mesh=mesh, data_axis="data" if compressed else None).init)(
            _put(_arrays(0), mesh))
  for new, old in zip(jax.tree.leaves(state), jax.tree.leaves(fresh)):
    assert new.sharding.is_equivalent_to(old.sharding, new.ndim)
  for k in SHAPES:
    assert params[k].sharding.is_equivalent_to(
        NamedSharding(mesh, SPECS[k]), params[k].ndim)


@pytest.mark.parametrize("compressed", [False, True],
                         ids=["sharded", "compressed_dp"])
@pytest.mark.parametrize("form", ["mu", "beta"])
@pytest.mark.parametrize("megabatch_form", ["apart"], indirect=True)
def test_megabatches_kept_apart_match_single_device(form, compressed,
                                                    megabatch_form):
  # The megabatches' weight-sized arrays kept apart (megabatch.kept_apart;
  # the other tests here step these small matrices joined): each member's
  # products with its block of B, summed over the mesh, and its rows of the
  # joined factors.
  _, params, state = _run_sharded((2, 2, 2), compressed=compressed, form=form)
  _assert_matches_single_device(params, state, 2, "qr", "cholesky_qr", form)


@pytest.mark.parametrize("compressed", [False, True],
                         ids=["sharded", "compressed_dp"])
@pytest.mark.parametrize("right_factor,method,form", [
    ("column", "cholesky_qr", "mu"),
    ("qr", "householder", "mu"),
    ("qr", "randomized_cholesky_qr", "mu"),
    ("polar", "cholesky_qr", "mu"),
    ("polar", "householder", "beta"),
    ("qr", "cholesky_qr", "beta"),
    ("column", "randomized_cholesky_qr", "beta"),
])
def test_every_method_and_form_matches_single_device(right_factor, method,
                                                     form, compressed):
  _, params, state = _run_sharded((2, 2, 2), compressed=compressed,
                                  right_factor=right_factor, method=method,
                                  form=form)
  _assert_matches_single_device(params, state, 2, right_factor, method, form)


@pytest.mark.parametrize("compressed", [False, True],
                         ids=["sharded", "compressed_dp"])
def test_auto_mesh_matches_single_device(compressed):
  _, params, state = _run_sharded((2, 2, 2), compressed=compressed,
                                  axis_type=AxisType.Auto)
  _assert_matches_single_device(params, state, 2, "qr", "cholesky_qr")


def test_right_factor_is_sharded_like_the_small_side():
  mesh = _mesh((2, 2, 2))
  with jax.set_mesh(mesh):
    state = jax.jit(_optimizer(mesh=mesh).init)(_put(_arrays(0), mesh))
  q = _low_rank_state(state).right_factor
  # attn (32 x 64): fan-in is the small side, split over fsdp.
  assert q["attn"].shape == (32, 8)
  assert q["attn"].sharding.spec == P("fsdp", None)
  # mlp_out (64 x 32): fan-out is small, split over fsdp.
  assert q["mlp_out"].sharding.spec == P("fsdp", None)
  # heads (4, 16, 32): batch over tensor, small fan-in 16 not split.
  assert q["heads"].shape == (4, 16, 4)
  assert q["heads"].sharding.spec == P("tensor", None, None)


def _update_collectives(mesh, compressed):
  """Collectives of the compiled low-rank update alone."""
  tx = od.scale_by_orth_dion(
      rank_fraction=0.25, mesh=mesh,
      weight_dimension_numbers={k: DIMS[k] for k in LOW_RANK},
      data_axis="data" if compressed else None)
  params = {k: v for k, v in _put(_arrays(0), mesh).items() if k in LOW_RANK}
  grads = _put(_arrays(1, (mesh.shape["data"],) if compressed else ()), mesh,
               lead=compressed)
  grads = {k: grads[k] for k in LOW_RANK}
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    compiled = jax.jit(tx.update).lower(grads, state).compile()
  return communication.collective_ops(compiled, mesh)


@pytest.mark.parametrize("compressed", [False, True],
                         ids=["sharded", "compressed_dp"])
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)],
                         ids=["2x2x2", "1x2x4"])
def test_hlo_moves_only_factor_sized_pieces(mesh_shape, compressed):
  mesh = _mesh(mesh_shape)
  records = _update_collectives(mesh, compressed)
  assert records, "a sharded step must complete its sums across devices"
  max_rank = 8
  for rec in records:
    # (k x r) factors, (r x r) Grams, (1 x r) column norms, scalars: the last
    # axis is never longer than the rank. A weight, gradient or momentum
    # block would end in a fan-out (>= 32).
    assert not rec.shape or rec.shape[-1] <= max_rank, rec
  if not compressed:
    # Weights are replicated over the data axis; nothing crosses it.
    assert communication.bytes_crossing(records, "data") == 0
  elif mesh.shape["data"] > 1:
    # Only the thin products (and a few flags) cross the data axis.
    assert communication.bytes_crossing(records, "data") > 0


def test_compressed_data_axis_bytes_are_the_factors():
  """(m + n) r float32 numbers per matrix cross the data axis, within 5%."""
  mesh = _mesh((8, 1, 1))
  records = _update_collectives(mesh, compressed=True)
  expected = 0
  for k in LOW_RANK:
    *batch, fan_in, fan_out = SHAPES[k]
    r = int(np.ceil(0.25 * min(fan_in, fan_out)))
    expected += int(np.prod(batch, dtype=int)) * (fan_in + fan_out) * r * 4
  measured = communication.bytes_crossing(records, "data")
  assert abs(measured - expected) <= 0.05 * expected, (measured, expected)


def test_averaging_momenta_changes_no_update():
  mesh = _mesh((4, 2, 1))
  tx = _optimizer(mesh=mesh, data_axis="data")
  grads = _gradients(4)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  with jax.set_mesh(mesh):
    step = jax.jit(step)
    params = _put(_arrays(0), mesh)
    state = jax.jit(tx.init)(params)
    for g in grads[:3]:
      params, state = step(params, state, _put(g, mesh, lead=True))
    averaged = jax.jit(data_parallel.average_replica_momenta)(state)
    per_replica = np.asarray(
        _low_rank_state(averaged).momentum["attn"].per_replica)
    before = np.asarray(_low_rank_state(state).momentum["attn"].per_replica)
    np.testing.assert_allclose(per_replica[0], per_replica[3])
    np.testing.assert_allclose(per_replica[0], before.mean(axis=0),
                               rtol=1e-6)
    assert not np.allclose(before[0], before[3])
    a, b = (params, state), (params, averaged)
    for g in grads[3:6]:
      a = step(*a, _put(g, mesh, lead=True))
      b = step(*b, _put(g, mesh, lead=True))
  for k in SHAPES:
    _assert_close(b[0][k], a[0][k], f"params[{k}]")


class _Mlp(nnx.Module):
  """Two Dense layers with tensor-parallel kernels (Megatron style)."""

  def __init__(self, rngs: nnx.Rngs, *, sharded: bool,
               explicit_layouts: bool = False):
    init = nnx.initializers.lecun_normal()
    wrap = ((lambda names: nnx.with_partitioning(init, names)) if sharded
            else (lambda names: init))
    self.explicit_layouts = explicit_layouts
    self.up = nnx.Linear(16, 64, kernel_init=wrap(("fsdp", "tensor")),
                         rngs=rngs)
    self.down = nnx.Linear(64, 16, kernel_init=wrap(("tensor", "fsdp")),
                           rngs=rngs)

  def __call__(self, x):
    if self.explicit_layouts:   # an Explicit mesh asks for them
      h = self.up(x, out_sharding=P(None, "tensor"))
      return self.down(jax.nn.gelu(h), out_sharding=P())
    return self.down(jax.nn.gelu(self.up(x)))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto],
                         ids=["explicit", "auto"])
def test_nnx_optimizer_on_a_sharded_model(axis_type):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((8, 16)).astype(np.float32)
  y = rng.standard_normal((8, 16)).astype(np.float32)

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  plain = _Mlp(nnx.Rngs(0), sharded=False)
  plain_opt = nnx.Optimizer(plain, od.orth_dion(0.05), wrt=nnx.Param)
  expected = [float(step(plain, plain_opt)) for _ in range(5)]

  mesh = _mesh((2, 2, 2), axis_type)
  with jax.set_mesh(mesh):
    model = _Mlp(nnx.Rngs(0), sharded=True,
                 explicit_layouts=axis_type == AxisType.Explicit)
    specs = (nnx.get_partition_spec(nnx.state(model, nnx.Param))
             if axis_type == AxisType.Auto else None)
    optimizer = nnx.Optimizer(
        model, od.orth_dion(0.05, mesh=mesh, param_specs=specs),
        wrt=nnx.Param)
    losses = [float(step(model, optimizer)) for _ in range(5)]
    q = _low_rank_state(optimizer.opt_state).right_factor
    assert q["up"]["kernel"].get_value().sharding.is_equivalent_to(
        NamedSharding(mesh, P("fsdp", None)), 2)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(model.up.kernel.get_value(),
                             plain.up.kernel.get_value(), rtol=1e-4,
                             atol=1e-6)


def test_per_replica_value_and_grad_is_not_averaged():
  """Per-replica gradients average to the whole batch's gradient."""
  mesh = _mesh((4, 1, 2), AxisType.Auto)
  rng = np.random.default_rng(4)
  w = rng.standard_normal((8, 4)).astype(np.float32)
  xs = rng.standard_normal((16, 8)).astype(np.float32)

  def loss_fn(params, batch):
    return jnp.mean(jnp.square(batch @ params["w"]))

  grad_fn = data_parallel.per_replica_value_and_grad(loss_fn, mesh, "data")
  with jax.set_mesh(mesh):
    loss, grads = jax.jit(grad_fn)({"w": w}, xs)
  assert grads["w"].shape == (4, 8, 4)
  assert grads["w"].sharding.spec[0] == "data"
  # Independent float64 check: replica i's gradient is 2 x_i^T x_i w / b.
  x64 = xs.astype(np.float64).reshape(4, 4, 8)
  for i in range(4):
    expected = 2 * x64[i].T @ (x64[i] @ w.astype(np.float64)) / (4 * 4)
    np.testing.assert_allclose(grads["w"][i], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      loss, np.mean(np.square(xs.astype(np.float64) @ w)), rtol=1e-5)


# ---------------------------------------------------------------- errors


def _init_error(tx, params, mesh):
  with jax.set_mesh(mesh), pytest.raises(ValueError) as info:
    jax.jit(tx.init)(params)
  return str(info.value)


def test_unknown_mesh_axis_names_the_parameter():
  mesh = _mesh((2, 2, 2))
  specs = dict(SPECS, attn=P("model", None))
  tx = _optimizer(mesh=mesh, param_specs=specs)
  message = _init_error(tx, _put(_arrays(0), mesh), mesh)
  assert "['attn']" in message and "'model'" in message


def test_data_axis_must_be_a_mesh_axis():
  with pytest.raises(ValueError, match="data_axis 'batch'"):
    _optimizer(mesh=_mesh((2, 2, 2)), data_axis="batch")


def test_data_axis_needs_a_mesh():
  with pytest.raises(ValueError, match="mesh="):
    _optimizer(data_axis="data")


def test_weight_sharded_over_the_data_axis_is_refused_in_compressed_mode():
  mesh = _mesh((2, 2, 2))
  specs = dict(SPECS, attn=P("data", "tensor"))
  tx = _optimizer(mesh=mesh, param_specs=specs, data_axis="data")
  message = _init_error(tx, _put(_arrays(0), mesh), mesh)
  assert "['attn']" in message and "data axis" in message


def test_sharded_inner_axis_of_a_flattened_side_is_refused():
  mesh = _mesh((2, 2, 2))
  # heads as (d_model, heads, head_dim) with fan-out (1, 2): only the heads
  # axis (the leading one of fan-out) may be split.
  tx = od.orth_dion(
      0.1, mesh=mesh, param_specs={"q": P(None, None, "tensor")},
      weight_dimension_numbers={"q": od.DionDimensionNumbers(0, (1, 2))})
  params = {"q": jax.device_put(np.ones((16, 4, 8), np.float32),
                                NamedSharding(mesh, P(None, None, "tensor")))}
  message = _init_error(tx, params, mesh)
  assert "['q']" in message and "leading" in message


def test_indivisible_axis_is_refused():
  mesh = _mesh((1, 2, 4))
  tx = od.orth_dion(0.1, mesh=mesh, param_specs={"w": P("tensor", None)})
  message = _init_error(tx, {"w": np.ones((6, 8), np.float32)}, mesh)
  assert "['w']" in message and "does not divide" in message


def test_auto_mesh_without_param_specs_asks_for_them():
  mesh = _mesh((2, 2, 2), AxisType.Auto)
  tx = _optimizer(mesh=mesh)
  message = _init_error(tx, _put(_arrays(0), mesh), mesh)
  assert "param_specs" in message


def test_compressed_gradients_need_the_replica_axis():
  mesh = _mesh((2, 2, 2))
  tx = _optimizer(mesh=mesh, data_axis="data")
  with jax.set_mesh(mesh):
    params = _put(_arrays(0), mesh)
    state = jax.jit(tx.init)(params)
    with pytest.raises(ValueError, match="leading axis of 2 replicas"):
      jax.jit(tx.update)(params, state, params)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto],
                         ids=["explicit", "auto"])
def test_diagnostics_of_a_sharded_state_match_single_device(axis_type):
  # Dion, so that nu differs from matrix to matrix and from 1.
  mesh, _, state = _run_sharded((2, 2, 2), compressed=False,
                                right_factor="column", axis_type=axis_type)
  _, ref_state = _single_device(2, "column", "cholesky_qr")
  expected = od.diagnostics_summary(ref_state)
  assert float(expected["nu_max"]) > 1.01
  with jax.set_mesh(mesh):
    jitted = jax.jit(od.diagnostics_summary)(state)
  for summary in (jitted, od.diagnostics_summary(state)):
    for key in ("nu_mean", "nu_max", "captured_fraction_mean"):
      _assert_close(summary[key], expected[key], key)
