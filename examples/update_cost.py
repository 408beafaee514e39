"""What one optimizer update of the example's model costs at given ranks: the wall time of the
jitted update, and the bytes compressed data parallelism moves per step.

The rank sets both. A fixed-rank arm runs at the ranks its --rank-fraction gives; an adaptive one
(--adaptive-rank) ends at the ranks its controller chose, so its cost is measured there: the
state is built at the initial ranks and resized to the final ones (`orth_dion_jax.resize_ranks`)
before the update is compiled and timed.

Time: `tx.update` plus `optax.apply_updates`, jitted, on one device, on gradients of the
parameters' shapes (their values do not change the work), the median of `repeats` calls after
one that compiles. It is the optimizer's step alone, not the model's forward and backward passes,
which the rank does not change.

Bytes: with compressed data parallelism (examples/train.py --compressed-dp) the replicas average
only the low-rank factors of each matrix, P (fan_out x r) and R (fan_in x r), in float32: (m + n)
r 4 bytes per matrix and step, summed over every low-rank matrix as
`orth_dion_jax.routing_summary` lists them (stacks of matrices counted once each). This is the
payload of the all-reduces, computed from the shapes, not read from a compiled program's
collectives (`orth_dion_jax.communication` does that, on a mesh of several devices); what a ring
all-reduce sends over the wire is 2 (g - 1) / g times it for g replicas.
"""

from __future__ import annotations

import statistics
import time
from typing import Mapping, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

import orth_dion_jax
from examples import train as train_lib
from examples.config import TrainConfig
from examples.model import Transformer

FLOAT32_BYTES = 4


class UpdateCost(NamedTuple):
  step_s: float  # median wall time of one jitted optimizer update
  factor_bytes: int  # compressed data-parallel payload of one step: sum of (m + n) r 4
  ranks: dict[str, int]  # {path: rank} it was measured at


def factor_bytes(summary: orth_dion_jax.RoutingSummary) -> int:
  """The float32 bytes of the factors P and R of every low-rank matrix in `summary`."""
  return sum(route.matrices * (route.fan_in + route.fan_out) * route.rank * FLOAT32_BYTES
             for route in summary if route.route == "low_rank")


def measure(config: TrainConfig, tx: optax.GradientTransformation,
            ranks: Mapping[str, int] | None = None, *, repeats: int = 30) -> UpdateCost:
  """The cost of one update of `tx` (Dion or Orth-Dion, built for `config`) on `config`'s model,
  at `ranks` ({path: rank}; default: the ranks `tx` starts with)."""
  params = nnx.as_pure(nnx.state(Transformer(config.model, rngs=nnx.Rngs(0)), nnx.Param))
  state = tx.init(params)
  held = orth_dion_jax.current_ranks(state)
  changed = {path: rank for path, rank in (ranks or {}).items() if held[path] != rank}
  if changed:
    state = orth_dion_jax.resize_ranks(state, changed)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(p.dtype), params)

  @jax.jit
  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jax.block_until_ready(update(params, state, grads))  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(update(params, state, grads))
    times.append(time.perf_counter() - start)
  summary = orth_dion_jax.routing_summary(params, state, **train_lib.low_rank_settings(config))
  return UpdateCost(statistics.median(times), factor_bytes(summary),
                    orth_dion_jax.current_ranks(state))

