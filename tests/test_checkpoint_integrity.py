"""Damaged checkpoints of the example: found by their checksums or because they cannot be read,
reported by step and directory (one warning, no tracebacks), and passed over for the newest intact
one, which resumes exactly; when none is intact, a clear error. A checkpoint written for other
flags is still refused, not passed over, with a line for each flag that differs."""

import math
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest

from examples import train as train_lib
from examples.checkpointing import (CheckpointMismatchError, NoIntactCheckpointError,
                                    committed_steps)
from examples.config import TrainConfig, parse_args, run_flags
from examples.run_directory import open_checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
# Checkpoints at steps 2 and 4.
RUN = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch-size",
       "8", "--max-bytes", "300000", "--eval-tokens", "64", "--no-progress", "--steps", "4",
       "--eval-every", "4", "--checkpoint-every", "2"]
DAMAGE = ["flipped bytes", "truncated file", "deleted file", "unreadable metadata", "cut manifest"]


def _config(out: pathlib.Path, *flags: str) -> TrainConfig:
  return parse_args([*RUN, "--out", str(out), *flags])


@pytest.fixture(scope="module")
def tx():
  """One optimizer for every run here: jit keys the compiled train step on it, so the runs share
  one compilation instead of taking some ten seconds each."""
  return train_lib.make_optimizer(_config(pathlib.Path("unused")))


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, tx) -> tuple[pathlib.Path, dict[int, float]]:
  """The run directory of a finished run, and its loss at each step."""
  out = tmp_path_factory.mktemp("earlier") / "run"
  records = train_lib.train(_config(out), tx=tx)
  assert committed_steps(out / "checkpoints") == [4, 2]
  return out, {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture
def run(earlier_run, tmp_path) -> tuple[pathlib.Path, dict[int, float]]:
  """A copy of the earlier run, to damage."""
  out, losses = earlier_run
  return pathlib.Path(shutil.copytree(out, tmp_path / "run")), losses


def _damage(step_directory: pathlib.Path, how: str) -> None:
  # The arrays' bytes live in the OCDBT data files; _METADATA describes the arrays.
  files = sorted((step_directory / "state" / "ocdbt.process_0" / "d").iterdir())
  assert files
  largest = max(files, key=lambda path: path.stat().st_size)
  if how == "flipped bytes":
    # Uncompressed chunks: without the checksums these restore silently, with other values.
    for path in files:
      data = bytearray(path.read_bytes())
      middle = len(data) // 2
      data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
      path.write_bytes(bytes(data))
  elif how == "truncated file":
    os.truncate(largest, largest.stat().st_size // 2)
  elif how == "deleted file":
    largest.unlink()
  elif how == "unreadable metadata":
    (step_directory / "state" / "_METADATA").write_text("{not json")
  elif how == "cut manifest":  # the OCDBT database's root: no array can be found without it
    os.truncate(step_directory / "state" / "manifest.ocdbt", 10)
  else:
    raise ValueError(how)


def _open(config: TrainConfig, tx=None) -> int:
  """Opens the run's checkpoints as train() does; the step it continues from."""
  model, optimizer = train_lib.build(config, train_lib.make_mesh(config), tx)
  checkpointer, start = open_checkpoints(config, model, optimizer)
  checkpointer.close()
  return start


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_resumes(run, tx, how):
  out, losses = run
  _damage(out / "checkpoints" / "4", how)
  config = _config(out, "--resume")
  with pytest.warns(UserWarning) as caught:
    assert _open(config, tx) == 2
  messages = [str(warning.message) for warning in caught]
  assert any(f"checkpoint step 4 at {out / 'checkpoints' / '4'} is damaged" in message
             for message in messages), messages
  assert any("resuming from step 2" in message for message in messages), messages
  # Kept for inspection, out of the way of the resumed run's own step 4.
  assert (out / "checkpoints_corrupt" / "4" / "state").is_dir()
  assert committed_steps(out / "checkpoints") == [2]

  records = train_lib.train(config, tx=tx)
  resumed = {r["step"]: r["loss"] for r in records if "loss" in r}
  assert sorted(resumed) == [1, 2, 3, 4]
  assert all(math.isfinite(loss) for loss in resumed.values())
  # Steps 3 and 4 again, from step 2's state restored bit for bit.
  assert resumed == losses
  assert committed_steps(out / "checkpoints") == [4, 2]


def test_when_every_checkpoint_is_damaged_the_error_names_each(run):
  out, _ = run
  for step in (2, 4):
    _damage(out / "checkpoints" / str(step), "flipped bytes")
  with pytest.warns(UserWarning, match="is damaged"):
    with pytest.raises(NoIntactCheckpointError) as error:
      _open(_config(out, "--resume"))
  assert f"no intact checkpoint in {out / 'checkpoints'}: step 4: " in str(error.value)
  assert "; step 2: " in str(error.value)
  # Nothing was moved: whatever is left of them stays where the user can look.
  assert committed_steps(out / "checkpoints") == [4, 2]
  assert not (out / "checkpoints_corrupt").exists()


def _resume_command(out: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "examples.train", *RUN, "--resume", "--out",
                         str(out), *flags], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=300, check=False)


# Three times: the tracebacks came from a race between orbax's reads, in most runs, not all.
@pytest.mark.parametrize("attempt", range(3))
def test_a_cut_manifest_is_one_warning_not_tracebacks(run, attempt):
  del attempt
  out, _ = run
  _damage(out / "checkpoints" / "4", "cut manifest")
  result = _resume_command(out)
  assert result.returncode == 0, result.stderr
  # Found by the one-array-at-a-time read, before orbax's metadata read could trip on it and
  # leave its other reads in flight.
  assert "Traceback" not in result.stderr, result.stderr
  assert "Event loop is closed" not in result.stderr, result.stderr
  assert f"checkpoint step 4 at {out / 'checkpoints' / '4'} is damaged" in result.stderr
  assert "manifest.ocdbt" in result.stderr
  assert "resuming from step 2" in result.stderr
  assert committed_steps(out / "checkpoints") == [4, 2]


def test_the_command_reports_no_intact_checkpoint_in_one_line(run):
  out, _ = run
  for step in (2, 4):
    _damage(out / "checkpoints" / str(step), "deleted file")
  result = _resume_command(out)
  # Not even third-party ones: the damage is found one read at a time, whereas orbax's concurrent
  # restore, tripping on it, would leave reads in flight that print hundreds of tracebacks.
  assert "Traceback" not in result.stderr, result.stderr
  assert result.returncode == 2, result.stderr
  last = result.stderr.strip().splitlines()[-1]  # after a warning for each damaged step
  assert last.startswith(f"python -m examples.train: error: no intact checkpoint in "
                         f"{out / 'checkpoints'}: step 4: "), result.stderr


def test_a_checkpoint_for_other_flags_is_refused_not_passed_over(run):
  out, _ = run
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with pytest.raises(CheckpointMismatchError, match="--rank-fraction: 0.25 in the checkpoint"):
      _open(_config(out, "--resume", "--rank-fraction", "0.5"))
  assert not [w for w in caught if "damaged" in str(w.message)]
  assert committed_steps(out / "checkpoints") == [4, 2]
  assert not (out / "checkpoints_corrupt").exists()


# (flags, the lines naming what differs): Dion's state has the shapes of Orth-Dion's, and --seed
# changes no shape, so only the flags the checkpoint records tell these apart.
OTHER_FLAGS = [
    (["--optimizer", "dion"], ["--optimizer: orth_dion in the checkpoint, dion now"]),
    (["--seed", "7", "--rank-fraction", "0.5"], ["--rank-fraction: 0.25 in the checkpoint, 0.5 now",
                                                 "--seed: 0 in the checkpoint, 7 now"]),
    (["--orthogonalize", "householder"],
     ["--orthogonalize: the default in the checkpoint, householder now"]),
    (["--optimizer", "adamw"], ["--optimizer: orth_dion in the checkpoint, adamw now"]),
    # The right factor and the error-feedback form change no shape either.
    (["--right-factor", "polar"], ["--right-factor: qr in the checkpoint, polar now"]),
    (["--error-feedback", "beta"], ["--error-feedback: mu in the checkpoint, beta now"]),
]


@pytest.mark.parametrize("flags, lines", OTHER_FLAGS, ids=[" ".join(f) for f, _ in OTHER_FLAGS])
def test_the_command_refuses_a_checkpoint_for_other_flags(run, capsys, flags, lines):
  out, _ = run
  before = sorted(path.name for path in (out / "checkpoints").iterdir())
  with pytest.raises(SystemExit) as exit_:
    train_lib.main([*RUN, "--resume", *flags, "--out", str(out)])
  assert exit_.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert error[0] == (f"python -m examples.train: error: the checkpoint at "
                      f"{out / 'checkpoints' / '4'} was written with other flags (pass its values "
                      "to resume it, or choose another --out):")
  # One line for each flag that differs, and no other: the flags of Orth-Dion alone
  # (--rank-fraction) are not listed when --optimizer differs.
  assert [line.strip() for line in error[1:]] == lines
  assert sorted(path.name for path in (out / "checkpoints").iterdir()) == before
  assert not (out / "checkpoints_corrupt").exists()


def test_compressed_data_parallelism_records_its_replicas():
  # Its state holds a momentum per "data" replica, shaped by --mesh-data: a resume on another
  # count, or without --compressed-dp, is refused by name rather than by a list of arrays.
  flags = run_flags(parse_args(
      [*RUN, "--out", "unused", "--compressed-dp", "--mesh-data", "2"]))
  assert flags["--compressed-dp"] is True and flags["--mesh-data"] == 2
  plain = run_flags(parse_args([*RUN, "--out", "unused", "--mesh-data", "2"]))
  assert plain["--compressed-dp"] is False and "--mesh-data" not in plain
  # AdamW has no rank, QR method or replicas to record.
  assert "--rank-fraction" not in run_flags(parse_args(
      [*RUN, "--out", "unused", "--optimizer", "adamw"]))
