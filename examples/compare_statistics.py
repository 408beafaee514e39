"""The statistics of a paired comparison of two optimizers (examples/compare.py): the difference
of their final losses paired by seed, and the steps one takes to reach the other's final loss.

A seed fixes the model's initialization and the batch order, so seed s of one arm and seed s of
another differ only in the optimizer: their differences are paired, and the seed-to-seed spread of
either arm, which is often larger than the difference, cancels out of them. With three seeds the t
ratio has two degrees of freedom; it says whether the sign is consistent across seeds, and little
more.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
  """a - b paired by seed: the mean, the sample std of the differences, the t ratio
  mean / (std / sqrt(n)) and its two-sided p-value (n - 1 degrees of freedom), and the
  seed-to-seed spread of a single run (the two arms' sample stds, averaged) to set it against."""
  d = np.asarray(a, float) - np.asarray(b, float)
  n = d.size
  std = float(d.std(ddof=1))
  if std > 0:
    t = float(d.mean() / (std / math.sqrt(n)))
  else:  # every seed the same difference: none (identical runs) is no evidence either way
    t = 0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean())
  return {"mean": float(d.mean()), "std": std, "t": t, "p": float(2 * stats.t.sf(abs(t), n - 1)),
          "n": n, "per_seed": d.tolist(),
          "seed_spread": float((np.std(a, ddof=1) + np.std(b, ddof=1)) / 2)}


def steps_to_reach(steps: np.ndarray, losses: np.ndarray, target: float) -> float | None:
  """The first step at which the piecewise-linear validation curve is at or below `target`;
  None if it never is."""
  hits = np.flatnonzero(losses <= target)
  if not hits.size:
    return None
  i = hits[0]
  if i == 0:
    return float(steps[0])
  # Between the evaluation above the target and the first at or below it.
  s0, s1, l0, l1 = steps[i - 1], steps[i], losses[i - 1], losses[i]
  return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1))


def steps_ratio(runs: Sequence[Any], targets: Sequence[Any]) -> dict:
  """Steps `runs` take to reach the final loss of `targets` (compare.Runs, paired by seed) as a
  fraction of the latter's steps: on the seed-mean curves, and per seed (None where never
  reached)."""
  curves = [run.curve() for run in runs]
  total = targets[0].curve()[0][-1]
  mean_curve = np.mean([losses for _, losses in curves], axis=0)
  target = float(np.mean([run.val_loss for run in targets]))
  ratio = lambda steps: None if steps is None else steps / total
  return {"mean_curve": ratio(steps_to_reach(curves[0][0], mean_curve, target)),
          "per_seed": [ratio(steps_to_reach(steps, losses, run.val_loss))
                       for (steps, losses), run in zip(curves, targets)]}
