"""Orbax checkpoints of a training run (model, optimizer state, data position), verified on restore.

A checkpoint holds three items: "state", the model's and the optimizer's arrays (for Orth-Dion and
Dion: momenta, low-rank right factors, AdamW moments, step counts); "data", JSON: the position of
the batch stream and, for Orth-Dion and Dion, the rank of each low-rank matrix and the rank
controller's history (--adaptive-rank); and "checksums", JSON again: the dtype, shape and sha256 of
every array of "state", a copy of "data", and the flags of the run that the state depends on. The
three are one orbax save, committed by one rename, so no checkpoint has arrays without their
checksums.

With --adaptive-rank the ranks change during a run, and with them the shapes of the right factors:
a freshly built optimizer has the initial ranks. Before reading a checkpoint's arrays, the
optimizer is resized to the ranks it recorded (examples/adaptive_rank.py), so that every array is
read into the shape it was saved with; a checkpoint's ranks that this optimizer cannot take (it is
not adaptive, or has other matrices) are left to the shape comparison below, which names the
arrays.

Restoring reads every array straight onto the sharding the freshly built model already has, so a
run can resume on a different mesh. First, each array is read on its own, before orbax reads
anything, so that a missing or cut file fails one read, cleanly. Then the recorded flags, and the
saved shapes and dtypes, are compared with the run's: a difference is an error naming each
offending flag or array, never a reshape, and never a reason to try another checkpoint (it means
other flags, not damage). A checkpoint that cannot be read, or whose arrays differ from their
checksums, is damaged: a warning names its step, its directory and what failed, and the next older
one is tried. When an older one restores, the damaged newer ones are moved to <checkpoint
directory>_corrupt/ (kept for inspection, and out of the way of the resumed run's own saves at
those steps); when none does, NoIntactCheckpointError.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from examples import adaptive_rank

# What orbax names a step's directory: the step, with a suffix while the save is in flight (a run
# killed mid-save leaves that one behind).
_TMP = "(" + re.escape(ocp.utils.TMP_DIR_SUFFIX) + ".*)?"
_STEP_DIRECTORY = re.compile(r"\d+" + _TMP)
# What orbax writes in a step's directory, as {name pattern: what it is}: None for a file, a
# directory's own such dict otherwise. tensorstore writes a file through "<name>.__lock", which a
# killed save can leave behind. The items are this module's: "state", an OCDBT database of the
# arrays (its data files are named by 32 hex digits) and their metadata; "data" and "checksums",
# one JSON file each. An item's directory is suffixed too until orbax finalizes it.
_LOCK = r"(\.__lock)?"
_OCDBT = {"d": {"[0-9a-f]{32}" + _LOCK: None}, r"manifest\.ocdbt" + _LOCK: None}
_STEP_CONTENTS = {
    r"(_CHECKPOINT_METADATA|commit_success\.txt)" + _LOCK: None,
    "state" + _TMP: {r"(_METADATA|_sharding|commit_success\.txt)" + _LOCK: None,
                     "array_metadatas": {r"process_\d+" + _LOCK: None},
                     r"ocdbt\.process_\d+": _OCDBT, **_OCDBT},
    "(data|checksums)" + _TMP: {r"(metadata|commit_success\.txt)" + _LOCK: None},
}


def _not_in(directory: pathlib.Path, contents: dict[str, Any], name: str) -> list[str]:
  """The paths ("<name>/...") of the entries of `directory` that `contents` does not describe."""
  foreign = []
  for entry in sorted(directory.iterdir()):
    kind = next((kind for pattern, kind in contents.items() if re.fullmatch(pattern, entry.name)),
                False)
    if kind is False or entry.is_symlink() or entry.is_dir() != (kind is not None):
      # A name orbax does not write here, a symlink (orbax writes none), or a file for a directory.
      foreign.append(f"{name}/{entry.name}")
    elif kind is not None:
      foreign += _not_in(entry, kind, f"{name}/{entry.name}")
  return foreign


class CheckpointMismatchError(ValueError):
  """The checkpoint's arrays do not fit the model and optimizer being restored into."""


class FlagMismatchError(CheckpointMismatchError):
  """The checkpoint was written by a run with other flags (optimizer, seed, model shape...)."""


class NoIntactCheckpointError(RuntimeError):
  """There are checkpoints, but every one of them is damaged: none can be restored."""


class Progress(NamedTuple):
  """What a checkpoint records of a run besides its arrays, to continue it exactly."""
  position: int  # of the batch stream: the batches taken so far
  rank_history: list[tuple[int, dict[str, int]]]  # RankController.history; [] without one


class _Damaged(Exception):
  """A damaged checkpoint: unreadable, or not what was saved; the message says how."""


def not_written_by_orbax(path: pathlib.Path) -> list[str]:
  """What in `path`, an entry of a checkpoint directory, orbax did not write, as paths relative to
  that directory: [] if `path` is a step directory orbax wrote.

  That is a real directory (a symlink is not one, whatever its name) named "<step>", or
  "<step>.orbax-checkpoint-tmp..." while (or since a killed run was) writing it, which holds only
  what orbax writes there (_STEP_CONTENTS), and something, unless it is an unfinished save: the
  name alone does not make a directory orbax's.
  """
  if path.is_symlink() or not path.is_dir() or not _STEP_DIRECTORY.fullmatch(path.name):
    return [path.name]
  if path.name.isdigit() and not any(path.iterdir()):  # orbax renames a save once it is written
    return [f"{path.name} (empty)"]
  return _not_in(path, _STEP_CONTENTS, path.name)


def is_step_directory(path: pathlib.Path) -> bool:
  """Whether `path` is a step directory orbax wrote (see not_written_by_orbax): what --overwrite
  may delete."""
  return not not_written_by_orbax(path)


def committed_steps(directory: pathlib.Path) -> list[int]:
  """The steps of the committed checkpoints in `directory`, newest first ([] if it is absent)."""
  if not directory.is_dir():
    return []
  return sorted((int(path.name) for path in directory.iterdir()
                 if path.name.isdigit() and is_step_directory(path)), reverse=True)


def _pure_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
  return {"model": nnx.to_pure_dict(nnx.state(model)),
          "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}


def _by_path(tree: Any) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def array_checksums(state: Any) -> dict[str, dict[str, Any]]:
  """{path: {"dtype", "shape", "sha256"}} of every array of `state`, hashed from host copies."""
  return {path: {"dtype": str(array.dtype), "shape": list(array.shape),
                 "sha256": hashlib.sha256(
                     np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()}
          for path, array in _by_path(jax.device_get(state)).items()}


def _array_description(array: Any) -> str:
  return f"shape {tuple(array.shape)} {np.dtype(array.dtype).name}"


def check_compatible(saved: Any, target: Any, where: str) -> None:
  """Raises CheckpointMismatchError listing every array whose presence, shape or dtype differs."""
  saved, target = _by_path(saved), _by_path(target)
  problems = [f"  {path}: checkpoint has {_array_description(saved[path])}, "
              f"the model expects {_array_description(target[path])}"
              for path in sorted(saved.keys() & target.keys())
              if tuple(saved[path].shape) != tuple(target[path].shape)
              or np.dtype(saved[path].dtype) != np.dtype(target[path].dtype)]
  problems += [f"  {path}: in the model but not in the checkpoint"
               for path in sorted(target.keys() - saved.keys())]
  problems += [f"  {path}: in the checkpoint but not in the model"
               for path in sorted(saved.keys() - target.keys())]
  if problems:
    raise CheckpointMismatchError(
        f"the checkpoint at {where} does not match this model and optimizer (was it written with "
        "other model-size, optimizer or rank flags?):\n" + "\n".join(problems))


def _describe(error: BaseException) -> str:
  """One line on why a checkpoint could not be read. Orbax wraps tensorstore's errors in one that
  prints the whole store spec; the innermost cause is the one that names the file and the fault."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else 'no message'}"


def _read_every_array(state_directory: pathlib.Path) -> None:
  """Reads every array orbax stored under `state_directory` (zarr arrays in one OCDBT database), one
  at a time, and drops the values.

  A deleted or cut file then fails one synchronous read, with tensorstore's message. Left to
  orbax (its restore, or its metadata, which opens every array), it fails one of many concurrent
  reads; orbax gives up with the others in flight, and those print hundreds of tracebacks ("Event
  loop is closed", "Exception ignored in") from tensorstore's threads and the garbage collector.
  """
  base = {"driver": "file", "path": f"{state_directory}/"}
  store = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
  for key in store.list().result():
    name, _, leaf = key.decode().rpartition("/")
    if leaf in (".zarray", "zarr.json"):  # an array's metadata, zarr v2 or v3
      ts.open({"driver": "zarr" if leaf == ".zarray" else "zarr3",
               "kvstore": {"driver": "ocdbt", "base": base, "path": f"{name}/"},
               # A chunk missing is damage, not an array of fill values.
               "fill_missing_data_reads": False}).result().read().result()


def _resize_to(optimizer: nnx.Optimizer, ranks: dict[str, Any]) -> None:
  """Resizes `optimizer`'s right factors to the `ranks` a checkpoint recorded, where they differ.

  Its arrays are about to be overwritten by the checkpoint's: only their shapes matter. Ranks it
  cannot take (an optimizer without adaptive_rank, another model) leave it as it is, for
  check_compatible to name the arrays that differ.
  """
  held = adaptive_rank.optimizer_ranks(optimizer)
  changed = {path: rank for path, rank in ranks.items() if held.get(path, rank) != rank}
  if changed:
    try:
      adaptive_rank.resize_optimizer(optimizer, changed, seed=0)
    except (ValueError, TypeError):
      pass


def _check_flags(recorded: dict[str, Any], flags: dict[str, Any], where: pathlib.Path) -> None:
  """Raises FlagMismatchError naming, one line each, every flag whose value differs from the one
  `recorded` in the checkpoint at `where`. Only flags both record are compared: one that only some
  optimizers have (--rank-fraction) is moot when --optimizer differs, which is its own line."""

  def shown(value: Any) -> str:
    return "the default" if value is None else str(value)  # None: the flag was not given

  differ = [f"  {flag}: {shown(recorded[flag])} in the checkpoint, {shown(flags[flag])} now"
            for flag in sorted(recorded.keys() & flags.keys()) if recorded[flag] != flags[flag]]
  if differ:
    raise FlagMismatchError(
        f"the checkpoint at {where} was written with other flags (pass its values to resume it, "
        "or choose another --out):\n" + "\n".join(differ))


class Checkpointer:
  """Saves checkpoints (keeping the latest `keep`) and restores the newest intact one."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep)),
        # Handlers named up front, so that a fresh process can read the metadata before restoring.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler()})

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, *,
           data_position: int, rank_history: list[tuple[int, dict[str, int]]] | None = None,
           flags: dict[str, Any] | None = None) -> None:
    """Starts an asynchronous save; a run killed before it finishes keeps the previous one.

    The checksums are taken now, before the save starts, from host copies of the arrays being
    saved: they describe what the run had, not what the writer may have made of it. `flags`
    ({flag: value}, JSON) are recorded with them, for restore_latest to compare. The ranks of
    the optimizer's low-rank matrices are recorded whatever the optimizer, `rank_history` (the
    rank controller's) when given.
    """
    state = _pure_state(model, optimizer)
    data: dict[str, Any] = {"position": data_position}
    if ranks := adaptive_rank.optimizer_ranks(optimizer):
      data["ranks"] = ranks
    if rank_history:
      data["rank_history"] = [[at, changed] for at, changed in rank_history]
    checksums = {"arrays": array_checksums(state), "data": data}
    if flags is not None:
      checksums["flags"] = flags
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        checksums=ocp.args.JsonSave(checksums)))

  def restore_latest(self, model: nnx.Module, optimizer: nnx.Optimizer, *,
                     flags: dict[str, Any] | None = None) -> Progress | None:
    """Loads the newest intact checkpoint into `model` and `optimizer` in place, the optimizer
    first resized to the ranks the checkpoint recorded.

    Returns its Progress, or None when there is no checkpoint. Damaged checkpoints are
    skipped with a warning each, and moved aside if an older one restores; if all are damaged,
    NoIntactCheckpointError. CheckpointMismatchError if the newest readable one was written for
    another model or optimizer; FlagMismatchError, before that, if it recorded `flags` (see save)
    that differ from the given ones. A checkpoint that recorded none is not compared.
    """
    damaged = []  # (step, what failed), newest first
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self._restore_verified(step, model, optimizer, flags)
      except _Damaged as error:
        reason = str(error)
      else:
        self._set_aside([s for s, _ in damaged], restored_step=step)
        for module, pure in ((model, restored["state"]["model"]),
                             (optimizer, restored["state"]["optimizer"])):
          state = nnx.state(module)
          nnx.replace_by_pure_dict(state, pure)
          nnx.update(module, state)
        data = restored["data"]
        return Progress(int(data["position"]),
                        [(int(at), changed) for at, changed in data.get("rank_history", [])])
      damaged.append((step, reason))
      warnings.warn(f"checkpoint step {step} at {self.directory / str(step)} is damaged, trying "
                    f"an older one: {reason}", stacklevel=2)
    if damaged:
      raise NoIntactCheckpointError(
          f"no intact checkpoint in {self.directory}: "
          + "; ".join(f"step {step}: {reason}" for step, reason in damaged))
    return None

  def _restore_verified(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
                        flags: dict[str, Any] | None) -> dict[str, Any]:
    """The items of the checkpoint at `step`, its arrays read onto the shardings of `model` and
    `optimizer` (the latter resized to the checkpoint's ranks) and compared with their checksums.
    Raises _Damaged on anything missing, unreadable or altered; FlagMismatchError if it recorded
    other `flags`, CheckpointMismatchError (from check_compatible) if it was written for another
    model.

    Missing, cut or garbled files surface as whatever orbax, tensorstore or json raise, hence the
    broad excepts: each of those errors means the checkpoint cannot be read.
    """
    where = self.directory / str(step)
    # Every array is read on its own first, before orbax is asked for anything: orbax's metadata
    # read opens every array concurrently too, and a damaged database (a cut manifest.ocdbt)
    # failing those reads leaves the others in flight, printing "Event loop is closed" tracebacks.
    try:
      _read_every_array(where / "state")
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise _Damaged(f"it cannot be read: {_describe(error)}") from error
    # The JSON item alone (no arrays), for the flags: they explain a mismatch better than shapes.
    try:
      checksums = self.manager.restore(step, args=ocp.args.Composite(
          checksums=ocp.args.JsonRestore()))["checksums"]
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise _Damaged(f"its checksums cannot be read: {_describe(error)}") from error
    # A flipped bit in the checksums' own JSON can leave it valid JSON of another shape.
    if not isinstance(checksums, dict) or not isinstance(checksums.get("arrays"), dict):
      raise _Damaged("its checksums are garbled")
    if flags is not None and isinstance(checksums.get("flags"), dict):
      _check_flags(checksums["flags"], flags, where)
    data = checksums.get("data")
    ranks = data.get("ranks", {}) if isinstance(data, dict) else {}
    if not isinstance(ranks, dict):
      raise _Damaged("its ranks are garbled")
    _resize_to(optimizer, ranks)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        _pure_state(model, optimizer))
    try:
      items = self.manager.metadata(step).item_metadata
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise _Damaged(f"its metadata cannot be read: {_describe(error)}") from error
    saved = items.get("state") if items is not None else None
    if saved is None:
      raise _Damaged("the metadata of its arrays is missing")
    check_compatible(saved, target, where=f"{where}")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise _Damaged(f"it cannot be read: {_describe(error)}") from error
    recorded, actual = checksums["arrays"], array_checksums(restored["state"])
    altered = sorted(path for path in recorded.keys() | actual.keys()
                     if recorded.get(path) != actual.get(path))
    if altered:
      raise _Damaged(f"{len(altered)} arrays differ from the checksums recorded when it was saved: "
                     + ", ".join(altered[:3]) + (", ..." if len(altered) > 3 else ""))
    if restored["data"] != checksums.get("data"):
      raise _Damaged(f"its data item {restored['data']} differs from the one recorded when it was "
                     f"saved, {checksums.get('data')}")
    return restored

  def _set_aside(self, steps: list[int], *, restored_step: int) -> None:
    """Moves the damaged checkpoints at `steps` (newer than `restored_step`) to
    <directory>_corrupt/: the resumed run saves those steps again, and orbax would refuse to write
    over them; deleting them would lose what is left of them."""
    if not steps:
      return
    aside = self.directory.with_name(self.directory.name + "_corrupt")
    aside.mkdir(exist_ok=True)
    moves = []
    for step in steps:
      destination, copies = aside / str(step), 0
      while destination.exists():  # set aside by an earlier resume too: keep both
        copies += 1
        destination = aside / f"{step}.{copies}"
      (self.directory / str(step)).rename(destination)
      moves.append(f"{step} -> {destination}")
    self.manager.reload()  # it still lists the moved steps
    warnings.warn(f"resuming from step {restored_step}, the newest intact checkpoint; moved the "
                  f"damaged newer ones aside: {', '.join(moves)}", stacklevel=3)

  def close(self) -> None:
    """Waits for pending saves."""
    self.manager.wait_until_finished()
    self.manager.close()
