"""Orbax checkpoints of a training run: model, optimizer state and data position.

A checkpoint holds two items: "state", the model's and the optimizer's arrays (for Orth-Dion and
Dion: momenta, low-rank right factors, AdamW moments, step counts), and "data", the position of
the batch stream as JSON. Restoring reads every array straight onto the sharding the freshly built
model already has, so a run can resume on a different mesh. Before reading, the saved shapes are
compared with the model's: a mismatch is an error naming each offending array, never a reshape.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointMismatchError(ValueError):
  """The checkpoint's arrays do not fit the model and optimizer being restored into."""


def _pure_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
  return {"model": nnx.to_pure_dict(nnx.state(model)),
          "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}


def _by_path(tree: Any) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(saved: Any, target: Any, where: str) -> None:
  """Raises CheckpointMismatchError listing every array whose presence or shape differs."""
  saved, target = _by_path(saved), _by_path(target)
  problems = [f"  {path}: checkpoint has shape {tuple(saved[path].shape)}, "
              f"the model expects {tuple(target[path].shape)}"
              for path in sorted(saved.keys() & target.keys())
              if tuple(saved[path].shape) != tuple(target[path].shape)]
  problems += [f"  {path}: in the model but not in the checkpoint"
               for path in sorted(target.keys() - saved.keys())]
  problems += [f"  {path}: in the checkpoint but not in the model"
               for path in sorted(saved.keys() - target.keys())]
  if problems:
    raise CheckpointMismatchError(
        f"the checkpoint at {where} does not match this model and optimizer (was it written with "
        "other model-size, optimizer or rank flags?):\n" + "\n".join(problems))


class Checkpointer:
  """Saves checkpoints (keeping the latest `keep`) and restores the latest."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep)),
        # Handlers named up front, so that a fresh process can read the metadata before restoring.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, *,
           data_position: int) -> None:
    """Starts an asynchronous save; a run killed before it finishes keeps the previous one."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_pure_state(model, optimizer)),
        data=ocp.args.JsonSave({"position": data_position})))

  def restore_latest(self, model: nnx.Module, optimizer: nnx.Optimizer) -> int | None:
    """Loads the latest checkpoint into `model` and `optimizer` in place.

    Returns the saved data position, or None when there is no checkpoint.
    """
    step = self.manager.latest_step()
    if step is None:
      return None
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        _pure_state(model, optimizer))
    check_compatible(self.manager.metadata(step).item_metadata["state"], target,
                     where=f"{self.directory / str(step)}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    for module, pure in ((model, restored["state"]["model"]),
                         (optimizer, restored["state"]["optimizer"])):
      state = nnx.state(module)
      nnx.replace_by_pure_dict(state, pure)
      nnx.update(module, state)
    return int(restored["data"]["position"])

  def close(self) -> None:
    """Waits for pending saves."""
    self.manager.wait_until_finished()
    self.manager.close()
