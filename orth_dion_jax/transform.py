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

Non-finite gradients: a matrix whose gradient has a NaN or Inf is skipped for
that step (zero update, momentum and right factor unchanged) and counted in
``nonfinite_count``; the other matrices step normally.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree as optax_tree

from orth_dion_jax import low_rank
from orth_dion_jax import matrix_view
from orth_dion_jax import validation
from orth_dion_jax.low_rank import Collectives
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


class OrthDionState(NamedTuple):
  """State of ``scale_by_orth_dion`` / ``scale_by_error_feedback``."""
  count: Array                # (), int32: steps taken
  momentum: optax.Updates     # like params, momentum_dtype (or param dtype)
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
    validation.check_static_int("seed", self.seed)
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


def _init_right_factors(compressor, paths, dims) -> list[Array]:
  factors = []
  for index, ((path, x), d) in enumerate(zip(paths, dims)):
    spec = compressor.spec(path, x.shape, d)
    # Standard normal, from the seed only: identical on every replica.
    factors.append(jax.random.normal(
        _leaf_key(compressor.seed, index), spec.right_factor_shape,
        jnp.float32))
  return factors


def _resolve(value: ScalarOrSchedule, count: Array):
  return value(count) if callable(value) else value


class _Prepared(NamedTuple):
  """A leaf in layout view, ready for the power iteration."""
  spec: matrix_view.MatrixSpec
  buffer: Array    # B = M + G (or G without momentum), (n, fan_in, fan_out)
  finite: Array    # (n,) bool: the matrix's gradient is all finite


def _prepare(spec: matrix_view.MatrixSpec, grad: Array,
             momentum: Array | None) -> _Prepared:
  g = spec.to_layout(grad)
  # One bad entry poisons the whole power iteration of its matrix: that matrix
  # sees a zero gradient and is frozen below, instead of letting NaN reach the
  # momentum or the weights.
  # max|g| is NaN or Inf exactly when some entry is: one reduction, no mask.
  finite = jnp.isfinite(jnp.max(jnp.abs(g), axis=(-2, -1)))
  g = jnp.where(finite[:, None, None], g, 0)
  if momentum is None:
    return _Prepared(spec, g, finite)
  m = spec.to_layout(momentum)
  return _Prepared(spec, m + g.astype(m.dtype), finite)


class _MatrixStep(NamedTuple):
  update: Array
  momentum: Array | None
  right_factor: Array
  captured_fraction: Array
  nonfinite_count: Array


def _finish(
    prepared: _Prepared,
    factors: low_rank.LowRankFactors,
    old_right_factor: Array,
    nonfinite_count: Array,
    *,
    decays: tuple[Array, Array] | None,
    grad_dtype,
    collectives: Collectives,
) -> _MatrixStep:
  """Update, error feedback and new state of one leaf from its factors."""
  spec, b, finite = prepared
  keep = finite[:, None, None]
  # Masks go on the (n, k, r) factors and per-matrix coefficients, never on a
  # weight-sized array: after B is formed nothing refers to the old momentum,
  # so B's buffer can become the new momentum in place.
  left = jnp.where(keep, factors.left, 0.0)
  direction = low_rank.outer(left, factors.right, spec.small_axis)
  update = (spec.scale * direction).astype(grad_dtype)
  q = old_right_factor.reshape(factors.right.shape)
  new_q = jnp.where(keep, factors.right, q)
  if decays is None:
    new_m = None
  else:
    # A skipped matrix gets decays (1, 1): M' = B = M, unchanged.
    residual_decay, captured_decay = (jnp.where(keep, d, 1.0) for d in decays)
    new_m = spec.from_layout(low_rank.error_feedback(
        b, factors, small_axis=spec.small_axis,
        residual_decay=residual_decay, captured_decay=captured_decay))
  captured = low_rank.captured_fraction(b, factors, collectives)
  return _MatrixStep(
      update=spec.from_layout(update),
      momentum=new_m,
      right_factor=new_q.reshape(spec.right_factor_shape),
      captured_fraction=captured.reshape(spec.batch_shape),
      nonfinite_count=nonfinite_count + (~finite).reshape(
          spec.batch_shape).astype(jnp.int32),
  )


def _low_rank_transformation(
    compressor: LowRankCompressor,
    *,
    feedback: tuple[ScalarOrSchedule, ScalarOrSchedule] | None,
    momentum_dtype,
    weight_dimension_numbers: DimensionNumbersTree,
    collectives: Collectives,
) -> optax.GradientTransformation:
  """Shared body of the two public transformations."""
  momentum_dtype = (None if momentum_dtype is None
                    else jnp.dtype(momentum_dtype))

  def init_fn(params):
    paths, dims, treedef = _leaf_paths_and_dims(params,
                                                weight_dimension_numbers)
    specs = [compressor.spec(p, x.shape, d) for (p, x), d in zip(paths, dims)]
    unflatten = functools.partial(jax.tree.unflatten, treedef)
    fields = dict(
        count=jnp.zeros([], jnp.int32),
        right_factor=unflatten(_init_right_factors(compressor, paths, dims)),
        captured_fraction=unflatten(
            [jnp.zeros(s.batch_shape, jnp.float32) for s in specs]),
        nonfinite_count=unflatten(
            [jnp.zeros(s.batch_shape, jnp.int32) for s in specs]),
    )
    if feedback is None:
      return LowRankState(**fields)
    return OrthDionState(
        momentum=optax_tree.zeros_like(params, dtype=momentum_dtype), **fields)

  def update_fn(updates, state, params=None):
    del params
    paths, dims, treedef = _leaf_paths_and_dims(updates,
                                                weight_dimension_numbers)
    count = state.count
    eps = _resolve(compressor.eps, count)
    decays = None if feedback is None else tuple(
        _resolve(v, count) for v in feedback)
    step_key = jax.random.fold_in(jax.random.key(compressor.seed), count)
    flat = lambda t: treedef.flatten_up_to(t)
    momenta = ([None] * len(paths) if feedback is None
               else flat(state.momentum))
    prepared = [
        _prepare(compressor.spec(path, g.shape, d), g, m)
        for (path, g), d, m in zip(paths, dims, momenta)]
    old_qs = flat(state.right_factor)
    factors = low_rank.power_iteration(
        [low_rank.MatrixTask(
            buffer=p.buffer,
            right_factor=q.reshape(-1, p.spec.small, p.spec.rank),
            small_axis=p.spec.small_axis, collectives=collectives)
         for p, q in zip(prepared, old_qs)],
        config=compressor.step_config, eps=eps, key=step_key)
    results = [
        _finish(p, f, q, skips, decays=decays, grad_dtype=g.dtype,
                collectives=collectives)
        for p, f, q, skips, (_, g) in zip(
            prepared, factors, old_qs, flat(state.nonfinite_count), paths)]
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


def scale_by_low_rank_orthogonalization(
    compressor: LowRankCompressor | None = None,
    *,
    weight_dimension_numbers: DimensionNumbersTree = None,
    collectives: Collectives = low_rank.SINGLE_DEVICE,
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
    collectives: where sums are completed under sharding.

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
      collectives=collectives)


def scale_by_error_feedback(
    compressor: LowRankCompressor | None = None,
    *,
    residual_decay: ScalarOrSchedule = 1.0,
    captured_decay: ScalarOrSchedule = 0.95,
    momentum_dtype=None,
    weight_dimension_numbers: DimensionNumbersTree = None,
    collectives: Collectives = low_rank.SINGLE_DEVICE,
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
    collectives: where sums are completed under sharding.

  Returns:
    An ``optax.GradientTransformation`` with state ``OrthDionState``.

  References:
    Ahn et al., Dion, https://arxiv.org/abs/2504.05295
    Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341
  """
  for name, value in (("residual_decay", residual_decay),
                      ("captured_decay", captured_decay)):
    validation.check_unit_interval(name, value, closed_right=True)
  return _low_rank_transformation(
      compressor or LowRankCompressor(),
      feedback=(residual_decay, captured_decay),
      momentum_dtype=momentum_dtype,
      weight_dimension_numbers=weight_dimension_numbers,
      collectives=collectives)


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
    collectives: Collectives = low_rank.SINGLE_DEVICE,
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
    collectives: where sums are completed under sharding.

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
      weight_dimension_numbers=weight_dimension_numbers,
      collectives=collectives)

