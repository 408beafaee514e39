"""The optimizers users call: ``orth_dion`` and ``dion``.

Each is ``optax.partition`` of two chains (``routing``; docs/design.md,
"Where each parameter goes"):

* hidden weight matrices: the low-rank step with error feedback, then
  decoupled weight decay and the learning rate,
  ``X <- (1 - lr wd) X - lr s P Q^T``;
* every other leaf (embeddings, LM head, biases, norm scales): AdamW with its
  own learning rate, skipped for a step whose gradient is not finite.

Both take the same settings (``settings``); they differ only in the right
factor, which each fixes.
"""

from __future__ import annotations

import functools
from typing import Any

import optax

from orth_dion_jax import adaptive_rank
from orth_dion_jax import data_parallel
from orth_dion_jax import nnx_interop
from orth_dion_jax import nonfinite
from orth_dion_jax import routing
from orth_dion_jax import settings
from orth_dion_jax import transform
from orth_dion_jax import validation
from orth_dion_jax.settings import (ErrorFeedback, LowRankCompressor,
                                    MatrixAxes, OtherLeaves, Placement)

_GROUPS = (LowRankCompressor, ErrorFeedback, MatrixAxes, Placement,
           OtherLeaves)


def _low_rank_and_adamw(fn, learning_rate, kwargs: dict[str, Any], *,
                        fixed: dict[str, Any] | None = None
                        ) -> optax.GradientTransformation:
  validation.check_nonnegative("learning_rate", learning_rate)
  given = settings.parse(fn, kwargs, fixed=fixed)
  feedback, axes = given[ErrorFeedback], given[MatrixAxes]
  placement, other = given[Placement], given[OtherLeaves]
  low_rank_chain = optax.chain(
      transform.low_rank_transformation(
          given[LowRankCompressor], feedback=feedback.decays,
          momentum_dtype=feedback.dtype, axes=axes, placement=placement),
      nonfinite.decay_and_scale_if_finite(learning_rate, other.weight_decay),
  )
  adam_chain = nonfinite.skip_nonfinite_steps(optax.adamw(
      learning_rate=(learning_rate if other.adam_learning_rate is None
                     else other.adam_learning_rate),
      b1=other.adam_b1, b2=other.adam_b2, eps=other.adam_eps,
      weight_decay=other.adam_weight_decay))
  if placement.data_axis is not None:
    # AdamW leaves are not compressible: their gradients are averaged first.
    adam_chain = optax.chain(data_parallel.average_replicas(), adam_chain)
  return routing.partition_by_params(
      {routing.LOW_RANK: low_rank_chain, routing.ADAM: adam_chain},
      routing.labels_fn(axes.weight_dimension_numbers, other.param_labels,
                        axes.layer_axes),
      num_replicas=(None if placement.data_axis is None
                    else placement.mesh.shape[placement.data_axis]),
      warn_at_init=(functools.partial(routing.warn_unrouted_weights,
                                      layer_axes=axes.layer_axes)
                    if axes.weight_dimension_numbers is None
                    and other.param_labels is None else None))


# The aliases differ only in the right factor: dion fixes Dion's.
_DION_FIXED = {"right_factor": "dion fixes the column-normalized right "
                               "factor; orth_dion takes right_factor='qr' or "
                               "'polar'"}


@settings.accepts(*_GROUPS)
def orth_dion(learning_rate: optax.ScalarOrSchedule,
              **kwargs) -> optax.GradientTransformation:
  r"""Orth-Dion: low-rank orthonormalized updates for matrices, AdamW elsewhere.

  For each hidden weight matrix ``X`` with gradient ``G`` (docs/design.md,
  "The step")::

    B = M + G;  P = orth(B Q);  R = B^T P;  M = B - (1 - mu) P R^T
    Q = qr_+(R);  X = (1 - lr wd) X - lr s P Q^T

  ``P Q^T`` is an exact rank-r partial isometry (its r singular values are
  1), a descent direction in the unit ball of the rank-r spectral geometry.
  Dion's column-normalized ``Q`` (``dion``) leaves that unit ball: its
  spectral norm can reach sqrt(r). ``right_factor="polar"`` takes
  ``Q = polar(R)``, the partial isometry best aligned with ``B``
  (``P Q^T = polar(P P^T B)``); ``error_feedback="beta"`` is the form the
  paper's experiments ran, ``M = beta (B - P R^T)``.

  Routing (``routing``): matrices get Orth-Dion, except embeddings, heads,
  norms and biases, which get AdamW with every non-matrix leaf;
  ``layer_axes`` for stacked layers, ``weight_dimension_numbers`` or
  ``param_labels`` to decide otherwise; ``routing_summary`` shows it.

  Non-finite values never reach parameters or state (docs/design.md,
  "Failure semantics"): a matrix whose gradient, schedule values, buffer or
  factors are not finite skips its low-rank step (counted in the state's
  ``nonfinite_count``); a non-finite learning-rate or weight-decay value
  means learning rate 0 for that step; the AdamW leaves skip a step whose
  gradient, updates or moments are not finite.

  Args:
    learning_rate: learning rate of the low-rank step (float or schedule).

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
    >>> params["w"].shape
    (16, 8)

  References:
    Nakamori et al., Orth-Dion: Eliminating Geometric Mismatch in Distributed
    Low-Rank Spectral Optimization, https://arxiv.org/abs/2605.16341
    Ahn et al., Dion: Distributed Orthonormalized Updates,
    https://arxiv.org/abs/2504.05295
  """
  if kwargs.get("right_factor") == "column":
    raise TypeError("orth_dion(right_factor='column') would be Dion: use "
                    "dion(...), or right_factor='qr' or 'polar'.")
  return _low_rank_and_adamw(orth_dion, learning_rate, kwargs)


@settings.accepts(*_GROUPS, omit=_DION_FIXED)
def dion(learning_rate: optax.ScalarOrSchedule,
         **kwargs) -> optax.GradientTransformation:
  r"""Dion: ``orth_dion`` with the column-normalized right factor.

  ``Q = R / (||R||_col + eps)`` instead of ``qr_+(R)``; the update ``P Q^T``
  then has spectral norm in [1, sqrt(r)]. The baseline Orth-Dion fixes;
  the settings are those of ``orth_dion``.

  Args:
    learning_rate: learning rate of the low-rank step (float or schedule).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.eye(16, 8)}
    >>> tx = dion(learning_rate=0.01, rank=2)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape
    (16, 8)

  References:
    Ahn et al., Dion: Distributed Orthonormalized Updates,
    https://arxiv.org/abs/2504.05295
  """
  return _low_rank_and_adamw(dion, learning_rate, kwargs,
                             fixed={"right_factor": "column"})


@settings.accepts(*_GROUPS)
def routing_summary(params: Any, opt_state: Any = None, **kwargs
                    ) -> routing.RoutingSummary:
  """Where ``orth_dion`` / ``dion`` with these settings send each leaf.

  Takes the optimizers' settings (those that do not affect routing are
  accepted and ignored, so the same keywords can be passed to both) and
  returns a ``RoutingSummary``: one ``LeafRoute`` per leaf with its route,
  number of matrices, rank, update scale and right-factor shape;
  ``print(routing_summary(params))`` shows them as a table. Given the
  optimizer's state (``opt_state``), the ranks are those it holds now (with
  ``adaptive_rank``, the ones ``RankController`` chose).

  Example:
    >>> import jax.numpy as jnp
    >>> summary = routing_summary({"w": jnp.ones((64, 32)),
    ...                            "bias": jnp.ones(32)})
    >>> [(r.path, r.route, r.rank) for r in summary]
    [("['bias']", 'adam', None), ("['w']", 'low_rank', 8)]
  """
  given = settings.parse(routing_summary, kwargs)
  axes, other = given[MatrixAxes], given[OtherLeaves]
  params = nnx_interop.unboxed(params)
  labels = routing.labels_fn(axes.weight_dimension_numbers,
                             other.param_labels, axes.layer_axes)(params)
  view = given[LowRankCompressor].view
  if opt_state is not None:
    held = adaptive_rank.current_ranks(nnx_interop.unboxed(opt_state))
    routed = set()

    def view(path, shape, dims, compressor=given[LowRankCompressor]):
      routed.add(path)
      if path not in held:
        raise ValueError(f"routing_summary: {path} is routed to the low-rank "
                         "step, but opt_state holds no right factor for it "
                         "(is it the state of this optimizer?).")
      return compressor.view(path, shape, dims, rank=held[path])
  summary = routing.summarize(params, labels, view,
                              axes.weight_dimension_numbers, axes.layer_axes)
  if opt_state is not None and set(held) - routed:
    raise ValueError(
        "routing_summary: opt_state holds right factors for "
        f"{sorted(set(held) - routed)}, which these settings route to "
        "AdamW: pass the settings the optimizer was built with (e.g. "
        "layer_axes, weight_dimension_numbers).")
  return summary
