"""The Flax example trains: validation loss falls below the corpus's unigram entropy, every
optimizer choice runs, the data-parallel mesh computes what one device computes, and a run
compiles its train step once."""

import collections
import contextlib
import json

import jax
import numpy as np
import pytest

from examples import compare
from examples import data as data_lib
from examples import train as train_lib
from examples.config import parse_args

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32",
        "--batch-size", "8", "--max-bytes", "300000", "--eval-tokens", "4096", "--no-progress"]


def _losses(records: list[dict], key: str) -> list[float]:
  return [r[key] for r in records if key in r]


def test_main_lowers_validation_loss_below_unigram_entropy(tmp_path, capsys):
  train_lib.main(["--optimizer", "orth_dion", "--steps", "40", "--eval-every", "20",
                  "--checkpoint-every", "0", "--out", str(tmp_path), *TINY])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  val = _losses(records, "val_loss")
  train_bytes, _ = data_lib.load_corpus(max_bytes=300_000)
  assert len(val) == 3  # steps 0, 20, 40
  assert val[0] > np.log(256) - 0.1  # a fresh model predicts bytes uniformly
  assert val[-1] < data_lib.unigram_entropy(train_bytes) - 0.3
  assert len(_losses(records, "loss")) == 40
  # Orth-Dion's update is a partial isometry at every step.
  np.testing.assert_allclose(_losses(records, "nu_max"), 1.0, atol=1e-3)
  assert (tmp_path / "loss.png").stat().st_size > 0
  assert "unigram entropy" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["dion", "muon", "adamw"])
def test_every_optimizer_lowers_the_loss(tmp_path, optimizer):
  config = parse_args(["--optimizer", optimizer, "--steps", "20", "--eval-every", "20",
                                 "--checkpoint-every", "0", "--out", str(tmp_path), *TINY])
  val = _losses(train_lib.train(config), "val_loss")
  assert val[-1] < val[0] - 1.0


def _train(out, *flags, steps=8):
  # A constant learning rate: a shorter run's steps are the first steps of a longer one.
  config = parse_args(["--steps", str(steps), "--eval-every", str(steps),
                                 "--schedule", "constant", "--warmup-steps", "1",
                                 "--checkpoint-every", "0", "--out", str(out), *flags, *TINY])
  return _losses(train_lib.train(config), "loss")


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("one_device"))


def test_sharded_mesh_matches_one_device(tmp_path, one_device_losses):
  # The batch split over data x fsdp, the weights over fsdp x tensor.
  sharded = _train(tmp_path, "--mesh-data", "2", "--mesh-fsdp", "2", "--mesh-tensor", "2")
  # Only the order of the sums differs.
  np.testing.assert_allclose(sharded, one_device_losses, rtol=2e-5)


def test_compressed_data_parallel_matches_one_device_and_resumes(tmp_path, one_device_losses):
  # Per-replica gradients and momenta over data, weights split over fsdp x tensor.
  flags = ["--mesh-data", "2", "--mesh-fsdp", "2", "--mesh-tensor", "2", "--compressed-dp",
           "--checkpoint-every", "2"]
  compressed = _train(tmp_path, *flags, steps=4)
  # The update equals the averaged gradient's: the same math, summed in another order.
  np.testing.assert_allclose(compressed, one_device_losses[:4], rtol=2e-5)
  # The checkpoint at step 2 (sharded arrays, momenta averaged over replicas) resumes exactly.
  (tmp_path / "checkpoints" / "4").rename(tmp_path / "step_4")
  resumed = _train(tmp_path, *flags, "--resume", steps=4)
  np.testing.assert_allclose(resumed, compressed, rtol=1e-5)


# (flags, the jitted functions the run calls): a sharded run, and one with compressed data
# parallelism, whose checkpoint at step 2 averages the momenta over the replicas between steps.
# There jit had returned the replicated norm scales, and their moments, split over "fsdp": the
# second step and the last validation compiled again.
MESHES = [(["--mesh-data", "2", "--mesh-fsdp", "2", "--mesh-tensor", "2"],
           ["train_step", "eval_loss"]),
          (["--mesh-data", "2", "--mesh-fsdp", "2", "--mesh-tensor", "2", "--compressed-dp",
            "--checkpoint-every", "2"], ["train_step", "eval_loss", "average_momenta_in_state"])]


@contextlib.contextmanager
def _counting_compiles():
  """Counts, by function name, the programs jit builds inside the block (what jax_log_compiles
  reports as "Compiling <name>": a cache miss)."""
  compiles = collections.Counter()

  def count(event, duration, fun_name="", **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      compiles[fun_name] += 1

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(count)


@pytest.mark.parametrize("flags, functions", MESHES, ids=["sharded", "compressed_dp"])
def test_a_run_on_a_mesh_compiles_each_step_once(tmp_path, flags, functions):
  # jit compiles anew for arguments on other shardings than it compiled for: the state a step
  # returns must come back on the shardings it went in on.
  with _counting_compiles() as compiles:
    _train(tmp_path, *flags, steps=3)  # a fresh optimizer: nothing compiled before
  assert {name: compiles[f"jit({name})"] for name in functions} == dict.fromkeys(functions, 1), (
      compiles)


def test_adaptive_rank_on_a_compressed_data_parallel_mesh_compiles_once_per_set_of_ranks(
    tmp_path, capsys):
  # A rank change gives the state new shapes: the train step compiles for them once, and the
  # jitted steps rebuilt on the resized state return it on its own shardings (no second compile
  # per set of ranks), through the checkpoints' averaging of the replicas' momenta too.
  with _counting_compiles() as compiles:
    train_lib.main([
        "--steps", "5", "--eval-every", "5", "--schedule", "constant", "--warmup-steps", "1",
        "--mesh-data", "2", "--mesh-fsdp", "2", "--mesh-tensor", "2", "--compressed-dp",
        "--checkpoint-every", "2", "--rank-fraction", "0.5", "--adaptive-rank",
        "--rank-interval", "2", "--min-rank", "2", "--rank-multiple", "2", "--out", str(tmp_path),
        *TINY])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rank_sets = {json.dumps(r["ranks"], sort_keys=True) for r in records if "ranks" in r}
  assert len(rank_sets) > 1, "no rank changed"
  assert compiles["jit(train_step)"] == len(rank_sets), compiles
  assert np.isfinite(_losses(records, "loss")).all()
  assert "ranks per matrix type (mean over layers), start -> end" in capsys.readouterr().out


def test_batches_resume_from_their_position():
  data = np.arange(1000, dtype=np.uint8)
  stream = data_lib.Batches(data, batch_size=4, seq_len=8, seed=3)
  skipped = [next(stream) for _ in range(5)]
  resumed = data_lib.Batches(data, batch_size=4, seq_len=8, seed=3, position=3)
  np.testing.assert_array_equal(next(resumed)[0], skipped[3][0])
  inputs, targets = skipped[0]
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize("true_best, found, edge, n_runs", [
    (0.04, 0.04, None, 5),    # inside the grid 0.01 ... 0.16
    (0.01, 0.01, None, 6),    # at its low end: one more point below shows it is the best
    (1.28, 0.64, "high", 7),  # beyond two extensions: reported as an edge hit
])
def test_compare_sweep_grows_its_grid_towards_the_best_rate(true_best, found, edge, n_runs):
  def fake_runner(arm, lr, seed):
    return compare.Run(lr, seed, val_loss=(np.log2(lr) - np.log2(true_best)) ** 2, records=[])

  grid, best, at_edge = compare.sweep(fake_runner, compare.Arm("adamw"), center=0.04, points=5,
                                      factor=2.0, max_extensions=2, seeds=[0, 1])
  assert (best, at_edge, len(grid)) == (pytest.approx(found), edge, n_runs)
  assert [point.lr for point in grid] == sorted(point.lr for point in grid)
  assert all([run.seed for run in point.runs] == [0, 1] for point in grid)
