"""The optax transformations that carry Dion / Orth-Dion state.

Two composable pieces share one per-matrix implementation:

* ``scale_by_low_rank_orthogonalization(compressor)``: the low-rank step alone.
  It maps each buffer ``B`` to ``s * P Q^T`` and carries only the right factor
  ``Q``. Chain it after any momentum (e.g. ``optax.trace``).
* ``scale_by_error_feedback(compressor, ...)``: wraps the same compressor with
  Dion's momentum and error feedback ``M <- a (B - P R^T) + c P R^T``. With
  ``(a, c) = (1, mu)`` it is the reference mu-form, with ``(beta, 0)`` the
  paper's beta-form.

``scale_by_orth_dion`` is the mu-form with a QR right factor; ``dion`` uses the
column-normalized one (``right_factor="column"``).

Non-finite values: a matrix whose gradient, schedule values, buffer, factors
or new momentum is not finite is skipped for that step (zero update, right
factor kept) and counted in ``nonfinite_count``; the other matrices step
normally. Its momentum is kept when the gradient or a schedule was the cause
and reset to zero when the buffer itself was not finite (``_finish``).

Sharding: given ``mesh``, the step of every matrix runs inside one
``jax.shard_map`` over the mesh, on each device's blocks, with the
collectives ``sharding.leaf_plan`` derives from each weight's
``PartitionSpec``; the same per-matrix code runs on one device with no
collectives.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from optax import tree as optax_tree

from orth_dion_jax import low_rank
from orth_dion_jax import matrix_view
from orth_dion_jax import nonfinite
from orth_dion_jax import sharding
from orth_dion_jax import validation
from orth_dion_jax.collectives import Collectives
from jax.sharding import PartitionSpec
from orth_dion_jax.matrix_view import DionDimensionNumbers

Array = jax.Array
DimensionNumbersTree = Any   # tree of DionDimensionNumbers | None, or callable
ScalarOrSchedule = optax.ScalarOrSchedule


class LowRankState(NamedTuple):
  """State of ``scale_by_low_rank_orthogonalization``."""
  count: Array                # (), int32: steps taken
  right_factor: optax.Updates  # per matrix: batch + (min(fan_in, fan_out), r), f32
  captured_fraction: optax.Updates  # per matrix: batch shape, f32
  nonfinite_count: optax.Updates    # per matrix: batch shape, int32 skipped steps


class ReplicaMomenta(NamedTuple):
  """Per-replica momenta of one matrix under compressed data parallelism.

  ``per_replica`` has shape ``(replicas, *param.shape)`` and is sharded over
  the data axis: replica ``i`` keeps ``M_i`` and never sends it. The
  parameter update depends only on the replicas' mean (docs/design.md,
  "What crosses devices"), so ``average_replica_momenta`` may replace them by it at any time.
  """
  per_replica: Array


class OrthDionState(NamedTuple):
  """State of ``scale_by_orth_dion`` / ``scale_by_error_feedback``."""
  count: Array                # (), int32: steps taken
  momentum: optax.Updates     # like params, momentum_dtype (or param dtype);
                              # ReplicaMomenta leaves in compressed mode
  right_factor: optax.Updates  # per matrix: batch + (min(fan_in, fan_out), r), f32
  captured_fraction: optax.Updates  # per matrix: batch shape, f32
  nonfinite_count: optax.Updates    # per matrix: batch shape, int32 skipped steps


@dataclasses.dataclass(frozen=True)
class LowRankCompressor:
  """The low-rank orthonormalized step's static configuration.

  Attributes:
    rank_fraction: r = ceil(rank_fraction * min(fan_in, fan_out)).
    rank: explicit rank; overrides ``rank_fraction`` (clipped to the matrix).
    rank_multiple_of: r is rounded up to a multiple of this.
    right_factor: ``"qr"`` (Orth-Dion) or ``"column"`` (Dion).
    orthogonalize: ``"householder"``, ``"cholesky_qr"`` or
      ``"randomized_cholesky_qr"``.
    power_iters: power iterations per step (1 in the papers).
    eps: Dion's column-normalization epsilon (may be an array or schedule).
    scale: ``"spectral"`` (sqrt(fan_out/fan_in)), ``"rms"``
      (0.2 sqrt(max(fan_in, fan_out))), a float, or None (1).
    seed: seeds the initial right factors and randomized sketches; the same
      seed gives the same factors on every replica and host.
  """
  rank_fraction: float = 0.25
  rank: int | None = None
  rank_multiple_of: int = 1
  right_factor: low_rank.RightFactor = "qr"
  orthogonalize: str = "cholesky_qr"
  power_iters: int = 1
  eps: ScalarOrSchedule = 1e-8
  scale: matrix_view.Scale = "spectral"
  seed: int = 0

  def __post_init__(self):
    validation.check_rank_arguments(self.rank, self.rank_fraction,
                                    self.rank_multiple_of)
    validation.check_choice("right_factor", self.right_factor,
                            low_rank.RIGHT_FACTORS)
    validation.check_choice("orthogonalize", self.orthogonalize,
                            ("householder", "cholesky_qr",
                             "randomized_cholesky_qr"))
    validation.check_positive_int("power_iters", self.power_iters)
    validation.check_seed(self.seed)
    validation.check_scale(self.scale)
    validation.check_nonnegative("eps", self.eps)

  @property
  def step_config(self) -> low_rank.LowRankConfig:
    return low_rank.LowRankConfig(
        right_factor=self.right_factor, orthogonalize=self.orthogonalize,
        power_iters=self.power_iters)

  def spec(self, path: str, shape, dims: DionDimensionNumbers
           ) -> matrix_view.MatrixSpec:
    return matrix_view.matrix_spec(
        path, tuple(shape), dims, rank=self.rank,
        rank_fraction=self.rank_fraction,
        rank_multiple_of=self.rank_multiple_of, scale=self.scale)


def _leaf_paths_and_dims(
    tree: Any, weight_dimension_numbers: DimensionNumbersTree
) -> tuple[list[tuple[str, Array]], list[DionDimensionNumbers], Any]:
  """Flattens ``tree`` and pairs each array leaf with its dimension numbers."""
  dims_tree = (weight_dimension_numbers(tree)
               if callable(weight_dimension_numbers)
               else weight_dimension_numbers)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if dims_tree is None:
    dims = [DionDimensionNumbers()] * len(leaves_with_path)
  else:
    # dims_tree may be a prefix of tree: broadcast each entry over its subtree.
    broadcast = jax.tree.map(
        lambda d, sub: jax.tree.map(lambda _: _Dims(d), sub),
        dims_tree, tree, is_leaf=matrix_view.is_dimension_numbers_leaf)
    dims = [w.dims for w in jax.tree.leaves(
        broadcast, is_leaf=lambda x: isinstance(x, _Dims))]
  paths = [(jax.tree_util.keystr(p), x) for p, x in leaves_with_path]
  for (path, x), d in zip(paths, dims):
    if dims_tree is None and jnp.ndim(x) != 2:
      raise ValueError(
          f"{path}: a leaf of shape {jnp.shape(x)} cannot be treated as a "
          "matrix without weight_dimension_numbers (only 2-D (fan_in, fan_out) "
          "leaves have a default). Give it DionDimensionNumbers, or None to "
          "route it to AdamW.")
    if d is None:
      raise ValueError(
          f"{path}: its weight_dimension_numbers entry is None (AdamW), but it "
          "was sent to the low-rank transformation. Mask it out (optax.partition"
          " or the orth_dion alias) before this transformation.")
  return paths, dims, treedef


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Opaque box so dimension numbers survive a tree flatten as one leaf."""
  dims: DionDimensionNumbers | None


def _leaf_key(seed: int, index: int) -> Array:
  return jax.random.fold_in(jax.random.key(seed), index)


def _resolve(value: ScalarOrSchedule, count: Array):
  return value(count) if callable(value) else value


class _Prepared(NamedTuple):
  """A leaf in layout view, ready for the power iteration."""
  spec: matrix_view.MatrixSpec   # sizes of this device's block
  buffer: Array    # B = M + G (or G without momentum), (n, fan_in, fan_out)
  finite: Array    # (n,) bool: the gradient and the schedules are finite
  momentum_dtype: Any = None   # the new momentum's dtype (None: no momentum)


def _prepare(spec: matrix_view.MatrixSpec, grad: Array,
             momentum: Array | None, collectives: Collectives,
             schedules_finite: Array) -> _Prepared:
  g = spec.to_layout(grad)
  # A non-finite gradient (or schedule value) is dropped before it touches the
  # momentum: B = M, and _finish keeps that M. max|g| is NaN or Inf exactly
  # when some entry is: one reduction, no mask. Every block and replica must
  # agree on the flag.
  bad = ~jnp.isfinite(jnp.max(jnp.abs(g), axis=(-2, -1)))
  finite = ((collectives.everything.max(bad.astype(jnp.int32)) == 0)
            & schedules_finite)
  g = jnp.where(finite[:, None, None], g, 0)
  if momentum is None:
    return _Prepared(spec, g, finite)
  m = spec.to_layout(momentum)
  # B is held in float32 at least (or the momentum's wider dtype): with a
  # bfloat16 momentum that is the one weight-sized temporary per matrix, and
  # the products read it directly, where a bfloat16 B would be converted to
  # float32 once per product by backends without bfloat16 matmuls (XLA:CPU).
  dtype = jnp.promote_types(m.dtype, jnp.float32)
  return _Prepared(spec, m.astype(dtype) + g.astype(dtype), finite, m.dtype)


class _MatrixStep(NamedTuple):
  update: Array
  momentum: Array | None
  right_factor: Array
  captured_fraction: Array
  nonfinite_count: Array


def _finish(
    prepared: _Prepared,
    factors: low_rank.LowRankFactors,
    q: Array,
    q_finite: Array,
    nonfinite_count: Array,
    *,
    decays: tuple[Array, Array] | None,
    grad_dtype,
    collectives: Collectives,
) -> _MatrixStep:
  """Update, error feedback and new state of one leaf from its factors.

  The non-finite guard, per matrix: a step is taken only when its gradient
  and schedules (``prepared.finite``), ``B``, ``R`` and the new ``Q`` are
  finite and the new momentum fits its dtype. Otherwise the update is zero,
  ``Q`` is kept and the skip is counted. The momentum is kept when only the
  gradient or a schedule was bad (they never entered ``B``); when ``B``
  itself or its factors are not finite (a corrupt momentum, ``M + G``
  overflowing), it is reset to zero, since there is no finite momentum left
  to keep, and the next step starts the error feedback afresh. A carried
  ``Q`` that was not finite (``q_finite``) was replaced before the step and
  is counted as well.
  """
  spec, b, finite, momentum_dtype = prepared
  b_max = low_rank.largest_magnitude(b, collectives)
  # The new momentum a B - (a - c) P R^T is finite when B, P and R are; the
  # update P Q^T needs the new Q too.
  healthy = jnp.isfinite(b_max) & low_rank.all_finite(factors.projected,
                                                      collectives)
  if decays is not None:
    # A skipped matrix gets decays (1, 1): M' = B = M, unchanged.
    decays = tuple(jnp.where(finite, d, 1.0) for d in decays)
    if jnp.finfo(momentum_dtype).max < jnp.finfo(jnp.float32).max:
      healthy &= nonfinite.momentum_fits(b_max, factors, decays,
                                         momentum_dtype, collectives)
  step = (finite & healthy & low_rank.all_finite(factors.right, collectives)
          )[:, None, None]
  # Masks are selects in the elementwise pass that reads each product (a
  # multiplication by 0 would keep a NaN); neither a factor nor a
  # weight-sized array is copied to mask it. After B is formed nothing refers
  # to the old momentum, so B's buffer can become the new momentum in place.
  update = jnp.where(step, spec.scale * factors.moved * low_rank.outer(
      factors.left, factors.right, spec.small_axis), 0.0).astype(grad_dtype)
  new_q = jnp.where(step, factors.right, q)
  if decays is None:
    new_m = None
  else:
    residual_decay, captured_decay = (d[:, None, None] for d in decays)
    new_m = spec.from_layout(jnp.where(
        healthy[:, None, None],
        low_rank.error_feedback(
            b, factors, small_axis=spec.small_axis,
            residual_decay=residual_decay, captured_decay=captured_decay),
        0.0).astype(momentum_dtype))
  captured = jnp.where(
      step[:, 0, 0],
      low_rank.captured_fraction(b, factors, b_max, collectives), 0.0)
  return _MatrixStep(
      update=spec.from_layout(update),
      momentum=new_m,
      right_factor=new_q,
      captured_fraction=captured.reshape(spec.batch_shape),
      # A repaired right factor counts as a non-finite event too.
      nonfinite_count=nonfinite_count + (~(step[:, 0, 0] & q_finite)).reshape(
          spec.batch_shape).astype(jnp.int32),
  )


def _step(
    compressor: LowRankCompressor,
    matrices: Sequence[matrix_view.MatrixSpec],
    collectives: Sequence[Collectives],
    grads: Sequence[Array],
    momenta: Sequence[Array | None],
    right_factors: Sequence[Array],
    nonfinite_counts: Sequence[Array],
    count: Array,
    eps: Array,
    decays: tuple[Array, Array] | None,
) -> list[_MatrixStep]:
  """One step of every matrix, on whole arrays or on one device's blocks.

  ``matrices`` hold the whole weights' specs; each is localized to the block
  it is given (the identity on one device), and ``collectives`` complete the
  sums across blocks and replicas.
  """
  # A schedule value that is not finite skips every matrix's step.
  schedules_finite = functools.reduce(
      jnp.logical_and, [jnp.isfinite(v) for v in (eps, *(decays or ()))])
  prepared = [
      _prepare(m.localized(g.shape), g, mom, c, schedules_finite)
      for m, g, mom, c in zip(matrices, grads, momenta, collectives)]
  qs, qs_finite = zip(*[
      nonfinite.finite_right_factor(
          q.reshape(-1, p.spec.small, p.spec.rank), c)
      for p, q, c in zip(prepared, right_factors, collectives)])
  step_key = jax.random.fold_in(jax.random.key(compressor.seed), count)
  factors = low_rank.power_iteration(
      [low_rank.MatrixTask(buffer=p.buffer, right_factor=q,
                           small_axis=p.spec.small_axis, collectives=c)
       for p, q, c in zip(prepared, qs, collectives)],
      config=compressor.step_config, eps=eps, key=step_key)
  results = [
      _finish(p, f, q, q_finite, skips, decays=decays, grad_dtype=g.dtype,
              collectives=c)
      for p, f, q, q_finite, skips, g, c in zip(
          prepared, factors, qs, qs_finite, nonfinite_counts, grads,
          collectives)]
  return [r._replace(right_factor=r.right_factor.reshape(old.shape))
          for r, old in zip(results, right_factors)]


@dataclasses.dataclass(frozen=True)
class _Placement:
  """Where a transformation's weights live: the mesh and how to read specs."""
  mesh: jax.sharding.Mesh | None = None
  param_specs: Any = None       # tree / callable of PartitionSpec, or None
  data_axis: str | None = None  # compressed data parallelism over this axis

  def __post_init__(self):
    if self.mesh is None and (self.data_axis is not None
                              or self.param_specs is not None):
      raise ValueError("data_axis and param_specs need mesh= (the mesh the "
                       "parameters are sharded over).")
    if self.data_axis is not None:
      sharding.replica_count(self.mesh, self.data_axis)

  def replicas(self) -> int:
    return (1 if self.data_axis is None
            else sharding.replica_count(self.mesh, self.data_axis))

  def plans(self, tree, paths, matrices, treedef,
            per_replica: bool) -> list[sharding.LeafPlan]:
    """Each leaf's plan; specs from ``param_specs`` or from the arrays."""
    if self.param_specs is None:
      specs = [sharding.inferred_spec(x, p, self.mesh, per_replica)
               for (p, _), x in zip(paths, treedef.flatten_up_to(tree))]
    else:
      given = _without_variable_boxes(
          self.param_specs(tree) if callable(self.param_specs)
          else self.param_specs)
      # Matched by path, so the specs of all parameters also serve a subtree
      # (the low-rank leaves that optax.partition hands on).
      flat, _ = jax.tree_util.tree_flatten_with_path(
          given, is_leaf=sharding.is_spec_leaf)
      by_path = {jax.tree_util.keystr(p): sharding.spec_of(x)
                 for p, x in flat}
      specs = []
      for path, _ in paths:
        if path not in by_path:
          raise ValueError(f"{path}: param_specs has no entry for it.")
        specs.append(by_path[path])
    return [sharding.leaf_plan(m, s, self.mesh, self.data_axis)
            for m, s in zip(matrices, specs)]


def _without_variable_boxes(tree: Any) -> Any:
  """``tree`` with Flax NNX ``Variable`` boxes replaced by their arrays.

  ``nnx.Optimizer`` hands ``init`` a state of ``Variable``s and copies each
  box's metadata (its sharding included) onto every state leaf built from
  it. The right factor and the per-matrix scalars are not shaped like their
  parameter, so the state is built from the bare arrays and placed here.
  """
  nnx = sys.modules.get("flax.nnx")   # no Variable can exist unless loaded
  if nnx is None:
    return tree
  is_box = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda x: x.get_value() if is_box(x) else x, tree,
                      is_leaf=is_box)


def _has_variable_boxes(tree: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return False
  is_box = lambda x: isinstance(x, nnx.Variable)
  return any(map(is_box, jax.tree.leaves(tree, is_leaf=is_box)))


def _boxed_like(boxed: Any, bare: Any) -> Any:
  """``bare``'s arrays in the ``Variable`` boxes of ``boxed``.

  A Variable is a pytree node whose one child is its array, so both trees
  list the same leaves in the same order; optax's tree maps give updates
  boxed like this, and ``optax.apply_updates`` / ``nnx.update`` expect it.
  """
  return jax.tree.unflatten(jax.tree.structure(boxed), jax.tree.leaves(bare))


def _flatten_like(updates: Any, tree: Any, what: str) -> list[Any]:
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


def _check_gradient_shapes(updates, state, params, replicas: int | None
                           ) -> None:
  """Each gradient leaf has the shape of the weight its state was made for.

  Checked before the step: a transposed gradient fits the momentum's layout
  after a reshape and would silently scramble it. The momentum holds the
  weight's shape; without one (``LowRankState``) the parameter does, when
  given. In compressed mode gradients carry a leading replica axis.
  """
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  if isinstance(state, OrthDionState):
    source = "the momentum in the optimizer state"
    weights = [m.per_replica.shape[1:] if isinstance(m, ReplicaMomenta)
               else jnp.shape(m)
               for m in _flatten_like(updates, state.momentum, source)]
  elif params is not None:
    source = "the parameter"
    weights = [jnp.shape(p) for p in _flatten_like(updates, params, source)]
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


def _check_right_factors(updates, paths, matrices, state) -> None:
  """The right factors in the state are those these gradients' shapes imply.

  Catches what ``_check_gradient_shapes`` cannot see without a momentum or
  the parameters: a gradient whose matrix differs from the one init saw.
  """
  held = _flatten_like(updates, state.right_factor, "the optimizer state")
  for (path, _), m, q in zip(paths, matrices, held):
    if jnp.shape(q) != m.right_factor_shape:
      raise ValueError(
          f"{path}: the gradient's shape implies a right factor of shape "
          f"{m.right_factor_shape}, but the optimizer state holds one of "
          f"shape {jnp.shape(q)}: init was given a weight of another shape.")


def _weight_shapes(tree, replicas: int | None):
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


def _low_rank_transformation(
    compressor: LowRankCompressor,
    *,
    feedback: tuple[ScalarOrSchedule, ScalarOrSchedule] | None,
    momentum_dtype,
    weight_dimension_numbers: DimensionNumbersTree,
    placement: _Placement,
) -> optax.GradientTransformation:
  """Shared body of the two public transformations."""
  momentum_dtype = (None if momentum_dtype is None
                    else jnp.dtype(momentum_dtype))
  mesh = placement.mesh
  replicas = None if placement.data_axis is None else placement.replicas()

  def layout(tree, per_replica):
    per_replica = per_replica and replicas is not None
    shapes = _weight_shapes(tree, replicas if per_replica else None)
    paths, dims, treedef = _leaf_paths_and_dims(shapes,
                                                weight_dimension_numbers)
    matrices = [compressor.spec(p, x.shape, d)
                for (p, x), d in zip(paths, dims)]
    plans = (None if mesh is None else
             placement.plans(tree, paths, matrices, treedef, per_replica))
    return paths, matrices, plans, treedef

  def init_fn(params):
    params = _without_variable_boxes(params)
    paths, matrices, plans, treedef = layout(params, per_replica=False)
    leaves = treedef.flatten_up_to(params)
    specs = plans or [None] * len(matrices)

    def put(x, plan, field):
      # On one device JAX's default placement is the right one.
      return x if plan is None else sharding.place(x, mesh,
                                                   getattr(plan, field))
    unflatten = functools.partial(jax.tree.unflatten, treedef)
    fields = dict(
        count=jnp.zeros([], jnp.int32),
        # Standard normal from the seed only: identical on every replica.
        right_factor=unflatten([
            put(jax.random.normal(_leaf_key(compressor.seed, i),
                                  m.right_factor_shape, jnp.float32),
                p, "right_factor_spec")
            for i, (m, p) in enumerate(zip(matrices, specs))]),
        captured_fraction=unflatten([
            put(jnp.zeros(m.batch_shape, jnp.float32), p, "batch_spec")
            for m, p in zip(matrices, specs)]),
        nonfinite_count=unflatten([
            put(jnp.zeros(m.batch_shape, jnp.int32), p, "batch_spec")
            for m, p in zip(matrices, specs)]),
    )
    if feedback is None:
      return LowRankState(**fields)

    def zero_momentum(x, p):
      dtype = momentum_dtype or x.dtype
      if p is not None and p.compressed:
        return ReplicaMomenta(put(jnp.zeros((replicas,) + x.shape, dtype),
                                  p, "momentum_spec"))
      return put(jnp.zeros(x.shape, dtype), p, "spec")
    return OrthDionState(
        momentum=unflatten([zero_momentum(x, p)
                            for x, p in zip(leaves, specs)]), **fields)

  def update_fn(updates, state, params=None):
    if _has_variable_boxes(updates):
      # The state was built from bare arrays; return the updates boxed like
      # the gradients, as optax's own transformations do.
      bare, state = update_fn(_without_variable_boxes(updates), state, params)
      return _boxed_like(updates, bare), state
    _check_gradient_shapes(updates, state, _without_variable_boxes(params),
                           replicas)
    paths, matrices, plans, treedef = layout(updates, per_replica=True)
    _check_right_factors(updates, paths, matrices, state)
    flat = treedef.flatten_up_to
    grads = flat(updates)
    count = state.count
    eps = sharding.scalar(_resolve(compressor.eps, count))
    decays = None if feedback is None else tuple(
        sharding.scalar(_resolve(v, count)) for v in feedback)
    momenta = ([None] * len(paths) if feedback is None
               else flat(state.momentum))
    step = functools.partial(_step, compressor, matrices)
    args = (grads, momenta, flat(state.right_factor),
            flat(state.nonfinite_count), count, eps, decays)
    if mesh is None:
      results = step([low_rank.SINGLE_DEVICE] * len(paths), *args)
    else:
      results = _sharded_step(step, plans, mesh, replicas, *args)
    unflatten = lambda field: jax.tree.unflatten(
        treedef, [getattr(r, field) for r in results])
    fields = dict(
        count=optax.safe_increment(count),
        right_factor=unflatten("right_factor"),
        captured_fraction=unflatten("captured_fraction"),
        nonfinite_count=unflatten("nonfinite_count"),
    )
    if feedback is None:
      new_state = LowRankState(**fields)
    else:
      new_state = OrthDionState(momentum=unflatten("momentum"), **fields)
    return unflatten("update"), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _sharded_step(step, plans, mesh, replicas, grads, momenta, right_factors,
                  nonfinite_counts, count, eps, decays) -> list[_MatrixStep]:
  """Runs ``step`` inside ``jax.shard_map``: each device on its blocks.

  In compressed mode a matrix that does not compress falls back to the plain
  gradient all-reduce (the replica mean) before the step; the others enter
  with one gradient and momentum per replica.
  """
  grads = [g if p.compressed or replicas is None else jnp.mean(g, axis=0)
           for g, p in zip(grads, plans)]
  momenta = [m.per_replica if isinstance(m, ReplicaMomenta) else m
             for m in momenta]
  grad_specs = [p.momentum_spec for p in plans]
  mom_specs = [None if m is None else p.momentum_spec
               for m, p in zip(momenta, plans)]
  q_specs = [p.right_factor_spec for p in plans]
  batch_specs = [p.batch_spec for p in plans]
  put = lambda xs, specs: [x if s is None else sharding.place(x, mesh, s)
                           for x, s in zip(xs, specs)]
  scalar_spec = PartitionSpec()
  decay_specs = None if decays is None else (scalar_spec, scalar_spec)

  def local(grads, momenta, right_factors, nonfinite_counts, count, eps,
            decays):
    # A per-replica block carries a leading replica axis of length 1.
    squeeze = [p.compressed for p in plans]
    grads = [g[0] if s else g for g, s in zip(grads, squeeze)]
    momenta = [m[0] if s and m is not None else m
               for m, s in zip(momenta, squeeze)]
    results = step([p.collectives for p in plans], grads, momenta,
                   right_factors, nonfinite_counts, count, eps, decays)
    return [r._replace(momentum=r.momentum[None])
            if s and r.momentum is not None else r
            for r, s in zip(results, squeeze)]

  out_specs = [
      _MatrixStep(update=p.spec, momentum=ms, right_factor=qs,
                  captured_fraction=bs, nonfinite_count=bs)
      for p, ms, qs, bs in zip(plans, mom_specs, q_specs, batch_specs)]
  results = jax.shard_map(
      local, mesh=mesh,
      in_specs=(grad_specs, mom_specs, q_specs, batch_specs, scalar_spec,
                scalar_spec, decay_specs),
      out_specs=out_specs, check_vma=False,
  )(put(grads, grad_specs), put(momenta, mom_specs),
    put(right_factors, q_specs), put(nonfinite_counts, batch_specs),
    count, eps, decays)
  return [r._replace(momentum=ReplicaMomenta(r.momentum))
          if p.compressed and r.momentum is not None else r
          for r, p in zip(results, plans)]


def scale_by_low_rank_orthogonalization(
    compressor: LowRankCompressor | None = None,
    *,
    weight_dimension_numbers: DimensionNumbersTree = None,
    mesh: jax.sharding.Mesh | None = None,
    param_specs: Any = None,
    data_axis: str | None = None,
) -> optax.GradientTransformation:
  r"""Replaces each matrix update ``B`` by the rank-r step ``s P Q^T``.

  One warm-started power iteration: :math:`P = \mathrm{orth}(B Q)`,
  :math:`R = B^\top P`, :math:`Q \leftarrow \mathrm{qr}_+(R)` (Orth-Dion) or
  :math:`R / \|R\|_{col}` (Dion); the new ``Q`` is both this step's right
  factor and the next step's warm start. No momentum and no error feedback:
  chain it after ``optax.trace`` for "Orth-Dion's step on plain momentum".

  Args:
    compressor: the step's configuration (defaults: Orth-Dion, rank 1/4).
    weight_dimension_numbers: tree (or callable of the updates) of
      ``DionDimensionNumbers``; None treats every leaf as a 2-D
      ``(fan_in, fan_out)`` matrix.
    mesh: the mesh the parameters are sharded over; the step then runs in
      ``jax.shard_map`` on each device's blocks (see ``sharding``).
    param_specs: tree (or callable of the parameters) of ``PartitionSpec``;
      None reads each leaf's sharding from its array or type (an
      ``Explicit`` mesh); required under jit with ``Auto`` mesh axes.
    data_axis: mesh axis of compressed data parallelism: gradients then
      carry a leading replica axis (``per_replica_value_and_grad``), each
      replica keeps its own momentum and only ``P`` and ``R`` are averaged.

  Returns:
    An ``optax.GradientTransformation`` with state ``LowRankState``.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> from orth_dion_jax import LowRankCompressor
    >>> tx = optax.chain(optax.trace(decay=0.9),
    ...     scale_by_low_rank_orthogonalization(LowRankCompressor(rank=2)),
    ...     optax.scale_by_learning_rate(0.01))
    >>> state = tx.init({"w": jnp.ones((8, 4))})

  References:
    Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  """
  return _low_rank_transformation(
      compressor or LowRankCompressor(), feedback=None, momentum_dtype=None,
      weight_dimension_numbers=weight_dimension_numbers,
      placement=_Placement(mesh, param_specs, data_axis))


def scale_by_error_feedback(
    compressor: LowRankCompressor | None = None,
    *,
    residual_decay: ScalarOrSchedule = 1.0,
    captured_decay: ScalarOrSchedule = 0.95,
    momentum_dtype=None,
    weight_dimension_numbers: DimensionNumbersTree = None,
    mesh: jax.sharding.Mesh | None = None,
    param_specs: Any = None,
    data_axis: str | None = None,
) -> optax.GradientTransformation:
  r"""Dion's momentum with error feedback around a low-rank compressor.

  .. math::
    B = M + G;\quad (P, R, Q) = \mathrm{compress}(B, Q);\quad
    M \leftarrow a\,(B - P R^\top) + c\,P R^\top;\quad u = s\,P Q^\top

  ``(a, c) = (1, mu)`` is the reference mu-form (the captured part decays by
  mu, the residual is kept whole); ``(beta, 0)`` is the paper's beta-form
  ``E = beta (M - U U^T M)``. They coincide at mu = 0, beta = 1.

  Args:
    compressor: the low-rank step (right factor kind, rank, method, ...).
    residual_decay: ``a``, the factor on what the rank-r step missed.
    captured_decay: ``c``, the factor on what it captured.
    momentum_dtype: dtype of the momentum (None: the parameter's dtype).
      The QR and normalization run in float32 regardless.
    weight_dimension_numbers: as in ``scale_by_low_rank_orthogonalization``.
    mesh, param_specs, data_axis: sharding and compressed data parallelism,
      as in ``scale_by_low_rank_orthogonalization``.

  Returns:
    An ``optax.GradientTransformation`` with state ``OrthDionState``.

  References:
    Ahn et al., Dion, https://arxiv.org/abs/2504.05295
    Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  """
  for name, value in (("residual_decay", residual_decay),
                      ("captured_decay", captured_decay)):
    validation.check_unit_interval(name, value, closed_right=True)
  validation.check_float_dtype("momentum_dtype", momentum_dtype)
  return _low_rank_transformation(
      compressor or LowRankCompressor(),
      feedback=(residual_decay, captured_decay),
      momentum_dtype=momentum_dtype,
      weight_dimension_numbers=weight_dimension_numbers,
      placement=_Placement(mesh, param_specs, data_axis))


def scale_by_orth_dion(
    *,
    rank_fraction: float = 0.25,
    rank: int | None = None,
    rank_multiple_of: int = 1,
    mu: ScalarOrSchedule = 0.95,
    eps: ScalarOrSchedule = 1e-8,
    right_factor: low_rank.RightFactor = "qr",
    orthogonalize: str = "cholesky_qr",
    power_iters: int = 1,
    scale: matrix_view.Scale = "spectral",
    seed: int = 0,
    momentum_dtype=None,
    weight_dimension_numbers: DimensionNumbersTree = None,
    mesh: jax.sharding.Mesh | None = None,
    param_specs: Any = None,
    data_axis: str | None = None,
) -> optax.GradientTransformation:
  r"""Orth-Dion's direction ``s P Q^T`` in the reference mu-form.

  .. math::
    B = M + G;\ P = \mathrm{orth}(B Q);\ R = B^\top P;\
    M \leftarrow B - (1-\mu) P R^\top;\ Q \leftarrow \mathrm{qr}_+(R);\
    u = s\,P Q^\top

  ``qr_+`` is the QR with a positive triangular diagonal, so ``P Q^T`` is an
  exact rank-r partial isometry (all r singular values 1) aligned with ``B``.
  With ``right_factor="column"`` this is Dion.

  Args:
    rank_fraction: r = ceil(rank_fraction * min(fan_in, fan_out)).
    rank: explicit rank (overrides ``rank_fraction``).
    rank_multiple_of: round r up to a multiple of this.
    mu: error-feedback decay of the captured part (float or schedule).
    eps: column-normalization epsilon (Dion only).
    right_factor: ``"qr"`` (Orth-Dion) or ``"column"`` (Dion).
    orthogonalize: ``"cholesky_qr"`` (CholeskyQR2, Householder fallback),
      ``"householder"`` or ``"randomized_cholesky_qr"``.
    power_iters: power iterations per step.
    scale: ``"spectral"`` sqrt(fan_out/fan_in), ``"rms"`` 0.2 sqrt(max fan),
      a float, or None.
    seed: seed of the initial right factors and sketches.
    momentum_dtype: momentum dtype (e.g. ``jnp.bfloat16``); None: param dtype.
    weight_dimension_numbers: tree or callable of ``DionDimensionNumbers``.
    mesh, param_specs, data_axis: sharding and compressed data parallelism,
      as in ``scale_by_low_rank_orthogonalization``.

  Returns:
    An ``optax.GradientTransformation`` with state ``OrthDionState``.

  References:
    Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  """
  validation.check_unit_interval("mu", mu, closed_right=False)
  compressor = LowRankCompressor(
      rank_fraction=rank_fraction, rank=rank,
      rank_multiple_of=rank_multiple_of, right_factor=right_factor,
      orthogonalize=orthogonalize, power_iters=power_iters, eps=eps,
      scale=scale, seed=seed)
  return scale_by_error_feedback(
      compressor, residual_decay=1.0, captured_decay=mu,
      momentum_dtype=momentum_dtype,
      weight_dimension_numbers=weight_dimension_numbers, mesh=mesh,
      param_specs=param_specs, data_axis=data_axis)

