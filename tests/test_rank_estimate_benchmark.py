"""benchmarks/rank_estimate.py measures what it says: its float64 rule is the
package's ``low_rank.energy_rank``, its truth is the energy rank of a known
spectrum, and a ``--quick`` run reports every estimate with finite errors and
rebuilds the buffers the optimizer used (its energy rank equals the state's
raw estimate to float32 rounding). No figure is checked for its value: which
estimate wins is the benchmark's finding, not a property of the code."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import rank_estimate
from orth_dion_jax import low_rank

REPO = pathlib.Path(__file__).resolve().parents[1]
# --quick takes under a minute on an idle 2-core machine; a shared one is
# several times slower.
QUICK_TIMEOUT_S = 600


def _spectrum(r: int, seed: int) -> np.ndarray:
  """Squared singular values, descending, spread over three decades."""
  rng = np.random.default_rng(seed)
  return np.sort(10.0 ** rng.uniform(-3, 0, r))[::-1]


@pytest.mark.parametrize("captured", [0.3, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("share", rank_estimate.SHARES)
def test_the_float64_rule_is_the_packages(captured, share):
  energies = _spectrum(12, seed=int(100 * captured + 10 * share))
  small = 40
  ours = rank_estimate.energy_rank(energies, captured, share, small)
  # The package takes the eigenvalues ascending, in float32.
  theirs = low_rank.energy_rank(
      jnp.asarray(energies[::-1][None], jnp.float32),
      jnp.asarray([captured], jnp.float32), share, small)
  np.testing.assert_allclose(ours, float(theirs[0]), rtol=1e-5)


def test_the_truth_of_a_flat_spectrum_is_the_share_of_its_rank():
  energies = np.concatenate([np.ones(10), np.zeros(22)])
  sample = rank_estimate.Sample(energies, energies[:4], 0.4, 0.0)
  for share in rank_estimate.SHARES:
    assert rank_estimate.true_rank(sample, share) == pytest.approx(10 * share)
  estimates = rank_estimate.estimates(sample, 0.8)
  # Four of ten equal directions captured: the flat tail is exact, and so is
  # the mean level; inside R all four are equal.
  assert estimates["energy"] == pytest.approx(8.0)
  assert estimates["mean_level"] == pytest.approx(8.0)
  assert estimates["exact_top_r"] == pytest.approx(8.0)
  assert estimates["entropy"] == pytest.approx(4.0)
  assert estimates["captured"] == pytest.approx(0.8 * 4)


def test_only_the_extrapolating_estimates_go_beyond_r():
  energies = _spectrum(64, seed=1)
  sample = rank_estimate.Sample(energies, energies[:8] * 0.5,
                                0.5 * energies[:8].sum() / energies.sum(),
                                0.0)
  estimates = rank_estimate.estimates(sample, 0.9)
  assert estimates["entropy"] <= 8 and estimates["captured"] <= 8
  assert 8 < estimates["energy"] <= 64 and 8 < estimates["mean_level"] <= 64


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("rank_estimate") / "quick.json"
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.rank_estimate", "--quick", "--json",
       str(path)], cwd=REPO, capture_output=True, text=True,
      timeout=QUICK_TIMEOUT_S, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-4000:]
  return done.stdout, json.loads(path.read_text())["records"]


def test_quick_run_reports_every_estimate_at_every_share(quick_run):
  printed, report = quick_run
  header = next(line for line in printed.splitlines()
                if line.strip().startswith("form"))
  assert all(name in header.split() for name in rank_estimate.ESTIMATES)
  records = report["estimates"]
  assert sorted((r["share"], r["estimate"]) for r in records) == sorted(
      (share, name) for share in rank_estimate.SHARES
      for name in rank_estimate.ESTIMATES)
  for record in records:
    assert math.isfinite(record["mae"]) and math.isfinite(record["bias"])
    assert record["mae"] >= abs(record["bias"]) - 1e-12
    assert -1.0 <= record["spearman"] <= 1.0
    assert record["true_mean"] > 0 and 0.0 <= record["reached"] <= 1.0


def test_quick_run_rebuilds_the_buffers_the_optimizer_used(quick_run):
  printed, report = quick_run
  [run] = report["runs"]
  assert run["samples"] > 0
  assert run["max_rel"] <= rank_estimate.CONSISTENCY_RTOL
  assert "holds" in printed and "FAILS" not in printed
  # R = B^T P holds at most B's top-r energy, direction by direction.
  assert 0 < run["captured_of_top_r"] <= 1 + 1e-9
  assert 0 < run["weakest_of_rth"] <= 1 + 1e-9
