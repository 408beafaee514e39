"""Where the weights live, and the ``shard_map`` that runs the step there.

Three questions, answered while tracing:

* Which mesh? ``Placement.mesh`` when given. Otherwise the one the
  parameters carry: a concrete array's ``NamedSharding``, or under ``jit`` the
  sharding in its type (a mesh with ``Explicit`` axes). A mesh with ``Auto``
  axes records no sharding in the types, so under ``jit`` the optimizer could
  only guess, and a wrong guess costs about twice the bytes per step (the
  compiler gathers what the step would only have summed): that is an error
  asking for ``mesh=`` and ``param_specs=``, raised at ``init`` already.
  No mesh: the step runs on whole arrays.
* How is each weight split? ``param_specs`` (matched by path) or the same
  shardings; ``sharding.leaf_plan`` turns each into the collectives of its
  step and the ``PartitionSpec`` of each state leaf.
* Where does the step run? ``sharded_step`` runs ``matrix_step.step_matrices``
  inside one ``jax.shard_map`` over the mesh, each device on its blocks.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from orth_dion_jax import nnx_interop
from orth_dion_jax import sharding
from orth_dion_jax.collectives import Collectives
from orth_dion_jax.data_parallel import ReplicaMomenta
from orth_dion_jax.matrix_view import MatrixView
from orth_dion_jax.matrix_step import MatrixStep, StepInputs
from orth_dion_jax.settings import Placement

Array = jax.Array
Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh


def _auto_mesh_error(path: str, mesh: Mesh, mesh_given: bool) -> ValueError:
  missing = "param_specs=" if mesh_given else "mesh= and param_specs="
  return ValueError(
      f"{path}: the parameters are sharded over a mesh with Auto axes "
      f"{tuple(mesh.axis_names)}, which under jit (where update runs) does "
      "not record how a parameter is sharded, so the optimizer cannot follow "
      f"it. Pass {missing} (a tree of PartitionSpec like the parameters, "
      "e.g. nnx.get_partition_spec(state)), or make the mesh with Explicit "
      "axes (the jax.make_mesh default).")


def _carried_mesh(x: Any) -> Mesh | None:
  """The mesh ``x`` may be sharded over, as far as ``x`` itself tells.

  A mesh of one device shards nothing and is ignored. Under jit an Auto
  mesh is returned whatever the spec its type shows, since that spec says
  nothing about the array's layout.
  """
  if isinstance(x, jax.core.Tracer):
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    return None if mesh is None or mesh.empty or mesh.size == 1 else mesh
  carried = getattr(x, "sharding", None)
  if isinstance(carried, NamedSharding) and not carried.is_fully_replicated:
    return carried.mesh
  return None


def resolve_mesh(placement: Placement, leaves: Sequence[tuple[str, Any]]
                 ) -> Mesh | None:
  """The mesh the step runs over (see the module docstring), or None.

  Raises:
    ValueError: naming a parameter's path, when the parameters sit on two
      different meshes, or on a mesh with Auto axes without ``mesh=``.
  """
  if placement.mesh is not None:
    return placement.mesh
  found = None
  for path, x in leaves:
    mesh = _carried_mesh(x)
    if mesh is None:
      continue
    if sharding.has_auto_axes(mesh):
      raise _auto_mesh_error(path, mesh, mesh_given=False)
    if found is not None and mesh.abstract_mesh != found[1].abstract_mesh:
      raise ValueError(
          f"{path}: it is sharded over the mesh {mesh.abstract_mesh}, but "
          f"{found[0]} over {found[1].abstract_mesh}; the optimizer needs "
          "every weight on one mesh.")
    found = found or (path, mesh)
  return None if found is None else found[1]


def _spec_of(x: PartitionSpec | NamedSharding | None) -> PartitionSpec | None:
  return x.spec if isinstance(x, NamedSharding) else x


def _carried_spec(x: Any, path: str, mesh: Mesh,
                  leading_replica_axis: bool) -> PartitionSpec | None:
  """The ``PartitionSpec`` ``x`` carries (its type's or its array's), or
  None where it does not tell: under jit on a mesh with Auto axes, and for
  an array without a ``NamedSharding`` (on one device: replicated)."""
  spec = None
  if isinstance(x, jax.core.Tracer):
    if not sharding.has_auto_axes(mesh):
      spec = getattr(jax.typeof(x).sharding, "spec", PartitionSpec())
  else:
    carried = getattr(x, "sharding", None)
    if isinstance(carried, NamedSharding):
      spec = carried.spec
    elif carried is not None and not carried.is_fully_replicated:
      raise ValueError(f"{path}: its sharding {carried} is not a "
                       "NamedSharding; pass param_specs.")
  if spec is not None and leading_replica_axis:
    spec = PartitionSpec(*tuple(spec)[1:])
  return spec


def leaf_plans(placement: Placement, mesh: Mesh,
               leaves: Sequence[tuple[str, Any]], views: Sequence[MatrixView],
               tree: Any, per_replica: bool) -> list[sharding.LeafPlan]:
  """Each leaf's plan; its spec from ``param_specs`` or from the array."""
  carried = [_carried_spec(x, path, mesh, per_replica) for path, x in leaves]
  if placement.param_specs is None:
    specs = []
    for (path, x), spec in zip(leaves, carried):
      if spec is None and isinstance(x, jax.core.Tracer):
        raise _auto_mesh_error(path, mesh, mesh_given=True)
      specs.append(PartitionSpec() if spec is None else spec)
  else:
    given = nnx_interop.unboxed(
        placement.param_specs(tree) if callable(placement.param_specs)
        else placement.param_specs)
    # Matched by path, so the specs of all parameters also serve a subtree
    # (the low-rank leaves that optax.partition hands on).
    flat, _ = jax.tree_util.tree_flatten_with_path(
        given, is_leaf=lambda x: x is None or isinstance(
            x, (PartitionSpec, NamedSharding)))
    by_path = {jax.tree_util.keystr(p): _spec_of(x) for p, x in flat}
    specs = []
    for path, _ in leaves:
      if path not in by_path:
        raise ValueError(f"{path}: param_specs has no entry for it.")
      specs.append(by_path[path])
  plans = [sharding.leaf_plan(v, s, mesh, placement.data_axis)
           for v, s in zip(views, specs)]
  if placement.param_specs is not None:
    for (path, x), given, spec in zip(leaves, specs, carried):
      _check_given_spec(path, jnp.ndim(x) - per_replica, given, spec)
  return plans


def _check_given_spec(path: str, ndim: int, given: PartitionSpec | None,
                      carried: PartitionSpec | None) -> None:
  """A spec in ``param_specs`` agrees with the array's own, where it has one.

  A wrong spec gives correct numbers but replicates the state or gathers
  whole weights every step (several times the bytes): refuse it while the
  array can still tell.
  """
  if carried is None:
    return
  normalize = lambda s: sharding.normalized_spec(s, ndim, path)
  if normalize(given) != normalize(carried):
    raise ValueError(
        f"{path}: param_specs gives it {given}, but the array is sharded as "
        f"{carried}. Give the spec the parameter has (for NNX, "
        "nnx.get_partition_spec reads the partitioning metadata, not where "
        "jax.device_put put an array).")


def place(x: Array, mesh: Mesh, spec: PartitionSpec) -> Array:
  """``x`` laid out as ``spec`` over ``mesh`` (eagerly or under jit)."""
  if isinstance(x, jax.core.Tracer):
    if sharding.has_auto_axes(mesh):
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return jax.device_put(x, NamedSharding(mesh, spec))


def _placed(xs: Sequence[Any], specs: Sequence[Any], mesh: Mesh) -> list[Any]:
  return [x if s is None else place(x, mesh, s) for x, s in zip(xs, specs)]


def energy_spec(plan: sharding.LeafPlan) -> PartitionSpec:
  """An r x r matrix per matrix: sharded like the batch, whole inside."""
  return PartitionSpec(*plan.batch_spec, None, None)


def sharded_step(step: Callable[[Sequence[Collectives], StepInputs],
                                list[MatrixStep]],
                 plans: Sequence[sharding.LeafPlan], mesh: Mesh,
                 inputs: StepInputs, *, per_replica: bool) -> list[MatrixStep]:
  """Runs ``step(collectives, inputs)`` in ``jax.shard_map``: each device on
  its blocks, with each weight's collectives from its plan.

  In compressed mode a matrix that does not compress falls back to the plain
  gradient all-reduce (the replica mean) before the step; the others enter
  with one gradient and momentum per replica (``per_replica``: the
  gradients carry a leading replica axis).
  """
  compressed = [p.compressed for p in plans]
  grads = [g if c or not per_replica else jnp.mean(g, axis=0)
           for g, c in zip(inputs.grads, compressed)]
  momenta = [m.per_replica if isinstance(m, ReplicaMomenta) else m
             for m in inputs.momenta]
  scalar = PartitionSpec()
  specs = StepInputs(
      grads=[p.momentum_spec for p in plans],
      momenta=[None if m is None else p.momentum_spec
               for m, p in zip(momenta, plans)],
      right_factors=[p.right_factor_spec for p in plans],
      nonfinite_counts=[p.batch_spec for p in plans],
      count=scalar, eps=scalar,
      decays=None if inputs.decays is None else (scalar, scalar),
      effective_ranks=(None if inputs.effective_ranks is None
                       else [p.batch_spec for p in plans]),
      right_energies=(None if inputs.right_energies is None
                      else [energy_spec(p) for p in plans]))
  adaptive = inputs.effective_ranks is not None
  inputs = inputs._replace(
      grads=_placed(grads, specs.grads, mesh),
      momenta=_placed(momenta, specs.momenta, mesh),
      right_factors=_placed(inputs.right_factors, specs.right_factors, mesh),
      nonfinite_counts=_placed(inputs.nonfinite_counts,
                               specs.nonfinite_counts, mesh))
  if adaptive:
    inputs = inputs._replace(
        effective_ranks=_placed(inputs.effective_ranks,
                                specs.effective_ranks, mesh),
        right_energies=_placed(inputs.right_energies, specs.right_energies,
                               mesh))

  def local(inputs: StepInputs) -> list[MatrixStep]:
    # A per-replica block carries a leading replica axis of length 1.
    inputs = inputs._replace(
        grads=[g[0] if c else g for g, c in zip(inputs.grads, compressed)],
        momenta=[m[0] if c and m is not None else m
                 for m, c in zip(inputs.momenta, compressed)])
    results = step([p.collectives for p in plans], inputs)
    return [r._replace(momentum=r.momentum[None])
            if c and r.momentum is not None else r
            for r, c in zip(results, compressed)]

  out_specs = [
      MatrixStep(update=p.weight_spec, momentum=m, right_factor=q,
                 captured_fraction=p.batch_spec, alignment=p.batch_spec,
                 nonfinite_count=p.batch_spec,
                 effective_rank=p.batch_spec if adaptive else None,
                 right_energy=energy_spec(p) if adaptive else None)
      for p, m, q in zip(plans, specs.momenta, specs.right_factors)]
  results = jax.shard_map(local, mesh=mesh, in_specs=(specs,),
                          out_specs=out_specs, check_vma=False)(inputs)
  return [r._replace(momentum=ReplicaMomenta(r.momentum))
          if c and r.momentum is not None else r
          for r, c in zip(results, compressed)]
