"""Train a byte-level transformer language model with Orth-Dion (or Dion, Muon, AdamW).

    python -m examples.train                # Orth-Dion on the standard library's sources
    python -m examples.train --optimizer dion --rank-fraction 0.125
    python -m examples.train --data my_texts/ --steps 2000 --d-model 256 --n-layers 6
    python -m examples.train --resume       # continue from the latest checkpoint in --out
    python -m examples.train --overwrite    # start afresh, replacing the checkpoints in --out
    python -m examples.train --mesh-data 2 --mesh-fsdp 2 --mesh-tensor 2 --compressed-dp

Writes to --out (default runs/<optimizer>): metrics.jsonl (one JSON record per step, and one per
validation), loss.png, and orbax checkpoints under checkpoints/. A run refuses to start while
checkpoints/ holds anything, unless told to --resume that run or to --overwrite its checkpoints;
--overwrite deletes only the step directories orbax wrote (recognised by their contents, not their
name alone), and refuses if there is anything else. --resume refuses a checkpoint written with
other flags (run_flags).
A fresh or --overwrite run rewrites metrics.jsonl and loss.png. The hidden weight matrices
(attention and MLP projections) get the chosen spectral optimizer; the embedding, the output head
and the norm scales get AdamW, as in the Dion reference.

On a mesh, the batch is split over the "data" and "fsdp" axes and the weights over "fsdp" and
"tensor" (model.partition_specs); Orth-Dion and Dion then run their sharded step. With
--compressed-dp, gradients stay per "data" replica and only the low-rank factors are averaged.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Iterable, NoReturn, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import orth_dion_jax
from examples import data as data_lib
from examples.checkpointing import (CheckpointMismatchError, Checkpointer, NoIntactCheckpointError,
                                    committed_steps, is_step_directory, not_written_by_orbax)
from examples.model import (VOCAB_SIZE, ModelConfig, Transformer, cross_entropy,
                            dimension_numbers, hidden_matrix_mask, partition_specs)

OPTIMIZERS = ("orth_dion", "dion", "muon", "adamw")
SCHEDULES = ("cosine", "wsd", "constant")
# Peak learning rates for the default model and budget (the centre of compare.py's sweep grid).
DEFAULT_LEARNING_RATES = {"orth_dion": 0.04, "dion": 0.04, "muon": 0.04, "adamw": 0.008}
MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  optimizer: str = "orth_dion"
  lr: float | None = None  # None: DEFAULT_LEARNING_RATES[optimizer]
  rank_fraction: float = 0.25
  orthogonalize: str | None = None  # None: the library's default
  schedule: str = "cosine"
  warmup_steps: int | None = None  # None: 5% of the steps
  weight_decay: float = 0.01
  model: ModelConfig = ModelConfig()
  steps: int = 300
  batch_size: int = 16
  seq_len: int = 128
  seed: int = 0
  data: str | None = None  # None: the Python standard library's sources
  max_bytes: int = data_lib.DEFAULT_MAX_BYTES
  eval_every: int = 100
  eval_tokens: int = 16_384
  log_every: int = 10
  mesh_data: int = 1
  mesh_fsdp: int = 1
  mesh_tensor: int = 1
  compressed_dp: bool = False  # Orth-Dion / Dion: average low-rank factors, not gradients
  out: str | None = None  # None: runs/<optimizer>
  checkpoint_every: int = 100  # 0: no checkpoints
  resume: bool = False
  overwrite: bool = False  # replace the checkpoints an earlier run left in out_dir
  progress: bool = True

  @property
  def peak_lr(self) -> float:
    return DEFAULT_LEARNING_RATES[self.optimizer] if self.lr is None else self.lr

  @property
  def out_dir(self) -> pathlib.Path:
    # An empty --out is refused (check_config), not taken for the default.
    return pathlib.Path(os.path.join("runs", self.optimizer) if self.out is None else self.out)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup to the peak, then one of: cosine decay towards 0 ("cosine"), the peak
  ("constant"), or the peak followed by a linear decay over the last 20% of steps ("wsd")."""
  peak, steps = config.peak_lr, config.steps
  warmup = max(1, steps // 20) if config.warmup_steps is None else max(1, config.warmup_steps)

  def schedule(count):
    step = count + 1  # the step this learning rate is used for: 1, 2, ..., steps
    ramp = jnp.minimum(1.0, step / warmup)
    if config.schedule == "constant":
      return peak * ramp
    if config.schedule == "cosine":
      progress = jnp.clip((step - warmup) / max(1, steps + 1 - warmup), 0.0, 1.0)
      return peak * ramp * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return peak * ramp * jnp.clip((steps + 1 - step) / max(1, steps // 5), 0.0, 1.0)

  return schedule


def make_optimizer(config: TrainConfig, mesh: jax.sharding.Mesh | None = None,
                   param_specs: Any = None) -> optax.GradientTransformation:
  """The chosen optimizer for the hidden matrices (with decoupled weight decay), and AdamW without
  weight decay for the embedding, head and norm scales.

  Muon, Dion and Orth-Dion give those the AdamW of the Dion reference (betas 0.95, 0.98) at their
  own learning rate, so that they differ only in the matrix step. Given the `mesh` the weights
  are sharded over (as `param_specs` says: the mesh's axes are Auto), Orth-Dion and Dion run their
  sharded step, and with `config.compressed_dp` their compressed data parallelism over "data".
  """
  lr = learning_rate_schedule(config)
  wd = config.weight_decay
  if config.optimizer in ("orth_dion", "dion"):
    factory = orth_dion_jax.orth_dion if config.optimizer == "orth_dion" else orth_dion_jax.dion
    method = {} if config.orthogonalize is None else {"orthogonalize": config.orthogonalize}
    return factory(
        lr, rank_fraction=config.rank_fraction, weight_decay=wd, seed=config.seed, **method,
        mesh=mesh, param_specs=param_specs, data_axis="data" if config.compressed_dp else None,
        weight_dimension_numbers=lambda p: dimension_numbers(p, orth_dion_jax.DionDimensionNumbers))
  if config.optimizer == "muon":
    return optax.contrib.muon(
        lr, weight_decay=wd, adam_b1=0.95, adam_b2=0.98,
        muon_weight_dimension_numbers=lambda p: dimension_numbers(
            p, optax.contrib.MuonDimensionNumbers))
  if config.optimizer == "adamw":
    return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=wd, mask=hidden_matrix_mask)
  raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")


def make_mesh(config: TrainConfig) -> jax.sharding.Mesh:
  shape = (config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
  devices = jax.devices()
  if math.prod(shape) > len(devices):
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, found "
        f"{len(devices)}; on CPU, simulate more with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(shape)}")
  # Auto axes: the compiler propagates the batch and weight shardings through the model, so its
  # matmuls need no out_sharding; the optimizer is told the weights' specs instead.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices[:math.prod(shape)])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  # The batch is split over the data and fsdp axes (FSDP: each fsdp device gathers the weights
  # for its examples); tensor-axis devices see the same examples.
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def shard(tree: Any, specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree, specs)


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
  if config.compressed_dp and config.optimizer not in ("orth_dion", "dion"):
    raise ValueError(f"--compressed-dp needs orth_dion or dion, not {config.optimizer!r}")
  # It averages over the "data" replicas: with one there is nothing to compress, and no mesh.
  if config.compressed_dp and config.mesh_data == 1:
    raise ValueError("--compressed-dp needs --mesh-data > 1")


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
    flags |= {"--rank-fraction": config.rank_fraction, "--orthogonalize": config.orthogonalize,
              "--compressed-dp": config.compressed_dp}
    if config.compressed_dp:
      flags["--mesh-data"] = config.mesh_data
  return flags


def per_replica_value_and_grad(model: Transformer, inputs: jax.Array, targets: jax.Array,
                               mesh: jax.sharding.Mesh) -> tuple[jax.Array, nnx.State]:
  """The batch's mean loss and, for each replica of the "data" axis, the gradient of the loss on
  its share of the batch: leaves (replicas, *param.shape), for compressed data parallelism."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, batch):
    return cross_entropy(nnx.merge(graphdef, params, rest), *batch)

  grad_fn = orth_dion_jax.per_replica_value_and_grad(loss, mesh, "data")
  return grad_fn(params, (inputs, targets))


# The step functions take the model and optimizer as nnx.split's (graphdef, state) and jax.jit
# them: nnx.merge then runs once per compilation instead of a graph traversal on every call,
# which matters for models this small.
@functools.partial(jax.jit, static_argnums=(0, 4))
def train_step(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, targets: jax.Array,
               replica_mesh: jax.sharding.Mesh | None = None
               ) -> tuple[nnx.State, jax.Array, dict[str, jax.Array]]:
  """One optimizer step of (model, optimizer) = nnx.merge(graphdef, state); with `replica_mesh`,
  on per-replica gradients (compressed data parallelism over its "data" axis)."""
  model, optimizer = nnx.merge(graphdef, state)
  if replica_mesh is None:
    loss, grads = nnx.value_and_grad(cross_entropy)(model, inputs, targets)
  else:
    loss, grads = per_replica_value_and_grad(model, inputs, targets, replica_mesh)
  optimizer.update(model, grads)
  # nu = ||P Q^T||_op per matrix and the rest; an empty dict for Muon and AdamW.
  diagnostics = orth_dion_jax.diagnostics_summary(optimizer.opt_state)
  return nnx.state((model, optimizer)), loss, diagnostics


@functools.partial(jax.jit, static_argnums=0)
def average_replica_momenta(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.State:
  """The state with each per-replica momentum replaced by the replicas' mean: exact, and what a
  checkpoint should hold, so that a restart's replicas all start from the same momentum."""
  model, optimizer = nnx.merge(graphdef, state)
  averaged = orth_dion_jax.average_replica_momenta(nnx.as_pure(optimizer.opt_state))
  nnx.update(optimizer.opt_state, nnx.state(averaged))
  return nnx.state((model, optimizer))


@functools.partial(jax.jit, static_argnums=0)
def eval_loss(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array,
              targets: jax.Array) -> jax.Array:
  model, _ = nnx.merge(graphdef, state)
  return cross_entropy(model, inputs, targets)


def validation_loss(graphdef: nnx.GraphDef, state: nnx.State,
                    batches: Iterable[tuple[np.ndarray, np.ndarray]],
                    sharding: NamedSharding) -> float:
  losses = [eval_loss(graphdef, state, *jax.device_put(batch, sharding)) for batch in batches]
  return float(np.mean(jax.device_get(losses)))


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


def _progress_bar(config: TrainConfig, initial: int):
  if not config.progress:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=config.steps, initial=initial, desc=config.optimizer, unit="step")


def build(config: TrainConfig, mesh: jax.sharding.Mesh,
          tx: optax.GradientTransformation | None = None) -> tuple[Transformer, nnx.Optimizer]:
  """The model, sharded over `mesh` as `partition_specs` says, and its optimizer.

  `tx` replaces `make_optimizer(config, ...)`; if it is an `optax.inject_hyperparams` optimizer with
  a "peak_lr" hyperparameter (compare.py's), that is set to `config.peak_lr`: runs that share
  such a `tx` and differ only in learning rate or seed then share one compiled train step.
  """
  model = Transformer(config.model, rngs=nnx.Rngs(config.seed))
  weights = nnx.as_pure(nnx.state(model))
  nnx.update(model, shard(weights, partition_specs(weights), mesh))
  if tx is None:
    # One device needs no mesh; an Auto mesh keeps no shardings under jit, hence the specs.
    tx = (make_optimizer(config) if mesh.size == 1 else
          make_optimizer(config, mesh, partition_specs(nnx.state(model, nnx.Param))))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # Step counts and hyperparameters come out of init on one device (a checkpoint restored onto
  # them would pin them there): replicate them. Moments and factors are on the mesh already.
  replicated = NamedSharding(mesh, PartitionSpec())
  nnx.update(optimizer, jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
      nnx.as_pure(nnx.state(optimizer))))
  hyperparams = getattr(optimizer.opt_state, "hyperparams", {})
  if "peak_lr" in hyperparams:
    hyperparams["peak_lr"][...] = config.peak_lr
  return model, optimizer


def open_checkpoints(config: TrainConfig, model: Transformer,
                     optimizer: nnx.Optimizer) -> tuple[Checkpointer | None, int]:
  """(checkpointer or None, the step to continue from), restoring in place with --resume.

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
  restored = (checkpointer.restore_latest(model, optimizer, flags=run_flags(config))
              if config.resume else None)
  return checkpointer, restored or 0


def train(config: TrainConfig, corpus: tuple[np.ndarray, np.ndarray] | None = None,
          tx: optax.GradientTransformation | None = None) -> list[dict]:
  """Runs one training run and returns its metric records (also in out_dir/metrics.jsonl).

  `corpus` is (train, validation) bytes, loaded from `config.data` when not given; `tx` as in
  `build`. Settings that cannot run and a run directory it may not use are refused (ValueError)
  before anything is built or written.
  """
  check_config(config)
  check_run_directory(config)
  if corpus is None:
    corpus = data_lib.load_corpus(config.data, config.max_bytes)
  data_lib.check_corpus(corpus, config.seq_len)
  train_bytes, val_bytes = corpus
  mesh = make_mesh(config)
  sharding = batch_sharding(mesh)
  model, optimizer = build(config, mesh, tx)
  checkpointer, start = open_checkpoints(config, model, optimizer)
  # The batch stream is a function of (seed, position): resuming at step k resumes its position k.
  batches = data_lib.Batches(train_bytes, config.batch_size, config.seq_len, seed=config.seed,
                             position=start)
  val_batches = data_lib.validation_batches(
      val_bytes, batch_size=config.batch_size, seq_len=config.seq_len,
      max_tokens=config.eval_tokens)
  lrs = np.asarray(learning_rate_schedule(config)(np.arange(config.steps)))

  replica_mesh = mesh if config.compressed_dp else None
  graphdef, state = nnx.split((model, optimizer))
  log = MetricsLog(config.out_dir / "metrics.jsonl", resume_step=start if config.resume else None)
  val_loss = math.nan  # the latest validation loss, for the progress bar
  if start == 0:
    val_loss = validation_loss(graphdef, state, val_batches, sharding)
    log.write([{"step": 0, "val_loss": val_loss}])
  bar = _progress_bar(config, start)
  pending = []  # (step, loss, diagnostics) still on device: fetched every log_every steps
  window_start, window_tokens = time.perf_counter(), 0
  for step in range(start + 1, config.steps + 1):
    inputs, targets = jax.device_put(next(batches), sharding)
    state, loss, diagnostics = train_step(graphdef, state, inputs, targets, replica_mesh)
    pending.append((step, loss, diagnostics))
    window_tokens += inputs.size
    if step == start + 1:  # leave compilation out of the throughput
      loss.block_until_ready()
      window_start, window_tokens = time.perf_counter(), 0
    last = step == config.steps
    evaluate = step % config.eval_every == 0 or last
    checkpoint = checkpointer is not None and (step % config.checkpoint_every == 0 or last)
    # A checkpoint at step k comes after the records of steps <= k are on disk.
    if step % config.log_every == 0 or evaluate or checkpoint:
      fetched = jax.device_get(pending)
      tokens_per_s = window_tokens / (time.perf_counter() - window_start)
      records = [{"step": s, "loss": float(l), "lr": float(lrs[s - 1]),
                  "tokens_per_s": tokens_per_s, **{k: float(v) for k, v in d.items()}}
                 for s, l, d in fetched]
      if evaluate:
        val_loss = validation_loss(graphdef, state, val_batches, sharding)
        records.append({"step": step, "val_loss": val_loss})
      log.write(records)
      if bar is not None:
        bar.update(len(pending))
        bar.set_postfix(loss=f"{records[len(fetched) - 1]['loss']:.3f}",
                        val=f"{val_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
      pending, window_start, window_tokens = [], time.perf_counter(), 0
    if checkpoint:
      if config.compressed_dp:
        state = average_replica_momenta(graphdef, state)
      nnx.update((model, optimizer), state)
      checkpointer.save(step, model, optimizer, data_position=batches.position,
                        flags=run_flags(config))
  if bar is not None:
    bar.close()
  if checkpointer is not None:
    checkpointer.close()
  nnx.update((model, optimizer), state)
  return log.records


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


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
  """An argparse type: an integer of at least `minimum` (and at most `maximum`, if given)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
      bounds = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
      raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
    return value
  return parse


def _number(low: float, high: float = math.inf, *, low_included: bool) -> Callable[[str], float]:
  """An argparse type: a finite number between low and high (high included when finite)."""
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    above_low = value >= low if low_included else value > low
    if not (math.isfinite(value) and above_low and value <= high):
      interval = f"{'[' if low_included else '('}{low:g}, {high:g}{']' if high < math.inf else ')'}"
      raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
    return value
  return parse


class _ArgumentParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line, exit status 2: the usage summary argparse prints
  first runs to a dozen lines for these flags and buries the message (--help has it)."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"{self.prog}: error: {message}\n")


def argument_parser() -> argparse.ArgumentParser:
  """The command line's flags, each checked as it is parsed: a value out of range is an error
  naming the flag, not a failure later in the run."""
  defaults = TrainConfig()
  positive, non_negative = _integer(1), _integer(0)
  parser = _ArgumentParser(prog="python -m examples.train", description=__doc__.split("\n\n")[0])
  add = parser.add_argument
  add("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
  add("--lr", type=_number(0, low_included=False), default=None,
      help=f"peak learning rate (default per optimizer: {DEFAULT_LEARNING_RATES})")
  add("--rank-fraction", type=_number(0, 1, low_included=False), default=defaults.rank_fraction,
      help="Dion / Orth-Dion rank as a fraction of min(fan_in, fan_out), in (0, 1]")
  add("--orthogonalize", choices=("cholesky_qr", "householder", "randomized_cholesky_qr"),
      default=None, help="Dion / Orth-Dion QR method (default: the library's)")
  add("--schedule", choices=SCHEDULES, default=defaults.schedule)
  add("--warmup-steps", type=non_negative, default=None, help="default: 5%% of --steps")
  add("--weight-decay", type=_number(0, low_included=True), default=defaults.weight_decay,
      help="decoupled weight decay of the hidden matrices")
  add("--d-model", type=positive, default=defaults.model.d_model)
  add("--n-layers", type=positive, default=defaults.model.n_layers)
  add("--n-heads", type=positive, default=defaults.model.n_heads,
      help="must divide --d-model into an even head dimension")
  add("--mlp-hidden", type=positive, default=None, help="default: 3 * d_model")
  add("--steps", type=positive, default=defaults.steps)
  add("--batch-size", type=positive, default=defaults.batch_size)
  add("--seq-len", type=positive, default=defaults.seq_len)
  # jax.random.key takes a 32-bit seed.
  add("--seed", type=_integer(0, 2**32 - 1), default=defaults.seed)
  add("--data", default=None,
      help="a text file or a directory of them (default: the Python standard library's sources); "
           "in a directory, symlinked directories are not followed, symlinked files are read "
           "only if they lead to a regular file inside it, and FIFOs, sockets, devices and "
           "symlink loops are skipped")
  add("--max-bytes", type=positive, default=defaults.max_bytes,
      help="corpus size cap: no more than this is read from the files")
  add("--eval-every", type=positive, default=defaults.eval_every)
  add("--eval-tokens", type=positive, default=defaults.eval_tokens)
  add("--log-every", type=positive, default=defaults.log_every)
  add("--mesh-data", type=positive, default=1)
  add("--mesh-fsdp", type=positive, default=1)
  add("--mesh-tensor", type=positive, default=1)
  add("--compressed-dp", action="store_true",
      help="Orth-Dion / Dion: keep gradients and momenta per data-parallel replica and average "
           "only the low-rank factors")
  add("--out", default=None, help="run directory (default: runs/<optimizer>)")
  add("--checkpoint-every", type=non_negative, default=defaults.checkpoint_every,
      help="0: never")
  continuation = parser.add_mutually_exclusive_group()
  continuation.add_argument(
      "--resume", action="store_true",
      help="continue from the newest intact checkpoint in --out (an error if there is none, if "
           "it is past --steps, or if it was written with another --optimizer, --seed, "
           "--rank-fraction, --orthogonalize, --compressed-dp or model shape)")
  continuation.add_argument(
      "--overwrite", action="store_true",
      help="start afresh although --out holds an earlier run's checkpoints, deleting them; "
           "refused if its checkpoints/ holds anything else")
  add("--no-progress", dest="progress", action="store_false")
  return parser


def parse_args(argv: Sequence[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> TrainConfig:
  """The TrainConfig of the command line `argv`; any problem with its flags, alone or together,
  exits through `parser.error` (default: argument_parser()'s)."""
  parser = parser or argument_parser()
  args = vars(parser.parse_args(argv))
  d_model = args.pop("d_model")
  try:
    model = ModelConfig(d_model=d_model, n_layers=args.pop("n_layers"),
                        n_heads=args.pop("n_heads"),
                        mlp_hidden=args.pop("mlp_hidden") or 3 * d_model)
  except ValueError as error:
    parser.error(f"--d-model / --n-heads: {error}")
  config = TrainConfig(model=model, **args)
  try:
    check_config(config)
  except ValueError as error:
    parser.error(str(error))
  return config


def main(argv: Sequence[str] | None = None) -> None:
  parser = argument_parser()
  config = parse_args(argv, parser)
  devices = config.mesh_data * config.mesh_fsdp * config.mesh_tensor
  if devices > 1 and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Simulated CPU devices; jax reads XLA_FLAGS when the backend starts (first use), not at import.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}")
  # What can be wrong with the run directory or the data is found here, before any training, and
  # reported like a bad flag.
  try:
    check_run_directory(config)
    corpus = data_lib.load_corpus(config.data, config.max_bytes)
    data_lib.check_corpus(corpus, config.seq_len)
  except (ValueError, OSError) as error:
    parser.error(str(error))
  entropy = data_lib.unigram_entropy(corpus[0])
  print(f"corpus: {corpus[0].size:,} training and {corpus[1].size:,} validation bytes; unigram "
        f"entropy {entropy:.3f} nats/byte (the loss of a model that ignores context)")
  try:
    records = train(config, corpus)
  except (CheckpointMismatchError, NoIntactCheckpointError) as error:
    parser.error(str(error))
  final = [r for r in records if "val_loss" in r][-1]
  plot_losses({config.optimizer: records}, config.out_dir / "loss.png",
              title=f"{config.optimizer}, byte-level LM", unigram_entropy=entropy)
  print(f"validation loss after {final['step']} steps: {final['val_loss']:.3f} nats/byte "
        f"({final['val_loss'] / math.log(2):.2f} bits/byte); unigram entropy: {entropy:.3f} "
        "nats/byte")
  print(f"metrics: {config.out_dir / 'metrics.jsonl'}, plot: {config.out_dir / 'loss.png'}")


if __name__ == "__main__":
  main()
