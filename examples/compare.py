"""The paper's comparison at CPU scale: AdamW, Muon, and in each error-feedback form (mu, beta) and
at each rank fraction (1/2, 1/4, 1/8) Dion, Orth-Dion, Orth-Dion with the polar right factor and,
when asked for, Ada-Orth-Dion (adaptive rank), on one small byte-level transformer with the same
data, steps and seeds for every arm.

    python -m examples.compare                       # default: 17 min on 2 busy CPU cores
    python -m examples.compare --full                # all 20 arms but Ada: about an hour
    python -m examples.compare --forms mu beta --ranks 4 --arms dion orth_dion polar ada
    python -m examples.compare --steps 900 --lrs-from runs/compare/results.json --arms dion ...

The default runs the paper's own setting, the beta-form, at rank 1/4, with AdamW and Muon as
baselines: five arms, measured at 17 minutes on 2 cores shared with other work (load 7-8), inside
a 25-minute budget that the mu-form's three arms at the same rank (about 9 runs of 20 s an arm)
would break. --forms, --ranks and --arms choose other arms; --full runs them all but Ada, which
runs only when --arms names it ("ada").

"ada" is Orth-Dion (QR right factor) with adaptive_rank=True: it starts at the arm's rank, and its
RankController (examples/adaptive_rank.py) decides every --rank-interval steps, between --min-rank
and that initial rank, in multiples of --rank-multiple. The defaults (every 50 of 300 steps,
ranks 4 to 16 in steps of 4 at rank 1/4 of width 64) are the library's policy (every 100 steps,
multiples of 8, at least 8) scaled to this model, whose rank 16 the library's multiples would
allow only to halve; they were set before any run and are not swept.

Procedure, identical for every arm:
  1. Learning-rate sweep on --sweep-seeds seeds: a geometric grid of --grid-points rates, a factor
     --grid-factor apart, centred on the optimizer's default rate (the same for Dion, Orth-Dion
     and polar), scored by the mean final validation loss over those seeds. While the best score
     sits at an end of the grid, the grid grows by one rate at that end (at most --max-extensions
     times); a best rate still at an end is reported as an edge hit. --lrs-from skips the sweep of
     the arms it has a rate for, taking it from earlier results.json files (for longer runs, or
     to add an arm to an earlier comparison: an arm none of them has is swept); --lr gives every
     arm one rate; the report marks such rates "fixed". Ada's grid is Orth-Dion's.
  2. The best rate is rerun on --seeds fresh seeds (not the sweep seeds, so the reported losses are
     independent of the selection). A seed sets the model's initialization and the batch order, so
     seed s of one arm and seed s of another see the same data from the same start: the
     differences between arms are paired by seed.
  3. The error-feedback decay (mu in the mu-form, beta in the beta-form) is not swept: it is fixed
     at the library's default, DECAY = 0.95, for every low-rank arm, and recorded in the JSON.

Reported per arm: the final validation loss (mean and sample std over seeds), and for the low-rank
arms nu = ||P Q^T||_op (mean over matrices and steps, and its maximum) and the alignment
<B, P Q^T> / (nu ||P^T B||_*) (mean, and minimum over matrices and steps). Per form and rank:
Orth-Dion - Dion and polar - Orth-Dion, paired by seed (mean, std of the paired differences, the
t ratio mean / (std / sqrt(n))), and the steps Orth-Dion and polar take to reach Dion's final
validation loss as a fraction of Dion's (the paper's 0.88x), read off the validation curve; and
Ada - Orth-Dion with Ada's steps to Orth-Dion's final loss. For every low-rank arm, the ranks it
ends at per matrix type (Ada's, mean over layers and seeds), and the cost of its optimizer update
at those ranks: the wall time of the jitted update, and the bytes compressed data parallelism would
average per step (examples/update_cost.py). Nothing is tuned per optimizer beyond step 1. The
initial right factor Q0 of the low-rank arms is drawn from seed 0 in every run, so that the seeds
of an arm's learning rate share one optimizer, and with it one compiled train step.
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

from examples import adaptive_rank
from examples import compare_report
from examples.compare_statistics import paired_difference, steps_ratio
from examples import data as data_lib
from examples import train as train_lib
from examples import update_cost
from examples.config import DEFAULT_LEARNING_RATES, QR_METHODS, SCHEDULES, TrainConfig
from examples.model import ModelConfig

FORMS = ("mu", "beta")
RANKS = (2, 4, 8)  # rank fraction 1/k
LOW_RANK = ("dion", "orth_dion", "polar", "ada")
OPTIMIZERS = ("adamw", "muon", *LOW_RANK)
DEFAULT_ARMS = tuple(name for name in OPTIMIZERS if name != "ada")  # Ada sweeps its own rates
DECAY = 0.95  # mu and beta alike: the library's default, fixed, not swept
DEFAULT_FORMS, DEFAULT_RANKS = ("beta",), (4,)
DIAGNOSTICS = ("nu_mean", "nu_max", "alignment_mean", "alignment_min", "captured_fraction_mean")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer setting: "polar" is orth_dion with right_factor="polar", "ada" orth_dion with
  adaptive_rank=True; the low-rank arms have an error-feedback form and a rank (fraction 1/rank,
  Ada's initial one), AdamW and Muon neither."""
  optimizer: str
  form: str | None = None
  rank: int | None = None

  @property
  def name(self) -> str:
    return self.optimizer if self.rank is None else f"{self.optimizer} {self.form} r=1/{self.rank}"

  def settings(self, rank_policy: dict | None = None) -> dict:
    """The TrainConfig fields this arm sets; Ada's include `rank_policy`, the fields of its rank
    controller ({"rank_interval": ..., ...}; default: the library's)."""
    if self.rank is None:
      return {"optimizer": self.optimizer}
    settings = {"optimizer": "dion" if self.optimizer == "dion" else "orth_dion",
                "right_factor": "polar" if self.optimizer == "polar" else "qr",
                "error_feedback": self.form, "decay": DECAY, "rank_fraction": 1 / self.rank}
    if self.optimizer == "ada":
      settings |= {"adaptive_rank": True, **(rank_policy or {})}
    return settings


def arm_grid(optimizers: Sequence[str], forms: Sequence[str], ranks: Sequence[int]) -> list[Arm]:
  """The baselines among `optimizers`, then each low-rank one per form and rank, grouped by
  (form, rank) so that the arms a comparison pairs run one after another."""
  arms = [Arm(name) for name in OPTIMIZERS[:2] if name in optimizers]
  return arms + [Arm(name, form, rank) for form in FORMS if form in forms
                 for rank in RANKS if rank in ranks for name in LOW_RANK if name in optimizers]


@dataclasses.dataclass
class Run:
  lr: float
  seed: int
  val_loss: float  # final; inf if the run diverged
  records: list[dict]

  @property
  def final_ranks(self) -> dict[str, int] | None:
    """The ranks an adaptive run's last steps ran at ({path: rank}); None for the others."""
    ranks = [r["ranks"] for r in self.records if "ranks" in r]
    return ranks[-1] if ranks else None

  def curve(self) -> tuple[np.ndarray, np.ndarray]:
    """(steps, validation losses) of the evaluations, step 0 included."""
    points = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
    return tuple(np.array(column, dtype=float) for column in zip(*points))

  def diagnostic(self, key: str) -> np.ndarray:
    return np.array([r[key] for r in self.records if key in r])


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
  sweep: list[SweepPoint]  # empty when the rate came from --lrs-from
  best_lr: float
  edge: str | None  # "low" or "high" when the best rate is still at an end of the grid
  runs: list[Run]  # the best rate on the reporting seeds
  costs: list[update_cost.UpdateCost] = dataclasses.field(default_factory=list)  # per run

  @property
  def losses(self) -> np.ndarray:
    return np.array([run.val_loss for run in self.runs])

  def summary(self) -> dict:
    diagnostics = {key: np.concatenate([run.diagnostic(key) for run in self.runs])
                   for key in DIAGNOSTICS}
    # Over matrices and steps: the mean of the per-step means, the extremes of the extremes.
    reduce = {"nu_mean": np.mean, "nu_max": np.max, "alignment_mean": np.mean,
              "alignment_min": np.min, "captured_fraction_mean": np.mean}
    return {
        "arm": self.arm.name, **dataclasses.asdict(self.arm),
        "decay": DECAY if self.arm.rank else None,
        "best_lr": self.best_lr, "edge": self.edge, "lr_source": "sweep" if self.sweep else "fixed",
        "sweep": [{"lr": point.lr, "val_loss": point.val_loss,
                   "val_losses": [run.val_loss for run in point.runs]} for point in self.sweep],
        "seeds": [run.seed for run in self.runs], "val_losses": self.losses.tolist(),
        "val_loss_mean": float(self.losses.mean()),
        "val_loss_std": float(self.losses.std(ddof=1)) if len(self.runs) > 1 else 0.0,
        **{key: float(reduce[key](values)) if values.size else None
           for key, values in diagnostics.items()},
        **self._cost_summary(),
    }

  def _cost_summary(self) -> dict:
    """The ranks the runs end at (mean over layers and seeds: per matrix type and over every
    matrix) and the cost of the update there (mean over runs); {} without costs."""
    if not self.costs:
      return {}
    by_type = [adaptive_rank.by_matrix_type(cost.ranks) for cost in self.costs]
    return {"ranks_by_type": {kind: float(np.mean([ranks[kind] for ranks in by_type]))
                              for kind in by_type[0]},
            "mean_rank": float(np.mean([list(cost.ranks.values()) for cost in self.costs])),
            "update_ms": 1e3 * float(np.mean([cost.step_s for cost in self.costs])),
            "factor_bytes": float(np.mean([cost.factor_bytes for cost in self.costs]))}


class Runner:
  """Trains one arm at one learning rate and seed; the seeds of a learning rate reuse one
  optimizer (its Q0 from seed 0), hence one compilation per arm and learning rate."""

  def __init__(self, base: TrainConfig, corpus, out: pathlib.Path, log,
               rank_policy: dict | None = None):
    self.base, self.corpus, self.out, self.log = base, corpus, out, log
    self.rank_policy = rank_policy
    self.optimizers: dict[tuple[Arm, float], optax.GradientTransformation] = {}

  def _config(self, arm: Arm, lr: float, seed: int) -> TrainConfig:
    return dataclasses.replace(self.base, lr=lr, seed=seed, **arm.settings(self.rank_policy))

  def costs(self, result: ArmResult) -> list[update_cost.UpdateCost]:
    """The cost of a low-rank arm's update at the ranks each of its runs ended at (the same for
    every run of a fixed rank: measured once)."""
    config, tx = self._config(result.arm, result.best_lr, 0), self._optimizer(result.arm,
                                                                             result.best_lr)
    measured = {}
    for run in result.runs:
      key = json.dumps(run.final_ranks, sort_keys=True)
      if key not in measured:
        measured[key] = update_cost.measure(config, tx, run.final_ranks)
    return [measured[json.dumps(run.final_ranks, sort_keys=True)] for run in result.runs]

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
    self.log(f"{arm.name:22s} lr={lr:<8.4g} seed={seed}: val {run.val_loss:.4f} "
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


def comparisons(results: dict[str, ArmResult]) -> list[dict]:
  """Per form and rank with both arms of a pair: Orth-Dion vs Dion, polar vs Orth-Dion and Ada vs
  Orth-Dion."""
  rows = []
  for form in FORMS:
    for rank in RANKS:
      arm = {name: results.get(Arm(name, form, rank).name) for name in LOW_RANK}
      row = {"form": form, "rank": rank,
             **{f"{name}_loss": r and float(r.losses.mean()) for name, r in arm.items()}}
      pairs = (("orth_dion", "dion"), ("polar", "orth_dion"), ("polar", "dion"),
               ("ada", "orth_dion"))
      for a, b in pairs:
        if arm[a] and arm[b]:
          row[f"{a}_minus_{b}"] = paired_difference(arm[a].losses, arm[b].losses)
      for a, b in (("orth_dion", "dion"), ("polar", "dion"), ("ada", "orth_dion")):
        if arm[a] and arm[b]:
          row[f"{a}_steps_to_{b}"] = steps_ratio(arm[a].runs, arm[b].runs)
      if any("_minus_" in key for key in row):
        rows.append(row)
  return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add = parser.add_argument
  add("--steps", type=int, default=300, help="the budget: optimizer steps of every run")
  add("--batch-size", type=int, default=16)
  add("--seq-len", type=int, default=64)
  add("--d-model", type=int, default=64)
  add("--n-layers", type=int, default=2)
  add("--n-heads", type=int, default=2)
  add("--max-bytes", type=int, default=data_lib.DEFAULT_MAX_BYTES, help="corpus size cap")
  add("--eval-every", type=int, default=None, help="default: --steps / 15, for the steps-to-reach")
  add("--eval-tokens", type=int, default=16_384)
  add("--schedule", choices=SCHEDULES, default="cosine")
  add("--orthogonalize", choices=QR_METHODS, default=None,
      help="QR method of the low-rank arms' factors (default: the library's)")
  add("--seeds", type=int, default=3, help="reporting seeds per arm, at least 2")
  add("--sweep-seeds", type=int, default=1, help="seeds each learning rate of the sweep runs on")
  add("--grid-points", type=int, default=5)
  add("--grid-factor", type=float, default=2**0.5)
  add("--max-extensions", type=int, default=3)
  add("--arms", nargs="+", choices=OPTIMIZERS, default=list(DEFAULT_ARMS), metavar="OPTIMIZER",
      help=f"a subset of {', '.join(OPTIMIZERS)} (default: all but ada)")
  add("--forms", nargs="+", choices=FORMS, default=None,
      help=f"error-feedback forms of the low-rank arms (default: {' '.join(DEFAULT_FORMS)})")
  add("--ranks", nargs="+", type=int, choices=RANKS, default=None,
      help=f"rank fractions 1/k of the low-rank arms (default: "
           f"{' '.join(map(str, DEFAULT_RANKS))})")
  add("--full", action="store_true", help="every form and rank (unless --forms / --ranks say)")
  add("--rank-interval", type=int, default=50, help="ada: steps between rank decisions")
  add("--min-rank", type=int, default=4, help="ada: the lowest rank")
  add("--rank-multiple", type=int, default=4, help="ada: ranks are multiples of this")
  rates = parser.add_mutually_exclusive_group()
  rates.add_argument("--lrs-from", nargs="+", default=None, metavar="RESULTS_JSON",
                     help="earlier results.json files whose arms' rates to use (no sweep for "
                          "those arms; the others are swept)")
  rates.add_argument("--lr", type=float, default=None, help="one rate for every arm: no sweep")
  add("--data", default=None)
  add("--out", default="runs/compare")
  add("--json", default=None, help="default: <out>/results.json")
  add("--plot", default=None, help="default: <out>/compare.png")
  args = parser.parse_args(argv)
  if args.seeds < 2:
    parser.error("--seeds must be at least 2: the comparison needs a seed-to-seed spread")
  args.forms = args.forms or list(FORMS if args.full else DEFAULT_FORMS)
  args.ranks = args.ranks or list(RANKS if args.full else DEFAULT_RANKS)
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the comparison; prints the tables and returns what it writes to the JSON."""
  args = parse_args(argv)
  started = time.perf_counter()
  out = pathlib.Path(args.out)
  arms = arm_grid(args.arms, args.forms, args.ranks)
  fixed = {arm.name: args.lr for arm in arms} if args.lr else {}
  for path in args.lrs_from or []:
    fixed |= {s["arm"]: s["best_lr"] for s in json.loads(pathlib.Path(path).read_text())["arms"]}
  if args.lrs_from and (swept := [arm.name for arm in arms if arm.name not in fixed]):
    print(f"no rate in {' '.join(args.lrs_from)} for {', '.join(swept)}: swept", flush=True)
  base = TrainConfig(
      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      model=ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads),
      schedule=args.schedule, data=args.data, max_bytes=args.max_bytes,
      orthogonalize=args.orthogonalize, eval_every=args.eval_every or max(1, args.steps // 15),
      eval_tokens=args.eval_tokens, log_every=50, checkpoint_every=0, progress=False)
  corpus = data_lib.load_corpus(args.data, args.max_bytes)
  print(f"{len(arms)} arms ({', '.join(arm.name for arm in arms)}), {args.steps} steps of "
        f"{args.batch_size}x{args.seq_len} bytes; unigram entropy of the corpus "
        f"{data_lib.unigram_entropy(corpus[0]):.3f} nats/byte", flush=True)
  rank_policy = {"rank_interval": args.rank_interval, "min_rank": args.min_rank,
                 "rank_multiple": args.rank_multiple}
  runner = Runner(base, corpus, out, log=lambda line: print(line, flush=True),
                  rank_policy=rank_policy)
  sweep_seeds = list(range(args.sweep_seeds))
  seeds = [args.sweep_seeds + i for i in range(args.seeds)]
  results = {}
  for arm in arms:
    if arm.name in fixed:
      grid, best_lr, edge = [], fixed[arm.name], None
    else:
      center = DEFAULT_LEARNING_RATES[
          "orth_dion" if arm.optimizer in ("polar", "ada") else arm.optimizer]
      grid, best_lr, edge = sweep(runner, arm, center=center, points=args.grid_points,
                                  factor=args.grid_factor, max_extensions=args.max_extensions,
                                  seeds=sweep_seeds)
    results[arm.name] = ArmResult(arm, grid, best_lr, edge,
                                  [runner(arm, best_lr, seed) for seed in seeds])
  # After every run, one arm after the other: the timings share the machine's load of the moment.
  for result in results.values():
    if result.arm.rank:
      result.costs = runner.costs(result)

  summaries = [result.summary() for result in results.values()]
  rows = comparisons(results)
  print("\n" + compare_report.tables(summaries, rows))
  report = {
      "settings": {**vars(args), "decay": DECAY, "model": dataclasses.asdict(base.model),
                   "eval_every": base.eval_every, "sweep_seeds": sweep_seeds,
                   "reporting_seeds": seeds},
      "arms": summaries, "comparisons": rows,
      "curves": {name: {"steps": r.runs[0].curve()[0].tolist(),
                        "val_loss": [run.curve()[1].tolist() for run in r.runs]}
                 for name, r in results.items()},
      "elapsed_s": time.perf_counter() - started,
  }
  json_path = pathlib.Path(args.json or out / "results.json")
  json_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(report, indent=1))
  plot_path = pathlib.Path(args.plot or out / "compare.png")
  compare_report.plot(results, plot_path)
  print(f"\n{report['elapsed_s']:.0f} s; results: {json_path}, plot: {plot_path}")
  return report


if __name__ == "__main__":
  main()
