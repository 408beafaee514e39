"""Which in-step estimate tracks a matrix's effective rank best (Ada-Orth-Dion).

With ``adaptive_rank=True`` every step estimates each matrix's effective rank
from what its low-rank step already holds: the singular values
``s_1 >= ... >= s_r`` of ``R = B^T P`` (``P = orth(B Q)``, ``Q`` the right
factor before the step) and the captured fraction
``c = ||R||_F^2 / ||B||_F^2``. With ``p_i = s_i^2 / sum s^2``, ``k`` the
matrix's smaller side and ``h`` the share, the candidates are:

* ``energy`` (the package's, ``low_rank.energy_rank``): the crossing of ``h``
  in the cumulative shares ``c (p_1 + ... + p_i)`` of ``B``'s energy,
  interpolated inside the direction that crosses it; when the ``r``
  directions hold less than ``h``, the rest is taken to continue at the
  weakest direction's level: ``r + (h - c) / (c p_r)``, capped at ``k``;
* ``entropy``: Roy and Vetterli's effective rank of ``R``, ``exp(H(q))``
  with ``q_i = s_i / sum s``: the same at every share, at most ``r``;
* ``captured``: the crossing of ``h`` in ``p_1 + ... + p_i``: how many of
  the captured directions hold ``h`` of what was captured, at most ``r``;
* ``mean_level``: ``energy``, but beyond ``r`` the rest continues at the
  captured directions' mean level ``c / r`` instead of the weakest one's:
  ``r h / c``, capped at ``k``. Why: a single warm-started power iteration
  converges slowest on its weakest direction, so ``s_r`` is the singular
  value it underestimates most, and a tail priced at ``s_r^2`` needs the
  most directions; the mean level leans on the converged directions
  instead. Equally cheap (one division), and the opposite guess about the
  tail: where the two agree, the tail does not matter.

One reference row is not an in-step candidate: ``exact_top_r`` applies the
package's rule to ``B``'s exact top ``r`` singular values (a converged power
iteration). Its error is what the rule alone costs, the flat tail included;
the rest of ``energy``'s error is the power iteration's.

The truth: the energy rank of the buffer itself at the same share, by the
same interpolation: the crossing of ``h`` in the cumulative shares of
``B``'s squared singular values, from a float64 SVD.

Each is measured on the example's byte-level transformer (``examples.model``
at its default size, the default ``examples.train`` data, batch and learning
rate schedule), trained with Orth-Dion (QR right factor) in the mu-form and
the beta-form at rank fractions 1/4 and 1/2 (fixed ranks: nothing resizes
them). Every ``--every`` steps, for every hidden weight matrix, the buffer
the step used is rebuilt in float64: ``B = M + G``, the state's momentum
before the step and the step's gradient (in the beta-form that momentum is
the carried error ``E``, so ``B = G + E`` is the same sum). ``P`` and ``R``
follow from ``B`` and the state's ``Q`` as the step computes them, in
float64. The optimizer is built with ``rank_ema=0`` and
``rank_energy=0.9``, so that the state's ``effective_rank`` after the step is
the package's raw estimate at share 0.9: ``energy`` computed here must equal
it up to float32 rounding (the consistency line; relative tolerance 1e-4).

Each run's line says how far the step's ``R`` fell short of ``B``'s top
``r`` (medians over its samples): ``c`` over the top-``r`` share of
``||B||_F^2``, and ``s_r^2`` over ``B``'s ``r``-th squared singular value,
the level ``energy`` prices its tail at. Both are 1 after a converged power
iteration; Orth-Dion takes one, warm-started.

Per form, rank fraction and share (0.5, 0.8, 0.9), over all matrices and
sampled steps, each cell is ``mae / bias / spearman``: the mean absolute
error against the true rank, the mean signed error (estimate - truth) and
the Spearman correlation of estimate and truth (a steady bias with the
right order could be corrected by a constant; the wrong order cannot).
``true`` is the truth's mean and ``c>=h`` the fraction of samples whose
captured fraction reached the share (the others need a tail).

    python -m benchmarks.rank_estimate                # 6.5 to 8.5 minutes
    python -m benchmarks.rank_estimate --quick        # one tiny run, < 1 minute
    python -m benchmarks.rank_estimate --json runs/rank_estimate.json

The default run (four runs of 200 steps, every 10th sampled: 420 samples
each) took 6.5 to 8.5 minutes of wall time, three times, on the 2-core CPU
machine of benchmarks/README.md while other jobs kept it busy (load average
4 to 9); ``--quick`` took 20 to 25 s. Each run spends up to a minute
compiling its train step and the rest training; the float64 SVDs take
seconds.
"""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from scipy import stats

import orth_dion_jax
from benchmarks import workload
from examples import data as data_lib
from examples import train
from examples.config import TrainConfig
from examples.model import ModelConfig, cross_entropy, dimension_numbers
from orth_dion_jax import matrix_view

SHARES = (0.5, 0.8, 0.9)
# The share the optimizer is built with (the package's default rank_energy).
CHECKED_SHARE = 0.9
# The package's estimate is float32 (a float32 B, P from a Cholesky QR, the
# eigenvalues of the float32 Gram R^T R); measured agreement is about 1e-5.
CONSISTENCY_RTOL = 1e-4
FORMS = ("mu", "beta")
RANK_FRACTIONS = (0.25, 0.5)
CANDIDATES = ("energy", "entropy", "captured", "mean_level")
REFERENCE = "exact_top_r"
ESTIMATES = CANDIDATES + (REFERENCE,)
# The tiny model of --quick: one block of width 32 (k = 32, r = 8).
QUICK_MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2)


class Sample(NamedTuple):
  """One matrix at one step: what the truth and every estimate need."""
  buffer_energies: np.ndarray   # squared singular values of B, descending, (k,)
  factor_energies: np.ndarray   # of R = B^T P, descending, (r,)
  captured: float               # ||R||_F^2 / ||B||_F^2
  package: float                # the state's raw effective rank (CHECKED_SHARE)


# --- The estimates, float64 NumPy, one matrix at a time. ---

def energy_rank(energies: np.ndarray, captured: float, share: float,
                small: int) -> float:
  """How many directions hold ``share`` of ``B``'s energy, by the package's
  rule: ``energies`` (descending) hold ``captured`` of it together, beyond
  them the rest continues at the last one's level, capped at ``small``.

  Written apart from ``low_rank.energy_rank`` so that the benchmark checks
  the package rather than reuses it. Given all of ``B``'s squared singular
  values and ``captured = 1`` it is the true energy rank (the crossing is
  always inside).
  """
  total = energies.sum()
  if captured <= 0 or total <= 0:
    return 0.0
  shares = captured * np.cumsum(energies) / total
  below = int(np.sum(shares < share))      # directions wholly needed
  r = energies.size
  if below < r:
    before = shares[below - 1] if below else 0.0
    step = captured * energies[below] / total
    return below + float(np.clip((share - before) / step, 0.0, 1.0))
  step = captured * energies[-1] / total
  if step <= 0:
    return float(small)
  return float(min(r + (share - captured) / step, small))


def entropy_rank(energies: np.ndarray) -> float:
  """Roy and Vetterli's effective rank ``exp(H(q))``, ``q = s / sum s``, of
  the singular values ``s = sqrt(energies)``."""
  s = np.sqrt(np.maximum(energies, 0.0))
  q = s[s > 0] / s.sum()
  return float(np.exp(-np.sum(q * np.log(q)))) if q.size else 0.0


def mean_level_rank(energies: np.ndarray, captured: float, share: float,
                    small: int) -> float:
  """``energy_rank``, but the energy beyond the ``r`` directions continues
  at their mean level ``captured / r``: ``r share / captured``."""
  if captured >= share or captured <= 0:
    return energy_rank(energies, captured, share, small)
  return float(min(energies.size * share / captured, small))


def true_rank(sample: Sample, share: float) -> float:
  return energy_rank(sample.buffer_energies, 1.0, share,
                     sample.buffer_energies.size)


def estimates(sample: Sample, share: float) -> dict[str, float]:
  """Every candidate's estimate, and the reference's, for one sample."""
  factor, small = sample.factor_energies, sample.buffer_energies.size
  top = sample.buffer_energies[:factor.size]
  return {
      "energy": energy_rank(factor, sample.captured, share, small),
      "entropy": entropy_rank(factor),
      "captured": energy_rank(factor, 1.0, share, factor.size),
      "mean_level": mean_level_rank(factor, sample.captured, share, small),
      REFERENCE: energy_rank(top, top.sum() / sample.buffer_energies.sum(),
                             share, small),
  }


# --- The buffers of a training run. ---

def _step(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array,
          targets: jax.Array) -> tuple[nnx.State, nnx.State]:
  """One step of (model, optimizer), as ``examples.train.train_step`` takes
  it, that also returns the gradient: the step's buffer is rebuilt from it."""
  model, optimizer = nnx.merge(graphdef, state)
  grads = nnx.grad(cross_entropy)(model, inputs, targets)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), grads


def _by_path(tree: Any, is_leaf=None) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _orth_dion_state(optimizer: nnx.Optimizer) -> orth_dion_jax.OrthDionState:
  """The low-rank chain's state inside ``orth_dion``'s partition."""
  is_state = lambda x: isinstance(x, orth_dion_jax.OrthDionState)
  [state] = [s for s in jax.tree.leaves(nnx.as_pure(optimizer.opt_state),
                                        is_leaf=is_state) if is_state(s)]
  return state


def matrix_spectra(buffer: np.ndarray, right: np.ndarray, small_axis: str
                   ) -> tuple[np.ndarray, np.ndarray, float]:
  """``B``'s and ``R``'s squared singular values (descending) and the
  captured fraction, in float64, for one matrix in layout view
  ``(fan_in, fan_out)`` and the right factor ``Q`` ``(k, r)`` its step
  started from."""
  # Rows on the larger side, as the step orients B.
  b = buffer.T if small_axis == "in" else buffer
  p, _ = np.linalg.qr(b @ right)
  factor = np.linalg.svd(b.T @ p, compute_uv=False) ** 2
  whole = np.linalg.svd(b, compute_uv=False) ** 2
  return whole, factor, float(factor.sum() / whole.sum())


def run_samples(config: TrainConfig, train_bytes: np.ndarray, every: int
                ) -> list[Sample]:
  """Trains ``config``'s model with Orth-Dion for ``config.steps`` steps
  and samples every hidden matrix's buffer at steps 1, 1 + every, ...

  ``config`` gives the model, the form, the rank fraction, the batches and
  the learning rate schedule, as ``examples.train`` reads them; the
  optimizer adds ``rank_energy=CHECKED_SHARE, rank_ema=0``.
  """
  tx = orth_dion_jax.orth_dion(
      train.learning_rate_schedule(config), **train.low_rank_settings(config),
      rank_energy=CHECKED_SHARE, rank_ema=0.0)
  network, optimizer = train.build(config, train.make_mesh(config), tx)
  batches = data_lib.Batches(train_bytes, config.batch_size, config.seq_len,
                             seed=config.seed)
  dims = _by_path(
      dimension_numbers(nnx.as_pure(nnx.state(network, nnx.Param)),
                        orth_dion_jax.DionDimensionNumbers),
      is_leaf=matrix_view.is_dimension_numbers_leaf)
  graphdef, state = nnx.split((network, optimizer))
  step = jax.jit(_step, static_argnums=0)
  samples = []
  for t in range(config.steps):
    before = state
    state, grads = step(graphdef, state, *next(batches))
    if t % every:
      continue
    nnx.update((network, optimizer), before)
    held = _orth_dion_state(optimizer)
    momenta, rights = _by_path(held.momentum), _by_path(held.right_factor)
    nnx.update((network, optimizer), state)
    packaged = orth_dion_jax.effective_ranks(nnx.as_pure(optimizer.opt_state))
    gradients = _by_path(nnx.as_pure(grads))
    for path, numbers in dims.items():
      if numbers is None:   # routed to AdamW
        continue
      buffer = (np.asarray(momenta[path], np.float64)
                + np.asarray(gradients[path], np.float64))
      right = np.asarray(rights[path], np.float64)
      view = matrix_view.matrix_view(
          path, buffer.shape, numbers, rank=right.shape[-1],
          rank_fraction=config.rank_fraction, rank_multiple_of=1, scale=None)
      for layout, q, package in zip(
          view.to_layout(buffer), right.reshape(-1, *right.shape[-2:]),
          np.asarray(packaged[path], np.float64).reshape(-1)):
        samples.append(Sample(*matrix_spectra(layout, q, view.small_axis),
                              float(package)))
  return samples


# --- The figures. ---

def summarize(samples: list[Sample], share: float) -> list[dict]:
  """Per estimate: mae, bias and spearman against the true rank, with the
  truth's mean and the fraction of samples whose captured fraction reached
  ``share``."""
  truth = np.array([true_rank(s, share) for s in samples])
  reached = float(np.mean([s.captured >= share for s in samples]))
  found = [estimates(s, share) for s in samples]
  records = []
  for name in ESTIMATES:
    estimate = np.array([f[name] for f in found])
    error = estimate - truth
    records.append({
        "share": share, "estimate": name,
        "mae": float(np.mean(np.abs(error))), "bias": float(np.mean(error)),
        "spearman": float(stats.spearmanr(estimate, truth).statistic),
        "true_mean": float(truth.mean()), "reached": reached})
  return records


def consistency(samples: list[Sample]) -> dict[str, float]:
  """``energy`` at CHECKED_SHARE here against the package's own estimate:
  the largest absolute difference, and relative to max(1, estimate)."""
  mine = np.array([energy_rank(s.factor_energies, s.captured, CHECKED_SHARE,
                               s.buffer_energies.size) for s in samples])
  package = np.array([s.package for s in samples])
  difference = np.abs(mine - package)
  return {"max_abs": float(difference.max()),
          "max_rel": float(np.max(difference / np.maximum(mine, 1.0)))}


def shortfall(samples: list[Sample]) -> dict[str, float]:
  """How far the step's ``R`` falls short of ``B``'s top ``r`` (medians over
  the samples): its captured fraction over the top-``r`` share, and its
  weakest squared singular value over ``B``'s ``r``-th. Both are 1 after a
  converged power iteration; the second is what ``energy``'s tail is priced
  at."""
  r = samples[0].factor_energies.size
  top = [s.buffer_energies[:r] for s in samples]
  return {
      "captured_of_top_r": float(np.median([
          s.captured * s.buffer_energies.sum() / t.sum()
          for s, t in zip(samples, top)])),
      "weakest_of_rth": float(np.median([
          s.factor_energies[-1] / t[-1] for s, t in zip(samples, top)])),
  }


def measure(model: ModelConfig, *, steps: int, every: int, batch_size: int,
            seq_len: int, max_bytes: int, runs) -> dict[str, list[dict]]:
  """Trains every (form, rank fraction) of ``runs``: ``estimates`` holds a
  record per form, rank fraction, share and estimate, ``runs`` one per run
  (its consistency and shortfall)."""
  train_bytes, _ = data_lib.load_corpus(None, max_bytes)
  records, per_run = [], []
  for form, rank_fraction in runs:
    start = time.perf_counter()
    config = TrainConfig(
        model=model, rank_fraction=rank_fraction, error_feedback=form,
        adaptive_rank=True, steps=steps, batch_size=batch_size,
        seq_len=seq_len, max_bytes=max_bytes, progress=False,
        checkpoint_every=0)
    samples = run_samples(config, train_bytes, every)
    label = {"form": form, "rank_fraction": rank_fraction}
    run = {**label, "samples": len(samples), **consistency(samples),
           **shortfall(samples), "wall_s": time.perf_counter() - start}
    per_run.append(run)
    records += [{**label, **record} for share in SHARES
                for record in summarize(samples, share)]
    print(f"{form}-form, rank {workload.fraction_label(rank_fraction)}: "
          f"{len(samples)} samples in {run['wall_s']:.0f} s; R holds "
          f"{run['captured_of_top_r']:.1%} of B's top-r energy, its weakest "
          f"direction {run['weakest_of_rth']:.1%} of B's r-th (medians)",
          flush=True)
  return {"estimates": records, "runs": per_run}


def table(records: list[dict]) -> str:
  """One row per form, rank fraction and share; ``mae / bias / spearman``
  per estimate."""
  rows = {}
  for x in records:
    key = (x["form"], workload.fraction_label(x["rank_fraction"]), x["share"])
    row = rows.setdefault(key, [*key, x["true_mean"], x["reached"]])
    row.append(f"{x['mae']:.2f} / {x['bias']:+.2f} / {x['spearman']:.3f}")
  columns = [("form", ""), ("rank", ""), ("share", ".1f"), ("true", ".1f"),
             ("c>=h", ".2f")] + [(name, "") for name in ESTIMATES]
  return workload.format_table(columns, list(rows.values()))


def consistency_line(runs: list[dict]) -> str:
  """The worst disagreement over all runs: the check holds only if every
  rebuilt buffer gave the estimate the optimizer itself took."""
  worst_abs = max(run["max_abs"] for run in runs)
  worst_rel = max(run["max_rel"] for run in runs)
  samples = sum(run["samples"] for run in runs)
  verdict = "holds" if worst_rel <= CONSISTENCY_RTOL else "FAILS"
  return (f"consistency: energy at share {CHECKED_SHARE} here against the "
          f"state's effective_rank (rank_ema=0), {samples} samples: max "
          f"|diff| {worst_abs:.2e}, max relative {worst_rel:.2e}: {verdict} "
          f"(rtol {CONSISTENCY_RTOL:.0e})")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=200,
                      help="training steps of each run")
  parser.add_argument("--every", type=int, default=10,
                      help="steps between samples (from step 1)")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the records and the runs here")
  parser.add_argument("--quick", action="store_true",
                      help="the tiny model, 12 steps, one run: the "
                           "beta-form at rank 1/4")
  args = parser.parse_args(argv)
  runs = [(form, fraction) for form in FORMS for fraction in RANK_FRACTIONS]
  size = dict(model=ModelConfig(), batch_size=16, seq_len=128,
              max_bytes=data_lib.DEFAULT_MAX_BYTES)
  if args.quick:
    args.steps, args.every = 12, 4
    runs = [("beta", 0.25)]
    size = dict(model=QUICK_MODEL, batch_size=4, seq_len=32,
                max_bytes=200_000)
  print(workload.device_description(), flush=True)
  start = time.perf_counter()
  result = measure(steps=args.steps, every=args.every, runs=runs, **size)
  print(f"{args.steps} steps a run, sampled every {args.every}; cells: "
        "mae / bias (estimate - truth) / spearman")
  print(table(result["estimates"]))
  print(consistency_line(result["runs"]))
  print(f"wall time: {time.perf_counter() - start:.0f} s")
  workload.write_json(args.json, result)


if __name__ == "__main__":
  main()
