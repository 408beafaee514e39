"""The composable pieces, assembled into the three documented recipes.

Each recipe is checked step by step against the float64 reference:

* mu-form (the reference's, docs/design.md, "The step"):
  ``scale_by_error_feedback(compressor, residual_decay=1, captured_decay=mu)``;
* beta-form (the paper's analysed form, section 6):
  ``scale_by_error_feedback(compressor, residual_decay=beta,
  captured_decay=0)``, against a literal transcription of
  ``E = beta (M - U U^T M)``;
* Orth-Dion's low-rank step on plain momentum:
  ``optax.trace`` then ``scale_by_low_rank_orthogonalization(compressor)``.
"""

import numpy as np
import optax
import pytest

import orth_dion_jax
from core_helpers import gradient_steps
from core_helpers import kernel_tree
from core_helpers import run_against_reference

SHAPES = {"tall": (12, 40), "wide": (40, 12)}
STEPS = 10
LR = 0.05
COMPRESSOR = orth_dion_jax.LowRankCompressor(rank=3)


def _check(momentum_and_direction, *, momentum_key="momentum", **reference):
  rng = np.random.default_rng(16)
  tx = optax.chain(momentum_and_direction, optax.scale_by_learning_rate(LR))
  run_against_reference(tx, kernel_tree(rng, SHAPES),
                        gradient_steps(rng, SHAPES, STEPS),
                        momentum_key=momentum_key, learning_rate=LR,
                        **reference)


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_mu_form(mu):
  _check(orth_dion_jax.scale_by_error_feedback(
      COMPRESSOR, residual_decay=1.0, captured_decay=mu), form="mu", decay=mu)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_beta_form(beta):
  _check(orth_dion_jax.scale_by_error_feedback(
      COMPRESSOR, residual_decay=beta, captured_decay=0.0),
         form="beta", decay=beta)


def test_low_rank_step_after_optax_trace():
  _check(optax.chain(
      optax.trace(decay=0.9),
      orth_dion_jax.scale_by_low_rank_orthogonalization(COMPRESSOR)),
         momentum_key="trace", form="trace", decay=0.9)
