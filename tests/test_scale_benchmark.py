"""benchmarks/scale.py compares layouts that hold the same matrices and does
the same work on both, and its report has every candidate; benchmarks/
accelerator.py plans what the issue asks of an accelerator within 8 minutes,
bounds each part by a timeout, and writes its summary. Times are checked for
being measured (positive), never for their values."""

import json
import math

import chex
import jax
import jax.numpy as jnp
import pytest

from benchmarks import accelerator
from benchmarks import memory
from benchmarks import scale
from benchmarks import workload

RECORD_KEYS = {
    "optimizer", "layout", "layers", "d", "rank_fraction", "dtype", "leaves",
    "matrices", "matrix_counts", "trace_s", "compile_s", "step_s", "steps_s",
    "spread", "temp_bytes", "x_muon_compile", "x_scanned_step"}


@pytest.mark.parametrize("layers", [1, 3, 48])
def test_layouts_hold_the_same_matrices_in_6_l_or_6_leaves(layers):
  unscanned = scale.model_shapes(256, layers, "unscanned")
  scanned = scale.model_shapes(256, layers, "scanned")
  assert len(unscanned) == 6 * layers and len(scanned) == 6
  counts = scale.matrix_counts(unscanned, "unscanned")
  assert counts == scale.matrix_counts(scanned, "scanned") == {
      "1024 x 256": layers, "256 x 1024": layers, "256 x 256": 4 * layers}


def _layer(tree, index, layers):
  """Layer ``index`` of a tree in either layout, keyed by matrix kind."""
  if len(tree) == 6 * layers:
    prefix = f"layer_{index:02d}_"
    return {k.removeprefix(prefix): v for k, v in tree.items()
            if k.startswith(prefix)}
  return {k: v[index] for k, v in tree.items()}


def _state_bytes(name, layout, layers):
  params = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in
            scale.model_shapes(8, layers, layout).items()}
  tx = scale.optimizer(name, layout, rank_fraction=0.5,
                       momentum_dtype=jnp.float32)
  return memory.tree_nbytes(jax.eval_shape(tx.init, params))


@pytest.mark.parametrize("name", scale.OPTIMIZERS)
def test_both_layouts_keep_the_same_state(name):
  layers = 3
  unscanned = _state_bytes(name, "unscanned", layers)
  scanned = _state_bytes(name, "scanned", layers)
  # Stacked leaves handed to Adam would keep a second moment (8 * 8 * 4 B
  # and more per matrix); per-leaf scalars come 6 L times unscanned.
  assert abs(unscanned - scanned) <= 6 * layers * 16


def test_scanned_muon_orthogonalizes_each_layer_as_unscanned_muon_does():
  layers = 2
  params, grads = workload.weight_set(scale.model_shapes(8, layers,
                                                         "unscanned"))
  stack = lambda tree: {k: jnp.stack([_layer(tree, i, layers)[k]
                                      for i in range(layers)])
                        for k in scale.layer_shapes(8)}
  updates = {}
  for layout, p, g in (("unscanned", params, grads),
                       ("scanned", stack(params), stack(grads))):
    tx = scale.optimizer("muon", layout, rank_fraction=0.5,
                         momentum_dtype=jnp.float32)
    updates[layout], _ = jax.jit(tx.update)(g, tx.init(p), p)
  chex.assert_trees_all_close(stack(updates["unscanned"]), updates["scanned"],
                              rtol=1e-5, atol=1e-7)


def test_quick_run_reports_every_candidate_with_measured_times(tmp_path,
                                                               capsys):
  path = tmp_path / "scale.json"
  scale.main(["--quick", "--json", str(path)])
  printed = capsys.readouterr().out
  report = json.loads(path.read_text())
  assert report["device"] == workload.device_description()
  records = report["records"]
  assert all(set(record) == RECORD_KEYS for record in records)
  assert sorted((r["layout"], r["optimizer"]) for r in records) == sorted(
      (layout, name) for layout in scale.LAYER_AXES
      for name in scale.OPTIMIZERS)
  for record in records:
    assert 0 < record["trace_s"] < record["compile_s"]
    assert record["step_s"] > 0 and all(t > 0 for t in record["steps_s"])
    # XLA reports the temporaries of every compiled update here (CPU);
    # AdamW's elementwise update may need none.
    assert isinstance(record["temp_bytes"], int) and record["temp_bytes"] >= 0
    assert record["matrices"] == 6 * record["layers"]
    assert sum(record["matrix_counts"].values()) == record["matrices"]
    assert record["leaves"] == (6 * record["layers"] if record["layout"]
                                == "unscanned" else 6)
  by_key = {(r["layout"], r["optimizer"]): r for r in records}
  for name in scale.OPTIMIZERS:
    unscanned, scanned = by_key["unscanned", name], by_key["scanned", name]
    assert unscanned["matrix_counts"] == scanned["matrix_counts"]
    assert scanned["x_scanned_step"] == 1.0
    assert math.isclose(unscanned["x_scanned_step"],
                        unscanned["step_s"] / scanned["step_s"])
    assert math.isclose(unscanned["x_muon_compile"], unscanned["compile_s"]
                        / by_key["unscanned", "muon"]["compile_s"])
  for name in scale.OPTIMIZERS:
    assert f"{name} compile s" in printed and f"{name} step ms" in printed
  assert "orth_dion: compile / Muon's = " in printed
  assert "step / scanned = " in printed


def test_accelerator_plan_fits_8_minutes_and_covers_the_issue():
  parts = {part.name: part for part in accelerator.plan(quick=False)}
  steps = [f"step_time_{d}_{dtype}" for d in (2048, 4096)
           for dtype in ("float32", "bfloat16")]
  assert list(parts) == ["device", *steps, "memory", "scale", "tests"]
  assert math.isclose(sum(part.share for part in parts.values()), 1.0)
  assert accelerator.BUDGET_S <= 8 * 60 - 20
  for d in (2048, 4096):
    for dtype in ("float32", "bfloat16"):
      args = " ".join(parts[f"step_time_{d}_{dtype}"].args)
      assert f"--dims {d} " in args and "--rank-fractions 1/4 1/16" in args
      assert f"--dtype {dtype} " in args
      assert "--optimizers orth_dion dion muon adamw" in args
  assert "--layers 48" in " ".join(parts["scale"].args)
  for test_file in accelerator.FAST_TESTS:
    assert test_file in parts["tests"].args
    assert (accelerator.REPO / test_file).exists()


def test_a_part_that_runs_over_its_timeout_is_killed_and_recorded(tmp_path):
  sleeper = accelerator.Part("sleeper", ("-c", "import time; print('up', "
                                               "flush=True); time.sleep(60)"),
                             1.0, writes_json=False)
  result = accelerator.run_part(sleeper, tmp_path, timeout_s=2.0)
  assert result["status"] == "timeout" and result["returncode"] != 0
  assert 2.0 <= result["wall_s"] < 20
  assert (tmp_path / "sleeper.txt").read_text() == "up\n"


def test_accelerator_run_writes_device_and_summary(tmp_path, capsys):
  accelerator.main(["--quick", "--out", str(tmp_path), "--parts", "device"])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["jax"] == jax.__version__
  assert [part["part"] for part in summary["parts"]] == ["device"]
  assert summary["parts"][0]["status"] == "ok"
  assert summary["parts"][0]["command"][-1] == str(tmp_path / "device.json")
  device = json.loads((tmp_path / "device.json").read_text())
  assert device["backend"] == jax.default_backend()
  assert device["jax"] == jax.__version__
  printed = capsys.readouterr().out
  assert device["description"] in printed
  assert printed.strip() == (tmp_path / "summary.txt").read_text().strip()
