"""Compressed data parallelism: each replica keeps its own momentum.

Plain data parallelism all-reduces every gradient: ``m n`` numbers per matrix
and step. Dion's power iteration is linear in the buffer, so the replicas can
instead keep their own gradient and momentum ``B_i = M_i + G_i`` and average
only the two thin products (docs/design.md, "What crosses devices")::

    P = orth(mean_i B_i Q)     # (big x r) all-reduce
    R = mean_i B_i^T P         # (small x r) all-reduce
    M_i <- B_i - (1 - mu) P R^T

The update ``P Q^T`` is the same on every replica and equals the one computed
from the averaged gradient; so does the replicas' mean momentum, which is all
that later steps depend on. ``(m + n) r`` numbers cross the data axis instead
of ``m n``.

The training step (gradients are never averaged by hand or by the compiler)::

    tx = orth_dion(lr, mesh=mesh, data_axis="data")
    grad_fn = per_replica_value_and_grad(loss_fn, mesh, data_axis="data")

    @jax.jit
    def train_step(params, opt_state, batch):
      loss, grads = grad_fn(params, batch)   # leaves: (replicas, *shape)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

Matrices that would not compress (``(m + n) r >= m n``) and the AdamW leaves
fall back to averaging their gradient.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from orth_dion_jax import sharding


class ReplicaMomenta(NamedTuple):
  """Per-replica momenta of one matrix under compressed data parallelism.

  ``per_replica`` has shape ``(replicas, *param.shape)`` and is sharded over
  the data axis: replica ``i`` keeps ``M_i`` and never sends it. The
  parameter update depends only on the replicas' mean, so
  ``average_replica_momenta`` may replace them by it at any time.
  """
  per_replica: jax.Array


def _constrain(x: jax.Array, mesh, data_axis: str) -> jax.Array:
  """Leading axis over ``data_axis``, the rest left to the compiler, on a
  mesh with Auto axes; on an Explicit mesh the types already say so (the
  batch is split over the data axis and vmap keeps it there)."""
  rest = [PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)
  if sharding.has_auto_axes(mesh):
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, PartitionSpec(data_axis, *rest)))
  return x


def per_replica_value_and_grad(
    fun: Callable[..., Any],
    mesh: jax.sharding.Mesh,
    data_axis: str = "data",
    *,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
  """``jax.value_and_grad`` of ``fun(params, batch, *args)`` per replica.

  The batch's leading axis (sharded over ``data_axis``) is split into one
  slice per replica, and each replica differentiates ``fun`` on its own
  slice. Gradients come back with a leading replica axis,
  ``(replicas, *param.shape)``, sharded over ``data_axis``: nothing is
  averaged, so no gradient all-reduce is compiled. Feed them to an optimizer
  built with the same ``data_axis``.

  Args:
    fun: the loss, ``fun(params, batch, *args) -> scalar`` (or
      ``(scalar, aux)`` with ``has_aux``); a per-example mean.
    mesh: the mesh.
    data_axis: the mesh axis the batch is split over.
    has_aux: as in ``jax.value_and_grad``.

  Returns:
    A function ``(params, batch, *args) -> (value, grads)``; ``value`` is the
    replicas' mean loss (the whole batch's mean loss), ``aux`` is per replica.
  """
  replicas = sharding.replica_count(mesh, data_axis)
  value_and_grad = jax.value_and_grad(fun, has_aux=has_aux)

  def split(path, x):
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] % replicas:
      raise ValueError(
          f"batch{jax.tree_util.keystr(path)}: its leading axis "
          f"{jnp.shape(x)[:1]} does not split into {replicas} replicas.")
    x = jnp.reshape(x, (replicas, -1) + jnp.shape(x)[1:])
    return _constrain(x, mesh, data_axis)

  def wrapped(params, batch, *args):
    batch = jax.tree_util.tree_map_with_path(split, batch)
    value, grads = jax.vmap(
        value_and_grad, in_axes=(None, 0) + (None,) * len(args))(
            params, batch, *args)
    grads = jax.tree.map(lambda g: _constrain(g, mesh, data_axis), grads)
    if has_aux:
      loss, aux = value
      return (jnp.mean(loss), aux), grads
    return jnp.mean(value), grads

  return wrapped


def average_replicas() -> optax.GradientTransformation:
  """Averages the leading replica axis away: the plain gradient all-reduce.

  What ``orth_dion(..., data_axis=...)`` puts in front of the AdamW leaves.
  """
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), updates), state

  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), update_fn)


def average_replica_momenta(state: Any) -> Any:
  """``state`` with every replica's momentum replaced by the replicas' mean.

  Exact: later updates depend on the momenta only through their mean. Call it
  before a checkpoint so that the saved momentum is the one a restart on any
  number of replicas would use, and so that replicas restarted from it agree.
  Shapes and shardings are kept.
  """
  def average(x):
    if isinstance(x, ReplicaMomenta):
      m = x.per_replica
      mean = jnp.mean(m.astype(jnp.float32), axis=0, keepdims=True)
      # Adding to zeros shaped (and sharded) like m keeps m's layout.
      spread = jnp.zeros_like(m, dtype=jnp.float32) + mean
      return ReplicaMomenta(spread.astype(m.dtype))
    return x
  return jax.tree.map(average, state,
                      is_leaf=lambda x: isinstance(x, ReplicaMomenta))
