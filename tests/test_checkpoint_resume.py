"""Checkpointing of the example: a run killed with SIGKILL and resumed reproduces the uninterrupted
run's losses exactly; a checkpoint restores onto another mesh; a mismatched one is refused."""

import dataclasses
import json
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from flax import nnx

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


def test_killed_and_resumed_run_reproduces_uninterrupted_losses(tmp_path):
  uninterrupted = _start(tmp_path / "uninterrupted")
  victim = _start(tmp_path / "killed")
  # Kill once a checkpoint is committed and training has moved past it.
  deadline = time.monotonic() + 600
  while not (_committed_steps(tmp_path / "killed") and
             any(r.get("step", 0) > CHECKPOINT_EVERY + 2 for r in _records(tmp_path / "killed"))):
    assert victim.poll() is None, victim.communicate()[0].decode()
    assert time.monotonic() < deadline
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.communicate()
  assert victim.returncode == -signal.SIGKILL
  steps_before_kill = max(r["step"] for r in _records(tmp_path / "killed"))
  assert steps_before_kill < STEPS, "the run finished before it could be killed"

  _finish(_start(tmp_path / "killed", "--resume"))
  _finish(uninterrupted)
  resumed, reference = _records(tmp_path / "killed"), _records(tmp_path / "uninterrupted")
  assert [r["step"] for r in resumed if "loss" in r] == list(range(1, STEPS + 1))
  # Exact equality, not closeness: the restored state is bit-identical and CPU XLA deterministic.
  assert _without_timing(resumed) == _without_timing(reference)


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
  assert Checkpointer(tmp_path / "ckpt").restore_latest(restored_model, restored_optimizer) == 3
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
