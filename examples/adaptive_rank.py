"""Adaptive rank (Ada-Orth-Dion, --adaptive-rank) in the example: the rank controller of a run,
and the ranks an `nnx.Optimizer`'s state holds.

The optimizer's state carries each matrix's smoothed effective rank; `orth_dion_jax.RankController`,
called between the jitted steps, resizes the right factors every --rank-interval steps. A resize
changes the shapes of the state, which the rest of the example has to follow:

* the train loop builds its jitted steps again, their `out_shardings` from the resized state
  (train.py), and writes the new ranks to metrics.jsonl (`rank_record`);
* a checkpoint records the ranks its arrays have, and a restore first resizes the freshly built
  optimizer to them, since orbax reads an array only into the shape it is given
  (checkpointing.py);
* the controller's bounds are each matrix's initial rank (what --rank-fraction gives) and
  --min-rank. `start_controller` takes them from the freshly built state: a resumed run calls it
  before the restore resizes that state, so its bounds are those of the run it continues, not the
  ranks the checkpoint happened to hold. Its history comes back from the checkpoint
  (`RankController.resume`, run_directory.py).

The library's functions (`current_ranks`, `resize_ranks`, `RankController.update`) take a pure
pytree of the optax state: here that is `nnx.as_pure(optimizer.opt_state)`, written back with
`nnx.update`, which replaces each Variable's array whatever its shape.

Ranks are reported per matrix type (attention q/k/v/o, MLP gate/up/down): the name of the module
owning the kernel.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import nnx

import orth_dion_jax
from examples.config import TrainConfig, rank_policy

# A right factor's path, as orth_dion_jax.current_ranks names it: "...['<module>']['kernel']".
_OWNER = re.compile(r"\['(\w+)'\]\['kernel'\]$")


def optimizer_ranks(optimizer: nnx.Optimizer) -> dict[str, int]:
  """{parameter path: rank} of each low-rank matrix of `optimizer`'s state ({} for Muon, AdamW)."""
  return orth_dion_jax.current_ranks(nnx.as_pure(optimizer.opt_state))


def resize_optimizer(optimizer: nnx.Optimizer, ranks: Mapping[str, int], *, seed: int) -> None:
  """Resizes the right factors of `optimizer`'s state to `ranks` ({path: rank}), in place.

  Raises what `orth_dion_jax.resize_ranks` raises: ValueError for a state built without
  adaptive_rank, an unknown path or a rank the matrix cannot have.
  """
  resized = orth_dion_jax.resize_ranks(nnx.as_pure(optimizer.opt_state), ranks, seed=seed)
  nnx.update(optimizer.opt_state, nnx.state(resized))


def start_controller(config: TrainConfig, optimizer: nnx.Optimizer
                     ) -> orth_dion_jax.RankController | None:
  """The run's rank controller (None without --adaptive-rank), its bounds taken from the ranks
  `optimizer` holds now: call it on the freshly built optimizer, before a restore."""
  if not config.adaptive_rank:
    return None
  controller = orth_dion_jax.RankController(seed=config.seed, **rank_policy(config))
  # update() records the bounds of each matrix it has not seen, and decides nothing at step 0.
  controller.update(0, nnx.as_pure(optimizer.opt_state))
  return controller


def follow(controller: orth_dion_jax.RankController, step: int, graphdef: nnx.GraphDef,
           state: nnx.State) -> tuple[nnx.State, dict[str, int]]:
  """(state, {path: new rank}) after `controller`'s decision at `step`; `state` itself and {}
  when no rank changes. Off the decision steps it returns at once: merging the model and optimizer
  to read their state costs a traversal of the graph, which only a decision needs."""
  if step % controller.policy.interval:
    return state, {}
  model, optimizer = nnx.merge(graphdef, state)
  before = nnx.as_pure(optimizer.opt_state)
  after = controller.update(step, before)
  if after is before:
    return state, {}
  nnx.update(optimizer.opt_state, nnx.state(after))
  return nnx.state((model, optimizer)), controller.history[-1][1]


def matrix_type(path: str) -> str:
  """The module owning the kernel at `path` ("q_proj", "up", ...); the path if none is named."""
  match = _OWNER.search(path)
  return match.group(1) if match else path


def by_matrix_type(ranks: Mapping[str, float]) -> dict[str, float]:
  """The mean rank of each matrix type (over layers), in the order the types first appear."""
  groups: dict[str, list[float]] = {}
  for path, rank in ranks.items():
    groups.setdefault(matrix_type(path), []).append(rank)
  return {kind: float(np.mean(values)) for kind, values in groups.items()}


def rank_record(step: int, ranks: Mapping[str, int]) -> dict:
  """The metrics.jsonl record of the ranks the steps after `step` run at."""
  return {"step": step, "ranks": dict(ranks)}


def describe(ranks: Mapping[str, float], initial: Mapping[str, float] | None = None) -> str:
  """"q_proj 12, k_proj 16, ..." per matrix type; with `initial`, "q_proj 16 -> 12, ..."."""
  now = by_matrix_type(ranks)
  before = by_matrix_type(initial) if initial is not None else {}
  return ", ".join(f"{kind} {before[kind]:g} -> {rank:g}" if kind in before else f"{kind} {rank:g}"
                   for kind, rank in now.items())
