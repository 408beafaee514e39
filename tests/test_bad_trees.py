"""Trees a user may hand the optimizers, and what each one gets.

Either the optimizer does what ``optax.adamw`` would (a tree with no matrix, a Python float leaf,
a complex or integer leaf under the default routing), or it raises an error naming the argument
and the parameter's path. And the updates come out in the parameters' dtypes, as optax's do.
"""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import orth_dion_jax as od
from orth_dion_jax import DionDimensionNumbers as D


@pytest.mark.parametrize("params", [{}, {"b": jnp.zeros(3)}, {"s": jnp.float32(2.0)},
                                    {"w": jnp.ones((2, 3, 4)), "b": jnp.ones(4)}],
                         ids=["empty", "bias", "scalar", "no-default-matrix"])
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_a_tree_without_matrices_steps_like_adamw(params, jitted):
  tx = od.orth_dion(0.1, weight_decay=0.0, adam_weight_decay=0.0, adam_b1=0.9, adam_b2=0.999)
  adamw = optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  update = jax.jit(tx.update) if jitted else tx.update
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  three_d = any(jnp.ndim(x) > 2 for x in jax.tree.leaves(params))
  # A 3-D leaf the default sends to AdamW is named in a warning at init.
  with (pytest.warns(UserWarning, match=r"\['w'\] of shape \(2, 3, 4\)") if three_d
        else contextlib.nullcontext()):
    state = tx.init(params)
  updates, _ = update(grads, state, params)
  expected, _ = adamw.update(grads, adamw.init(params), params)
  chex.assert_trees_all_close(updates, expected, rtol=1e-6)


def test_python_float_leaves_go_to_adamw():
  params = {"w": jnp.ones((16, 32)), "s": 1.0}
  tx = od.orth_dion(0.1)
  updates, _ = tx.update({"w": jnp.ones((16, 32)), "s": 1.0}, tx.init(params), params)
  assert np.isfinite(updates["s"]) and updates["s"] != 0


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int32])
def test_non_real_float_matrices_go_to_adamw_by_default(dtype):
  params = {"w": jnp.ones((16, 32), dtype), "v": jnp.ones((16, 32))}
  routes = {r.path: r.route for r in od.routing_summary(params)}
  assert routes == {"['v']": "low_rank", "['w']": "adam"}


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int32])
def test_non_real_float_matrix_sent_to_low_rank_is_refused_with_its_path(dtype):
  with pytest.raises(ValueError, match=r"\['w'\].*real floating-point.*" + jnp.dtype(dtype).name):
    od.scale_by_orth_dion().init({"w": jnp.ones((16, 32), dtype)})


def test_complex_gradients_keep_their_imaginary_part_on_adamw():
  w = jnp.ones((8, 16), jnp.complex64)
  tx = od.orth_dion(0.1)
  updates, _ = tx.update({"w": (1 + 1j) * jnp.ones((8, 16))}, tx.init({"w": w}), {"w": w})
  assert float(jnp.max(jnp.abs(updates["w"].imag))) > 0


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(weight_dimension_numbers={"w": D(0.0, 1.0), "v": None}), ValueError,
     r"\['w'\]: reduction_axis must be an int"),
    (dict(weight_dimension_numbers={"w": "kernel", "v": None}), TypeError,
     r"weight_dimension_numbers\['w'\]: entries must be DionDimensionNumbers"),
    (dict(weight_dimension_numbers={"w": D()}), ValueError,
     r"weight_dimension_numbers does not match the parameters: .*\['v'\]"),
    (dict(param_labels={"w": "adam"}), ValueError,
     r"param_labels does not match the parameters: .*\['v'\]"),
    (dict(param_labels={"w": "adam", "v": "low_rank"}, weight_dimension_numbers={"w": None,
                                                                                "v": D()}),
     TypeError, r"param_labels or weight_dimension_numbers, not both"),
    (dict(layer_axes=1, weight_dimension_numbers={"w": None, "v": D()}), TypeError,
     r"layer_axes applies to the default"),
    (dict(mesh="data"), TypeError, r"mesh must be a jax.sharding.Mesh"),
    (dict(layer_axes=-1), ValueError, r"layer_axes must be >= 0"),
], ids=["float-axes", "string-entry", "dims-missing-leaf", "labels-missing-leaf",
        "labels-and-dims", "layer-axes-and-dims", "mesh-string", "negative-layer-axes"])
def test_bad_routing_arguments_name_the_argument(kwargs, error, pattern):
  params = {"w": jnp.ones((16, 32)), "v": jnp.ones((16, 32))}
  with pytest.raises(error, match=pattern):
    od.orth_dion(0.1, **kwargs).init(params)


def test_a_vector_labelled_low_rank_says_how_to_route_it():
  with pytest.raises(ValueError, match=r"\['v'\]: a leaf of shape \(4,\) has no default "
                                       r"dimension numbers.*label 'adam'"):
    od.orth_dion(0.1, param_labels={"v": "low_rank"}).init({"v": jnp.ones(4)})


@pytest.mark.parametrize("param_dtype,grad_dtype", [(jnp.float32, jnp.bfloat16),
                                                    (jnp.bfloat16, jnp.bfloat16),
                                                    (jnp.float32, jnp.float32)])
def test_updates_come_in_the_parameters_dtype_like_adamw(param_dtype, grad_dtype):
  params = {"w": jnp.ones((16, 32), param_dtype), "b": jnp.ones(32, param_dtype)}
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, grad_dtype), params)
  tx, adamw = od.orth_dion(0.1), optax.adamw(0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected, _ = adamw.update(grads, adamw.init(params), params)
  assert updates["w"].dtype == expected["w"].dtype
  assert updates["b"].dtype == expected["b"].dtype


def test_param_specs_that_contradict_the_arrays_are_refused():
  """A wrong spec trains correctly but replicates the state or gathers whole weights."""
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  params = {"w": jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P("fsdp", "tensor")))}
  for wrong in (P(), P("tensor", "fsdp")):
    with pytest.raises(ValueError, match=r"\['w'\]: param_specs gives it .*, but the array is "
                                         r"sharded as"):
      od.orth_dion(0.1, mesh=mesh, param_specs={"w": wrong}).init(params)
  od.orth_dion(0.1, mesh=mesh, param_specs={"w": P("fsdp", "tensor")}).init(params)


def test_auto_mesh_with_mesh_but_no_specs_asks_for_param_specs_only():
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  params = {"w": jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P("fsdp", "tensor")))}
  with pytest.raises(ValueError, match=r"\['w'\]: .*Auto axes.*Pass param_specs="):
    jax.jit(od.orth_dion(0.1, mesh=mesh).init)(params)
