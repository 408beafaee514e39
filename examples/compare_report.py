"""The report of examples/compare.py: its tables (Markdown, as printed and as docs/comparison.md
quotes them) and its figure. Nothing here measures or decides; compare.py's summaries and
comparison rows hold every number shown.

Tables: one row per arm (rate, final loss, nu, alignment); for the low-rank arms, the ranks they
end at per matrix type and the cost of their update there (examples/update_cost.py); per form and
rank, the paired differences Orth-Dion - Dion and polar - Orth-Dion and the steps to Dion's final
loss; and, with an Ada arm, Ada - Orth-Dion and Ada's steps to Orth-Dion's final loss.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import numpy as np

def _num(value: float | None, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def _diff(d: dict | None) -> str:
  if d is None:
    return "-"
  return f"{d['mean']:+.4f} ± {d['std']:.4f} (t={d['t']:+.1f}, p={d['p']:.2f})"


def _ratio(r: dict | None) -> str:
  if r is None:
    return "-"
  per_seed = ", ".join("never" if x is None else f"{x:.2f}" for x in r["per_seed"])
  return f"{'never' if r['mean_curve'] is None else format(r['mean_curve'], '.2f')} ({per_seed})"


def tables(summaries: Sequence[dict], rows: Sequence[dict]) -> str:
  """Markdown tables: one row per arm, the ranks and update costs of the low-rank arms, then one
  row per form and rank for Dion's comparisons and for Ada's."""
  n = len(summaries[0]["seeds"])
  lines = [f"Final validation loss (nats/byte) at each arm's learning rate, mean ± std over {n} "
           "seeds; nu and alignment over all matrices and steps of those runs.", "",
           "| arm | lr | lr at grid edge | final val loss | nu mean | nu max | alignment mean | "
           "alignment min |", "|---|---|---|---|---|---|---|---|"]
  for s in summaries:
    edge = (s["edge"] or "no") if s["lr_source"] == "sweep" else "fixed, no sweep"
    lines.append(f"| {s['arm']} | {s['best_lr']:.4g} | {edge} | {s['val_loss_mean']:.4f} ± "
                 f"{s['val_loss_std']:.4f} | {_num(s['nu_mean'])} | {_num(s['nu_max'])} | "
                 f"{_num(s['alignment_mean'])} | {_num(s['alignment_min'])} |")
  lines += _cost_table(summaries)
  dion_rows = [row for row in rows if any(key.endswith("_minus_dion") for key in row)]
  if dion_rows:
    lines += ["", "Paired by seed: mean ± std of the differences (t = mean / (std / sqrt(n)), "
              "two-sided p); seed sd: the std of one arm's final loss. Steps to Dion's final loss "
              "as a fraction of Dion's steps: on the seed-mean curve (per seed).", "",
              "| form | rank | Dion | Orth-Dion | polar | Orth-Dion - Dion | seed sd | "
              "polar - Orth-Dion | Orth-Dion steps to Dion | polar steps to Dion |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in dion_rows:
      pair = row.get("orth_dion_minus_dion")
      lines.append(
          f"| {row['form']} | 1/{row['rank']} | {_num(row['dion_loss'], 4)} | "
          f"{_num(row['orth_dion_loss'], 4)} | {_num(row['polar_loss'], 4)} | {_diff(pair)} | "
          f"{_num(pair and pair['seed_spread'], 4)} | {_diff(row.get('polar_minus_orth_dion'))} | "
          f"{_ratio(row.get('orth_dion_steps_to_dion'))} | "
          f"{_ratio(row.get('polar_steps_to_dion'))} |")
  ada_rows = [row for row in rows if "ada_minus_orth_dion" in row]
  if ada_rows:
    lines += ["", "Ada-Orth-Dion against Orth-Dion at the same initial rank, paired by seed; Ada's "
              "steps to Orth-Dion's final loss as a fraction of Orth-Dion's steps.", "",
              "| form | rank | Orth-Dion | Ada | Ada - Orth-Dion | seed sd | Ada steps to "
              "Orth-Dion |", "|---|---|---|---|---|---|---|"]
    for row in ada_rows:
      pair = row["ada_minus_orth_dion"]
      lines.append(f"| {row['form']} | 1/{row['rank']} | {_num(row['orth_dion_loss'], 4)} | "
                   f"{_num(row['ada_loss'], 4)} | {_diff(pair)} | "
                   f"{_num(pair['seed_spread'], 4)} | "
                   f"{_ratio(row.get('ada_steps_to_orth_dion'))} |")
  return "\n".join(lines)


def _cost_table(summaries: Sequence[dict]) -> list[str]:
  """Lines of the table of ranks and update costs of the low-rank arms ([] without any)."""
  low_rank = [s for s in summaries if s.get("ranks_by_type")]
  if not low_rank:
    return []
  kinds = list(dict.fromkeys(kind for s in low_rank for kind in s["ranks_by_type"]))
  lines = ["", "Ranks per matrix type at the end of the run (mean over layers and seeds; a fixed "
           "arm keeps the rank it starts with), and the cost of one optimizer update at those "
           "ranks: the median wall time of the jitted update on one CPU device (mean over the "
           "seeds' final ranks), and the bytes compressed data parallelism averages per step, "
           "sum over matrices of (m + n) r 4 (from the shapes, not measured on a mesh).", "",
           "| arm | " + " | ".join(kinds) + " | mean rank | update (ms) | factor bytes / step |",
           "|---|" + "---|" * (len(kinds) + 3)]
  for s in low_rank:
    ranks = s["ranks_by_type"]
    lines.append(f"| {s['arm']} | " + " | ".join(_rank(ranks.get(kind)) for kind in kinds)
                 + f" | {_rank(s['mean_rank'])} | {s['update_ms']:.2f} | "
                 f"{s['factor_bytes']:,.0f} |")
  return lines


def _rank(value: float | None) -> str:
  return "-" if value is None else f"{value:.3g}"


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
  """Validation curves (seed mean, min-max band), the sweeps, and nu and alignment per step, of
  compare.py's ArmResults by name."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(2, 2, figsize=(15, 10))
  (ax_curve, ax_sweep), (ax_nu, ax_align) = axes
  palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  # One colour per optimizer and rank, the form by line style: an arm's mu and beta runs read as
  # one family.
  families = list(dict.fromkeys((r.arm.optimizer, r.arm.rank) for r in results.values()))
  for name, result in results.items():
    color = palette[families.index((result.arm.optimizer, result.arm.rank)) % len(palette)]
    style = dict(color=color, label=name, ls=":" if result.arm.form == "mu" else "-")
    steps = result.runs[0].curve()[0]
    val = np.array([run.curve()[1] for run in result.runs])
    ax_curve.plot(steps, val.mean(axis=0), **style)
    ax_curve.fill_between(steps, val.min(axis=0), val.max(axis=0), color=color, alpha=0.15)
    if result.sweep:
      ax_sweep.plot([p.lr for p in result.sweep], [min(p.val_loss, 10.0) for p in result.sweep],
                    marker="o", **style)
    if result.arm.rank:
      for ax, key in ((ax_nu, "nu_mean"), (ax_align, "alignment_mean")):
        values = np.mean([run.diagnostic(key) for run in result.runs], axis=0)
        ax.plot(np.arange(1, values.size + 1), values, **style)
  bottom = min(r.losses.min() for r in results.values())
  ax_curve.set(xlabel="step", ylabel="validation loss (nats/byte), seed mean and range",
               title="validation loss at each arm's learning rate",
               ylim=(bottom - 0.03, bottom + 0.6))
  ax_sweep.set(xscale="log", xlabel="peak learning rate", ylabel="final val loss (sweep seeds)",
               title="learning-rate sweep")
  ax_nu.set(xlabel="step", ylabel="nu = ||P Q^T||_op, mean over matrices", title="update norm")
  ax_align.set(xlabel="step", ylabel="<B, P Q^T> / (nu ||P^T B||_*), mean over matrices",
               title="alignment (1 for polar)")
  for ax in axes.flat:
    ax.grid(alpha=0.3)
    if ax.has_data():  # the sweep panel stays empty when every rate was fixed
      ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
