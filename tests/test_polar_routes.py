"""The routes to the polar right factor, measured as ``benchmarks.polar_routes``
measures them, hold the accuracy its tables report.

The inputs are the benchmark's random factors: ``R`` of shape ``(4 r, r)``
with singular values log-spaced from 1 down to a floor, so that the floor is
``1 / cond(R)``. On them (measured: benchmarks/README.md, "Polar right
factor: routes and cost"), the library's route (QR, then the SVD of the
``r x r`` ``T``) is orthonormal and aligned to float32 precision at condition
number 1e4, where the polar factor taken from the float32 Gram ``R^T R``
loses the directions of its small singular values (orthogonality error about
0.5). The bounds below sit a decade or more from the measured values.
"""

import numpy as np
import pytest

from benchmarks import polar_routes

R = 32


@pytest.fixture(scope="module")
def functions():
  return polar_routes.route_functions()


def _errors(floor, functions, seed=0):
  return polar_routes.accuracy(polar_routes.random_factor(R, floor, seed),
                               functions)


def test_the_reference_scores_itself_exact():
  a = polar_routes.random_factor(R, 1e-4)
  ref = polar_routes.reference(a)
  assert ref.kept == R and 0.9e4 < ref.cond < 1.1e4
  assert all(v < 1e-12 for v in polar_routes.errors(a, ref.polar, ref).values())


@pytest.mark.parametrize("seed", [0, 1])
def test_qr_then_svd_is_accurate_at_condition_number_1e4(functions, seed):
  errors = _errors(1e-4, functions, seed)["qr_svd"]
  assert errors["orth"] < 1e-5
  assert errors["align"] < 1e-5
  assert errors["dist"] < 1e-3


def test_the_float32_gram_loses_orthogonality_at_condition_number_1e4(
    functions):
  errors = _errors(1e-4, functions)
  assert errors["gram_eigh"]["orth"] > 1e-2
  assert errors["gram_eigh"]["orth"] > 1e3 * errors["qr_svd"]["orth"]
  # Keeping every eigenvalue the library's rule keeps does not either: those
  # below eps * max are rounding noise.
  assert errors["gram_eigh_keep"]["orth"] > 1e-2
  # The QR first does not save it: T^T T is the same squared Gram.
  assert errors["qr_eigh"]["orth"] > 1e-2


def test_every_route_is_accurate_when_well_conditioned(functions):
  for route, errors in _errors(1e-2, functions).items():
    assert errors["orth"] < 1e-3, route
    if route != polar_routes.QR:
      assert errors["align"] < 1e-5, route


def test_the_qr_right_factor_falls_short_of_the_polar_alignment(functions):
  # trace(T) < ||R||_* unless R's columns are orthogonal.
  errors = _errors(1e-4, functions)
  assert errors[polar_routes.QR]["orth"] < 1e-5
  assert errors[polar_routes.QR]["align"] > 0.1


def test_newton_schulz_needs_its_steps_for_small_singular_values():
  a = polar_routes.random_factor(R, 1e-4)
  ref = polar_routes.reference(a)
  converged = polar_routes.errors(
      a, polar_routes.qr_newton_schulz(a, steps=30), ref)
  assert converged["orth"] < 1e-5 and converged["align"] < 1e-5
  # A singular value 1e-4 / sqrt(r) grows by 1.5 a step: far from 1 after 10.
  early = polar_routes.errors(a, polar_routes.qr_newton_schulz(a, steps=10),
                              ref)
  assert early["orth"] > 0.1


def test_rank_deficient_inputs_stay_finite_and_aligned(functions):
  a = polar_routes.random_factor(R, 1e-7)
  assert polar_routes.reference(a).kept < R
  q = np.asarray(functions["qr_svd"](a))
  assert np.all(np.isfinite(q))
  assert _errors(1e-7, functions)["qr_svd"]["align"] < 1e-4
