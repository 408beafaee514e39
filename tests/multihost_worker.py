"""One process of the two-process training run in ``test_multihost``.

Run as ``python multihost_worker.py PORT PROCESS_ID OUT.npz``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` in the environment:
each of the two processes brings 4 CPU devices to one global 8-device mesh,
and gloo carries the collectives between them. Process 0 writes the final
parameters and losses of every mode to ``OUT.npz``.

``train`` is the whole training run; the test calls the same function on a
single-process 8-device mesh and compares.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import orth_dion_jax
from orth_dion_jax.data_parallel import per_replica_value_and_grad

NUM_PROCESSES = 2
STEPS = 5
BATCH, FAN_IN, HIDDEN = 16, 32, 64

# Each mode's mesh puts a different axis first. jax.make_mesh lays devices
# out in process order, so the first axis is the one that crosses processes:
# "fsdp" for the sharded step (its psums of P and R pieces), "data" for
# compressed data parallelism (the replica average of P and R).
MODES = {
    "sharded": ("fsdp", "data", "tensor"),
    "data_parallel": ("data", "fsdp", "tensor"),
    # Compressed data parallelism with adaptive rank: every host's
    # RankController must take the same decisions, or the hosts' programs
    # (their shapes) would differ.
    "adaptive": ("data", "fsdp", "tensor"),
}
ADAPTIVE_STEPS = 8

PARAM_SPECS = {
    "w1": P("fsdp", "tensor"),
    "w2": P("tensor", "fsdp"),
    "b": P(),
}


def make_mesh(mode: str) -> jax.sharding.Mesh:
  return jax.make_mesh((2, 2, 2), MODES[mode])


def _host_data() -> tuple[dict, dict]:
  """Initial parameters and the one training batch, identical on each host."""
  rng = np.random.default_rng(0)
  params = {
      "w1": rng.normal(size=(FAN_IN, HIDDEN)) / np.sqrt(FAN_IN),
      "w2": rng.normal(size=(HIDDEN, FAN_IN)) / np.sqrt(HIDDEN),
      "b": np.zeros(HIDDEN),
  }
  x = rng.normal(size=(BATCH, FAN_IN))
  batch = {"x": x, "y": np.sin(x)}
  as_f32 = lambda t: {k: v.astype(np.float32) for k, v in t.items()}
  return as_f32(params), as_f32(batch)


def _global(host: np.ndarray, mesh, spec: P) -> jax.Array:
  """A global array whose shards each process cuts from its own copy."""
  return jax.make_array_from_callback(
      host.shape, NamedSharding(mesh, spec), lambda index: host[index])


def loss_fn(params: dict, batch: dict) -> jax.Array:
  # FSDP: the weights are gathered over "fsdp" before use, the batch stays
  # split over the mesh's data axis.
  w1 = jax.sharding.reshard(params["w1"], P(None, "tensor"))
  w2 = jax.sharding.reshard(params["w2"], P("tensor", None))
  hidden = jnp.tanh(batch["x"] @ w1 + params["b"])
  # The hidden axis is split over "tensor" on both sides of this product:
  # its partial sums are reduced into the target's layout.
  prediction = jnp.matmul(hidden, w2,
                          out_sharding=jax.typeof(batch["y"]).sharding)
  return jnp.mean((prediction - batch["y"]) ** 2)


def train(mode: str, steps: int | None = None) -> dict[str, np.ndarray]:
  """Orth-Dion steps in ``mode``; final params and losses on host (and the
  adaptive mode's ranks: each host's, stacked, and how often they
  changed)."""
  steps = steps or (ADAPTIVE_STEPS if mode == "adaptive" else STEPS)
  mesh = make_mesh(mode)
  host_params, host_batch = _host_data()
  with jax.set_mesh(mesh):
    params = {k: _global(v, mesh, PARAM_SPECS[k])
              for k, v in host_params.items()}
    batch = {k: _global(v, mesh, P("data")) for k, v in host_batch.items()}
    if mode == "sharded":
      tx = orth_dion_jax.orth_dion(
          learning_rate=0.02, rank_fraction=0.25, mesh=mesh)
      grad_fn = jax.value_and_grad(loss_fn)
    else:
      tx = orth_dion_jax.orth_dion(
          learning_rate=0.02, rank_fraction=0.25, mesh=mesh, data_axis="data",
          # A fifth of the energy: below rank 8 on this problem (whose replicas
          # disagree: the estimate counts their own noise), so ranks change.
          **({"adaptive_rank": True, "rank_energy": 0.2}
             if mode == "adaptive" else {}))
      grad_fn = per_replica_value_and_grad(loss_fn, mesh, data_axis="data")
    controller = orth_dion_jax.RankController(
        interval=2, min_rank=1, multiple_of=1, hysteresis=0.5)

    @jax.jit
    def step(params, opt_state, batch):
      loss, grads = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.jit(tx.init)(params)
    losses = []
    for t in range(steps):
      params, opt_state, loss = step(params, opt_state, batch)
      losses.append(loss)
      if mode == "adaptive":
        opt_state = controller.update(t + 1, opt_state)
    params, losses = multihost_utils.process_allgather(
        (params, jnp.stack(losses)), tiled=True)
    extra = {}
    if mode == "adaptive":
      ranks = np.array(list(orth_dion_jax.current_ranks(opt_state).values()))
      extra = {"ranks": ranks, "changes": np.array(controller.changes),
               "ranks_by_process": multihost_utils.process_allgather(ranks)}
  return {**params, "loss": losses, **extra}


def mesh_processes(mode: str) -> np.ndarray:
  """The process index of each device of ``mode``'s mesh."""
  return np.vectorize(lambda d: d.process_index)(make_mesh(mode).devices)


def main(port: str, process_id: str, out_path: str) -> None:
  # gloo carries the CPU collectives between processes. It is this jax's
  # default; naming it makes a jax without it fail here, saying so.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
      process_id=int(process_id), initialization_timeout=60,
      heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
  results = {}
  for mode in MODES:
    results.update({f"{mode}/{k}": v for k, v in train(mode).items()})
    results[f"mesh_processes/{mode}"] = mesh_processes(mode)
  if jax.process_index() == 0:
    np.savez(out_path, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
