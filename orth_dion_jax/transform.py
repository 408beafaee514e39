"""The optax transformations that carry Dion / Orth-Dion state.

Two composable pieces share one per-matrix implementation
(``matrix_step.step_matrices``):

* ``scale_by_low_rank_orthogonalization(compressor)``: the low-rank step alone.
  It maps each buffer ``B`` to ``s P Q^T`` and carries the right factor ``Q``
  (with the per-matrix diagnostics), no momentum. Chain it after any
  momentum (e.g. ``optax.trace``).
* ``scale_by_error_feedback(compressor, ...)``: wraps the same compressor with
  Dion's momentum and error feedback ``M <- a (B - P R^T) + c P R^T``. With
  ``(a, c) = (1, mu)`` it is the reference mu-form (``scale_by_orth_dion``),
  with ``(beta, 0)`` the paper's beta-form.

Each weight is seen as a batch of matrices (``matrix_view``, from
``weight_dimension_numbers`` and ``layer_axes``). On a mesh (given or read
from the parameters, ``placement``) the step runs on each device's blocks.
Non-finite values skip a matrix's step (``matrix_step``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orth_dion_jax import low_rank
from orth_dion_jax import matrix_step
from orth_dion_jax import matrix_view
from orth_dion_jax import nnx_interop
from orth_dion_jax import placement as placement_lib
from orth_dion_jax import settings
from orth_dion_jax import sharding
from orth_dion_jax import tree_views
from orth_dion_jax import validation
from orth_dion_jax.data_parallel import ReplicaMomenta
from orth_dion_jax.settings import (ErrorFeedback, LowRankCompressor,
                                    MatrixAxes, Placement)

Array = jax.Array


class LowRankState(NamedTuple):
  """State of ``scale_by_low_rank_orthogonalization``."""
  count: Array                # (), int32: steps taken
  right_factor: optax.Updates  # per matrix: batch + (min(fan_in, fan_out), r), f32
  captured_fraction: optax.Updates  # per matrix: batch shape, f32
  alignment: optax.Updates    # per matrix: batch shape, f32,
                              # <B, P Q^T> / ||P^T B||_* of the last step
  nonfinite_count: optax.Updates    # per matrix: batch shape, int32 skipped steps
  # adaptive_rank only (None otherwise), per matrix: the smoothed effective
  # rank (batch shape, f32; 0 before the first step) and the energy Gram of
  # the right factor's columns (batch + (r, r), f32, trace 1).
  effective_rank: optax.Updates = None
  right_energy: optax.Updates = None


class OrthDionState(NamedTuple):
  """State of ``scale_by_orth_dion`` / ``scale_by_error_feedback``."""
  count: Array                # (), int32: steps taken
  momentum: optax.Updates     # like params, momentum_dtype (or param dtype);
                              # ReplicaMomenta leaves in compressed mode
  right_factor: optax.Updates  # per matrix: batch + (min(fan_in, fan_out), r), f32
  captured_fraction: optax.Updates  # per matrix: batch shape, f32
  alignment: optax.Updates    # per matrix: batch shape, f32,
                              # <B, P Q^T> / ||P^T B||_* of the last step
  nonfinite_count: optax.Updates    # per matrix: batch shape, int32 skipped steps
  # adaptive_rank only (None otherwise), per matrix: the smoothed effective
  # rank (batch shape, f32; 0 before the first step) and the energy Gram of
  # the right factor's columns (batch + (r, r), f32, trace 1).
  effective_rank: optax.Updates = None
  right_energy: optax.Updates = None


class _Matrices(NamedTuple):
  """A tree of weights seen as matrices, and where each one lives."""
  leaves: list[tuple[str, Any]]            # (path, leaf) in tree order
  views: list[matrix_view.MatrixView]      # one per leaf
  mesh: placement_lib.Mesh | None          # None: whole arrays, one device
  plans: list[sharding.LeafPlan] | None    # one per leaf, on a mesh
  treedef: jax.tree_util.PyTreeDef


def _leaf_key(seed: int, index: int) -> Array:
  return jax.random.fold_in(jax.random.key(seed), index)


def low_rank_transformation(
    compressor: LowRankCompressor,
    *,
    feedback: tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule] | None,
    momentum_dtype: jnp.dtype | None,
    axes: MatrixAxes,
    placement: Placement,
) -> optax.GradientTransformation:
  """Shared body of the public transformations (``feedback``: the decays
  ``(a, c)`` of the error feedback; None for the low-rank step alone)."""
  num_replicas = (None if placement.data_axis is None
                  else placement.mesh.shape[placement.data_axis])

  def as_matrices(tree, per_replica: bool, right_factors=None) -> _Matrices:
    per_replica = per_replica and num_replicas is not None
    shapes = tree_views.without_replica_axis(
        tree, num_replicas if per_replica else None)
    leaves, dims, treedef = tree_views.matrix_leaves(
        shapes, axes.weight_dimension_numbers, axes.layer_axes)
    ranks = [None] * len(leaves)
    if compressor.adaptive_rank and right_factors is not None:
      # Adaptive rank: the rank is the one the state holds (RankController
      # resizes it between steps); check_right_factors still checks the
      # rest of its shape.
      ranks = [jnp.shape(q)[-1] if jnp.ndim(q) >= 2 else None
               for q in tree_views.flatten_like(tree, right_factors,
                                                "the optimizer state")]
    initial = [compressor.view(p, x.shape, d) for (p, x), d in zip(leaves,
                                                                   dims)]
    # A rank outside [1, small] is clipped, so that check_right_factors
    # reports the state's factor as the wrong shape.
    views = [v if r is None else dataclasses.replace(
        v, rank=min(max(r, 1), v.small)) for v, r in zip(initial, ranks)]
    # The arrays themselves (not their shapes) tell where they live. The
    # plans come from the initial ranks: whether a matrix compresses decides
    # its momentum's form (per replica or not), which a resize must not
    # change.
    arrays = [(p, x) for (p, _), x in zip(leaves, treedef.flatten_up_to(tree))]
    mesh = placement_lib.resolve_mesh(placement, arrays)
    plans = (None if mesh is None else placement_lib.leaf_plans(
        placement, mesh, arrays, initial, tree, per_replica))
    return _Matrices(leaves, views, mesh, plans, treedef)

  def init_fn(params):
    params = nnx_interop.unboxed(params)
    mats = as_matrices(params, per_replica=False)
    plans = mats.plans or [None] * len(mats.views)

    def put(x, plan, spec_of):
      # On one device JAX's default placement is the right one.
      return x if plan is None else placement_lib.place(x, mats.mesh,
                                                        spec_of(plan))
    unflatten = functools.partial(jax.tree.unflatten, mats.treedef)
    per_matrix = lambda make, spec_of: unflatten(
        [put(make(i, v), p, spec_of)
         for i, (v, p) in enumerate(zip(mats.views, plans))])
    batch_zeros = lambda dtype: per_matrix(
        lambda i, v: jnp.zeros(v.batch_shape, dtype), lambda p: p.batch_spec)
    fields = dict(
        count=jnp.zeros([], jnp.int32),
        # Standard normal from the seed only: identical on every replica.
        right_factor=per_matrix(
            lambda i, v: jax.random.normal(_leaf_key(compressor.seed, i),
                                           v.right_factor_shape, jnp.float32),
            lambda p: p.right_factor_spec),
        captured_fraction=batch_zeros(jnp.float32),
        alignment=batch_zeros(jnp.float32),
        nonfinite_count=batch_zeros(jnp.int32),
    )
    if compressor.adaptive_rank:
      fields.update(
          effective_rank=batch_zeros(jnp.float32),
          right_energy=per_matrix(
              lambda i, v: jnp.zeros(v.batch_shape + (v.rank, v.rank),
                                     jnp.float32),
              lambda p: placement_lib.energy_spec(p)))
    if feedback is None:
      return LowRankState(**fields)

    def zero_momentum(x, p):
      dtype = momentum_dtype or x.dtype
      if p is not None and p.compressed:
        return ReplicaMomenta(put(
            jnp.zeros((num_replicas,) + x.shape, dtype), p,
            lambda p: p.momentum_spec))
      return put(jnp.zeros(x.shape, dtype), p, lambda p: p.weight_spec)
    return OrthDionState(momentum=unflatten(
        [zero_momentum(x, p) for (_, x), p in zip(mats.leaves, plans)]),
                         **fields)

  def update_fn(updates, state, params=None):
    if nnx_interop.has_boxes(updates):
      # The state was built from bare arrays; return the updates boxed like
      # the gradients, as optax's own transformations do.
      bare, state = update_fn(nnx_interop.unboxed(updates), state, params)
      return nnx_interop.boxed_like(updates, bare), state
    tree_views.check_gradient_shapes(
        updates, None if feedback is None else state.momentum,
        nnx_interop.unboxed(params), num_replicas)
    if compressor.adaptive_rank and state.right_energy is None:
      raise ValueError(
          "This optimizer has adaptive_rank=True, but the state was built "
          "without it: start from this optimizer's init.")
    mats = as_matrices(updates, per_replica=True,
                       right_factors=state.right_factor)
    tree_views.check_right_factors(
        updates, mats.leaves, mats.views, state.right_factor,
        state.right_energy if compressor.adaptive_rank else None,
        state.effective_rank if compressor.adaptive_rank else None)
    flat = mats.treedef.flatten_up_to
    count = state.count
    adaptive = compressor.adaptive_rank
    inputs = matrix_step.StepInputs(
        grads=flat(updates),
        momenta=([None] * len(mats.views) if feedback is None
                 else flat(state.momentum)),
        right_factors=flat(state.right_factor),
        nonfinite_counts=flat(state.nonfinite_count),
        count=count,
        eps=matrix_step.schedule_value(compressor.eps, count),
        decays=None if feedback is None else tuple(
            matrix_step.schedule_value(v, count) for v in feedback),
        effective_ranks=flat(state.effective_rank) if adaptive else None,
        right_energies=flat(state.right_energy) if adaptive else None)
    # Updates in the parameters' dtypes, as optax's own (float32 updates for
    # float32 weights with bfloat16 gradients); without params, the grads'.
    update_dtypes = ([g.dtype for g in inputs.grads] if params is None else
                     [jnp.result_type(p) for p in flat(
                         nnx_interop.unboxed(params))])
    step = functools.partial(matrix_step.step_matrices, compressor, mats.views,
                             update_dtypes)
    if not mats.views:   # every leaf went elsewhere (e.g. to AdamW)
      results = []
    elif mats.mesh is None:
      results = step([low_rank.SINGLE_DEVICE] * len(mats.views), inputs)
    else:
      results = placement_lib.sharded_step(
          step, mats.plans, mats.mesh, inputs,
          per_replica=num_replicas is not None)
    unflatten = functools.partial(jax.tree.unflatten, mats.treedef)
    fields = dict(
        count=optax.safe_increment(count),
        right_factor=unflatten([r.right_factor for r in results]),
        captured_fraction=unflatten([r.captured_fraction for r in results]),
        alignment=unflatten([r.alignment for r in results]),
        nonfinite_count=unflatten([r.nonfinite_count for r in results]))
    if adaptive:
      fields.update(
          effective_rank=unflatten([r.effective_rank for r in results]),
          right_energy=unflatten([r.right_energy for r in results]))
    if feedback is None:
      new_state = LowRankState(**fields)
    else:
      new_state = OrthDionState(
          momentum=unflatten([r.momentum for r in results]), **fields)
    return unflatten([r.update for r in results]), new_state

  return optax.GradientTransformation(init_fn, update_fn)


@settings.accepts(MatrixAxes, Placement)
def scale_by_low_rank_orthogonalization(
    compressor: LowRankCompressor | None = None, **kwargs,
) -> optax.GradientTransformation:
  r"""Replaces each matrix update ``B`` by the rank-r step ``s P Q^T``.

  One warm-started power iteration: :math:`P = \mathrm{orth}(B Q)`,
  :math:`R = B^\top P`, :math:`Q \leftarrow \mathrm{qr}_+(R)` (Orth-Dion) or
  :math:`R / \|R\|_{col}` (Dion); the new ``Q`` is both this step's right
  factor and the next step's warm start. No momentum and no error feedback:
  chain it after ``optax.trace`` for "Orth-Dion's step on plain momentum".

  Args:
    compressor: the step's configuration (default: Orth-Dion, rank 1/4).

  Returns:
    An ``optax.GradientTransformation`` with state ``LowRankState``.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> from orth_dion_jax import LowRankCompressor
    >>> tx = optax.chain(optax.trace(decay=0.9),
    ...     scale_by_low_rank_orthogonalization(LowRankCompressor(rank=2)),
    ...     optax.scale_by_learning_rate(0.01))
    >>> state = tx.init({"w": jnp.ones((8, 4))})
    >>> state[1].right_factor["w"].shape
    (4, 2)

  References:
    Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  """
  given = settings.parse(scale_by_low_rank_orthogonalization, kwargs)
  return low_rank_transformation(
      compressor or LowRankCompressor(), feedback=None, momentum_dtype=None,
      axes=given[MatrixAxes], placement=given[Placement])


@settings.accepts(ErrorFeedback, MatrixAxes, Placement, omit={
    name: "give residual_decay and captured_decay instead"
    for name in ("error_feedback", "mu", "beta")})
def scale_by_error_feedback(
    compressor: LowRankCompressor | None = None,
    *,
    residual_decay: optax.ScalarOrSchedule = 1.0,
    captured_decay: optax.ScalarOrSchedule = 0.95,
    **kwargs,
) -> optax.GradientTransformation:
  r"""Dion's momentum with error feedback around a low-rank compressor.

  .. math::
    B = M + G;\quad (P, R, Q) = \mathrm{compress}(B, Q);\quad
    M \leftarrow a\,(B - P R^\top) + c\,P R^\top;\quad u = s\,P Q^\top

  ``(a, c) = (1, mu)`` is the reference mu-form (the captured part decays by
  mu, the residual is kept whole); ``(beta, 0)`` is the paper's beta-form
  ``M = beta (B - P R^T)``. They coincide at mu = 0, beta = 1
  (docs/design.md, "The two error-feedback forms").

  Args:
    compressor: the low-rank step (right factor kind, rank, method, ...).
    residual_decay: ``a``, the factor on what the rank-r step missed.
    captured_decay: ``c``, the factor on what it captured.

  Returns:
    An ``optax.GradientTransformation`` with state ``OrthDionState``.

  Example (the paper's beta-form, beta = 0.9)::

    >>> import optax, jax.numpy as jnp
    >>> from orth_dion_jax import LowRankCompressor
    >>> tx = optax.chain(
    ...     scale_by_error_feedback(LowRankCompressor(rank=2),
    ...                             residual_decay=0.9, captured_decay=0.0),
    ...     optax.scale_by_learning_rate(0.01))
    >>> state = tx.init({"w": jnp.ones((8, 4))})
    >>> state[0].momentum["w"].shape
    (8, 4)

  References:
    Ahn et al., Dion, https://arxiv.org/abs/2504.05295
    Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  """
  for name, value in (("residual_decay", residual_decay),
                      ("captured_decay", captured_decay)):
    validation.check_unit_interval(name, value, closed_right=True)
  given = settings.parse(scale_by_error_feedback, kwargs)
  return low_rank_transformation(
      compressor or LowRankCompressor(),
      feedback=(residual_decay, captured_decay),
      momentum_dtype=given[ErrorFeedback].dtype, axes=given[MatrixAxes],
      placement=given[Placement])


@settings.accepts(LowRankCompressor, ErrorFeedback, MatrixAxes, Placement)
def scale_by_orth_dion(**kwargs) -> optax.GradientTransformation:
  r"""Orth-Dion's direction ``s P Q^T`` with its error-feedback momentum.

  .. math::
    B = M + G;\ P = \mathrm{orth}(B Q);\ R = B^\top P;\
    M \leftarrow B - (1-\mu) P R^\top;\ Q \leftarrow \mathrm{qr}_+(R);\
    u = s\,P Q^\top

  ``qr_+`` is the QR with a positive triangular diagonal, so ``P Q^T`` is an
  exact rank-r partial isometry (all r singular values 1) aligned with ``B``.
  With ``right_factor="polar"``, ``Q = polar(R)`` and
  ``P Q^T = polar(P P^T B)``; with ``right_factor="column"`` this is Dion's
  direction. ``error_feedback="beta"`` keeps ``M = beta (B - P R^T)``
  instead (the paper's form).

  Returns:
    An ``optax.GradientTransformation`` with state ``OrthDionState``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.eye(8, 4)}
    >>> tx = scale_by_orth_dion(rank=2, mu=0.9)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> # s P Q^T: r singular values equal to s = sqrt(fan_out / fan_in).
    >>> [round(float(v), 4) for v in jnp.linalg.svd(updates["w"])[1][:3]]
    [0.7071, 0.7071, 0.0]

  References:
    Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  """
  given = settings.parse(scale_by_orth_dion, kwargs)
  return low_rank_transformation(
      given[LowRankCompressor], feedback=given[ErrorFeedback].decays,
      momentum_dtype=given[ErrorFeedback].dtype, axes=given[MatrixAxes],
      placement=given[Placement])
