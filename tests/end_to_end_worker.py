"""Trains a small GPT-style byte-level LM for each configuration named on the command line.

    python tests/end_to_end_worker.py orth_dion-householder-beta-mesh dion-cholesky_qr-mu-dp ...

Run by ``test_end_to_end`` in a subprocess under a watchdog, as a user runs it: JAX on CPU,
``OPENBLAS_NUM_THREADS`` unset, one device for the single-device runs and
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` for the meshes. A configuration that
deadlocks hangs this process, never the test suite.

The model is a GPT-2-style decoder with 2-D weights (fused q/k/v ``c_attn`` (d, 3d), ``c_proj``
(d, d), ``c_fc`` (d, 4d), ``mlp_proj`` (4d, d) per block; ``wte``, ``wpe``, ``lm_head`` and
LayerNorms), trained on the Python standard library's sources (``examples.data``). Its optimizer
routing is the library's default (``orth_dion_jax.default_param_labels``): the four block matrices
get the low-rank step, the embeddings, head and norms AdamW. Four blocks of d = 128 give factor
groups of four shapes, all of rank 32, whose batched LAPACK calls are large enough for XLA:CPU to
split them over its thread pool: on this model the optimizers deadlocked (single device and mesh),
where the example's model (``examples.model``, at d = 64 and at d = 128) ran through.

A training configuration is named ``OPTIMIZER-METHOD-FORM-PLACEMENT``:

* OPTIMIZER: ``orth_dion`` (right factor "qr"), ``polar`` (``orth_dion`` with
  ``right_factor="polar"``), ``dion`` (right factor "column") or ``ada`` (Ada-Orth-Dion:
  ``orth_dion`` with ``adaptive_rank=True``, its ``RankController`` deciding every
  ``ADA_INTERVAL`` steps from rank ``ADA_RANK_FRACTION``; after a change the jitted step is built
  again, its ``out_shardings`` from the resized state);
* METHOD: the ``orthogonalize`` method, ``cholesky_qr``, ``householder`` or
  ``randomized_cholesky_qr``;
* FORM: ``error_feedback="mu"`` (mu = ``MU``) or ``"beta"``, the paper's form
  ``E = beta (B - P P^T B)`` (beta = ``BETA``);
* PLACEMENT: ``single`` (one device), ``mesh`` (a 1 x 2 x 2 data x fsdp x tensor mesh with the
  weights sharded over fsdp x tensor, as ``examples.model.partition_specs`` shards the example's;
  the optimizer gets ``mesh=`` and ``param_specs=``) or ``dp`` (a 2 x 2 x 1 mesh with compressed
  data parallelism over "data", ``data_axis="data"``, gradients per replica from
  ``orth_dion_jax.per_replica_value_and_grad``).

Each runs ``STEPS`` jitted train steps. The name ``householder_four_layers`` instead runs
``orth_dion(..., orthogonalize="householder")`` on four layers of (128, 384), (128, 128),
(128, 512) and (512, 128) weights (a dict of 16 kernels) with random gradients for
``HOUSEHOLDER_STEPS`` jitted updates. The name ``stacked_layers_inferred_mesh`` trains a scanned
stack of MLP layers, sharded over a 2 x 2 Explicit mesh, with ``orth_dion(lr, layer_axes=1)`` and
no ``mesh=``, for ``STACKED_STEPS`` steps.

Stdout carries one JSON object a line, flushed as it happens:
``{"event": "start", "config": name}`` before a configuration is built;
``{"event": "step", "config": name, "step": k, "loss": ..., "elapsed_s": ...}`` after the first
step and every ``LOG_EVERY`` steps; ``{"event": "done", "config": name, "first_loss": ...,
"last_loss": ..., "finite": ..., ...}`` at its end (first and last loss: the means over the first
and the last ``WINDOW`` steps; finite: every loss and every parameter is finite); or
``{"event": "error", "config": name, "error": ...}`` if it raised. An ``ada`` configuration's
"done" also carries ``rank_changes`` (the controller's changes) and the ``initial_ranks`` and
``final_ranks`` per matrix type (mean over layers). Configurations run one after the
other; an error in one does not stop the next.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
import traceback

# `examples` lives at the repository root; PYTHONPATH, when set, still comes first.
sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=wrong-import-position

import orth_dion_jax  # pylint: disable=wrong-import-position
from examples import adaptive_rank  # pylint: disable=wrong-import-position
from examples import data as data_lib  # pylint: disable=wrong-import-position
from examples import model as model_lib  # pylint: disable=wrong-import-position
from examples.train import replicate_unplaced_state  # pylint: disable=wrong-import-position

VOCAB_SIZE = 256  # bytes
STEPS = 40
WINDOW = 5  # first_loss / last_loss: means over this many steps
LOG_EVERY = 10
BATCH_SIZE = 8  # divides the data x fsdp devices of every mesh below
MAX_BYTES = 300_000
LEARNING_RATE = 0.02
ADAM_LEARNING_RATE = 0.01
WARMUP_STEPS = 4  # then constant
WEIGHT_DECAY = 0.01
RANK_FRACTION = 0.25  # r = 32 for every block matrix of d = 128
MU = 0.95
BETA = 0.9  # beta-form residual decay, as in the README's recipe
SEED = 0

# Adaptive rank: from rank 64 (of 128) the controller's library defaults (multiples of 8, at least
# 8) have room to move within 40 steps.
ADA_RANK_FRACTION = 0.5
ADA_INTERVAL = 10

RIGHT_FACTORS = {"orth_dion": "qr", "polar": "polar", "dion": "column", "ada": "qr"}
METHODS = orth_dion_jax.ORTHOGONALIZE_METHODS
FORMS = ("mu", "beta")
MESH_AXES = ("data", "fsdp", "tensor")
# (data, fsdp, tensor) mesh shape of each placement.
PLACEMENTS = {"single": (1, 1, 1), "mesh": (1, 2, 2), "dp": (2, 2, 1)}

HOUSEHOLDER = "householder_four_layers"
HOUSEHOLDER_LAYERS = 4
HOUSEHOLDER_SHAPES = ((128, 384), (128, 128), (128, 512), (512, 128))  # each layer's
HOUSEHOLDER_STEPS = 10
# Layers stacked on a leading axis (scan), sharded over an Explicit mesh the optimizer is not told.
STACKED = "stacked_layers_inferred_mesh"
STACKED_LAYERS, STACKED_WIDTH, STACKED_STEPS = 3, 32, 40


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  seq_len: int = 64


MODEL = GPTConfig()


class Block(nnx.Module):
  """Pre-norm block: causal self-attention with fused q/k/v, then a GELU MLP of width 4d."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.n_heads = config.n_heads
    self.ln_1 = nnx.LayerNorm(d, rngs=rngs)
    self.c_attn = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.c_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(d, rngs=rngs)
    self.c_fc = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
    self.mlp_proj = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, seq, d = x.shape
    heads = lambda t: t.reshape(batch, seq, self.n_heads, d // self.n_heads)
    q, k, v = map(heads, jnp.split(self.c_attn(self.ln_1(x)), 3, axis=-1))
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.c_proj(attended.reshape(batch, seq, d))
    return x + self.mlp_proj(jax.nn.gelu(self.c_fc(self.ln_2(x))))


class GPT(nnx.Module):
  """Byte-level decoder: int tokens (batch, seq) -> next-byte logits (batch, seq, 256)."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.wte = nnx.Embed(VOCAB_SIZE, config.d_model, rngs=rngs)
    self.wpe = nnx.Embed(config.seq_len, config.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
    self.ln_f = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.lm_head = nnx.Linear(config.d_model, VOCAB_SIZE, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.ln_f(x))


def cross_entropy(model: GPT, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  logits = model(inputs).astype(jnp.float32)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))


# Megatron-style tensor parallelism inside FSDP: the model width over fsdp, the fused q/k/v, MLP
# hidden units and the vocabulary over tensor; norms replicated.
_PARTITIONING = {
    "c_attn": ("fsdp", "tensor"),
    "c_proj": ("tensor", "fsdp"),
    "c_fc": ("fsdp", "tensor"),
    "mlp_proj": ("tensor", "fsdp"),
    "wte": (None, "fsdp"),
    "wpe": (None, "fsdp"),
    "lm_head": ("fsdp", "tensor"),
}


def partition_specs(state):
  """A PartitionSpec for every leaf of the model's state, keyed by the owning module's name."""
  return model_lib.specs_by_module(state, _PARTITIONING)


def emit(event: str, config: str, **fields) -> None:
  print(json.dumps({"event": event, "config": config, **fields}), flush=True)


def parse(name: str) -> tuple[str, str, str, str]:
  """(optimizer, method, form, placement) of a configuration name; ValueError if it is none."""
  parts = name.split("-")
  if (len(parts) != 4 or parts[0] not in RIGHT_FACTORS or parts[1] not in METHODS
      or parts[2] not in FORMS or parts[3] not in PLACEMENTS):
    raise ValueError(f"unknown configuration {name!r}: expected OPTIMIZER-METHOD-FORM-PLACEMENT "
                     f"from {sorted(RIGHT_FACTORS)}, {METHODS}, {FORMS}, {sorted(PLACEMENTS)}")
  return parts[0], parts[1], parts[2], parts[3]


def learning_rate(peak: float) -> optax.Schedule:
  return lambda count: peak * jnp.minimum(1.0, (count + 1) / WARMUP_STEPS)


def make_optimizer(optimizer: str, method: str, form: str, mesh, param_specs,
                   data_axis: str | None) -> optax.GradientTransformation:
  """What a user builds: `orth_dion` or `dion` with the configuration's settings."""
  lr, adam_lr = learning_rate(LEARNING_RATE), learning_rate(ADAM_LEARNING_RATE)
  right_factor = RIGHT_FACTORS[optimizer]
  chosen = {"mu": MU} if form == "mu" else {"beta": BETA}
  if right_factor == "column":
    factory = orth_dion_jax.dion
  else:
    factory = functools.partial(orth_dion_jax.orth_dion, right_factor=right_factor)
  if optimizer == "ada":
    factory = functools.partial(factory, adaptive_rank=True)
  rank_fraction = ADA_RANK_FRACTION if optimizer == "ada" else RANK_FRACTION
  return factory(lr, rank_fraction=rank_fraction, error_feedback=form, **chosen,
                 weight_decay=WEIGHT_DECAY, orthogonalize=method, seed=SEED,
                 adam_learning_rate=adam_lr, mesh=mesh, param_specs=param_specs,
                 data_axis=data_axis)


def build(optimizer: str, method: str, form: str, mesh: jax.sharding.Mesh,
          data_parallel: bool) -> tuple[GPT, nnx.Optimizer]:
  """The model, its weights sharded over `mesh`, and its optimizer (told the specs on a mesh)."""
  model = GPT(MODEL, rngs=nnx.Rngs(SEED))
  weights = nnx.as_pure(nnx.state(model))
  nnx.update(model, jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)),
                                 weights, partition_specs(weights)))
  on_mesh = mesh.size > 1
  specs = partition_specs(nnx.state(model, nnx.Param)) if on_mesh else None
  tx = make_optimizer(optimizer, method, form, mesh if on_mesh else None, specs,
                      "data" if data_parallel else None)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  replicate_unplaced_state(opt, mesh)
  return model, opt


def train_step(graphdef, state, inputs, targets, replica_mesh=None):
  """One step; with `replica_mesh`, on per-replica gradients (compressed data parallelism)."""
  model, opt = nnx.merge(graphdef, state)
  if replica_mesh is None:
    loss, grads = nnx.value_and_grad(cross_entropy)(model, inputs, targets)
  else:
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
      return cross_entropy(nnx.merge(model_def, params, rest), *batch)

    grad_fn = orth_dion_jax.per_replica_value_and_grad(loss_fn, replica_mesh, "data")
    loss, grads = grad_fn(params, (inputs, targets))
  opt.update(model, grads)
  return nnx.state((model, opt)), loss


def all_finite(tree) -> bool:
  return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def train(name: str, corpus: np.ndarray) -> dict:
  optimizer, method, form, placement = parse(name)
  shape = PLACEMENTS[placement]
  devices = jax.devices()
  if math.prod(shape) > len(devices):
    raise ValueError(f"{name} needs {math.prod(shape)} devices, found {len(devices)}: set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(shape)}")
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices[:math.prod(shape)])
  data_parallel = placement == "dp"
  model, opt = build(optimizer, method, form, mesh, data_parallel)
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  replica_mesh = mesh if data_parallel else None
  batches = data_lib.Batches(corpus, BATCH_SIZE, MODEL.seq_len, seed=SEED)
  graphdef, state = nnx.split((model, opt))

  def jitted(state):
    # The state comes back sharded as it went in: left to the compiler, some leaves (norm scales,
    # right factors) would come back with other specs and cost a second compilation at step 2.
    return jax.jit(functools.partial(train_step, graphdef, replica_mesh=replica_mesh),
                   out_shardings=(jax.tree.map(lambda x: x.sharding, state),
                                  NamedSharding(mesh, PartitionSpec())))

  step_fn = jitted(state)
  controller, initial_ranks = None, adaptive_rank.optimizer_ranks(opt)
  if optimizer == "ada":
    controller = orth_dion_jax.RankController(interval=ADA_INTERVAL, seed=SEED)
  start = time.perf_counter()
  compile_s = math.nan
  losses = []
  for step in range(1, STEPS + 1):
    inputs, targets = jax.device_put(next(batches), sharding)
    state, loss = step_fn(state, inputs, targets)
    losses.append(loss)
    if controller is not None and step < STEPS:
      state, changed = adaptive_rank.follow(controller, step, graphdef, state)
      if changed:  # new shapes: a step jitted for the resized state's shardings
        step_fn = jitted(state)
        emit("ranks", name, step=step, changed=len(changed))
    if step == 1 or step % LOG_EVERY == 0:
      value = float(loss)  # waits for the step
      elapsed = time.perf_counter() - start
      if step == 1:
        compile_s = elapsed
      emit("step", name, step=step, loss=value, elapsed_s=round(elapsed, 2))
  losses = np.asarray(jax.device_get(losses), dtype=np.float64)
  nnx.update((model, opt), state)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  ranks = {}
  if controller is not None:
    ranks = {"rank_changes": controller.changes,
             "initial_ranks": adaptive_rank.by_matrix_type(initial_ranks),
             "final_ranks": adaptive_rank.by_matrix_type(adaptive_rank.optimizer_ranks(opt))}
  return {"first_loss": float(losses[:WINDOW].mean()), "last_loss": float(losses[-WINDOW:].mean()),
          "finite": bool(np.isfinite(losses).all()) and all_finite(params), "steps": len(losses),
          "compile_s": round(compile_s, 2),
          "train_s": round(time.perf_counter() - start - compile_s, 2), **ranks}


def householder_four_layers(name: str) -> dict:
  """orth_dion(orthogonalize="householder") on four layers of four matrices, random gradients."""
  shapes = {f"layer{layer}_w{i}": shape for layer in range(HOUSEHOLDER_LAYERS)
            for i, shape in enumerate(HOUSEHOLDER_SHAPES)}
  keys = jax.random.split(jax.random.key(SEED), len(shapes))
  params = {name: jax.random.normal(key, shape) / math.sqrt(shape[0])
            for key, (name, shape) in zip(keys, shapes.items())}
  tx = orth_dion_jax.orth_dion(0.01, orthogonalize="householder")
  state = tx.init(params)

  @jax.jit
  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = time.perf_counter()
  compile_s = math.nan
  initial = params
  rng = np.random.default_rng(SEED)
  for step in range(1, HOUSEHOLDER_STEPS + 1):
    grads = {k: rng.standard_normal(p.shape, dtype=np.float32) for k, p in params.items()}
    params, state = update(params, state, grads)
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - start
    if step == 1:
      compile_s = elapsed
    emit("step", name, step=step, elapsed_s=round(elapsed, 2))
  moved = all(bool(np.any(np.asarray(params[k]) != np.asarray(initial[k]))) for k in params)
  return {"first_loss": None, "last_loss": None, "finite": all_finite(params), "moved": moved,
          "steps": HOUSEHOLDER_STEPS, "compile_s": round(compile_s, 2),
          "train_s": round(time.perf_counter() - start - compile_s, 2)}


def stacked_layers_inferred_mesh(name: str) -> dict:
  """orth_dion(layer_axes=1) without mesh=: a scanned MLP stack on a 2 x 2 Explicit mesh."""
  mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), devices=jax.devices()[:4])
  layers, d = STACKED_LAYERS, STACKED_WIDTH
  keys = jax.random.split(jax.random.key(SEED), 4)
  params = {"up": jax.random.normal(keys[0], (layers, d, 2 * d)) / math.sqrt(d),
            "down": jax.random.normal(keys[1], (layers, 2 * d, d)) / math.sqrt(2 * d),
            "norm": {"scale": jnp.ones((layers, d))}}
  specs = {"up": PartitionSpec(None, "fsdp", "tensor"), "down": PartitionSpec(None, None, "fsdp"),
           "norm": {"scale": PartitionSpec()}}
  inputs = jax.random.normal(keys[2], (64, d))
  targets = jnp.tanh(inputs @ jax.random.normal(keys[3], (d, d)))

  def loss_fn(params):
    def layer(h, w):
      out = jax.nn.gelu((h * w["norm"]["scale"]) @ w["up"]) @ w["down"]
      return h + jax.sharding.reshard(out, PartitionSpec()), None
    h, _ = jax.lax.scan(layer, inputs, params)
    return jnp.mean((h - targets) ** 2)

  tx = orth_dion_jax.orth_dion(0.02, layer_axes=1)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    state = tx.init(params)
    start = time.perf_counter()
    compile_s = math.nan
    losses = []
    for i in range(1, STACKED_STEPS + 1):
      params, state, loss = step(params, state)
      losses.append(float(loss))  # waits for the step
      elapsed = time.perf_counter() - start
      if i == 1:
        compile_s = elapsed
      emit("step", name, step=i, loss=losses[-1], elapsed_s=round(elapsed, 2))
  # The sharded step ran: each layer's right factor is split like the kernel's fan-in.
  factor = optax.tree.get(state, "right_factor")["up"]
  assert factor.shape == (layers, d, d // 4) and factor.sharding.spec[1] == "fsdp", factor.sharding
  losses = np.asarray(losses)
  return {"first_loss": float(losses[:WINDOW].mean()), "last_loss": float(losses[-WINDOW:].mean()),
          "finite": bool(np.isfinite(losses).all()) and all_finite(params), "steps": len(losses),
          "compile_s": round(compile_s, 2),
          "train_s": round(time.perf_counter() - start - compile_s, 2)}


def main(names: list[str]) -> None:
  corpus = None
  for name in names:
    emit("start", name)
    start = time.perf_counter()
    try:
      if name == HOUSEHOLDER:
        result = householder_four_layers(name)
      elif name == STACKED:
        result = stacked_layers_inferred_mesh(name)
      else:
        if corpus is None:
          corpus, _ = data_lib.load_corpus(max_bytes=MAX_BYTES)
        result = train(name, corpus)
    except Exception:  # pylint: disable=broad-except
      emit("error", name, error=traceback.format_exc(limit=8))
      continue
    emit("done", name, seconds=round(time.perf_counter() - start, 2), **result)


if __name__ == "__main__":
  main(sys.argv[1:])
