"""The non-finite guard around the low-rank step: optax transformations.

NaN and Inf never reach parameters or state. Three places need a guard, each
branch-free (selects, no ``lax.cond``: a cond's branches would have to agree
on dtypes):

* the low-rank step itself, per matrix (``matrix_step``);
* the low-rank chain's learning rate and weight decay
  (``decay_and_scale_if_finite``, here): a non-finite value means learning
  rate 0;
* the AdamW-routed leaves (``skip_nonfinite_steps``, here).

Why each failure is handled as it is: docs/design.md, "Failure semantics".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from orth_dion_jax.matrix_step import schedule_value

Array = jax.Array


def _all_finite(tree) -> Array:
  """() bool: every floating leaf of ``tree`` is finite."""
  return functools.reduce(
      jnp.logical_and,
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
       if jnp.issubdtype(jnp.result_type(x), jnp.inexact)],
      jnp.array(True))


def skip_nonfinite_steps(inner: optax.GradientTransformation
                         ) -> optax.GradientTransformationExtraArgs:
  """``inner``, except that a step that would be non-finite changes nothing.

  A step is skipped when the gradient, or what ``inner`` makes of it (its
  updates and new state: a NaN learning-rate value, a gradient whose square
  overflows a second moment), is not finite; the moments are kept, the step
  counters advance (so that a schedule that is NaN at one count does not hold
  every later step there), and the skip is counted.

  ``optax.apply_if_finite`` without its ``lax.cond`` and without giving up.
  The cond's two branches must agree on dtypes, but its skip branch returns
  zeros like the gradient while AdamW returns updates (and moments) in the
  promoted dtype: a bfloat16 gradient for a float32 bias failed to trace.
  Here ``inner`` always runs, on a zeroed gradient when it is not finite so
  nothing it computes is NaN, and a select keeps the old state; the updates
  and state have ``inner``'s own dtypes, as when it runs alone, and the step
  stays free of control flow.

  The state is optax's ``ApplyIfFiniteState``: ``notfinite_count`` counts the
  consecutive skipped steps, ``total_notfinite`` all of them.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    # Moments restored non-finite (a corrupt checkpoint) would fail the check
    # below on every later step: they restart from zero, and the step that
    # finds them is skipped and counted.
    state_finite = _all_finite(state.inner_state)
    inner_state = jax.tree.map(
        lambda x: (x if not jnp.issubdtype(x.dtype, jnp.inexact) else
                   jnp.where(state_finite, x, 0).astype(x.dtype)),
        state.inner_state)
    finite = _all_finite(updates)
    updates = jax.tree.map(lambda g: jnp.where(finite, g, 0), updates)
    new_updates, new_inner = inner.update(updates, inner_state, params,
                                          **extra_args)
    # What the step produces is checked too: a learning-rate schedule's NaN,
    # or a finite gradient whose square overflows the second moment.
    finite &= state_finite & _all_finite((new_updates, new_inner))
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, 0), new_updates)
    # The select promotes to the wider dtype; cast back so the state has the
    # dtypes inner gives it whether the step was taken or skipped.
    # Step counters advance even on a skipped step: a schedule that is NaN
    # at one count must not hold every later step at that count.
    new_inner = jax.tree.map(
        lambda new, old: (new if jnp.issubdtype(new.dtype, jnp.integer) else
                          jnp.where(finite, new, old).astype(new.dtype)),
        new_inner, inner_state)
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=jnp.where(
            finite, 0, optax.safe_increment(state.notfinite_count)),
        last_finite=finite,
        total_notfinite=jnp.where(
            finite, state.total_notfinite,
            optax.safe_increment(state.total_notfinite)),
        inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScheduleGuardState(NamedTuple):
  """State of the low-rank chain's last step (learning rate, weight decay)."""
  count: jax.Array            # (), int32: steps taken (the schedules' input)
  nonfinite_count: jax.Array  # (), int32: steps whose lr or wd was not finite


def decay_and_scale_if_finite(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
) -> optax.GradientTransformation:
  """``u <- -lr (u + wd X)``: decoupled weight decay and the learning rate.

  ``optax.add_decayed_weights`` then ``optax.scale_by_learning_rate``, except
  that a step whose ``lr`` or ``wd`` value is NaN or Inf (a schedule gone
  wrong) is taken with learning rate 0: the parameters do not move and the
  step is counted in ``ScheduleGuardState.nonfinite_count``. The select is
  part of the elementwise pass that scales the updates.
  """
  def init_fn(params):
    del params
    return ScheduleGuardState(jnp.zeros([], jnp.int32),
                              jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    lr = schedule_value(learning_rate, state.count)
    wd = schedule_value(weight_decay, state.count)
    finite = jnp.isfinite(lr) & jnp.isfinite(wd)
    if params is None:
      raise ValueError("orth_dion / dion: update needs params (decoupled "
                       "weight decay reads them).")
    updates = jax.tree.map(
        lambda u, x: jnp.where(finite, -lr * (u + wd * x), 0).astype(u.dtype),
        updates, params)
    return updates, ScheduleGuardState(
        optax.safe_increment(state.count),
        state.nonfinite_count + (~finite).astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)
