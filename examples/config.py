"""The settings of a training run, each declared once: a field of TrainConfig (or of the model's
ModelConfig) with its default, its help and how its flag is checked, from which examples/cli.py
builds the command line of `python -m examples.train`. Then the rules the settings obey together
(check_config), and those a checkpoint records (run_flags).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

import orth_dion_jax
from examples import cli
from examples import data as data_lib
from examples.cli import integer, number, setting
from examples.model import VOCAB_SIZE, ModelConfig

OPTIMIZERS = ("orth_dion", "dion", "muon", "adamw")
SCHEDULES = ("cosine", "wsd", "constant")
QR_METHODS = orth_dion_jax.ORTHOGONALIZE_METHODS
ORTH_DION_RIGHT_FACTORS = ("qr", "polar")
# Peak learning rates for the default model and budget (the centre of compare.py's sweep grid).
DEFAULT_LEARNING_RATES = {"orth_dion": 0.04, "dion": 0.04, "muon": 0.04, "adamw": 0.008}
_POSITIVE = integer(1)
# The rank controller's defaults are the library's (RankPolicy): quoted in the help, not repeated.
_RANK_POLICY = {field.name: field.default for field in dataclasses.fields(orth_dion_jax.RankPolicy)}
# TrainConfig's rank flags -> the RankPolicy settings they give.
_RANK_FLAGS = {"rank_interval": "interval", "min_rank": "min_rank", "rank_multiple": "multiple_of"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a run; each field but `model` is the flag of the same name."""
  optimizer: str = setting("orth_dion", "the optimizer of the attention and MLP matrices",
                           choices=OPTIMIZERS)
  lr: float | None = setting(
      None, f"peak learning rate (default per optimizer: {DEFAULT_LEARNING_RATES})",
      parse=number(0, low_included=False))
  rank_fraction: float = setting(
      0.25, "Dion / Orth-Dion rank as a fraction of min(fan_in, fan_out), in (0, 1]",
      parse=number(0, 1, low_included=False))
  orthogonalize: str | None = setting(None, "Dion / Orth-Dion QR method (default: the library's)",
                                      choices=QR_METHODS)
  right_factor: str = setting(
      "qr", "Orth-Dion's right factor: the sign-safe QR of the paper, or the exact rank-r polar "
      "factor (Dion always normalizes columns)", choices=ORTH_DION_RIGHT_FACTORS)
  error_feedback: str = setting(
      "mu", "Dion / Orth-Dion error feedback: the reference mu-form, or the paper's beta-form",
      choices=orth_dion_jax.ERROR_FEEDBACK_FORMS)
  adaptive_rank: bool = setting(
      False, "Dion / Orth-Dion: Ada-Orth-Dion, each matrix's rank follows its effective rank, "
      "decided every --rank-interval steps between --min-rank and the rank --rank-fraction gives "
      "it at the start")
  rank_interval: int | None = setting(
      None, f"--adaptive-rank: steps between rank decisions (default: the library's, "
      f"{_RANK_POLICY['interval']})", parse=_POSITIVE)
  min_rank: int | None = setting(
      None, f"--adaptive-rank: no rank goes below this (default: the library's, "
      f"{_RANK_POLICY['min_rank']})", parse=_POSITIVE)
  rank_multiple: int | None = setting(
      None, f"--adaptive-rank: ranks are multiples of this, but at the bounds (default: the "
      f"library's, {_RANK_POLICY['multiple_of']})", parse=_POSITIVE)
  decay: float | None = setting(
      None, "Dion / Orth-Dion error-feedback decay: mu in the mu-form, in [0, 1), beta in the "
            "beta-form, in [0, 1] (default: the library's)",
      parse=number(0, 1, low_included=True))
  schedule: str = setting("cosine", "the learning rate after warmup: cosine decay, constant, or "
                          "constant then a linear decay over the last 20%% of steps (wsd)",
                          choices=SCHEDULES)
  warmup_steps: int | None = setting(None, "default: 5%% of --steps", parse=integer(0))
  weight_decay: float = setting(0.01, "decoupled weight decay of the hidden matrices",
                                parse=number(0, low_included=True))
  model: ModelConfig = ModelConfig()
  steps: int = setting(300, "optimizer steps", parse=_POSITIVE)
  batch_size: int = setting(16, "sequences a step", parse=_POSITIVE)
  seq_len: int = setting(128, "bytes a sequence", parse=_POSITIVE)
  # jax.random.key takes a 32-bit seed.
  seed: int = setting(0, "the model's initialization and the batch order",
                      parse=integer(0, 2**32 - 1))
  data: str | None = setting(
      None, "a text file or a directory of them (default: the Python standard library's "
      "sources); in a directory, symlinked directories are not followed, symlinked files are "
      "read only if they lead to a regular file inside it, and FIFOs, sockets, devices and "
      "symlink loops are skipped")
  max_bytes: int = setting(data_lib.DEFAULT_MAX_BYTES,
                           "corpus size cap: no more than this is read from the files",
                           parse=_POSITIVE)
  eval_every: int = setting(100, "steps between validations", parse=_POSITIVE)
  eval_tokens: int = setting(16_384, "validation bytes", parse=_POSITIVE)
  log_every: int = setting(10, "steps between writes of metrics.jsonl", parse=_POSITIVE)
  mesh_data: int = setting(1, "data-parallel devices", parse=_POSITIVE)
  mesh_fsdp: int = setting(1, "devices the batch and the model width are split over",
                           parse=_POSITIVE)
  mesh_tensor: int = setting(1, "devices the heads, MLP and vocabulary are split over",
                             parse=_POSITIVE)
  compressed_dp: bool = setting(
      False, "Orth-Dion / Dion: keep gradients and momenta per data-parallel replica and average "
      "only the low-rank factors")
  out: str | None = setting(None, "run directory (default: runs/<optimizer>)")
  checkpoint_every: int = setting(100, "steps between checkpoints; 0: never", parse=integer(0))
  resume: bool = setting(
      False, "continue from the newest intact checkpoint in --out (an error if there is none, if "
      "it is past --steps, or if it was written with another --optimizer, --seed, "
      "--rank-fraction, --orthogonalize, --right-factor, --error-feedback, --adaptive-rank, "
      "--compressed-dp or model shape)")
  overwrite: bool = setting(
      False, "start afresh although --out holds an earlier run's checkpoints, deleting them; "
      "refused if its checkpoints/ holds anything else")
  progress: bool = setting(True, "hide the progress bar")

  @property
  def peak_lr(self) -> float:
    return DEFAULT_LEARNING_RATES[self.optimizer] if self.lr is None else self.lr

  @property
  def out_dir(self) -> pathlib.Path:
    # An empty --out is refused (check_config), not taken for the default.
    return pathlib.Path(os.path.join("runs", self.optimizer) if self.out is None else self.out)


def check_mesh(config: TrainConfig) -> None:
  """Raises ValueError unless the batch and every weight axis split evenly over the mesh."""
  splits = [("--batch-size", config.batch_size, config.mesh_data * config.mesh_fsdp,
             "--mesh-data x --mesh-fsdp"),
            ("--d-model", config.model.d_model, config.mesh_fsdp, "--mesh-fsdp"),
            ("--n-heads", config.model.n_heads, config.mesh_tensor, "--mesh-tensor"),
            ("--mlp-hidden", config.model.mlp_hidden, config.mesh_tensor, "--mesh-tensor"),
            ("the vocabulary size", VOCAB_SIZE, config.mesh_tensor, "--mesh-tensor")]
  for name, size, devices, axes in splits:
    if size % devices:
      raise ValueError(f"{name} {size} is not divisible by the {devices} devices of {axes}")
  if config.right_factor != "qr" and config.optimizer != "orth_dion":
    raise ValueError(f"--right-factor {config.right_factor} needs orth_dion, not "
                     f"{config.optimizer!r}")
  low_rank_only = {"--error-feedback": config.error_feedback != "mu",
                   "--decay": config.decay is not None, "--adaptive-rank": config.adaptive_rank}
  for flag, given in low_rank_only.items():
    if given and config.optimizer not in ("orth_dion", "dion"):
      raise ValueError(f"{flag} needs orth_dion or dion, not {config.optimizer!r}")
  for name in _RANK_FLAGS:
    if getattr(config, name) is not None and not config.adaptive_rank:
      raise ValueError(f"--{name.replace('_', '-')} needs --adaptive-rank")
  if config.error_feedback == "mu" and config.decay == 1:
    raise ValueError("--decay 1 is not a mu of the mu-form, which must be below 1")
  if config.compressed_dp and config.optimizer not in ("orth_dion", "dion"):
    raise ValueError(f"--compressed-dp needs orth_dion or dion, not {config.optimizer!r}")
  # It averages over the "data" replicas: with one there is nothing to compress, and no mesh.
  if config.compressed_dp and config.mesh_data == 1:
    raise ValueError("--compressed-dp needs --mesh-data > 1")


def rank_policy(config: TrainConfig) -> dict[str, int]:
  """The RankController keywords (RankPolicy's names) of the rank flags given; the library's
  defaults for the rest."""
  return {policy: getattr(config, name) for name, policy in _RANK_FLAGS.items()
          if getattr(config, name) is not None}


def check_config(config: TrainConfig) -> None:
  """Raises ValueError for settings that cannot run together: an unknown optimizer or schedule, a
  warmup longer than the run, a mesh the batch or the weights do not split over, an empty --out,
  or --resume without checkpoints or with --overwrite."""
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")
  if config.schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {config.schedule!r}; choose one of {SCHEDULES}")
  if config.warmup_steps is not None and config.warmup_steps > config.steps:
    raise ValueError(f"--warmup-steps {config.warmup_steps} is more than --steps {config.steps}: "
                     "the learning rate would never reach its peak")
  if config.out == "":
    raise ValueError("--out is empty: name a run directory, or leave --out out for "
                     "runs/<optimizer>")
  check_mesh(config)
  if config.resume and config.overwrite:
    raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one")
  if config.resume and not config.checkpoint_every:
    raise ValueError("--resume needs checkpoints: set --checkpoint-every > 0")


def run_flags(config: TrainConfig) -> dict[str, Any]:
  """The flags a checkpoint records and a resume must repeat: those the model's and optimizer's
  state depends on, and --seed, which also picks the batches that follow. Not the learning rate,
  schedule, --steps, --batch-size or the mesh (but --mesh-data with --compressed-dp), which a
  resumed run may change."""
  flags = {"--optimizer": config.optimizer, "--seed": config.seed,
           "--d-model": config.model.d_model, "--n-layers": config.model.n_layers,
           "--n-heads": config.model.n_heads, "--mlp-hidden": config.model.mlp_hidden}
  if config.optimizer in ("orth_dion", "dion"):  # the others have no rank, QR method or replicas
    # --compressed-dp keeps a momentum per "data" replica: a state tree of its own, whose shapes
    # depend on --mesh-data.
    # --adaptive-rank adds arrays to the state. Its controller's settings add none: a resumed run
    # may change them, as it may the learning rate.
    flags |= {"--rank-fraction": config.rank_fraction, "--orthogonalize": config.orthogonalize,
              "--right-factor": config.right_factor, "--error-feedback": config.error_feedback,
              "--adaptive-rank": config.adaptive_rank, "--compressed-dp": config.compressed_dp}
    if config.compressed_dp:
      flags["--mesh-data"] = config.mesh_data
  return flags


def argument_parser() -> cli.ArgumentParser:
  """The command line of examples.train: a flag for each setting, checked as it is parsed, so that
  a value out of range is an error naming the flag, not a failure later in the run."""
  parser = cli.ArgumentParser(
      prog="python -m examples.train",
      description="Train a byte-level transformer language model with Orth-Dion (or Dion, Muon, "
                  "AdamW).")
  cli.add_flags(parser, TrainConfig)
  return parser


def parse_args(argv: Sequence[str] | None = None,
               parser: cli.ArgumentParser | None = None) -> TrainConfig:
  """The TrainConfig of the command line `argv`; any problem with its flags, alone or together,
  exits through `parser.error` (default: argument_parser()'s)."""
  parser = parser or argument_parser()
  args = vars(parser.parse_args(argv))
  try:
    config = cli.config_from(TrainConfig, args)
  except ValueError as error:  # ModelConfig's: the heads do not split the width evenly
    parser.error(f"--d-model / --n-heads: {error}")
  try:
    check_config(config)
  except ValueError as error:
    parser.error(str(error))
  return config
