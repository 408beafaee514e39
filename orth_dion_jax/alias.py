"""The optimizers users call: ``orth_dion`` and ``dion``.

Each is ``optax.partition`` of two chains (docs/design.md, "Where each parameter goes"):

* hidden weight matrices: the low-rank step with error feedback, then
  decoupled weight decay and the learning rate,
  ``X <- (1 - lr wd) X - lr s P Q^T``;
* every other leaf (embeddings, LM head, biases, norm scales): AdamW with its
  own learning rate, skipped for a step whose gradient is not finite.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from orth_dion_jax import data_parallel
from orth_dion_jax import matrix_view
from orth_dion_jax import nonfinite
from orth_dion_jax import transform
from orth_dion_jax import validation

LOW_RANK = "low_rank"
ADAM = "adam"

# A path component that names an embedding table or the output head keeps its
# 2-D leaf on AdamW by default: these are lookups, not linear maps between
# hidden spaces, and the reference treats them so.
_ADAM_BY_NAME = re.compile(
    r"(embed|^wte$|^wpe$|^(lm_|output_)?head$|^unembed|^logits$|^vocab)",
    re.IGNORECASE)


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return names


def default_param_labels(params: Any) -> Any:
  """``"low_rank"`` for 2-D leaves not named like an embedding or a head.

  Everything else (vectors, N-D arrays, ``embed``/``wte``/``lm_head``/``head``
  tables) is ``"adam"``. Pass ``weight_dimension_numbers`` or
  ``param_labels`` to ``orth_dion`` to decide otherwise.
  """
  def label(path, x):
    by_name = any(_ADAM_BY_NAME.search(n) for n in _path_names(path))
    return LOW_RANK if jax.numpy.ndim(x) == 2 and not by_name else ADAM
  return jax.tree_util.tree_map_with_path(label, params)


def _labels_fn(weight_dimension_numbers, param_labels) -> Callable:
  if param_labels is not None:
    return param_labels if callable(param_labels) else (lambda _: param_labels)
  if weight_dimension_numbers is None:
    return default_param_labels

  def from_dimension_numbers(params):
    dims = (weight_dimension_numbers(params)
            if callable(weight_dimension_numbers) else weight_dimension_numbers)
    return jax.tree.map(
        lambda d, sub: jax.tree.map(
            lambda _: ADAM if d is None else LOW_RANK, sub),
        dims, params, is_leaf=matrix_view.is_dimension_numbers_leaf)
  return from_dimension_numbers


def _check_gradient_shapes(updates, params, *, replica_axis: bool) -> None:
  """Every gradient leaf has its parameter's shape, or a ValueError names it.

  Checked for every leaf, whichever transformation it goes to: AdamW would
  broadcast a (1,)-shaped gradient onto a bias without a word. With
  ``replica_axis`` (compressed data parallelism) a leading replica axis is
  expected.
  """
  updates = transform._without_variable_boxes(updates)
  params = transform._without_variable_boxes(params)
  for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                          transform._flatten_like(updates, params,
                                                  "the parameters")):
    shape, expected = jnp.shape(g), jnp.shape(p)
    if shape != expected and not (replica_axis and shape[1:] == expected):
      raise ValueError(
          f"{jax.tree_util.keystr(path)}: the gradient has shape {shape}, "
          f"but the parameter has shape {expected}"
          + (" (plus a leading replica axis)" if replica_axis else "") + ".")


def _partition_by_params(transforms: dict, labels_fn: Callable, *,
                         params_required: bool
                         ) -> optax.GradientTransformationExtraArgs:
  """``optax.partition`` whose labels are read from the parameters.

  ``optax.partition`` labels the gradients in ``update``; then a gradient
  leaf of the wrong rank would be routed elsewhere than init routed its
  parameter and fail in the other group, far from its cause. Labelled like
  the parameters it reaches its own transformation, whose shape check names
  it. With compressed data parallelism the gradients carry a leading
  replica axis, so labels that look at shapes can only come from ``params``.
  """
  # Labels read off bare arrays are a prefix of the tree whether or not its
  # leaves are in nnx Variable boxes (nnx.Optimizer boxes them for init, not
  # for update), so init and update mask the same subtrees.
  def labels_of(tree):
    labels = labels_fn(transform._without_variable_boxes(tree))
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
      if label not in transforms:
        raise ValueError(
            f"{jax.tree_util.keystr(path)}: param_labels gives it the label "
            f"{label!r}; the labels are {tuple(transforms)}.")
    return labels

  def init_fn(params):
    return optax.partition(transforms, labels_of(params)).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None and params_required:
      raise ValueError("With data_axis set, update needs params: the routing "
                       "labels are read from the parameters' shapes.")
    if params is not None:
      _check_gradient_shapes(updates, params, replica_axis=params_required)
    labels = labels_of(updates if params is None else params)
    return optax.partition(transforms, labels).update(
        updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _orth_dion_family(
    learning_rate, *, rank_fraction, rank, rank_multiple_of, mu,
    weight_decay, eps, right_factor, orthogonalize, power_iters, scale, seed,
    momentum_dtype, weight_dimension_numbers, param_labels,
    adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay,
    mesh, param_specs, data_axis,
) -> optax.GradientTransformation:
  validation.check_nonnegative("learning_rate", learning_rate)
  if adam_learning_rate is not None:
    validation.check_nonnegative("adam_learning_rate", adam_learning_rate)
  validation.check_nonnegative("weight_decay", weight_decay)
  validation.check_nonnegative("adam_weight_decay", adam_weight_decay)
  validation.check_nonnegative("adam_eps", adam_eps)
  for name, value in (("adam_b1", adam_b1), ("adam_b2", adam_b2)):
    validation.check_unit_interval(name, value, closed_right=False)
  low_rank_chain = optax.chain(
      transform.scale_by_orth_dion(
          rank_fraction=rank_fraction, rank=rank,
          rank_multiple_of=rank_multiple_of, mu=mu, eps=eps,
          right_factor=right_factor, orthogonalize=orthogonalize,
          power_iters=power_iters, scale=scale, seed=seed,
          momentum_dtype=momentum_dtype,
          weight_dimension_numbers=weight_dimension_numbers, mesh=mesh,
          param_specs=param_specs, data_axis=data_axis),
      nonfinite.decay_and_scale_if_finite(learning_rate, weight_decay),
  )
  adam_chain = nonfinite.skip_nonfinite_steps(
      optax.adamw(
          learning_rate=(learning_rate if adam_learning_rate is None
                         else adam_learning_rate),
          b1=adam_b1, b2=adam_b2, eps=adam_eps,
          weight_decay=adam_weight_decay))
  labels_fn = _labels_fn(weight_dimension_numbers, param_labels)
  if data_axis is not None:
    # AdamW leaves are not compressible: their gradients are averaged first.
    adam_chain = optax.chain(data_parallel.average_replicas(), adam_chain)
  return _partition_by_params({LOW_RANK: low_rank_chain, ADAM: adam_chain},
                              labels_fn, params_required=data_axis is not None)


def orth_dion(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank_fraction: float = 0.25,
    rank: int | None = None,
    rank_multiple_of: int = 1,
    mu: optax.ScalarOrSchedule = 0.95,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    eps: optax.ScalarOrSchedule = 1e-8,
    right_factor: str = "qr",
    orthogonalize: str = "cholesky_qr",
    power_iters: int = 1,
    scale: matrix_view.Scale = "spectral",
    seed: int = 0,
    momentum_dtype=None,
    weight_dimension_numbers: Any = None,
    param_labels: Any = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.95,
    adam_b2: float = 0.98,
    adam_eps: float = 1e-8,
    adam_weight_decay: optax.ScalarOrSchedule = 0.0,
    mesh: jax.sharding.Mesh | None = None,
    param_specs: Any = None,
    data_axis: str | None = None,
) -> optax.GradientTransformation:
  r"""Orth-Dion: low-rank orthonormalized updates for matrices, AdamW elsewhere.

  For each hidden weight matrix ``X`` with gradient ``G`` (docs/design.md, "The step")::

    B = M + G;  P = orth(B Q);  R = B^T P;  M = B - (1 - mu) P R^T
    Q = qr_+(R);  X = (1 - lr wd) X - lr s P Q^T

  ``P Q^T`` is an exact rank-r partial isometry (its r singular values are
  1), the steepest-descent direction of the rank-r spectral geometry.
  Dion's column-normalized ``Q`` (``dion``) leaves that unit ball: its
  spectral norm can reach sqrt(r).

  Routing: leaves labelled ``"low_rank"`` get Orth-Dion, ``"adam"`` AdamW. By
  default 2-D leaves are low-rank except those whose path names an embedding
  or a head (``default_param_labels``); ``weight_dimension_numbers`` (a tree
  or callable with ``DionDimensionNumbers`` for low-rank leaves and ``None``
  for AdamW ones) or ``param_labels`` override it.

  Non-finite values never reach parameters or state: a low-rank matrix whose
  gradient, schedule values, buffer ``B = M + G`` or factors are not finite
  skips its low-rank step (zero update, right factor kept, counted in the
  state's ``nonfinite_count``; decoupled weight decay still applies). Its
  momentum is kept when only the gradient or a schedule was bad, reset to
  zero when ``B`` itself was not finite (see ``transform._finish``). A
  non-finite learning-rate or weight-decay value means learning rate 0 for
  that step (``ScheduleGuardState``); the AdamW leaves skip a step whose
  gradient, updates or moments are not finite (``ApplyIfFiniteState``).

  Args:
    learning_rate: learning rate of the low-rank step (float or schedule).
    rank_fraction: r = ceil(rank_fraction * min(fan_in, fan_out)).
    rank: explicit rank (overrides ``rank_fraction``; clipped per matrix).
    rank_multiple_of: round r up to a multiple of this.
    mu: error-feedback decay of the captured part (float or schedule).
    weight_decay: decoupled weight decay of the low-rank matrices.
    eps: Dion's column-normalization epsilon.
    right_factor: ``"qr"`` (Orth-Dion) or ``"column"`` (Dion).
    orthogonalize: ``"cholesky_qr"``, ``"householder"`` or
      ``"randomized_cholesky_qr"``.
    power_iters: power iterations per step.
    scale: ``"spectral"`` (sqrt(fan_out/fan_in)), ``"rms"``
      (0.2 sqrt(max(fan_in, fan_out))), a float, or None.
    seed: seed of the initial right factors (identical on all replicas).
    momentum_dtype: dtype of the low-rank momentum, e.g. ``jnp.bfloat16``.
    weight_dimension_numbers: tree or callable of ``DionDimensionNumbers`` /
      ``None`` for N-D weights and routing.
    param_labels: tree or callable of ``"low_rank"`` / ``"adam"`` labels.
    adam_learning_rate: AdamW's learning rate (default: ``learning_rate``).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps: AdamW's epsilon.
    adam_weight_decay: AdamW's decoupled weight decay.
    mesh: the mesh the parameters are sharded over. The low-rank step then
      runs under ``jax.shard_map`` and only (big x r), (small x r) and
      (r x r) pieces cross devices; state leaves are sharded to fit.
    param_specs: tree of ``PartitionSpec`` (or ``NamedSharding``) like the
      parameters; None reads them from the arrays (an ``Explicit`` mesh, or
      concrete arrays). Required under jit with ``Auto`` mesh axes.
    data_axis: turn on compressed data parallelism over this mesh axis:
      gradients come per replica (``per_replica_value_and_grad``) and only
      ``P`` and ``R`` are averaged (see ``data_parallel``).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from orth_dion_jax import orth_dion
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
    >>> tx = orth_dion(learning_rate=0.01, rank_fraction=0.5)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Nakamori et al., Orth-Dion: Eliminating Geometric Mismatch in Distributed
    Low-Rank Spectral Optimization, https://arxiv.org/abs/2605.16341
    Ahn et al., Dion: Distributed Orthonormalized Updates,
    https://arxiv.org/abs/2504.05295
  """
  return _orth_dion_family(**locals())


def dion(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank_fraction: float = 0.25,
    rank: int | None = None,
    rank_multiple_of: int = 1,
    mu: optax.ScalarOrSchedule = 0.95,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    eps: optax.ScalarOrSchedule = 1e-8,
    right_factor: str = "column",
    orthogonalize: str = "cholesky_qr",
    power_iters: int = 1,
    scale: matrix_view.Scale = "spectral",
    seed: int = 0,
    momentum_dtype=None,
    weight_dimension_numbers: Any = None,
    param_labels: Any = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.95,
    adam_b2: float = 0.98,
    adam_eps: float = 1e-8,
    adam_weight_decay: optax.ScalarOrSchedule = 0.0,
    mesh: jax.sharding.Mesh | None = None,
    param_specs: Any = None,
    data_axis: str | None = None,
) -> optax.GradientTransformation:
  r"""Dion: ``orth_dion`` with the column-normalized right factor.

  ``Q = R / (||R||_col + eps)`` instead of ``qr_+(R)``; the update ``P Q^T``
  then has spectral norm in [1, sqrt(r)]. The baseline Orth-Dion fixes; all
  arguments as in ``orth_dion``.

  References:
    Ahn et al., Dion: Distributed Orthonormalized Updates,
    https://arxiv.org/abs/2504.05295
  """
  return _orth_dion_family(**locals())
