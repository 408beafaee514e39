"""Checkpointing of the example: a run killed with SIGKILL and resumed reproduces the uninterrupted
run's losses exactly, with fixed ranks and with adaptive ones (whose checkpoints hold right factors
of other shapes than a freshly built optimizer's); a checkpoint restores onto another mesh; a
mismatched one is refused."""

import dataclasses
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from examples import adaptive_rank
from examples import train as train_lib
from examples.checkpointing import CheckpointMismatchError, Checkpointer
from examples.config import TrainConfig
from examples.model import ModelConfig

TINY_MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden=96)
REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60
CHECKPOINT_EVERY = 8
RUN_FLAGS = ["--optimizer", "orth_dion", "--rank-fraction", "0.5", "--steps", str(STEPS),
             "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32",
             "--batch-size", "8", "--max-bytes", "300000", "--eval-every", "20",
             "--eval-tokens", "2048", "--log-every", "1", "--no-progress",
             "--checkpoint-every", str(CHECKPOINT_EVERY)]
# Rank 16 of the 32 x 32 (and 32 x 96) matrices at the start, decisions every 10 steps, and a grid
# of ranks fine enough that they change within the run.
ADAPTIVE = ["--adaptive-rank", "--rank-interval", "10", "--min-rank", "2", "--rank-multiple", "2"]


def _start(out: pathlib.Path, *extra: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "examples.train", *RUN_FLAGS, "--out", str(out),
                           *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _records(out: pathlib.Path) -> list[dict]:
  path = out / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _committed_steps(out: pathlib.Path) -> list[int]:
  # orbax writes into a temporary directory and renames it to the bare step number when done.
  directory = out / "checkpoints"
  if not directory.exists():
    return []
  return [int(p.name) for p in directory.iterdir() if p.name.isdigit()]


def _finish(process: subprocess.Popen) -> None:
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output.decode()


def _without_timing(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def _saved_data(out: pathlib.Path, step: int) -> dict:
  """The JSON "data" item of the checkpoint at `step`: data position, ranks, rank history."""
  return json.loads((out / "checkpoints" / str(step) / "data" / "metadata").read_text())


def _ranks_changed(out: pathlib.Path, step: int, initial: int = 16) -> bool:
  return any(rank != initial for rank in _saved_data(out, step).get("ranks", {}).values())


@pytest.mark.parametrize("flags", [[], ADAPTIVE], ids=["fixed_rank", "adaptive_rank"])
def test_killed_and_resumed_run_reproduces_uninterrupted_losses(tmp_path, flags):
  uninterrupted = _start(tmp_path / "uninterrupted", *flags)
  victim = _start(tmp_path / "killed", *flags)
  # Kill once a checkpoint is committed (with adaptive ranks, one whose ranks have changed: its
  # right factors no longer have the shapes a fresh optimizer has) and training has moved past it.
  deadline = time.monotonic() + 600
  while not (any(not flags or _ranks_changed(tmp_path / "killed", step)
                 for step in _committed_steps(tmp_path / "killed")) and
             any(r.get("step", 0) > CHECKPOINT_EVERY + 2 for r in _records(tmp_path / "killed"))):
    assert victim.poll() is None, victim.communicate()[0].decode()
    assert time.monotonic() < deadline
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.communicate()
  assert victim.returncode == -signal.SIGKILL
  steps_before_kill = max(r["step"] for r in _records(tmp_path / "killed"))
  assert steps_before_kill < STEPS, "the run finished before it could be killed"

  _finish(_start(tmp_path / "killed", "--resume", *flags))
  _finish(uninterrupted)
  resumed, reference = _records(tmp_path / "killed"), _records(tmp_path / "uninterrupted")
  assert [r["step"] for r in resumed if "loss" in r] == list(range(1, STEPS + 1))
  # Exact equality, not closeness: the restored state is bit-identical and CPU XLA deterministic.
  # With adaptive ranks the records include the ranks after each change.
  assert _without_timing(resumed) == _without_timing(reference)
  # The last checkpoint holds the same ranks and the same history of rank changes: the resumed
  # run's controller took up the killed one's history.
  assert _saved_data(tmp_path / "killed", STEPS) == _saved_data(tmp_path / "uninterrupted", STEPS)
  if flags:
    assert len([r for r in reference if "ranks" in r]) > 1, "no rank changed"


def test_a_resumed_adaptive_run_keeps_the_bounds_of_its_config(tmp_path):
  """The rank bounds are the initial ranks of the config, not those the checkpoint holds: a rank
  below its initial one at the checkpoint grows back past it after the resume, as it did in the
  uninterrupted run."""
  config = dataclasses.replace(
      _tiny_config(tmp_path / "uninterrupted", optimizer="orth_dion"), rank_fraction=0.5,
      adaptive_rank=True, rank_interval=4, min_rank=2, rank_multiple=2, steps=24,
      checkpoint_every=12, eval_every=12, eval_tokens=256, log_every=1, seq_len=32)
  reference = train_lib.train(config)
  ranks = [(r["step"], r["ranks"]) for r in reference if "ranks" in r]
  at_12 = [changed for step, changed in ranks if step <= 12][-1]
  grown = [path for path, rank in ranks[-1][1].items() if rank > at_12[path]]
  assert grown, f"no rank grew after step 12: {ranks}"  # else this test shows nothing

  resumed_dir = shutil.copytree(tmp_path / "uninterrupted", tmp_path / "resumed")
  shutil.rmtree(resumed_dir / "checkpoints" / "24")  # resume from step 12
  resumed = train_lib.train(dataclasses.replace(config, out=str(resumed_dir), resume=True))
  assert _without_timing(resumed) == _without_timing(reference)


def test_a_checkpoint_restores_the_ranks_it_was_saved_with(tmp_path):
  config = _tiny_config(tmp_path, optimizer="orth_dion", rank_fraction=0.5, adaptive_rank=True)
  mesh = train_lib.make_mesh(config)
  model, optimizer = train_lib.build(config, mesh)
  _take_steps(model, optimizer, config, 2)
  first, second = sorted(adaptive_rank.optimizer_ranks(optimizer))[:2]
  history = [(2, {first: 4, second: 24})]  # from 16: one shrinks, one grows
  adaptive_rank.resize_optimizer(optimizer, history[0][1], seed=0)
  _take_steps(model, optimizer, config, 1)
  checkpointer = Checkpointer(tmp_path / "ckpt")
  checkpointer.save(3, model, optimizer, data_position=3, rank_history=history)
  checkpointer.close()

  fresh_model, fresh_optimizer = train_lib.build(config, mesh)
  progress = Checkpointer(tmp_path / "ckpt").restore_latest(fresh_model, fresh_optimizer)
  assert progress == (3, history)
  assert adaptive_rank.optimizer_ranks(fresh_optimizer) == adaptive_rank.optimizer_ranks(optimizer)
  for saved, restored in ((model, fresh_model), (optimizer, fresh_optimizer)):
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(saved)),
                                nnx.to_pure_dict(nnx.state(restored)))
  # An optimizer that cannot take those ranks is not resized into them: refused, by the arrays.
  fixed_model, fixed_optimizer = train_lib.build(
      dataclasses.replace(config, adaptive_rank=False), mesh)
  with pytest.raises(CheckpointMismatchError, match="right_factor"):
    Checkpointer(tmp_path / "ckpt").restore_latest(fixed_model, fixed_optimizer)


def _tiny_config(tmp_path, **overrides) -> TrainConfig:
  defaults = dict(optimizer="dion", model=TINY_MODEL, seq_len=16, batch_size=8,
                  steps=3, out=str(tmp_path), checkpoint_every=0,
                  progress=False)
  return TrainConfig(**{**defaults, **overrides})


def _take_steps(model, optimizer, config, n: int) -> None:
  rng = np.random.default_rng(0)
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(train_lib.train_step, static_argnums=0)
  for _ in range(n):
    tokens = rng.integers(0, 256, size=(config.batch_size, config.seq_len + 1), dtype=np.int32)
    state, _, _ = step(graphdef, state, tokens[:, :-1], tokens[:, 1:])
  nnx.update((model, optimizer), state)


def test_restore_onto_a_different_mesh(tmp_path):
  config = _tiny_config(tmp_path, mesh_data=2)
  model, optimizer = train_lib.build(config, train_lib.make_mesh(config))
  _take_steps(model, optimizer, config, 3)
  checkpointer = Checkpointer(tmp_path / "ckpt")
  checkpointer.save(3, model, optimizer, data_position=3)
  checkpointer.close()

  other = _tiny_config(tmp_path, mesh_data=4, mesh_fsdp=2, seed=1)
  mesh = train_lib.make_mesh(other)
  restored_model, restored_optimizer = train_lib.build(other, mesh)
  progress = Checkpointer(tmp_path / "ckpt").restore_latest(restored_model, restored_optimizer)
  assert progress.position == 3
  for saved, restored in ((model, restored_model), (optimizer, restored_optimizer)):
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(saved)),
                                nnx.to_pure_dict(nnx.state(restored)))
    for leaf in jax.tree.leaves(nnx.state(restored)):
      assert leaf.sharding.mesh.devices.size == mesh.devices.size


@pytest.mark.parametrize("change, path", [
    (dict(model=dataclasses.replace(TINY_MODEL, d_model=48)), "model/embed/embedding"),
    (dict(rank_fraction=0.125), "right_factor"),
])
def test_mismatched_checkpoint_is_refused_with_the_path(tmp_path, change, path):
  config = _tiny_config(tmp_path)
  mesh = train_lib.make_mesh(config)
  model, optimizer = train_lib.build(config, mesh)
  checkpointer = Checkpointer(tmp_path / "ckpt")
  checkpointer.save(0, model, optimizer, data_position=0)
  checkpointer.close()

  other_model, other_optimizer = train_lib.build(_tiny_config(tmp_path, **change), mesh)
  with pytest.raises(CheckpointMismatchError, match=path) as error:
    Checkpointer(tmp_path / "ckpt").restore_latest(other_model, other_optimizer)
  assert "the model expects" in str(error.value)
