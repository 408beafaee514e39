"""From a tree of weights to a list of matrices, and the checks on the way.

The transformations see a tree of gradients (or parameters); the step sees a
list of leaves, each with its path (for error messages) and the dimension
numbers that make it a batch of matrices (``matrix_view``). This module does
that flattening, broadcasting a dimension-numbers tree that is a prefix of the
weights, and checks that what ``update`` is given is what ``init`` saw: a
gradient of another shape that still fits the momentum after a reshape would
silently scramble it, so it is refused with its path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from orth_dion_jax import matrix_view
from orth_dion_jax.data_parallel import ReplicaMomenta
from orth_dion_jax.matrix_view import DionDimensionNumbers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Boxed:
  """Opaque box so dimension numbers survive a tree flatten as one leaf."""
  dims: DionDimensionNumbers | None


def dimension_numbers(tree: Any, weight_dimension_numbers: Any,
                      layer_axes: int) -> list[DionDimensionNumbers | None]:
  """Each leaf's dimension numbers, in ``jax.tree.leaves`` order.

  ``weight_dimension_numbers`` is a tree (or a callable of ``tree``) that may
  be a prefix of ``tree``: an entry applies to its whole subtree. None gives
  every leaf the default (``matrix_view.default_dimension_numbers``).
  """
  given = (weight_dimension_numbers(tree) if callable(weight_dimension_numbers)
           else weight_dimension_numbers)
  if given is None:
    return [matrix_view.default_dimension_numbers(jnp.ndim(x), layer_axes)
            for x in jax.tree.leaves(tree)]
  for path, d in jax.tree_util.tree_flatten_with_path(
      given, is_leaf=matrix_view.is_dimension_numbers_leaf)[0]:
    if not matrix_view.is_dimension_numbers_leaf(d):
      raise TypeError(
          f"weight_dimension_numbers{jax.tree_util.keystr(path)}: entries must "
          f"be DionDimensionNumbers (or MuonDimensionNumbers) or None, got "
          f"{d!r}.")
  broadcast = prefix_map(
      lambda d, sub: jax.tree.map(lambda _: _Boxed(d), sub), given, tree,
      "weight_dimension_numbers", matrix_view.is_dimension_numbers_leaf)
  return [b.dims for b in jax.tree.leaves(
      broadcast, is_leaf=lambda x: isinstance(x, _Boxed))]


def prefix_map(fn, prefix: Any, tree: Any, what: str, is_leaf) -> Any:
  """``jax.tree.map(fn, prefix, tree)`` for a ``prefix`` of ``tree``, or an
  error that names ``what`` and a path the two do not share."""
  try:
    return jax.tree.map(fn, prefix, tree, is_leaf=is_leaf)
  except (ValueError, TypeError) as e:
    entries = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(prefix, is_leaf=is_leaf)[0]}
    leaves = [jax.tree_util.keystr(p) for p, _ in
              jax.tree_util.tree_flatten_with_path(tree)[0]]
    missing = [p for p in leaves if not any(p.startswith(e) for e in entries)]
    detail = (f"it has no entry for {missing[0]}" if missing else
              "its structure is not a prefix of the parameters'")
    raise ValueError(f"{what} does not match the parameters: {detail}. Give "
                     "one entry per parameter (or per subtree).") from e


def matrix_leaves(tree: Any, weight_dimension_numbers: Any, layer_axes: int
                  ) -> tuple[list[tuple[str, Array]], list[Any], Any]:
  """``(path, leaf)`` pairs, their dimension numbers and the treedef.

  Raises:
    ValueError: naming the path of a leaf that has no dimension numbers.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  dims = dimension_numbers(tree, weight_dimension_numbers, layer_axes)
  paths = [(jax.tree_util.keystr(p), x) for p, x in leaves_with_path]
  for (path, x), d in zip(paths, dims):
    dtype = jnp.dtype(x.dtype if hasattr(x, "dtype") else jnp.result_type(x))
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{path}: the low-rank step needs a real floating-point weight, "
          f"got {dtype.name}; route it to AdamW (the label "
          "'adam', or None in weight_dimension_numbers).")
    if d is not None:
      continue
    if weight_dimension_numbers is None:
      stacked = (f", and {2 + layer_axes}-D ones with layer_axes={layer_axes}"
                 if layer_axes else "")
      raise ValueError(
          f"{path}: a leaf of shape {jnp.shape(x)} has no default dimension "
          f"numbers (only 2-D (fan_in, fan_out) leaves{stacked} do). Give it "
          "DionDimensionNumbers in weight_dimension_numbers, or route it to "
          "AdamW (the label 'adam').")
    raise ValueError(
        f"{path}: its weight_dimension_numbers entry is None (AdamW), but it "
        "was sent to the low-rank transformation. Mask it out (optax.partition"
        " or the orth_dion alias) before this transformation.")
  return paths, dims, treedef


def without_replica_axis(tree: Any, replicas: int | None) -> Any:
  """The weights' shapes: in compressed mode, without the replica axis."""
  if replicas is None:
    return tree

  def strip(path, g):
    if jnp.ndim(g) < 1 or jnp.shape(g)[0] != replicas:
      raise ValueError(
          f"{jax.tree_util.keystr(path)}: with data_axis set, gradients "
          f"carry a leading axis of {replicas} replicas (see "
          f"per_replica_value_and_grad); got shape {jnp.shape(g)}.")
    return jax.ShapeDtypeStruct(jnp.shape(g)[1:], g.dtype)
  return jax.tree_util.tree_map_with_path(strip, tree)


def flatten_like(updates: Any, tree: Any, what: str) -> list[Any]:
  """``tree``'s subtrees at the leaves of ``updates``, or an error naming
  a path that only one of them has."""
  try:
    return jax.tree.structure(updates).flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    paths = lambda t: {jax.tree_util.keystr(p) for p, _ in
                       jax.tree_util.tree_flatten_with_path(
                           t, is_leaf=lambda x: isinstance(x, ReplicaMomenta)
                       )[0]}
    given, held = paths(updates), paths(tree)
    extra = sorted(given ^ held)
    detail = (f"{extra[0]} is only in "
              f"{'the gradients' if extra[0] in given else what}" if extra
              else "their containers differ")
    raise ValueError(
        f"The gradient tree does not match {what}, which init built from "
        f"the parameters: {detail}.") from e


def check_gradient_shapes(updates: Any, momentum: Any, params: Any,
                          replicas: int | None) -> None:
  """Each gradient leaf has the shape of the weight its state was made for.

  The momentum holds the weight's shape; without one (the low-rank step
  alone) the parameter does, when given. In compressed mode gradients carry
  a leading replica axis.
  """
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  if momentum is not None:
    source = "the momentum in the optimizer state"
    weights = [m.per_replica.shape[1:] if isinstance(m, ReplicaMomenta)
               else jnp.shape(m)
               for m in flatten_like(updates, momentum, source)]
  elif params is not None:
    source = "the parameter"
    weights = [jnp.shape(p) for p in flatten_like(updates, params, source)]
  else:
    return
  leading = () if replicas is None else (replicas,)
  hint = ("" if replicas is None else "; with data_axis set, gradients carry "
          f"a leading axis of {replicas} replicas (see "
          "per_replica_value_and_grad)")
  for (path, g), weight in zip(flat, weights):
    expected = leading + tuple(weight)
    if jnp.shape(g) != expected:
      raise ValueError(
          f"{jax.tree_util.keystr(path)}: the gradient has shape "
          f"{jnp.shape(g)}, but {source} expects {expected}{hint}.")


def check_right_factors(updates: Any, paths, views, right_factors: Any,
                        right_energies: Any = None,
                        effective_ranks: Any = None) -> None:
  """The right factors held are those these gradients' shapes imply, and an
  adaptive state's energy Grams match their ranks.

  Catches what ``check_gradient_shapes`` cannot see without a momentum or
  the parameters: a gradient whose matrix differs from the one init saw.
  """
  held = flatten_like(updates, right_factors, "the optimizer state")
  energies = ([None] * len(held) if right_energies is None else
              flatten_like(updates, right_energies, "the optimizer state"))
  estimates = ([None] * len(held) if effective_ranks is None else
               flatten_like(updates, effective_ranks, "the optimizer state"))
  for (path, _), view, q, g, e in zip(paths, views, held, energies,
                                      estimates):
    if jnp.shape(q) != view.right_factor_shape:
      raise ValueError(
          f"{path}: the gradient's shape implies a right factor of shape "
          f"{view.right_factor_shape}, but the optimizer state holds one of "
          f"shape {jnp.shape(q)}: init was given a weight of another shape"
          + ("" if right_energies is not None else ", or the state's rank "
             "was resized (resize_ranks) and this optimizer does not have "
             "adaptive_rank=True") + ".")
    if e is not None and jnp.shape(e) != view.batch_shape:
      raise ValueError(
          f"{path}: the optimizer state's effective rank has shape "
          f"{jnp.shape(e)}, not the weight's batch shape {view.batch_shape}.")
    expected = view.batch_shape + (view.rank, view.rank)
    if g is not None and jnp.shape(g) != expected:
      raise ValueError(
          f"{path}: the right factor has rank {view.rank}, but its energy "
          f"Gram in the optimizer state has shape {jnp.shape(g)}, not "
          f"{expected}: resize a rank with orth_dion_jax.resize_ranks, which "
          "changes both.")
