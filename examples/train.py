"""Train a byte-level transformer language model with Orth-Dion (or Dion, Muon, AdamW).

    python -m examples.train                # Orth-Dion on the standard library's sources
    python -m examples.train --optimizer dion --rank-fraction 0.125
    python -m examples.train --data my_texts/ --steps 2000 --d-model 256 --n-layers 6
    python -m examples.train --resume       # continue from the latest checkpoint in --out
    python -m examples.train --overwrite    # start afresh, replacing the checkpoints in --out
    python -m examples.train --mesh-data 2 --mesh-fsdp 2 --mesh-tensor 2 --compressed-dp
    python -m examples.train --adaptive-rank --rank-interval 50   # Ada-Orth-Dion

Every flag is a field of config.TrainConfig. A run writes metrics.jsonl, loss.png and checkpoints
to --out (default runs/<optimizer>), and never over an earlier run's checkpoints unless told to
--resume or --overwrite them (run_directory.py). The hidden weight matrices (attention and MLP
projections) get the chosen spectral optimizer; the embedding, the output head and the norm scales
get AdamW, as in the Dion reference.

On a mesh, the batch is split over the "data" and "fsdp" axes and the weights over "fsdp" and
"tensor" (model.partition_specs); Orth-Dion and Dion then run their sharded step. With
--compressed-dp, gradients stay per "data" replica and only the low-rank factors are averaged.
With --adaptive-rank, the rank of each matrix may change between steps, every --rank-interval
steps (examples/adaptive_rank.py): metrics.jsonl records the ranks after each change, and the run
ends by printing them per matrix type.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import orth_dion_jax
from examples import adaptive_rank
from examples import data as data_lib
from examples.checkpointing import CheckpointMismatchError, NoIntactCheckpointError
from examples.config import (OPTIMIZERS, TrainConfig, argument_parser, check_config, parse_args,
                             run_flags)
from examples.model import (Transformer, cross_entropy, dimension_numbers, hidden_matrix_mask,
                            partition_specs)
from examples.run_directory import (MetricsLog, check_run_directory, open_checkpoints,
                                    plot_losses)

MESH_AXES = ("data", "fsdp", "tensor")


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
    return factory(lr, **low_rank_settings(config), mesh=mesh, param_specs=param_specs,
                   data_axis="data" if config.compressed_dp else None)
  if config.optimizer == "muon":
    return optax.contrib.muon(
        lr, weight_decay=wd, adam_b1=0.95, adam_b2=0.98,
        muon_weight_dimension_numbers=lambda p: dimension_numbers(
            p, optax.contrib.MuonDimensionNumbers))
  if config.optimizer == "adamw":
    return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=wd, mask=hidden_matrix_mask)
  raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")


def low_rank_settings(config: TrainConfig) -> dict[str, Any]:
  """The settings `config` gives orth_dion / dion, but the learning rate and the placement
  (`orth_dion_jax.routing_summary` takes them too, to list the matrices and their ranks)."""
  chosen = {"orthogonalize": config.orthogonalize,
            ("beta" if config.error_feedback == "beta" else "mu"): config.decay}
  if config.optimizer == "orth_dion":
    chosen["right_factor"] = config.right_factor
  return dict(
      rank_fraction=config.rank_fraction, weight_decay=config.weight_decay, seed=config.seed,
      error_feedback=config.error_feedback, adaptive_rank=config.adaptive_rank,
      **{name: value for name, value in chosen.items() if value is not None},
      weight_dimension_numbers=lambda p: dimension_numbers(p, orth_dion_jax.DionDimensionNumbers))


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


def replica_loss_and_grads(model: Transformer, inputs: jax.Array, targets: jax.Array,
                           mesh: jax.sharding.Mesh) -> tuple[jax.Array, nnx.State]:
  """The batch's mean loss and, for each replica of the "data" axis, the gradient of the loss on
  its share of the batch: leaves (replicas, *param.shape), for compressed data parallelism."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, batch):
    return cross_entropy(nnx.merge(graphdef, params, rest), *batch)

  grad_fn = orth_dion_jax.per_replica_value_and_grad(loss, mesh, "data")
  return grad_fn(params, (inputs, targets))


# The step functions take the model and optimizer as nnx.split's (graphdef, state) and run under
# jax.jit: nnx.merge then runs once per compilation instead of a graph traversal on every call,
# which matters for models this small. train() jits train_step and average_momenta_in_state with
# out_shardings, the shardings of the state they are given (jitted_steps).
def train_step(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, targets: jax.Array,
               replica_mesh: jax.sharding.Mesh | None = None
               ) -> tuple[nnx.State, jax.Array, dict[str, jax.Array]]:
  """One optimizer step of (model, optimizer) = nnx.merge(graphdef, state); with `replica_mesh`,
  on per-replica gradients (compressed data parallelism over its "data" axis)."""
  model, optimizer = nnx.merge(graphdef, state)
  if replica_mesh is None:
    loss, grads = nnx.value_and_grad(cross_entropy)(model, inputs, targets)
  else:
    loss, grads = replica_loss_and_grads(model, inputs, targets, replica_mesh)
  optimizer.update(model, grads)
  # nu = ||P Q^T||_op per matrix and the rest; an empty dict for Muon and AdamW.
  diagnostics = orth_dion_jax.diagnostics_summary(optimizer.opt_state)
  return nnx.state((model, optimizer)), loss, diagnostics


def average_momenta_in_state(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.State:
  """The state with each per-replica momentum replaced by the replicas' mean: exact, and what a
  checkpoint should hold, so that a restart's replicas all start from the same momentum."""
  model, optimizer = nnx.merge(graphdef, state)
  averaged = orth_dion_jax.average_replica_momenta(nnx.as_pure(optimizer.opt_state))
  nnx.update(optimizer.opt_state, nnx.state(averaged))
  return nnx.state((model, optimizer))


def jitted_steps(state: nnx.State) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """train_step and average_momenta_in_state, jitted to return the state on the shardings
  `state` has.

  Left to choose, jit returns some leaves on other shardings, in name (P("fsdp") for the right
  factors' P("fsdp", None)) or in fact (with --compressed-dp, the replicated norm scales split
  over "fsdp"): the next call, given other shardings than the first, would compile again, and so
  would eval_loss. The shardings are those of the state the next steps take: after a rank change,
  whose right factors have new shapes, they are taken again.
  """
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return (jax.jit(train_step, static_argnums=(0, 4), out_shardings=(shardings, None, None)),
          jax.jit(average_momenta_in_state, static_argnums=0, out_shardings=shardings))


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


def _progress_bar(config: TrainConfig, initial: int):
  if not config.progress:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=config.steps, initial=initial, desc=config.optimizer, unit="step")


def build(config: TrainConfig, mesh: jax.sharding.Mesh,
          tx: optax.GradientTransformation | None = None) -> tuple[Transformer, nnx.Optimizer]:
  """The model, sharded over `mesh` as `partition_specs` says, and its optimizer.

  `tx` replaces `make_optimizer(config, ...)`: runs that share one `tx` and a model shape share
  one compiled train step.
  """
  model = Transformer(config.model, rngs=nnx.Rngs(config.seed))
  weights = nnx.as_pure(nnx.state(model))
  nnx.update(model, shard(weights, partition_specs(weights), mesh))
  if tx is None:
    # One device needs no mesh; an Auto mesh keeps no shardings under jit, hence the specs.
    tx = (make_optimizer(config) if mesh.size == 1 else
          make_optimizer(config, mesh, partition_specs(nnx.state(model, nnx.Param))))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  replicate_unplaced_state(optimizer, mesh)
  return model, optimizer


def replicate_unplaced_state(optimizer: nnx.Optimizer, mesh: jax.sharding.Mesh) -> None:
  """Replicates over `mesh` the optimizer state that init left on one device.

  Step counts and hyperparameters come out of init on one device (a checkpoint restored onto
  them would pin them there); moments and factors are on the mesh already.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  nnx.update(optimizer, jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
      nnx.as_pure(nnx.state(optimizer))))


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
  # Before a restore resizes the optimizer: the bounds are the ranks this config starts with.
  controller = adaptive_rank.start_controller(config, optimizer)
  checkpointer, start = open_checkpoints(config, model, optimizer, controller)
  ranks = adaptive_rank.optimizer_ranks(optimizer)
  # The batch stream is a function of (seed, position): resuming at step k resumes its position k.
  batches = data_lib.Batches(train_bytes, config.batch_size, config.seq_len, seed=config.seed,
                             position=start)
  val_batches = data_lib.validation_batches(
      val_bytes, batch_size=config.batch_size, seq_len=config.seq_len,
      max_tokens=config.eval_tokens)
  lrs = np.asarray(learning_rate_schedule(config)(np.arange(config.steps)))

  replica_mesh = mesh if config.compressed_dp else None
  graphdef, state = nnx.split((model, optimizer))
  take_step, average_momenta = jitted_steps(state)
  log = MetricsLog(config.out_dir / "metrics.jsonl", resume_step=start if config.resume else None)
  val_loss = math.nan  # the latest validation loss, for the progress bar
  if start == 0:
    val_loss = validation_loss(graphdef, state, val_batches, sharding)
    log.write([{"step": 0, "val_loss": val_loss}]
              + ([adaptive_rank.rank_record(0, ranks)] if controller else []))
  bar = _progress_bar(config, start)
  pending = []  # (step, loss, diagnostics) still on device: fetched every log_every steps
  window_start, window_tokens = time.perf_counter(), 0
  compiles_at = start + 1  # a step that compiles the train step: left out of the throughput
  for step in range(start + 1, config.steps + 1):
    inputs, targets = jax.device_put(next(batches), sharding)
    state, loss, diagnostics = take_step(graphdef, state, inputs, targets, replica_mesh)
    pending.append((step, loss, diagnostics))
    window_tokens += inputs.size
    if step == compiles_at:
      loss.block_until_ready()
      window_start, window_tokens = time.perf_counter(), 0
    last = step == config.steps
    changed = {}
    # Decided before this step's checkpoint, which then holds the state the next step takes (a
    # resumed run does not decide again at the step it resumes from); none after the last step.
    if controller is not None and not last:
      state, changed = adaptive_rank.follow(controller, step, graphdef, state)
      if changed:
        ranks = {**ranks, **changed}
        take_step, average_momenta = jitted_steps(state)
        compiles_at = step + 1
    evaluate = step % config.eval_every == 0 or last
    checkpoint = checkpointer is not None and (step % config.checkpoint_every == 0 or last)
    # A checkpoint at step k comes after the records of steps <= k are on disk.
    if step % config.log_every == 0 or evaluate or checkpoint or changed:
      fetched = jax.device_get(pending)
      tokens_per_s = window_tokens / (time.perf_counter() - window_start)
      records = [{"step": s, "loss": float(l), "lr": float(lrs[s - 1]),
                  "tokens_per_s": tokens_per_s, **{k: float(v) for k, v in d.items()}}
                 for s, l, d in fetched]
      if evaluate:
        val_loss = validation_loss(graphdef, state, val_batches, sharding)
        records.append({"step": step, "val_loss": val_loss})
      if changed:
        records.append(adaptive_rank.rank_record(step, ranks))
      log.write(records)
      if bar is not None:
        bar.update(len(pending))
        bar.set_postfix(loss=f"{records[len(fetched) - 1]['loss']:.3f}",
                        val=f"{val_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
      pending, window_start, window_tokens = [], time.perf_counter(), 0
    if checkpoint:
      if config.compressed_dp:
        state = average_momenta(graphdef, state)
      nnx.update((model, optimizer), state)
      checkpointer.save(step, model, optimizer, data_position=batches.position,
                        rank_history=controller.history if controller else None,
                        flags=run_flags(config))
  if bar is not None:
    bar.close()
  if checkpointer is not None:
    checkpointer.close()
  nnx.update((model, optimizer), state)
  return log.records


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
  rank_records = [r["ranks"] for r in records if "ranks" in r]
  if rank_records:
    print(f"ranks per matrix type (mean over layers), start -> end, after "
          f"{len(rank_records) - 1} changes: "
          f"{adaptive_rank.describe(rank_records[-1], rank_records[0])}")
  print(f"metrics: {config.out_dir / 'metrics.jsonl'}, plot: {config.out_dir / 'loss.png'}")


if __name__ == "__main__":
  main()
