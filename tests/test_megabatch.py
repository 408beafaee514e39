"""Megabatching: an unscanned model is stepped as its scanned form is.

Properties of the compiled update, not times: the leaves of a shape share
their compiled kernels (the number of distinct kernels does not grow with
the number of layers), a sharded step makes one collective per megabatch
(their number does not grow either), the unscanned update equals the
scanned one matrix for matrix, and every leaf of a tree of mixed layouts
steps as if it were alone, on one device and sharded. ``megabatch``'s own
pieces are checked against NumPy.
"""

import collections
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orth_dion_jax as od
from orth_dion_jax import communication
from orth_dion_jax import megabatch

D = 16


def _shapes(layers: int, scanned: bool) -> dict[str, tuple[int, ...]]:
  block = {"q": (D, D), "k": (D, D), "o": (D, D), "up": (D, 2 * D),
           "down": (2 * D, D)}
  if scanned:
    return {name: (layers, *shape) for name, shape in block.items()}
  return {f"layer{i}_{name}": shape for i in range(layers)
          for name, shape in block.items()}


def _tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
          for k, s in shapes.items()}


def _optimizer(scanned: bool, **kwargs):
  return od.scale_by_orth_dion(rank_fraction=0.25,
                               layer_axes=1 if scanned else 0, **kwargs)


def _distinct_kernels(compiled) -> int:
  """Fused computations of a compiled module that differ in more than
  their names (what XLA:CPU compiles one kernel for)."""
  text = compiled.as_text()
  bodies = {}
  for block in re.split(r"\n(?=\S)", text):
    match = re.match(r"%(\S+) ", block)
    if match:
      bodies[match.group(1)] = block
  called = re.findall(r"fusion\(.*?\), kind=\w+, calls=%([\w.\-]+)", text)
  normal = lambda body: re.sub(
      r"%[\w.\-]+|, metadata=\{[^}]*\}", "", body.split("\n", 1)[-1])
  return len({normal(bodies[name]) for name in called})


def _compiled_update(layers, **kwargs):
  shapes = _shapes(layers, scanned=False)
  params = _tree(shapes, 0)
  tx = _optimizer(False, **kwargs)
  return jax.jit(tx.update).lower(params, tx.init(params)).compile()


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="counts XLA:CPU's fused kernels")
def test_unscanned_layers_share_their_kernels(megabatch_form):
  # Five leaves a layer, each with six outputs (update, momentum, Q and
  # three diagnostics). Sliced out of their megabatch at constant offsets,
  # every added leaf brought about six kernels of its own; at run-time
  # offsets the leaves of a shape share them. Only the batched kernels
  # (whose batch grows) may differ between 3 and 7 layers, and shapes that
  # coincide at one size and not at another: fewer than one per added leaf.
  added_leaves = 5 * (7 - 3)
  grown = (_distinct_kernels(_compiled_update(7))
           - _distinct_kernels(_compiled_update(3)))
  assert grown < added_leaves, grown


def test_one_collective_per_megabatch_not_per_matrix(megabatch_form):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))

  def collectives(layers):
    shapes = _shapes(layers, scanned=False)
    params = {k: jax.device_put(v, NamedSharding(mesh, P("fsdp", "tensor")))
              for k, v in _tree(shapes, 0).items()}
    tx = _optimizer(False, mesh=mesh)
    with jax.set_mesh(mesh):
      compiled = jax.jit(tx.update).lower(params, jax.jit(tx.init)(
          params)).compile()
    records = communication.collective_ops(compiled, mesh)
    assert records
    return collections.Counter((r.kind, r.axes) for r in records)

  assert collectives(2) == collectives(5)


@pytest.mark.parametrize("form", ["mu", "beta"])
def test_unscanned_update_equals_the_scanned_one(form, megabatch_form):
  layers = 4
  unscanned, scanned = _shapes(layers, False), _shapes(layers, True)
  stack = lambda tree: {name: jnp.stack([tree[f"layer{i}_{name}"]
                                         for i in range(layers)])
                        for name in scanned}
  params = _tree(unscanned, 0)
  # init draws each leaf's Q from its own key (a stacked leaf's differs from
  # its layers'): the scanned state starts from the unscanned Q.
  tx_u, tx_s = _optimizer(False, error_feedback=form), _optimizer(
      True, error_feedback=form)
  state_u = tx_u.init(params)
  state_s = tx_s.init(stack(params))._replace(
      right_factor=stack(state_u.right_factor))
  step_u, step_s = jax.jit(tx_u.update), jax.jit(tx_s.update)
  for seed in (1, 2, 3):
    g = _tree(unscanned, seed)
    updates_u, state_u = step_u(g, state_u, params)
    updates_s, state_s = step_s(stack(g), state_s, stack(params))
  chex.assert_trees_all_close(stack(updates_u), updates_s, rtol=1e-5,
                              atol=1e-6)
  for field in ("momentum", "right_factor", "captured_fraction",
                "alignment", "nonfinite_count"):
    chex.assert_trees_all_close(stack(getattr(state_u, field)),
                                getattr(state_s, field), rtol=1e-5,
                                atol=1e-6)


def test_megabatches_group_equal_keys_in_first_appearance_order():
  batches = megabatch.megabatches(["a", "b", "a", "c", "b"], [1, 2, 3, 4, 5])
  assert batches == [megabatch.Megabatch([0, 2], [1, 3]),
                     megabatch.Megabatch([1, 4], [2, 5]),
                     megabatch.Megabatch([3], [4])]


@pytest.mark.parametrize("predicate", [True, False])
def test_parted_inverts_joined_at_run_time_offsets(predicate):
  batches = [megabatch.Megabatch([0, 2, 4], [2, 1, 3]),
             megabatch.Megabatch([1, 3], [4, 2])]
  rng = np.random.default_rng(0)
  arrays = [[rng.standard_normal((n, 4, 3)).astype(np.float32)
             for n in batch.sizes] for batch in batches]

  @jax.jit
  def round_trip(arrays, predicate):
    offsets = megabatch.runtime_offsets(batches, predicate)
    return offsets, [
        megabatch.parted(megabatch.joined(a), batch.sizes, o)
        for a, batch, o in zip(arrays, batches, offsets)]

  offsets, parts = round_trip(arrays, predicate)
  # Either branch: each member's first row in its own megabatch.
  assert [[int(o) for o in batch] for batch in offsets] == [[0, 2, 3],
                                                             [0, 4]]
  for got, expected in zip(parts, arrays):
    for part, array in zip(got, expected):
      np.testing.assert_array_equal(np.asarray(part), array)
  assert megabatch.parted(None, [1, 2], offsets[1]) == [None, None]


def test_parts_take_each_members_rows_joined_or_apart(megabatch_form):
  batch = megabatch.Megabatch([0, 1, 2], [2, 1, 3])
  rng = np.random.default_rng(0)
  arrays = [rng.standard_normal((n, 5, 4)).astype(np.float32)
            for n in batch.sizes]
  factor = rng.standard_normal((6, 4, 2)).astype(np.float32)
  weights = rng.standard_normal(6).astype(np.float32)

  @jax.jit
  def use(arrays, factor, weights):
    offsets, = megabatch.runtime_offsets([batch], weights[0] == weights[0])
    parts = megabatch.Parts.of(arrays, offsets)
    products = parts.joined_each(lambda b, f: b @ f, factor)
    scaled = parts.members(parts.each(
        lambda b, w: b * w[:, None, None], weights))
    return len(parts.arrays), products, scaled

  count, products, scaled = use(arrays, factor, weights)
  assert count == (3 if megabatch_form == "apart" else 1)
  whole = np.concatenate(arrays)
  np.testing.assert_allclose(np.asarray(products),
                             np.einsum("nio,nor->nir", whole, factor),
                             rtol=1e-5, atol=1e-6)
  starts = np.cumsum([0, *batch.sizes])
  for got, lo, hi in zip(scaled, starts[:-1], starts[1:]):
    np.testing.assert_allclose(np.asarray(got),
                               whole[lo:hi] * weights[lo:hi, None, None],
                               rtol=1e-6)
  assert megabatch.Parts.of(arrays, [0, 2, 3]).members(None) == [None] * 3


def test_small_matrices_are_joined_and_large_ones_kept_apart():
  assert not megabatch.kept_apart((64, 64))
  assert not megabatch.kept_apart((16, 1023))
  assert megabatch.kept_apart((128, 128))
  assert megabatch.kept_apart((64, 256))


# Leaves whose matrices share their fan sizes but not the order of their
# axes: a transposed kernel, (out, in) storage, a Gemma-style (heads, d,
# head_dim) query with fan-out (heads, head_dim), a head axis kept as a
# batch axis. Each is a megabatch member brought to the layout by its own
# view.
MIXED_LAYOUTS = {
    "a": ((32, 32), od.DionDimensionNumbers(0, 1)),
    "b": ((32, 32), od.DionDimensionNumbers(1, 0)),
    "c": ((64, 32), od.DionDimensionNumbers(0, 1)),
    "d": ((32, 64), od.DionDimensionNumbers(1, 0)),
    "q": ((4, 64, 16), od.DionDimensionNumbers(1, (0, 2))),
    "e": ((64, 64), od.DionDimensionNumbers(0, 1)),
    "heads": ((64, 4, 16), od.DionDimensionNumbers(0, 2)),
    "f": ((64, 16), od.DionDimensionNumbers(0, 1)),
}


@pytest.mark.parametrize("first", ["a", "q"])
def test_each_leaf_steps_as_if_it_were_alone_whatever_its_layout(
    first, megabatch_form):
  names = [first] + [k for k in MIXED_LAYOUTS if k != first]
  shapes = {k: MIXED_LAYOUTS[k][0] for k in names}
  numbers = {k: MIXED_LAYOUTS[k][1] for k in names}
  params, grads = _tree(shapes, 0), _tree(shapes, 1)
  tx = od.scale_by_orth_dion(rank=4, weight_dimension_numbers=numbers)
  state = tx.init(params)
  together, state_after = jax.jit(tx.update)(grads, state, params)
  for name in names:
    alone = od.scale_by_orth_dion(
        rank=4, weight_dimension_numbers={name: numbers[name]})
    alone_state = alone.init({name: params[name]})._replace(
        right_factor={name: state.right_factor[name]})
    update, alone_after = jax.jit(alone.update)(
        {name: grads[name]}, alone_state, {name: params[name]})
    np.testing.assert_allclose(together[name], update[name], rtol=2e-5,
                               atol=1e-6, err_msg=name)
    np.testing.assert_allclose(state_after.momentum[name],
                               alone_after.momentum[name], rtol=2e-5,
                               atol=1e-6, err_msg=name)
    np.testing.assert_allclose(state_after.right_factor[name],
                               alone_after.right_factor[name], rtol=2e-5,
                               atol=1e-6, err_msg=name)


def test_a_sharded_mixed_layout_tree_matches_one_device(megabatch_form):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  shapes = {k: shape for k, (shape, _) in MIXED_LAYOUTS.items()}
  numbers = {k: dims for k, (_, dims) in MIXED_LAYOUTS.items()}
  params, grads = _tree(shapes, 0), _tree(shapes, 1)
  # The leading axis of every leaf split over "fsdp": a fan-in, a fan-out
  # or a batch axis, depending on the leaf's layout.
  put = lambda tree: {k: jax.device_put(v, NamedSharding(mesh, P("fsdp")))
                      for k, v in tree.items()}
  one_device = od.scale_by_orth_dion(rank=4,
                                     weight_dimension_numbers=numbers)
  expected, _ = jax.jit(one_device.update)(grads, one_device.init(params),
                                           params)
  sharded = od.scale_by_orth_dion(rank=4, weight_dimension_numbers=numbers,
                                  mesh=mesh)
  with jax.set_mesh(mesh):
    sharded_params = put(params)
    got, _ = jax.jit(sharded.update)(put(grads), jax.jit(sharded.init)(
        sharded_params), sharded_params)
  for name in shapes:
    np.testing.assert_allclose(np.asarray(got[name]), expected[name],
                               rtol=2e-5, atol=1e-6, err_msg=name)
