"""What a run keeps in its directory (--out): metrics.jsonl, one JSON record per step and one per
validation (MetricsLog); loss.png (plot_losses); and orbax checkpoints under checkpoints/
(examples/checkpointing.py).

A run never replaces what an earlier run left there by accident (check_run_directory): it refuses
to start while checkpoints/ holds anything, unless told to --resume that run or to --overwrite its
checkpoints; --overwrite deletes only the step directories orbax wrote (recognised by their
contents, not their name alone), and refuses if there is anything else. --resume refuses a
checkpoint written with other flags (config.run_flags), and drops the records metrics.jsonl holds
past the step it resumes from; a fresh or --overwrite run rewrites metrics.jsonl.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Sequence

import numpy as np
from flax import nnx

import orth_dion_jax
from examples.checkpointing import (Checkpointer, committed_steps, is_step_directory,
                                    not_written_by_orbax)
from examples.config import TrainConfig, run_flags
from examples.model import Transformer


def _listing(names: Sequence[str], most: int = 5) -> str:
  shown = ", ".join(names[:most])
  return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def check_run_directory(config: TrainConfig) -> None:
  """Raises ValueError unless out_dir/checkpoints is in the state the run asks for: empty or absent
  for a fresh run (it never replaces what an earlier run left there); holding a committed
  checkpoint no later than --steps for --resume (a mistyped --out must not silently start afresh,
  and a run past --steps has nothing to do); holding nothing but what orbax wrote for --overwrite,
  which deletes only that."""
  directory = config.out_dir / "checkpoints"
  for path in (config.out_dir, directory):
    if path.exists() and not path.is_dir():
      raise ValueError(f"--out: {path} exists and is not a directory")
  entries = sorted(directory.iterdir()) if directory.exists() else []
  if config.resume:
    steps = committed_steps(directory)
    if not steps:
      raise ValueError(f"--resume: there is no checkpoint to resume from in {directory}")
    if steps[0] > config.steps:
      raise ValueError(f"--resume: the newest checkpoint in {directory} is at step {steps[0]}, "
                       f"already past --steps {config.steps}")
  elif config.overwrite:
    foreign = [name for path in entries for name in not_written_by_orbax(path)]
    if foreign:
      raise ValueError(f"--overwrite deletes only checkpoints, and {directory} also holds "
                       f"{_listing(foreign)}, which orbax did not write: move that away, or choose "
                       "another --out")
  elif entries:
    raise ValueError(f"{directory} already holds {_listing([path.name for path in entries])}: "
                     "pass --resume to continue that run, --overwrite to replace its checkpoints, "
                     "or choose another --out")


def open_checkpoints(config: TrainConfig, model: Transformer, optimizer: nnx.Optimizer,
                     controller: orth_dion_jax.RankController | None = None
                     ) -> tuple[Checkpointer | None, int]:
  """(checkpointer or None, the step to continue from), restoring in place with --resume: the
  model, the optimizer (at the checkpoint's ranks) and the history of the rank `controller`.

  With --overwrite, first deletes the earlier run's step directories, and only those: anything
  else in the directory is left alone (check_run_directory refuses to start over it).
  """
  directory = config.out_dir / "checkpoints"
  if config.overwrite and directory.exists():
    for path in directory.iterdir():
      if is_step_directory(path):
        shutil.rmtree(path)
  if not config.checkpoint_every:
    return None, 0
  checkpointer = Checkpointer(directory)
  if not config.resume:
    return checkpointer, 0
  progress = checkpointer.restore_latest(model, optimizer, flags=run_flags(config))
  if progress is None:
    return checkpointer, 0
  if controller is not None:
    controller.resume(progress.rank_history)
  return checkpointer, progress.position


class MetricsLog:
  """metrics.jsonl: per-step records {"step", "loss", "lr", "tokens_per_s", nu...} and
  validation records {"step", "val_loss"}. Resuming at step k drops the records after k."""

  def __init__(self, path: pathlib.Path, resume_step: int | None):
    self.path = path
    self.records = []
    if resume_step is not None and path.exists():
      # A run killed while writing leaves its last line cut short: complete lines end in "}".
      lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
      self.records = [r for r in map(json.loads, lines) if r["step"] <= resume_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

  def write(self, records: Sequence[dict]) -> None:
    self.records.extend(records)
    with self.path.open("a") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)


def plot_losses(curves: dict[str, list[dict]], path: pathlib.Path, title: str = "",
                unigram_entropy: float | None = None) -> None:
  """Training loss (moving average) as lines and validation loss as markers, one colour a run;
  a dotted line at the unigram entropy, the loss of a model that ignores context."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for (name, records), color in zip(curves.items(), colors * (1 + len(curves) // len(colors))):
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    losses = np.array([r["loss"] for r in train_records])
    window = max(1, len(losses) // 30)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot([r["step"] for r in train_records][window - 1:], smooth, color=color, lw=1.2,
            label=f"{name} (train)")
    ax.plot([r["step"] for r in val_records], [r["val_loss"] for r in val_records], "o--",
            color=color, ms=3.5, lw=0.8, label=f"{name} (val)")
  if unigram_entropy is not None:
    ax.axhline(unigram_entropy, color="gray", ls=":", label="unigram entropy")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / byte)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
