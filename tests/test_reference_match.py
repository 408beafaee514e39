"""Every step matches the independent float64 reference (tests/reference.py).

Parameters are Flax-layout kernels ``(fan_in, fan_out)``; the reference works
on ``(fan_out, fan_in)``. Gradients are well conditioned (singular values
1 .. 0.1), so float32 against float64 agreement to 1e-5 is meaningful. Each
step compares the update, the parameters, the momentum, the right factor,
the captured fraction and the alignment, over 10 steps, for every right factor
(QR, polar, Dion's columns) with every orthonormalization method, and each of
them in both error-feedback forms (the reference mu-form, and the paper's
beta-form, which the reference transcribes from the paper's algorithm box).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orth_dion_jax
from core_helpers import gradient_steps
from core_helpers import kernel_tree
from core_helpers import alias_for
from core_helpers import run_against_reference

STEPS = 10
METHODS = orth_dion_jax.ORTHOGONALIZE_METHODS
RIGHT_FACTORS = orth_dion_jax.RIGHT_FACTORS
FORMS = orth_dion_jax.ERROR_FEEDBACK_FORMS

# Every right factor with every method, the form alternating so that each
# right factor and each method also meets both forms: all pairs of choices,
# in 9 runs instead of the 18 of the full product. (The method only changes
# how P and Q are orthonormalized, the form only the momentum: no choice
# reaches into another's code path.)
PAIRWISE = [(right_factor, method, FORMS[(i + j) % len(FORMS)])
            for i, right_factor in enumerate(RIGHT_FACTORS)
            for j, method in enumerate(METHODS)]

# With rank_fraction 0.25: r = 4, 4, 6 and 1.
MIXED_SHAPES = {"tall": (16, 48), "wide": (48, 16), "square": (24, 24),
                "rank_one": (40, 4)}
MIXED_RANKS = {"tall": 4, "wide": 4, "square": 6, "rank_one": 1}
# With rank_fraction 1: r = min(fan_in, fan_out).
FULL_RANK_SHAPES = {"tall": (12, 48), "wide": (48, 12)}


def _check_alias(shapes, *, right_factor, orthogonalize, rank_fraction,
                 form="mu", power_iters=1, scale="spectral",
                 orthonormal_start=False, momentum_dtype=None, rtol=1e-5):
  rng = np.random.default_rng(1)
  params = kernel_tree(rng, shapes)
  lr, decay, wd = 0.05, 0.9, 0.1
  tx = alias_for(
      right_factor, lr, rank_fraction=rank_fraction, error_feedback=form,
      **{"mu" if form == "mu" else "beta": decay}, weight_decay=wd,
      orthogonalize=orthogonalize,
      power_iters=power_iters, scale=scale, momentum_dtype=momentum_dtype)
  return run_against_reference(
      tx, params, gradient_steps(rng, shapes, STEPS), form=form,
      rebase=form == "beta",
      orthonormal_start=orthonormal_start, learning_rate=lr, decay=decay,
      weight_decay=wd, right_factor=right_factor, power_iters=power_iters,
      scale=scale, momentum_dtype=momentum_dtype, rtol=rtol)


@pytest.mark.parametrize("right_factor,orthogonalize,form", PAIRWISE)
def test_tall_wide_square_and_rank_one_match_reference(right_factor,
                                                       orthogonalize, form):
  state = _check_alias(MIXED_SHAPES, right_factor=right_factor,
                       orthogonalize=orthogonalize, rank_fraction=0.25,
                       form=form)
  factors = optax.tree.get(state, "right_factor")
  for name, (fan_in, fan_out) in MIXED_SHAPES.items():
    chex.assert_shape(factors[name], (min(fan_in, fan_out), MIXED_RANKS[name]))


# Several leaves of each shape: every shape is a megabatch of several leaves
# (matrix_step), its weight-sized arrays joined or kept apart, and each
# leaf's results are sliced out of its megabatch's.
MEGABATCHED_SHAPES = {
    **{f"tall{i}": (16, 48) for i in range(3)},
    **{f"wide{i}": (48, 16) for i in range(2)},
    **{f"square{i}": (24, 24) for i in range(3)},
    "rank_one": (40, 4),
}


@pytest.mark.parametrize("right_factor,form", [
    ("qr", "mu"), ("qr", "beta"), ("polar", "beta"), ("column", "mu")])
def test_leaves_stepped_as_megabatches_match_reference(right_factor, form,
                                                      megabatch_form):
  _check_alias(MEGABATCHED_SHAPES, right_factor=right_factor,
               orthogonalize=METHODS[0], rank_fraction=0.25, form=form)


@pytest.mark.parametrize("right_factor,orthogonalize,form", PAIRWISE)
def test_full_rank_matches_reference(right_factor, orthogonalize, form):
  state = _check_alias(FULL_RANK_SHAPES, right_factor=right_factor,
                       orthogonalize=orthogonalize, rank_fraction=1.0,
                       orthonormal_start=True, form=form)
  factors = optax.tree.get(state, "right_factor")
  for name in FULL_RANK_SHAPES:
    chex.assert_shape(factors[name], (12, 12))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("right_factor", RIGHT_FACTORS)
def test_bfloat16_momentum_matches_reference_rounding_its_momentum(
    right_factor, form):
  """Momentum stored in bfloat16, everything else float32: the reference
  rounds its float64 momentum to bfloat16 after every step. Entries that land
  on the other side of a bfloat16 rounding boundary differ by one bfloat16
  ulp (2^-8 relative), hence the looser tolerance. It still tells rounding
  from none: against a reference that keeps a float64 momentum, the updates
  part beyond it by step 3."""
  state = _check_alias(MIXED_SHAPES, right_factor=right_factor,
                       orthogonalize="cholesky_qr", rank_fraction=0.25,
                       momentum_dtype=jnp.bfloat16, rtol=5e-3, form=form)
  for m in jax.tree.leaves(optax.tree.get(state, "momentum")):
    assert m.dtype == jnp.bfloat16


@pytest.mark.parametrize("right_factor", ("qr", "polar"))
def test_power_iterations_and_rms_scale_match_reference(right_factor):
  _check_alias({"tall": (16, 40), "wide": (40, 16)},
               right_factor=right_factor, orthogonalize="householder",
               rank_fraction=0.25, power_iters=3, scale="rms")


@pytest.mark.parametrize("form,right_factor", [
    ("mu", "qr"), ("beta", "polar")])
def test_nd_weights_match_reference_slice_by_slice(form, right_factor):
  """Batch axes are independent matrices; merged axes form one fan."""
  dims = {
      # (layers, d_in, d_out): a scan-stacked Dense kernel.
      "stacked": orth_dion_jax.DionDimensionNumbers(1, 2),
      # (d_model, heads, head_dim): heads and head_dim merge into fan-out.
      "query": orth_dion_jax.DionDimensionNumbers(0, (1, 2)),
      # (heads, head_dim, d_model): heads and head_dim merge into fan-in.
      "out_proj": orth_dion_jax.DionDimensionNumbers((0, 1), 2),
      # (d_in, layers, d_out): a batch axis between the fans.
      "interleaved": orth_dion_jax.DionDimensionNumbers(0, 2),
  }
  shapes = {"stacked": (3, 16, 8), "query": (16, 2, 6),
            "out_proj": (2, 6, 16), "interleaved": (12, 2, 20)}
  rng = np.random.default_rng(2)
  lr = 0.1
  tx = optax.chain(
      orth_dion_jax.scale_by_orth_dion(
          rank=3, weight_dimension_numbers=dims, error_feedback=form,
          right_factor=right_factor),
      optax.scale_by_learning_rate(lr))
  state = run_against_reference(
      tx, kernel_tree(rng, shapes, dims),
      gradient_steps(rng, shapes, STEPS, dims), dims=dims, learning_rate=lr,
      form=form, decay=0.95, right_factor=right_factor, rebase=form == "beta")
  chex.assert_trees_all_equal_shapes(
      optax.tree.get(state, "right_factor"),
      {"stacked": np.zeros((3, 8, 3)), "query": np.zeros((12, 3)),
       "out_proj": np.zeros((12, 3)), "interleaved": np.zeros((2, 12, 3))})
