"""One optimizer step of every weight matrix: the glue around the math.

``step_matrices`` takes each weight's gradient, momentum and right factor,
forms the buffer ``B = M + G`` in the layout view (``matrix_view``), runs the
power iteration of all matrices together (``low_rank.power_iteration``, where
factors that share a rank are orthonormalized in one batched call) and
derives the update ``s P Q^T``, the error feedback and the new state of each.

The same code runs on whole arrays (one device) and on one device's blocks
inside ``jax.shard_map`` (``placement``): each weight's ``Collectives`` say
which mesh axes complete its sums, and are empty on one device.

Non-finite values (docs/design.md, "Failure semantics"): a matrix whose
gradient, schedule values, ``B``, ``R`` or new ``Q`` is not finite, or whose
new momentum would not fit its dtype, is skipped for that step: zero update,
``Q`` kept, the skip counted. Its momentum is kept when only the gradient or
a schedule was bad, and reset to zero when ``B`` itself or its factors were
not finite. The other matrices step normally.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from orth_dion_jax import low_rank
from orth_dion_jax import matrix_view
from orth_dion_jax import megabatch
from orth_dion_jax import scaling
from orth_dion_jax.scaling import abs_max, unit_scaled
from orth_dion_jax.collectives import Collectives
from orth_dion_jax.settings import LowRankCompressor

Array = jax.Array


class StepInputs(NamedTuple):
  """What the step reads: one entry per matrix in each list, and scalars."""
  grads: list[Array]              # like the weights (plus a replica axis)
  momenta: list[Any]   # like the weights; None without momentum;
                       # ReplicaMomenta in compressed mode until placement
                       # unwraps them for shard_map
  right_factors: list[Array]      # batch + (small, r), float32
  nonfinite_counts: list[Array]   # batch shape, int32
  count: Array                    # (), int32: steps taken
  eps: Array                      # (), float32: Dion's epsilon this step
  decays: tuple[Array, Array] | None   # (), float32: (residual, captured)
  # Adaptive rank only (None otherwise): the smoothed effective ranks, batch
  # shape float32, and the right factors' energy Grams, batch + (r, r).
  effective_ranks: list[Array] | None = None
  right_energies: list[Array] | None = None


class MatrixStep(NamedTuple):
  """What the step returns for one matrix."""
  update: Array                # like the weight, in the parameter's dtype
  momentum: Array | None       # like the weight, the momentum's dtype
  right_factor: Array          # batch + (small, r), float32
  captured_fraction: Array     # batch shape, float32
  alignment: Array             # batch shape, float32
  nonfinite_count: Array       # batch shape, int32
  effective_rank: Array | None = None   # batch shape, float32 (adaptive)
  right_energy: Array | None = None     # batch + (r, r), float32 (adaptive)


def schedule_value(value: optax.ScalarOrSchedule, count: Array) -> Array:
  """A hyperparameter's value at ``count``, as a float32 scalar (an operand
  that ``shard_map`` replicates)."""
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def _finite_right_factor(q: Array, collectives: Collectives
                          ) -> tuple[Array, Array]:
  """The carried ``Q``, or the first r columns of I where it is not usable.

  A right factor restored from a corrupt checkpoint would otherwise make
  every later step of its matrix non-finite (or, all zero, skipped). The
  replacement is the same on every replica (no randomness) and of full
  column rank. Returns the factor and the (n,) flag of those that were
  usable.
  """
  c = collectives
  # An all-zero Q is as unusable (B Q = 0: the matrix would never step again).
  largest = c.everything.max(abs_max(q, axis=(-2, -1)))
  finite = jnp.isfinite(largest) & (largest > 0)
  small, rank = q.shape[-2:]
  eye = c.small.local(jnp.eye(small * c.small.size(), rank, dtype=q.dtype),
                      axis=-2)
  return jnp.where(finite[:, None, None], q, eye), finite


def _momentum_fits(b_max: Array, factors: low_rank.LowRankFactors,
                   decays: tuple[Array, Array], dtype: jnp.dtype,
                   collectives: Collectives) -> Array:
  """(n,) bool: the new momentum cannot overflow ``dtype`` (float16,
  bfloat16 or float32).

  ``|M'| <= a max|B| + |a - c| max_j ||R_j||``, since the rows of ``P`` have
  norm <= 1 (for float32, ``max_j ||R_j|| <= sqrt(r) max|R|``): a bound from
  quantities the step has, so a float16 momentum is
  never written as Inf (checking ``M'`` itself would need a pass over it
  before it may be stored).
  """
  a, c = (jnp.reshape(d, (-1,)) for d in decays)
  r = factors.projected
  r_max = collectives.everything.max(abs_max(r, axis=(-2, -1)))
  if jnp.finfo(dtype).max < jnp.finfo(jnp.float32).max:
    # Rows of R / 2^e, whose largest entry is f = mantissa(r_max): the
    # largest row norm is r_max sqrt(rows) / f.
    row_norms = collectives.everything.max(abs_max(jnp.sum(jnp.square(
        unit_scaled(r, r_max[:, None, None])), axis=-1), axis=-1))
    row_norm = r_max / scaling.mantissa(r_max) * jnp.sqrt(row_norms)
  else:
    # float32: ||R_j|| <= sqrt(r) max|R| is tight enough this close to the
    # top of the range, and the pass over R's rows cost XLA:CPU's schedule
    # 0.2 float32 m x n of temporaries per matrix.
    row_norm = r_max * r.shape[-1] ** 0.5
  captured = jnp.where(factors.moved.reshape(-1) > 0, row_norm, 0.0)
  bound = a * b_max + jnp.abs(a - c) * captured
  return bound <= float(jnp.finfo(dtype).max)


def _all_hold(checks: Sequence[Array]) -> Array:
  """(n,) bool: every one of the (n,) bool ``checks`` holds, per matrix.

  Written as a count of the checks that fail (a reduction), not as a chain
  of ``&``: XLA copies a chain of cheap elementwise ops into each of its
  consumers, and in a megabatch those are every leaf's slice of every
  output, so the chain of checks would be compiled into each of those
  kernels. A reduction is computed once and read by all of them.
  """
  failed = jnp.stack([~check for check in checks]).astype(jnp.int32)
  return jnp.sum(failed, axis=0) == 0


class _Prepared(NamedTuple):
  """A megabatch in layout view, ready for the power iteration."""
  view: matrix_view.MatrixView   # sizes of this device's block
  buffer: megabatch.Parts   # B = M + G (or G without momentum), arrays
                            # (n_i, fan_in, fan_out), apart or joined
  finite: Array    # (n,) bool: the gradient and the schedules are finite
  momentum_dtype: jnp.dtype | None = None   # the new momentum's (None: none)


def _prepare(views: Sequence[matrix_view.MatrixView], grads: Sequence[Array],
             momenta: Sequence[Array | None], collectives: Collectives,
             schedules_finite: Array, offsets: Sequence[Array]) -> _Prepared:
  """The buffer of a megabatch's leaves, in layout view.

  ``views``: the members' own (their fan sizes agree, but not necessarily
  the order of their axes: each leaf is brought to the layout by its own
  view); ``offsets``: their ``megabatch.runtime_offsets``.
  """
  view = views[0]
  gs = [v.to_layout(g) for v, g in zip(views, grads)]
  sizes = [g.shape[0] for g in gs]
  # A non-finite gradient (or schedule value) is dropped before it touches the
  # momentum: B = M, and _finish keeps that M. abs_max(g) is Inf exactly
  # when some entry is NaN or Inf: one reduction per leaf. Every block and
  # replica must agree on the flags: one collective for the megabatch.
  bad = megabatch.joined([~jnp.isfinite(abs_max(g, axis=(-2, -1)))
                          for g in gs])
  finite = ((collectives.everything.max(bad.astype(jnp.int32)) == 0)
            & schedules_finite)
  flags = megabatch.parted(finite, sizes, offsets)
  # Each leaf's B is formed by a kernel shared by the leaves of its shape;
  # large ones stay apart, small ones are joined (megabatch.kept_apart).
  if momenta[0] is None:
    return _Prepared(view, megabatch.Parts.of(
        [jnp.where(f[:, None, None], g, 0) for f, g in zip(flags, gs)],
        offsets), finite)
  ms = [v.to_layout(m) for v, m in zip(views, momenta)]
  # B is held in float32 at least (or the momentum's wider dtype): with a
  # bfloat16 momentum that is the one weight-sized temporary per matrix, and
  # the products read it directly, where a bfloat16 B would be converted to
  # float32 once per product by backends without bfloat16 matmuls (XLA:CPU).
  dtype = jnp.promote_types(ms[0].dtype, jnp.float32)
  return _Prepared(view, megabatch.Parts.of(
      [m.astype(dtype) + jnp.where(f[:, None, None], g, 0).astype(dtype)
       for f, g, m in zip(flags, gs, ms)], offsets), finite, ms[0].dtype)


def _finish(
    prepared: _Prepared,
    factors: low_rank.LowRankFactors,
    q: Array,
    q_finite: Array,
    nonfinite_count: Array,
    adaptive: tuple[Array, Array] | None,
    *,
    decays: tuple[Array, Array] | None,
    update_dtype,
    collectives: Collectives,
    compressor: LowRankCompressor,
) -> MatrixStep:
  """Update, error feedback and new state of a megabatch from its factors,
  in layout view: the update and the momentum as lists of arrays
  ``(n_i, fan_in, fan_out)`` like ``prepared.buffer.arrays`` (each
  member's, or one joined), the rest joined (``(n, small, r)`` factors,
  ``(n,)`` scalars).

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

  ``adaptive``: the previous smoothed effective ranks ``(n,)`` and right
  energies ``(n, r, r)`` (adaptive rank), or None. A step's estimate
  (``low_rank.energy_rank``) enters the moving average only when the step
  was taken; the first one replaces the initial 0.
  """
  view, b, finite, momentum_dtype = prepared
  b_max = low_rank.largest_magnitude(b, collectives)
  # The new momentum a B - (a - c) P R^T is finite when B, P and R are; the
  # update P Q^T needs the new Q too.
  checks = [jnp.isfinite(b_max),
            low_rank.all_finite(factors.projected, collectives)]
  if decays is not None:
    # A skipped matrix gets decays (1, 1): M' = B = M, unchanged.
    decays = tuple(jnp.where(finite, d, 1.0) for d in decays)
    # Checked for float32 too: a finite B near the top of the range can still
    # give an infinite B - P R^T.
    checks.append(_momentum_fits(b_max, factors, decays, momentum_dtype,
                                 collectives))
  healthy = _all_hold(checks)
  step = _all_hold([finite, healthy,
                    low_rank.all_finite(factors.right, collectives)]
                   )[:, None, None]
  # Masks are selects in the elementwise pass that reads each product (a
  # multiplication by 0 would keep a NaN); neither a factor nor a
  # weight-sized array is copied to mask it. After B is formed nothing refers
  # to the old momentum, so B's buffer can become the new momentum in place.
  # The weight-sized results are formed like B (b.each): member by member,
  # from each one's rows of the joined factors, or joined.
  update = b.each(
      lambda _, left, right, moved, taken: jnp.where(
          taken, view.scale * moved * low_rank.outer(left, right,
                                                     view.small_axis),
          0.0).astype(update_dtype),
      factors.left, factors.right, factors.moved, step)
  new_q = jnp.where(step, factors.right, q)
  if decays is None:
    new_m = None
  else:
    # The feedback does not read the new Q: None, so that it is not sliced.
    new_m = b.each(
        lambda member, fs, keep, residual_decay, captured_decay: jnp.where(
            keep[:, None, None], low_rank.error_feedback(
                member, fs, small_axis=view.small_axis,
                residual_decay=residual_decay[:, None, None],
                captured_decay=captured_decay[:, None, None]),
            0.0).astype(momentum_dtype),
        factors._replace(right=None), healthy, *decays)
  taken = lambda value: jnp.where(step[:, 0, 0], value, 0.0)
  captured = taken(low_rank.captured_fraction(b, factors, b_max, collectives))
  spectrum = low_rank.spectrum(factors, collectives,
                               right_energy=adaptive is not None)
  effective_rank = right_energy = None
  if adaptive is not None:
    previous_rank, previous_energy = adaptive
    share, ema = compressor.rank_estimate
    estimate = low_rank.energy_rank(
        spectrum.eigenvalues, captured, share,
        view.small * collectives.small.size())
    # A previous value that is 0 (no step yet) or not a finite positive
    # number (a corrupt checkpoint) is replaced, not averaged with.
    usable = jnp.isfinite(previous_rank) & (previous_rank > 0)
    effective_rank = jnp.where(
        estimate > 0,
        jnp.where(usable, ema * previous_rank + (1 - ema) * estimate,
                  estimate),
        previous_rank)
    right_energy = jnp.where(step, spectrum.right_energy, previous_energy)
  return MatrixStep(
      update=update,
      momentum=new_m,
      right_factor=new_q,
      captured_fraction=captured,
      alignment=taken(spectrum.alignment),
      # A repaired right factor counts as a non-finite event too.
      nonfinite_count=nonfinite_count
      + (~(step[:, 0, 0] & q_finite)).astype(jnp.int32),
      effective_rank=effective_rank,
      right_energy=right_energy,
  )


def _megabatch_key(view: matrix_view.MatrixView, grad: Array,
                   momentum: Array | None, collectives: Collectives,
                   update_dtype) -> tuple:
  """Leaves with equal keys are stepped as one batch: the same fan sizes of
  their blocks (in whatever axis order), rank, scale, collectives and
  dtypes."""
  return (view.fan_in, view.fan_out, view.small_axis, view.rank, view.scale,
          collectives, grad.dtype, None if momentum is None else
          momentum.dtype, jnp.dtype(update_dtype))


def step_matrices(compressor: LowRankCompressor,
                  views: Sequence[matrix_view.MatrixView],
                  update_dtypes: Sequence[jnp.dtype],
                  collectives: Sequence[Collectives],
                  inputs: StepInputs) -> list[MatrixStep]:
  """One step of every matrix, on whole arrays or on one device's blocks.

  ``views`` describe the whole weights; each is localized to the block it is
  given (the identity on one device), and ``collectives`` complete the sums
  across blocks and replicas. Each update comes out in its
  ``update_dtypes`` entry (the parameter's dtype, as optax's updates do).

  Megabatching: the matrices of all leaves that share a block shape, rank,
  scale, collectives and dtypes (the q, k, v and o projections of every
  layer of an unscanned model, say) are stepped as one batch, so that a
  model with hundreds of weights compiles and runs a handful of batched
  products, factorizations and collectives, as its scanned form does
  (docs/design.md, "Megabatching").
  """
  # A schedule value that is not finite skips every matrix's step.
  schedules_finite = functools.reduce(jnp.logical_and, [
      jnp.isfinite(v) for v in (inputs.eps, *(inputs.decays or ()))])
  local = [v.localized(g.shape) for v, g in zip(views, inputs.grads)]
  batches = megabatch.megabatches(
      [_megabatch_key(*leaf) for leaf in zip(
          local, inputs.grads, inputs.momenta, collectives, update_dtypes)],
      [v.num_matrices for v in local])
  # Every member's results are sliced out of its megabatch's at offsets the
  # compiler does not fold (megabatch.runtime_offsets): any run-time
  # predicate will do.
  offsets = megabatch.runtime_offsets(batches, inputs.count >= 0)
  firsts = [batch.members[0] for batch in batches]
  prepared = [
      _prepare([local[i] for i in batch.members],
               [inputs.grads[i] for i in batch.members],
               [inputs.momenta[i] for i in batch.members],
               collectives[first], schedules_finite, members)
      for batch, first, members in zip(batches, firsts, offsets)]
  pick = lambda values, batch, shape: megabatch.joined(
      [values[i].reshape(shape) for i in batch.members])
  qs, qs_finite = zip(*[
      _finite_right_factor(
          pick(inputs.right_factors, batch, (-1, p.view.small, p.view.rank)),
          collectives[first])
      for batch, first, p in zip(batches, firsts, prepared)])
  step_key = jax.random.fold_in(jax.random.key(compressor.seed), inputs.count)
  factors = low_rank.power_iteration(
      [low_rank.MatrixTask(buffer=p.buffer, right_factor=q,
                           small_axis=p.view.small_axis,
                           collectives=collectives[first])
       for first, p, q in zip(firsts, prepared, qs)],
      config=compressor.step_config, eps=inputs.eps, key=step_key)
  results: list[MatrixStep | None] = [None] * len(views)
  for batch, first, members, p, f, q, q_finite in zip(
      batches, firsts, offsets, prepared, factors, qs, qs_finite):
    adaptive = None
    if inputs.effective_ranks is not None:
      adaptive = (pick(inputs.effective_ranks, batch, (-1,)),
                  pick(inputs.right_energies, batch,
                       (-1,) + q.shape[-1:] * 2))
    out = _finish(p, f, q, q_finite,
                  pick(inputs.nonfinite_counts, batch, (-1,)), adaptive,
                  decays=inputs.decays, update_dtype=update_dtypes[first],
                  collectives=collectives[first], compressor=compressor)
    # Each member's rows of the megabatch's results (weight-sized ones kept
    # apart are each member's already).
    parts = zip(p.buffer.members(out.update), p.buffer.members(out.momentum),
                *(megabatch.parted(x, batch.sizes, members) for x in out[2:]))
    for i, part in zip(batch.members, parts):
      view = local[i]
      (update, momentum, q_new, captured, aligned, skipped, effective_rank,
       right_energy) = part
      batch_shaped = lambda x: None if x is None else x.reshape(
          view.batch_shape + x.shape[1:])
      results[i] = MatrixStep(
          update=view.from_layout(update),
          momentum=None if momentum is None else view.from_layout(momentum),
          right_factor=q_new.reshape(inputs.right_factors[i].shape),
          captured_fraction=batch_shaped(captured),
          alignment=batch_shaped(aligned),
          nonfinite_count=batch_shaped(skipped),
          effective_rank=batch_shaped(effective_rank),
          right_energy=batch_shaped(right_energy))
  return results
