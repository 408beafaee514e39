"""Adaptive rank (Ada-Orth-Dion): the in-step estimate, the resize, the
controller, sharded and compressed, against float64 NumPy.

The estimate and energy Gram are compared with ``reference.energy_rank`` /
``reference.right_energy`` along real trajectories; the resize with an
eigendecomposition in float64; training on after a resize with the float64
reference started from the resized state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orth_dion_jax as od
from orth_dion_jax import adaptive_rank
from orth_dion_jax import communication
import reference
from core_helpers import (alias_for, as_reference, gradient_steps,
                          kernel_tree, run_against_reference)

# Tall, wide and a stack of two matrices (a per-layer kernel).
SHAPES = {"tall": (24, 40), "wide": (40, 16), "stack": (2, 16, 24)}
DIMS = {"tall": od.DionDimensionNumbers(0, 1),
        "wide": od.DionDimensionNumbers(0, 1),
        "stack": od.DionDimensionNumbers(1, 2)}
STEPS = 5


ENERGY, EMA = 0.8, 0.5
REFERENCE = dict(learning_rate=0.05, decay=0.9, rank_energy=ENERGY,
                 rank_ema=EMA)


def _optimizer(right_factor="qr", form="mu", *, rank=8, **kw):
  """The adaptive low-rank step and a constant learning rate."""
  decay = {"mu": 0.9} if form == "mu" else {"beta": 0.9}
  return optax.chain(
      od.scale_by_orth_dion(
          rank=rank, right_factor=right_factor, error_feedback=form,
          weight_dimension_numbers=DIMS, adaptive_rank=True,
          **{"rank_energy": ENERGY, "rank_ema": EMA, **decay, **kw}),
      optax.scale_by_learning_rate(0.05))


def _low_rank_gradients(rng, steps, rank=3, noise=0.05):
  """Gradients in a fixed rank-``rank`` subspace per matrix (random
  coefficients each step) plus a little noise: the momentum's energy rank
  stays well below the optimizer's rank, as in a low-rank problem."""
  basis = np.random.default_rng(99)
  spans = {name: (basis.standard_normal((*batch, m, rank)),
                  basis.standard_normal((*batch, rank, n)))
           for name, (*batch, m, n) in SHAPES.items()}
  out = []
  for _ in range(steps):
    tree = {}
    for name, shape in SHAPES.items():
      left, right = spans[name]
      coefficients = rng.standard_normal(shape[:-2] + (rank, rank))
      tree[name] = jnp.asarray(left @ coefficients @ right
                               + noise * rng.standard_normal(shape),
                               jnp.float32)
    out.append(tree)
  return out


def _train(tx, params, grads, state=None):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _field(state, name):
  return optax.tree.get(state, name)


@pytest.mark.parametrize("right_factor,form,energy", [
    ("qr", "mu", 0.3), ("polar", "beta", 0.95), ("column", "mu", 0.3),
    ("qr", "beta", 0.95)])
def test_estimate_and_energy_match_reference(right_factor, form, energy):
  """Well-conditioned gradients: at 30% the estimate falls inside the rank,
  at 95% beyond it (extrapolated); both against float64."""
  rng = np.random.default_rng(0)
  params = kernel_tree(rng, SHAPES, DIMS)
  tx = _optimizer(right_factor, form, rank_energy=energy)
  state = run_against_reference(
      tx, params, gradient_steps(rng, SHAPES, STEPS, DIMS), dims=DIMS,
      form=form, right_factor=right_factor, orthonormal_start=True,
      rebase=form == "beta", **{**REFERENCE, "rank_energy": energy})
  for path, r in od.effective_ranks(state).items():
    assert np.all((r > 0) & ((r < 8) if energy < 0.5 else (r > 8))), path


def test_estimate_of_an_exactly_low_rank_buffer_is_its_energy_rank():
  """B of rank 3 and r = 8: the step captures all of B, and the estimate is
  the energy rank of B's own singular values (float64 SVD)."""
  rng = np.random.default_rng(1)
  u = np.linalg.qr(rng.standard_normal((40, 3)))[0]
  v = np.linalg.qr(rng.standard_normal((24, 3)))[0]
  b = (u * np.array([4.0, 2.0, 1.0])) @ v.T          # (fan_in, fan_out)
  tx = od.scale_by_low_rank_orthogonalization(od.LowRankCompressor(
      rank=8, adaptive_rank=True, rank_energy=ENERGY))
  params = {"w": jnp.zeros((40, 24))}
  _, state = tx.update({"w": jnp.asarray(b, jnp.float32)}, tx.init(params))
  expected = reference.energy_rank(b, 1.0, ENERGY, 24)
  assert expected == pytest.approx(1.2, abs=1e-12)   # 16/21 < 0.8 < 20/21
  assert float(state.effective_rank["w"]) == pytest.approx(expected,
                                                           abs=1e-4)


def _trained(steps=3, seed=2):
  rng = np.random.default_rng(seed)
  params = kernel_tree(rng, SHAPES, DIMS)
  tx = _optimizer()
  params, state = _train(tx, params, _low_rank_gradients(rng, steps))
  return tx, params, state, rng


def test_resize_to_the_same_rank_is_the_identity():
  _, _, state, _ = _trained()
  for ranks in ({}, od.current_ranks(state)):
    same = od.resize_ranks(state, ranks)
    assert all(a is b for a, b in zip(jax.tree.leaves(same),
                                      jax.tree.leaves(state)))


def _matrices(x):
  x = np.asarray(x, np.float64)
  return x.reshape((-1,) + x.shape[-2:])


def test_shrink_keeps_the_directions_of_most_energy():
  _, _, state, _ = _trained()
  small = od.resize_ranks(state, {"['tall']": 4, "['stack']": 3})
  assert od.current_ranks(small) == {"['tall']": 4, "['wide']": 8,
                                     "['stack']": 3}
  assert (_field(small, "right_factor")["wide"]
          is _field(state, "right_factor")["wide"])
  for name, rank in (("tall", 4), ("stack", 3)):
    q = _matrices(_field(state, "right_factor")[name])
    g = _matrices(_field(state, "right_energy")[name])
    new_q = _matrices(_field(small, "right_factor")[name])
    new_g = _matrices(_field(small, "right_energy")[name])
    for i in range(q.shape[0]):
      values, vectors = np.linalg.eigh(g[i])
      expected = q[i] @ vectors[:, ::-1][:, :rank]
      # Eigenvectors are defined up to sign: compare the projectors.
      np.testing.assert_allclose(new_q[i] @ new_q[i].T,
                                 expected @ expected.T, atol=2e-5)
      np.testing.assert_allclose(new_q[i].T @ new_q[i], np.eye(rank),
                                 atol=2e-5)
      np.testing.assert_allclose(new_g[i], np.diag(values[::-1][:rank]),
                                 atol=2e-6)
      # More of the energy than keeping the first columns would (Ky Fan).
      assert np.trace(new_g[i]) >= np.trace(g[i][:rank, :rank]) - 1e-6


@pytest.mark.parametrize("form", ["mu", "beta"])
def test_training_on_after_a_shrink_matches_reference(form):
  """Shrinking then training equals training at the smaller rank from the
  resized state, step by step against float64."""
  rng = np.random.default_rng(3)
  params = kernel_tree(rng, SHAPES, DIMS)
  tx = _optimizer(form=form)
  params, state = _train(tx, params, _low_rank_gradients(rng, 3))
  resized = od.resize_ranks(state, {"['tall']": 4, "['wide']": 5,
                                    "['stack']": 3})
  run_against_reference(
      tx, params, _low_rank_gradients(rng, 3, noise=0.3), dims=DIMS,
      form=form,
      state=resized, rebase=True, **REFERENCE)


def test_grow_appends_orthonormal_columns_drawn_from_the_seed():
  tx, params, state, rng = _trained()
  grown = od.resize_ranks(state, {"['tall']": 13})
  q = np.asarray(_field(state, "right_factor")["tall"], np.float64)
  new_q = np.asarray(_field(grown, "right_factor")["tall"], np.float64)
  assert new_q.shape == (24, 13)
  np.testing.assert_array_equal(new_q[:, :8], q)
  np.testing.assert_allclose(new_q.T @ new_q, np.eye(13), atol=2e-5)
  g = np.asarray(_field(grown, "right_energy")["tall"])
  np.testing.assert_array_equal(
      g[:8, :8], np.asarray(_field(state, "right_energy")["tall"]))
  assert not g[8:].any() and not g[:, 8:].any()
  again = od.resize_ranks(state, {"['tall']": 13})
  np.testing.assert_array_equal(
      np.asarray(_field(again, "right_factor")["tall"]), new_q)
  other = od.resize_ranks(state, {"['tall']": 13}, seed=1)
  assert not np.allclose(_field(other, "right_factor")["tall"][:, 8:],
                         new_q[:, 8:])
  # It trains on at the new rank.
  params, grown = _train(tx, params, _low_rank_gradients(rng, 2), grown)
  assert od.current_ranks(grown)["['tall']"] == 13
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


POLICY = od.RankPolicy(min_rank=8, max_rank=32, multiple_of=8,
                       hysteresis=4.0)


@pytest.mark.parametrize("estimate,current,expected", [
    (0.0, 16, 16),     # no step yet
    (17.5, 16, 24),    # beyond the rank: grow to the next multiple
    (16.0, 16, 16),
    (13.0, 16, 16),    # 13 + 4 still needs 24 > 16: keep
    (11.9, 16, 16),    # 15.9 rounds up to 16: keep
    (3.5, 16, 8),      # 7.5 rounds up to 8: shrink
    (40.0, 24, 32),    # capped at max_rank
    (1.0, 16, 8),      # floored at min_rank
])
def test_policy(estimate, current, expected):
  assert adaptive_rank.target_rank(estimate, current, lowest=8, highest=32,
                                   policy=POLICY) == expected


def test_policy_does_not_flap_around_a_multiple():
  rank, changes = 16, 0
  for estimate in [17.0, 15.0, 17.0, 15.5, 16.5, 15.0] * 3:
    new = adaptive_rank.target_rank(estimate, rank, lowest=8, highest=32,
                                    policy=POLICY)
    changes += new != rank
    rank = new
  assert changes == 1 and rank == 24


def test_controller_follows_the_estimate_and_bounds_recompiles():
  rng = np.random.default_rng(4)
  params = kernel_tree(rng, SHAPES, DIMS)
  tx = _optimizer()
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(jax.tree.map(jnp.shape, _field(s, "right_factor")))
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  state = tx.init(params)
  controller = od.RankController(interval=4, min_rank=2, multiple_of=2,
                                 hysteresis=1.0)
  for t, g in enumerate(_low_rank_gradients(rng, 16, rank=2)):
    params, state = step(params, state, g)
    state = controller.update(t + 1, state)
  ranks = od.current_ranks(state)
  # The energy rank of rank-2 gradients at 80% is at most 2; with the
  # hysteresis, a multiple of 2 at most 4.
  assert all(r <= 4 for r in ranks.values()), ranks
  assert 1 <= controller.changes <= 16 // 4
  assert all(t % 4 == 0 for t, _ in controller.history)
  assert len(traces) <= controller.changes + 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_nonfinite_gradient_keeps_the_estimate_and_energy():
  tx, params, state, rng = _trained()
  g = _low_rank_gradients(rng, 1)[0]
  g["tall"] = g["tall"].at[0, 0].set(jnp.nan)
  _, after = _train(tx, params, [g], state)
  for field in ("effective_rank", "right_energy"):
    np.testing.assert_array_equal(_field(after, field)["tall"],
                                  _field(state, field)["tall"])
    assert not np.array_equal(_field(after, field)["wide"],
                              _field(state, field)["wide"])
  assert int(_field(after, "nonfinite_count")["tall"]) == 1


# --- Sharded and compressed data parallel ---------------------------------

AXES = ("data", "fsdp", "tensor")
SPECS = {"tall": P("fsdp", "tensor"), "wide": P("tensor", "fsdp"),
         "stack": P(None, "fsdp", "tensor")}
RESIZE = {"['tall']": 4, "['wide']": 12}


def _run(tx, params, grads, put=lambda tree, lead: tree):
  """3 steps, a resize, 2 steps; ``put`` places each input."""
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  params = put(params, False)
  state = jax.jit(tx.init)(params)
  shardings = None
  for t, g in enumerate(grads):
    if t == 3:
      shardings = jax.tree.map(lambda x: x.sharding,
                               _field(state, "right_factor"))
      state = od.resize_ranks(state, RESIZE)
    params, state = step(params, state, put(g, True))
  return params, state, shardings


@pytest.mark.parametrize("compressed", [False, True],
                         ids=["sharded", "compressed_dp"])
def test_sharded_and_compressed_match_single_device(compressed):
  rng = np.random.default_rng(5)
  params = kernel_tree(rng, SHAPES, DIMS)
  replicas = 2
  grads = [{k: jnp.asarray(rng.standard_normal((replicas,) + s), jnp.float32)
            for k, s in SHAPES.items()} for _ in range(5)]
  mean = [jax.tree.map(lambda x: jnp.mean(x, axis=0), g) for g in grads]
  expected_params, expected, _ = _run(_optimizer(), params, mean)

  mesh = jax.make_mesh((replicas, 2, 2), AXES)

  def put(tree, lead):
    if lead and not compressed:
      tree = jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
      lead = False
    prefix = ("data",) if lead else ()
    return {k: jax.device_put(v, NamedSharding(mesh, P(*prefix, *SPECS[k])))
            for k, v in tree.items()}
  tx = _optimizer(mesh=mesh, data_axis="data" if compressed else None)
  with jax.set_mesh(mesh):
    params, state, shardings = _run(tx, params, grads, put)
  assert od.current_ranks(state) == {**od.current_ranks(expected), **RESIZE}
  for k in SHAPES:
    q = _field(state, "right_factor")[k]
    # The resize kept each right factor's layout (only r changed).
    assert q.sharding.spec == shardings[k].spec, k
    fields = [("right_factor", q), ("right_energy",
                                     _field(state, "right_energy")[k])]
    if not compressed:
      # Compressed: ||B||^2 in the captured share (and so the estimate) is
      # the replicas' mean, not that of the mean buffer.
      fields.append(("effective_rank", _field(state, "effective_rank")[k]))
    for name, actual in fields + [("params", params[k])]:
      want = (expected_params[k] if name == "params"
              else _field(expected, name)[k])
      np.testing.assert_allclose(
          np.asarray(actual), np.asarray(want),
          atol=1e-5 * float(np.max(np.abs(want))), err_msg=f"{name}[{k}]")


def test_compressed_traffic_shrinks_with_the_rank():
  """The bytes crossing the data axis are (m + n) r float32 numbers per
  matrix at each rank: a resize shrinks them in proportion."""
  mesh = jax.make_mesh((8, 1, 1), AXES)
  tx = od.scale_by_orth_dion(rank=8, weight_dimension_numbers=DIMS,
                             adaptive_rank=True, mesh=mesh, data_axis="data")
  rng = np.random.default_rng(6)
  params = {k: jax.device_put(v, NamedSharding(mesh, P()))
            for k, v in kernel_tree(rng, SHAPES, DIMS).items()}
  grads = {k: jax.device_put(jnp.zeros((8,) + s), NamedSharding(mesh, P(
      "data"))) for k, s in SHAPES.items()}
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    measured = {}
    for ranks in ({}, {"['tall']": 4, "['wide']": 2, "['stack']": 6}):
      resized = od.resize_ranks(state, ranks)
      compiled = jax.jit(tx.update).lower(grads, resized).compile()
      measured[len(ranks)] = communication.bytes_crossing(
          communication.collective_ops(compiled, mesh), "data")
  def factor_bytes(ranks):
    return sum(
        int(np.prod(s[:-2], dtype=int)) * (s[-2] + s[-1])
        * ranks.get(f"['{k}']", 8) * 4 for k, s in SHAPES.items())
  for key, ranks in ((0, {}), (3, {"['tall']": 4, "['wide']": 2,
                                    "['stack']": 6})):
    expected = factor_bytes(ranks)
    assert abs(measured[key] - expected) <= 0.05 * expected, (
        measured, expected)
  assert measured[3] < measured[0]


# --- Bad input -------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(adaptive_rank="yes"), TypeError, "adaptive_rank"),
    (dict(adaptive_rank=True, rank_energy=0.0), ValueError, "rank_energy"),
    (dict(adaptive_rank=True, rank_energy=1.5), ValueError, "rank_energy"),
    (dict(adaptive_rank=True, rank_ema=1.0), ValueError, "rank_ema"),
    (dict(adaptive_rank=True, rank_ema="0.5"), TypeError,
     "rank_ema"),
    (dict(rank_energy=0.5), ValueError, "rank_energy applies to "
     "adaptive_rank=True"),
    (dict(rank_ema=0.5), ValueError, "rank_ema applies to"),
])
def test_bad_settings_name_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    od.orth_dion(0.01, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(intervall=5), TypeError, "did you mean 'interval'"),
    (dict(min_rank=8, max_rank=4), ValueError, "max_rank"),
    (dict(multiple_of=0), ValueError, "multiple_of"),
    (dict(hysteresis=-1.0), ValueError, "hysteresis"),
    (dict(interval=2.5), TypeError, "interval"),
    (dict(hysteresis=lambda c: 1.0), TypeError, "hysteresis"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=2**32), ValueError, "seed"),
])
def test_bad_controller_settings_name_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    od.RankController(**kwargs)


def test_bad_resizes_name_the_path():
  _, _, state, _ = _trained()
  with pytest.raises(ValueError, match=r"\['nope'\]"):
    od.resize_ranks(state, {"['nope']": 4})
  with pytest.raises(ValueError, match=r"\['wide'\].*\[1, 16\], got 17"):
    od.resize_ranks(state, {"['wide']": 17})
  with pytest.raises(ValueError, match=r"\['wide'\].*got 0"):
    od.resize_ranks(state, {"['wide']": 0})
  with pytest.raises(TypeError, match=r"\['wide'\] must be an int"):
    od.resize_ranks(state, {"['wide']": 4.0})
  with pytest.raises(TypeError, match="mapping"):
    od.resize_ranks(state, [("['wide']", 4)])
  with pytest.raises(TypeError, match="seed"):
    od.resize_ranks(state, {"['wide']": 4}, seed="x")
  # Every matrix starts at 8, below min_rank 12: nothing can change.
  controller = od.RankController(min_rank=12)
  with pytest.warns(UserWarning, match="min_rank=12.*no rank can change"):
    controller.update(1, state)
  assert sorted(controller.fixed) == sorted(od.current_ranks(state))


def test_a_state_without_adaptive_rank_is_refused():
  tx = od.orth_dion(0.01, rank=4)
  state = tx.init({"w": jnp.ones((16, 8))})
  with pytest.raises(ValueError, match="adaptive_rank=True"):
    od.resize_ranks(state, {"['w']": 2})
  with pytest.raises(ValueError, match="adaptive_rank=True"):
    od.RankController(interval=1).update(1, state)


def test_an_energy_gram_of_the_wrong_rank_names_the_path():
  tx, params, state, rng = _trained()
  # A right factor resized by hand, without its energy Gram.
  q = dict(_field(state, "right_factor"))
  q["tall"] = q["tall"][:, :4]
  broken = optax.tree.set(state, right_factor=q)
  with pytest.raises(ValueError, match=r"\['tall'\].*energy Gram.*resize_ranks"):
    tx.update(_low_rank_gradients(rng, 1)[0], broken, params)


def test_routing_summary_shows_the_ranks_held():
  _, params, state, _ = _trained()
  resized = od.resize_ranks(state, {"['tall']": 4})
  rows = {r.path: r for r in od.routing_summary(
      params, resized, rank=8, weight_dimension_numbers=DIMS)}
  assert rows["['tall']"].rank == 4
  assert rows["['tall']"].right_factor_shape == (24, 4)
  assert rows["['stack']"].right_factor_shape == (2, 16, 8)
  with pytest.raises(ValueError, match=r"\['other'\]"):
    od.routing_summary({**params, "other": jnp.ones((8, 8))}, resized,
                       weight_dimension_numbers={**DIMS, "other":
                                                 od.DionDimensionNumbers()})


def test_diagnostics_report_the_ranks():
  _, _, state, _ = _trained()
  resized = od.resize_ranks(state, {"['tall']": 4})
  summary = od.diagnostics_summary(resized)
  # tall 4, wide 8, the two stacked matrices 8 each.
  assert float(summary["rank_mean"]) == pytest.approx((4 + 8 + 16) / 4)
  estimates = np.concatenate([np.ravel(e) for e in
                              od.effective_ranks(resized).values()])
  assert float(summary["effective_rank_mean"]) == pytest.approx(
      float(np.mean(estimates)), rel=1e-6)
  per_matrix = od.matrix_diagnostics(resized)
  assert per_matrix["['tall']"].rank == 4
  np.testing.assert_array_equal(per_matrix["['stack']"].effective_rank,
                                _field(resized, "effective_rank")["stack"])
  plain = od.orth_dion(0.01, rank=4)
  state = plain.init({"w": jnp.ones((16, 8))})
  assert "effective_rank_mean" not in od.diagnostics_summary(state)


def _corrupt(state, field, name, value):
  tree = dict(_field(state, field))
  tree[name] = jnp.full_like(tree[name], value)
  return optax.tree.set(state, **{field: tree})


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf, -jnp.inf])
def test_a_corrupt_estimate_heals_at_the_next_step_and_is_never_acted_on(
    value):
  tx, params, state, rng = _trained()
  broken = _corrupt(state, "effective_rank", "tall", value)
  controller = od.RankController(interval=1, min_rank=2, multiple_of=2)
  # NaN is no estimate: the policy keeps the rank.
  assert controller.targets(broken)["['tall']"] == 8
  _, after = _train(tx, params, _low_rank_gradients(rng, 1), broken)
  healed = np.asarray(_field(after, "effective_rank")["tall"])
  assert np.isfinite(healed) and 0 < healed <= 8


def test_a_corrupt_energy_gram_resizes_to_the_first_columns_and_heals():
  tx, params, state, rng = _trained()
  broken = _corrupt(state, "right_energy", "tall", jnp.inf)
  small = od.resize_ranks(broken, {"['tall']": 3})
  np.testing.assert_array_equal(_field(small, "right_factor")["tall"],
                                _field(state, "right_factor")["tall"][:, :3])
  assert np.isfinite(np.asarray(_field(small, "right_energy")["tall"])).all()
  params, after = _train(tx, params, _low_rank_gradients(rng, 1), broken)
  assert np.isfinite(np.asarray(_field(after, "right_energy")["tall"])).all()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_resumed_controller_keeps_the_run_record_and_fresh_bounds():
  _, _, state, _ = _trained()
  controller = od.RankController(interval=2, min_rank=2, multiple_of=2)
  controller.update(0, state)          # bounds from the fresh ranks (8)
  controller.resume([(4, {"['tall']": 4})])
  assert controller.changes == 1 and controller.history == [
      (4, {"['tall']": 4})]
  resized = od.resize_ranks(state, {"['tall']": 4})
  # The bound is still the initial rank 8, not the restored 4.
  grown = od.resize_ranks(resized, {"['tall']": 2})
  estimates = _corrupt(grown, "effective_rank", "tall", 100.0)
  assert controller.targets(estimates)["['tall']"] == 8


def test_a_huge_energy_gram_resizes_to_finite_factors():
  _, _, state, _ = _trained()
  g = dict(_field(state, "right_energy"))
  g["tall"] = g["tall"] * 3e38
  huge = optax.tree.set(state, right_energy=g)
  small = od.resize_ranks(huge, {"['tall']": 3})
  reference_small = od.resize_ranks(state, {"['tall']": 3})
  q, expected = (np.asarray(_field(s, "right_factor")["tall"], np.float64)
                 for s in (small, reference_small))
  np.testing.assert_allclose(q @ q.T, expected @ expected.T, atol=1e-5)
  assert np.isfinite(np.asarray(_field(small, "right_energy")["tall"])).all()


def test_a_state_from_another_configuration_is_refused_with_the_reason():
  _, params, state, rng = _trained()
  grads = _low_rank_gradients(rng, 1)[0]
  plain = optax.chain(
      od.scale_by_orth_dion(rank=8, mu=0.9, weight_dimension_numbers=DIMS),
      optax.scale_by_learning_rate(0.05))
  with pytest.raises(ValueError, match="built without it"):
    _optimizer().update(grads, plain.init(params), params)
  resized = od.resize_ranks(state, {"['tall']": 4})
  with pytest.raises(ValueError, match=r"\['tall'\].*resize_ranks.*"
                     "adaptive_rank=True"):
    plain.update(grads, resized, params)
  wrong = dict(_field(state, "effective_rank"))
  wrong["tall"], wrong["wide"] = wrong["stack"], wrong["tall"]
  with pytest.raises(ValueError, match=r"effective rank has shape"):
    _optimizer().update(grads, optax.tree.set(state, effective_rank=wrong),
                        params)


def test_routing_summary_refuses_settings_that_route_a_held_matrix_away():
  _, params, state, _ = _trained()
  with pytest.raises(ValueError, match=r"\['stack'\].*AdamW"):
    od.routing_summary(params, state, weight_dimension_numbers={
        **DIMS, "stack": None})


def test_an_nnx_optimizer_is_resized_by_parameter_path():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(16, 48, rngs=rngs)
      self.down = nnx.Linear(48, 16, rngs=rngs)

    def __call__(self, x):
      return self.down(jax.nn.relu(self.up(x)))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, od.orth_dion(0.01, adaptive_rank=True, rank=8), wrt=nnx.Param)
  x = jnp.ones((4, 16))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
  step(model, optimizer)
  ranks = od.current_ranks(optimizer.opt_state)
  assert ranks == {"['down']['kernel']": 8, "['up']['kernel']": 8}
  resized = od.resize_ranks(optimizer.opt_state, {"['up']['kernel']": 4})
  nnx.update(optimizer.opt_state, nnx.state(resized))
  assert od.current_ranks(optimizer.opt_state)["['up']['kernel']"] == 4
  step(model, optimizer)
  assert all(np.isfinite(np.asarray(p)).all()
             for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
