"""examples/compare.py is a procedure a reader trusts with a claim: its arms are the grid the issue
names (every low-rank arm at the same fixed decay, polar as Orth-Dion with the polar factor, Ada
as Orth-Dion with adaptive rank), its paired statistics and steps-to-reach agree with hand
computations, and a tiny end-to-end run writes a report whose numbers agree with each other and
with the shapes (the factor bytes of a step)."""

import json
import math

import numpy as np
import pytest

from examples import compare
from examples import compare_statistics
from examples.config import TrainConfig, check_config


def test_default_is_the_beta_form_at_rank_one_quarter_with_the_baselines():
  args = compare.parse_args([])
  arms = compare.arm_grid(args.arms, args.forms, args.ranks)
  assert [arm.name for arm in arms] == [
      "adamw", "muon", "dion beta r=1/4", "orth_dion beta r=1/4", "polar beta r=1/4"]
  assert args.seeds >= 3


def test_ada_runs_only_when_named_in_both_forms():
  assert "ada" not in compare.parse_args(["--full"]).arms
  args = compare.parse_args(["--forms", "beta", "mu", "--arms", "orth_dion", "ada"])
  assert [arm.name for arm in compare.arm_grid(args.arms, args.forms, args.ranks)] == [
      "orth_dion mu r=1/4", "ada mu r=1/4", "orth_dion beta r=1/4", "ada beta r=1/4"]


def test_full_grid_holds_every_optimizer_form_and_rank_once():
  args = compare.parse_args(["--full"])
  names = [arm.name for arm in compare.arm_grid(args.arms, args.forms, args.ranks)]
  assert len(names) == len(set(names)) == 2 + 3 * 2 * 3
  filtered = compare.parse_args(["--full", "--arms", "dion", "polar", "--ranks", "8"])
  assert [arm.name for arm in compare.arm_grid(filtered.arms, filtered.forms, filtered.ranks)] == [
      "dion mu r=1/8", "polar mu r=1/8", "dion beta r=1/8", "polar beta r=1/8"]


@pytest.mark.parametrize("arm, expected", [
    (compare.Arm("dion", "beta", 2), dict(optimizer="dion", right_factor="qr")),
    (compare.Arm("orth_dion", "mu", 4), dict(optimizer="orth_dion", right_factor="qr")),
    (compare.Arm("polar", "beta", 8), dict(optimizer="orth_dion", right_factor="polar")),
    (compare.Arm("ada", "mu", 4), dict(optimizer="orth_dion", right_factor="qr",
                                       adaptive_rank=True, rank_interval=7)),
])
def test_low_rank_arms_are_valid_runs_at_the_fixed_decay(arm, expected):
  config = TrainConfig(**arm.settings({"rank_interval": 7}))
  check_config(config)
  assert {k: getattr(config, k) for k in expected} == expected
  assert (config.error_feedback, config.decay) == (arm.form, compare.DECAY)
  assert config.rank_fraction == pytest.approx(1 / arm.rank)


@pytest.mark.parametrize("flags", [["--seeds", "1"], ["--lr", "0.1", "--lrs-from", "x.json"]])
def test_too_few_seeds_and_two_sources_of_rates_are_refused(flags):
  with pytest.raises(SystemExit):
    compare.parse_args(flags)


def test_paired_difference_matches_a_hand_computation():
  a, b = np.array([1.0, 1.2, 0.9]), np.array([1.1, 1.25, 1.05])
  result = compare_statistics.paired_difference(a, b)
  # d = (-0.10, -0.05, -0.15): mean -0.1, sample std 0.05.
  t = -0.1 / (0.05 / math.sqrt(3))
  # Student's t with 2 degrees of freedom has CDF 1/2 + t / (2 sqrt(2 + t^2)).
  p = 1 - abs(t) / math.sqrt(2 + t * t)
  assert result["mean"] == pytest.approx(-0.1)
  assert result["std"] == pytest.approx(0.05)
  assert (result["t"], result["p"]) == (pytest.approx(t), pytest.approx(p))
  assert result["per_seed"] == pytest.approx([-0.1, -0.05, -0.15])
  assert result["seed_spread"] == pytest.approx((np.std(a, ddof=1) + np.std(b, ddof=1)) / 2)


def test_identical_arms_differ_by_nothing_not_significantly():
  # An arm that ran exactly as another (Ada whose ranks never changed is Orth-Dion) has p = 1.
  same = np.array([1.0, 1.2, 0.9])
  result = compare_statistics.paired_difference(same, same.copy())
  assert (result["mean"], result["std"], result["t"], result["p"]) == (0, 0, 0, 1)


@pytest.mark.parametrize("target, expected", [
    (1.5, 15.0),   # halfway between the evaluations at 10 and 20
    (2.0, 10.0),   # an evaluation exactly at the target
    (3.5, 0.0),    # reached before the first step
    (0.5, None),   # never reached
])
def test_steps_to_reach_interpolates_the_first_crossing(target, expected):
  steps, losses = np.array([0, 10, 20, 30]), np.array([3.0, 2.0, 1.0, 1.2])
  assert compare_statistics.steps_to_reach(steps, losses, target) == expected


def _run(seed, losses):
  records = [{"step": 10 * i, "val_loss": loss} for i, loss in enumerate(losses)]
  return compare.Run(0.01, seed, losses[-1], records)


def test_steps_ratio_reads_the_paired_seed_and_the_mean_curve():
  dion = [_run(1, [4.0, 3.0, 2.0]), _run(2, [4.0, 3.2, 2.2])]
  orth = [_run(1, [4.0, 2.0, 1.8]), _run(2, [4.0, 3.0, 2.3])]
  ratio = compare_statistics.steps_ratio(orth, dion)
  # Seed 1 reaches 2.0 at step 10 of 20; seed 2 never reaches 2.2; the mean curve
  # (4, 2.5, 2.05) crosses Dion's mean final loss 2.1 at step 10 + 10 * 0.4 / 0.45.
  assert ratio["per_seed"] == [0.5, None]
  assert ratio["mean_curve"] == pytest.approx((10 + 10 * 0.4 / 0.45) / 20)


def test_tiny_comparison_writes_a_consistent_report(tmp_path, capsys):
  # Dion's rate from an earlier results file, the others swept; Ada decides its ranks every step.
  (tmp_path / "earlier.json").write_text(json.dumps({"arms": [
      {"arm": "dion beta r=1/4", "best_lr": 0.04}]}))
  report = compare.main([
      "--steps", "4", "--d-model", "16", "--n-layers", "1", "--seq-len", "16", "--batch-size",
      "4", "--max-bytes", "200000", "--eval-tokens", "64", "--eval-every", "1", "--grid-points",
      "1", "--max-extensions", "0", "--seeds", "2", "--arms", "dion", "orth_dion", "ada",
      "--rank-interval", "1", "--min-rank", "1", "--rank-multiple", "1",
      "--lrs-from", str(tmp_path / "earlier.json"), "--out", str(tmp_path)])
  assert json.loads((tmp_path / "results.json").read_text()) == report
  assert (tmp_path / "compare.png").stat().st_size > 0
  assert report["settings"]["decay"] == compare.DECAY
  dion, orth, ada = report["arms"]
  assert (dion["arm"], orth["arm"], ada["arm"]) == (
      "dion beta r=1/4", "orth_dion beta r=1/4", "ada beta r=1/4")
  assert [arm["lr_source"] for arm in (dion, orth, ada)] == ["fixed", "sweep", "sweep"]
  for arm in (dion, orth, ada):
    assert arm["seeds"] == [1, 2]
    assert arm["val_loss_mean"] == pytest.approx(np.mean(arm["val_losses"]))
    assert 0 < arm["alignment_min"] <= arm["alignment_mean"] <= 1 + 1e-5
    assert arm["update_ms"] > 0
  # Rank 4 of every matrix of the d = 16 block: q, k, v, o (16 x 16) and gate, up, down
  # (16 x 48), each (m + n) r float32s of factors a step.
  assert dion["factor_bytes"] == orth["factor_bytes"] == (4 * 32 + 3 * 64) * 4 * 4
  assert orth["ranks_by_type"] == dict.fromkeys(
      ["k_proj", "o_proj", "q_proj", "v_proj", "down", "gate", "up"], 4.0)
  # Ada starts at rank 4, which is also its bound: it can only shrink, and with it its bytes.
  assert ada["ranks_by_type"].keys() == orth["ranks_by_type"].keys()
  assert all(1 <= rank <= 4 for rank in ada["ranks_by_type"].values())
  assert ada["factor_bytes"] <= orth["factor_bytes"]
  printed = capsys.readouterr().out
  assert "no rate in" in printed and "orth_dion beta r=1/4, ada beta r=1/4: swept" in printed
  assert "| ada beta r=1/4 |" in printed and "factor bytes / step" in printed
  # Orth-Dion's update is a partial isometry, Dion's column-normalized one is not.
  assert orth["nu_max"] == pytest.approx(1.0, abs=1e-3) and dion["nu_max"] >= 1.0
  (row,) = report["comparisons"]
  pair = row["orth_dion_minus_dion"]
  assert pair["per_seed"] == pytest.approx(np.subtract(orth["val_losses"], dion["val_losses"]))
  assert row["ada_minus_orth_dion"]["per_seed"] == pytest.approx(
      np.subtract(ada["val_losses"], orth["val_losses"]))
  assert len(report["curves"]["dion beta r=1/4"]["val_loss"]) == 2
  assert len(row["orth_dion_steps_to_dion"]["per_seed"]) == 2
  assert len(row["ada_steps_to_orth_dion"]["per_seed"]) == 2
