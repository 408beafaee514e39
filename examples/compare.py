"""The paper's comparison at CPU scale: AdamW, Muon, Dion and Orth-Dion at rank fractions 1/2, 1/4
and 1/8 on one small byte-level transformer, same data, steps and seeds for all.

    python -m examples.compare                 # the default budget: about 20 min on 2 CPU cores
    python -m examples.compare --steps 600 --seeds 3 --json runs/compare.json

Procedure, identical for every optimizer ("arm"):
  1. Learning-rate sweep on --sweep-seeds seeds: a geometric grid of --grid-points rates, a factor
     --grid-factor apart, centred on the optimizer's default rate, scored by the mean final
     validation loss over those seeds. While the best score sits at an end of the grid, the grid
     grows by one rate at that end (at most --max-extensions times); a best rate still at an end is
     reported as an edge hit.
  2. The best rate is rerun on --seeds fresh seeds (not the sweep seeds, so the reported losses are
     independent of the selection). A seed sets the model's initialization and the batch order.
  3. Reported per arm: final validation loss (mean and sample std over seeds), and for Dion and
     Orth-Dion nu = ||P Q^T||_op (mean over matrices and steps, and its maximum). Per rank:
     Orth-Dion minus Dion, paired by seed, against the seed-to-seed spread.
Nothing here is tuned per optimizer beyond step 1. The initial right factor Q0 of Dion and
Orth-Dion is drawn from seed 0 in every run, so that the seeds of an arm's learning rate share one
optimizer, and with it one compiled train step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time
from typing import Sequence

import numpy as np
import optax

from examples import data as data_lib
from examples import train as train_lib
from examples.config import DEFAULT_LEARNING_RATES, QR_METHODS, SCHEDULES, TrainConfig
from examples.model import ModelConfig

RANK_FRACTIONS = (0.5, 0.25, 0.125)


@dataclasses.dataclass(frozen=True)
class Arm:
  optimizer: str
  rank_fraction: float | None = None

  @property
  def name(self) -> str:
    if self.rank_fraction is None:
      return self.optimizer
    return f"{self.optimizer} r=1/{round(1 / self.rank_fraction)}"


ARMS = (Arm("adamw"), Arm("muon"),
        *(Arm(name, fraction) for fraction in RANK_FRACTIONS for name in ("dion", "orth_dion")))


@dataclasses.dataclass
class Run:
  lr: float
  seed: int
  val_loss: float  # final; inf if the run diverged
  records: list[dict]

  @property
  def nu(self) -> np.ndarray:
    return np.array([[r["nu_mean"], r["nu_max"]] for r in self.records if "nu_mean" in r])


@dataclasses.dataclass
class SweepPoint:
  lr: float
  runs: list[Run]  # one per sweep seed

  @property
  def val_loss(self) -> float:
    return float(np.mean([run.val_loss for run in self.runs]))


@dataclasses.dataclass
class ArmResult:
  arm: Arm
  sweep: list[SweepPoint]
  best_lr: float
  edge: str | None  # "low" or "high" when the best rate is still at an end of the grid
  runs: list[Run]  # the best rate on the reporting seeds

  @property
  def losses(self) -> np.ndarray:
    return np.array([run.val_loss for run in self.runs])

  def summary(self) -> dict:
    nu = np.concatenate([run.nu for run in self.runs]) if self.arm.rank_fraction else None
    return {
        "arm": self.arm.name, "optimizer": self.arm.optimizer,
        "rank_fraction": self.arm.rank_fraction, "best_lr": self.best_lr, "edge": self.edge,
        "sweep": [{"lr": point.lr, "val_loss": point.val_loss,
                   "val_losses": [run.val_loss for run in point.runs]} for point in self.sweep],
        "seeds": [run.seed for run in self.runs], "val_losses": self.losses.tolist(),
        "val_loss_mean": float(self.losses.mean()),
        "val_loss_std": float(self.losses.std(ddof=1)) if len(self.runs) > 1 else 0.0,
        "nu_mean": None if nu is None else float(nu[:, 0].mean()),
        "nu_max": None if nu is None else float(nu[:, 1].max()),
    }


class Runner:
  """Trains one arm at one learning rate and seed; the seeds of a learning rate reuse one
  optimizer (its Q0 from seed 0), hence one compilation per arm and learning rate."""

  def __init__(self, base: TrainConfig, corpus, out: pathlib.Path, log):
    self.base, self.corpus, self.out, self.log = base, corpus, out, log
    self.optimizers: dict[tuple[Arm, float], optax.GradientTransformation] = {}

  def _config(self, arm: Arm, lr: float, seed: int) -> TrainConfig:
    return dataclasses.replace(self.base, optimizer=arm.optimizer, lr=lr, seed=seed,
                               rank_fraction=arm.rank_fraction or 1.0)

  def _optimizer(self, arm: Arm, lr: float) -> optax.GradientTransformation:
    if (arm, lr) not in self.optimizers:
      self.optimizers[arm, lr] = train_lib.make_optimizer(self._config(arm, lr, seed=0))
    return self.optimizers[arm, lr]

  def __call__(self, arm: Arm, lr: float, seed: int) -> Run:
    start = time.perf_counter()
    directory = self.out / arm.name.replace(" ", "_").replace("/", "") / f"lr{lr:.4g}_seed{seed}"
    config = dataclasses.replace(self._config(arm, lr, seed), out=str(directory))
    records = train_lib.train(config, self.corpus, tx=self._optimizer(arm, lr))
    final = [r["val_loss"] for r in records if "val_loss" in r][-1]
    run = Run(lr, seed, final if math.isfinite(final) else math.inf, records)
    self.log(f"{arm.name:16s} lr={lr:<8.4g} seed={seed}: val {run.val_loss:.4f} "
             f"({time.perf_counter() - start:.0f} s)")
    return run


def sweep(runner: Runner, arm: Arm, *, center: float, points: int, factor: float,
          max_extensions: int, seeds: Sequence[int]
          ) -> tuple[list[SweepPoint], float, str | None]:
  """Grid search that grows at an end holding the best rate; returns (grid, best, edge)."""

  def point(k: int) -> SweepPoint:
    lr = center * factor**k
    return SweepPoint(lr, [runner(arm, lr, seed) for seed in seeds])

  grid = {k: point(k) for k in range(-(points // 2), points - points // 2)}
  for _ in range(max_extensions):
    best = min(grid, key=lambda k: grid[k].val_loss)
    if best not in (min(grid), max(grid)):
      break
    k = best - 1 if best == min(grid) else best + 1
    grid[k] = point(k)
  best = min(grid, key=lambda k: grid[k].val_loss)
  edge = "low" if best == min(grid) else "high" if best == max(grid) else None
  return [grid[k] for k in sorted(grid)], grid[best].lr, edge


def orth_dion_vs_dion(results: dict[str, ArmResult]) -> list[dict]:
  """Per rank: Orth-Dion minus Dion final loss, paired by seed, against the seed spread."""
  rows = []
  for fraction in RANK_FRACTIONS:
    if {Arm("dion", fraction).name, Arm("orth_dion", fraction).name} - results.keys():
      continue
    dion = results[Arm("dion", fraction).name]
    orth = results[Arm("orth_dion", fraction).name]
    paired = orth.losses - dion.losses
    delta = float(paired.mean())
    # Seed-to-seed spread: the sample std of a single run's final loss, averaged over both arms.
    spread = float(np.mean([dion.losses.std(ddof=1), orth.losses.std(ddof=1)]))
    winner = "Orth-Dion" if delta < 0 else "Dion"
    beyond = abs(delta) > spread
    rows.append({
        "rank_fraction": fraction, "dion": float(dion.losses.mean()),
        "orth_dion": float(orth.losses.mean()), "delta": delta,
        "paired_deltas": paired.tolist(), "seed_spread": spread,
        "delta_over_spread": abs(delta) / spread if spread > 0 else math.inf,
        "verdict": f"{winner} lower, {'beyond' if beyond else 'within'} the seed spread",
        "dion_nu_mean": dion.summary()["nu_mean"], "dion_nu_max": dion.summary()["nu_max"],
        "orth_dion_nu_mean": orth.summary()["nu_mean"],
        "orth_dion_nu_max": orth.summary()["nu_max"],
    })
  return rows


def _fmt(value: float | None, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def tables(results: dict[str, ArmResult], comparison: list[dict], n_seeds: int) -> str:
  lines = [f"Final validation loss (nats/byte) at each arm's best learning rate, {n_seeds} seeds",
           f"{'arm':16s} {'best lr':>8s} {'grid edge':>9s} {'val loss':>16s} {'nu mean':>8s} "
           f"{'nu max':>7s}"]
  for result in results.values():
    s = result.summary()
    lines.append(f"{s['arm']:16s} {s['best_lr']:8.4g} {s['edge'] or 'no':>9s} "
                 f"{s['val_loss_mean']:9.4f} ± {s['val_loss_std']:.4f} {_fmt(s['nu_mean']):>8s} "
                 f"{_fmt(s['nu_max']):>7s}")
  lines += ["", "Orth-Dion vs Dion per rank (delta = Orth-Dion - Dion, paired by seed)",
            f"{'rank':>5s} {'Dion':>7s} {'Orth-Dion':>9s} {'delta':>8s} {'spread':>7s} "
            f"{'|d|/spr':>7s} {'Dion nu mean/max':>16s} {'Orth nu mean/max':>16s}  verdict"]
  for row in comparison:
    lines.append(
        f"{'1/' + str(round(1 / row['rank_fraction'])):>5s} {row['dion']:7.4f} "
        f"{row['orth_dion']:9.4f} {row['delta']:+8.4f} {row['seed_spread']:7.4f} "
        f"{row['delta_over_spread']:7.2f} "
        f"{_fmt(row['dion_nu_mean']) + ' / ' + _fmt(row['dion_nu_max']):>16s} "
        f"{_fmt(row['orth_dion_nu_mean']) + ' / ' + _fmt(row['orth_dion_nu_max']):>16s}  "
        f"{row['verdict']}")
  edges = [r.arm.name for r in results.values() if r.edge]
  lines += ["", f"learning rates at a grid edge: {', '.join(edges)}" if edges else
            "no arm's best learning rate is at an edge of its grid"]
  return "\n".join(lines)


def plot(results: dict[str, ArmResult], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_sweep, ax_curve, ax_nu) = plt.subplots(1, 3, figsize=(17, 5))
  colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for name, result in results.items():
    sweep_losses = [min(point.val_loss, 10.0) for point in result.sweep]
    ax_sweep.plot([point.lr for point in result.sweep], sweep_losses, "o-", color=colors[name],
                  label=name)
    val = np.array([[r["val_loss"] for r in run.records if "val_loss" in r] for run in result.runs])
    steps = [r["step"] for r in result.runs[0].records if "val_loss" in r]
    ax_curve.plot(steps, val.mean(axis=0), "o-", ms=3, color=colors[name], label=name)
    if result.arm.rank_fraction:
      nu = np.array([[r["nu_mean"] for r in run.records if "nu_mean" in r] for run in result.runs])
      ax_nu.plot(np.arange(1, nu.shape[1] + 1), nu.mean(axis=0), color=colors[name], label=name,
                 ls="-" if result.arm.optimizer == "orth_dion" else "--")
  ax_sweep.set(xscale="log", xlabel="peak learning rate", ylabel="final val loss (sweep seeds)",
               title="learning-rate sweep")
  ax_curve.set(xlabel="step", ylabel="val loss (mean over seeds)",
               title="validation loss at the best rate")
  bottom = min(r.losses.min() for r in results.values())
  ax_curve.set_ylim(bottom - 0.05, bottom + 1.0)
  ax_nu.set(xlabel="step", ylabel="nu = ||P Q^T||_op, mean over matrices",
            title="update spectral norm (Orth-Dion solid, Dion dashed)")
  for ax in (ax_sweep, ax_curve, ax_nu):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add = parser.add_argument
  add("--steps", type=int, default=300)
  add("--batch-size", type=int, default=16)
  add("--seq-len", type=int, default=64)
  add("--d-model", type=int, default=64)
  add("--n-layers", type=int, default=2)
  add("--n-heads", type=int, default=2)
  add("--schedule", choices=SCHEDULES, default="cosine")
  add("--orthogonalize", choices=QR_METHODS, default=None,
      help="QR method of Dion's and Orth-Dion's factors (default: the library's)")
  add("--seeds", type=int, default=3, help="reporting seeds per arm, at least 2")
  add("--sweep-seeds", type=int, default=1, help="seeds each learning rate of the sweep runs on")
  add("--grid-points", type=int, default=5)
  add("--grid-factor", type=float, default=2**0.5)
  add("--max-extensions", type=int, default=3)
  add("--arms", nargs="+", default=None, metavar="ARM",
      help=f"a subset of: {', '.join(arm.name.replace(' ', '@') for arm in ARMS)}")
  add("--data", default=None)
  add("--out", default="runs/compare")
  add("--json", default=None, help="default: <out>/results.json")
  add("--plot", default=None, help="default: <out>/compare.png")
  args = parser.parse_args(argv)
  if args.seeds < 2:
    parser.error("--seeds must be at least 2: the comparison needs a seed-to-seed spread")
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  started = time.perf_counter()
  out = pathlib.Path(args.out)
  arms = [arm for arm in ARMS if args.arms is None or arm.name.replace(" ", "@") in args.arms]
  base = TrainConfig(
      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      model=ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads),
      schedule=args.schedule, data=args.data,
      orthogonalize=args.orthogonalize,
      eval_every=max(1, args.steps // 4), eval_tokens=16_384, log_every=50, checkpoint_every=0,
      progress=False)
  corpus = data_lib.load_corpus(args.data)
  print(f"{len(arms)} arms, {args.steps} steps of {args.batch_size}x{args.seq_len} bytes; "
        f"unigram entropy of the corpus {data_lib.unigram_entropy(corpus[0]):.3f} nats/byte",
        flush=True)
  runner = Runner(base, corpus, out, log=lambda line: print(line, flush=True))
  sweep_seeds = list(range(args.sweep_seeds))
  seeds = [args.sweep_seeds + i for i in range(args.seeds)]
  results = {}
  for arm in arms:
    grid, best_lr, edge = sweep(
        runner, arm, center=DEFAULT_LEARNING_RATES[arm.optimizer],
        points=args.grid_points, factor=args.grid_factor, max_extensions=args.max_extensions,
        seeds=sweep_seeds)
    results[arm.name] = ArmResult(arm, grid, best_lr, edge,
                                  [runner(arm, best_lr, seed) for seed in seeds])

  comparison = orth_dion_vs_dion(results)
  print("\n" + tables(results, comparison, args.seeds))
  json_path = pathlib.Path(args.json or out / "results.json")
  json_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps({
      "settings": {**vars(args), "model": dataclasses.asdict(base.model),
                   "sweep_seeds": sweep_seeds, "reporting_seeds": seeds},
      "arms": [result.summary() for result in results.values()],
      "orth_dion_vs_dion": comparison,
      "elapsed_s": time.perf_counter() - started,
  }, indent=1))
  plot_path = pathlib.Path(args.plot or out / "compare.png")
  plot(results, plot_path)
  print(f"\n{time.perf_counter() - started:.0f} s; results: {json_path}, plot: {plot_path}")


if __name__ == "__main__":
  main()
