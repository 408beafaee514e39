"""The example's command line refuses what it cannot do, in one line and exit status 2, before any
work: invalid flag values and combinations, a run directory holding an earlier run's checkpoints
(never deleted without --overwrite, never anything else even with it, whatever its name), --resume
with nothing to resume or past --steps, a missing --data. And the corpus it reads stays inside
--data and within --max-bytes, and a symlink loop there is skipped."""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from examples import data as data_lib
from examples import train as train_lib
from examples.checkpointing import committed_steps, is_step_directory, not_written_by_orbax
from examples.config import parse_args

REPO = pathlib.Path(__file__).resolve().parents[1]
PROG = "python -m examples.train: error: "
# A tiny run, so that a value the command line failed to refuse trains for seconds, not minutes.
TINY = ["--steps", "4", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32",
        "--batch-size", "8", "--max-bytes", "300000", "--eval-tokens", "64", "--no-progress",
        "--checkpoint-every", "0"]


def _cli(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "examples.train", *flags], cwd=REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _assert_one_line(stderr: str, *mentions: str) -> str:
  """`stderr` is one error line, which names each of `mentions`."""
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(PROG), stderr
  for mention in mentions:
    assert mention in lines[0]
  return lines[0]


def _assert_refused(result: subprocess.CompletedProcess, *mentions: str) -> str:
  """The command exited with status 2 and one error line, which names each of `mentions`."""
  assert "Traceback" not in result.stderr, result.stderr
  assert result.returncode == 2, result.stderr + result.stdout
  return _assert_one_line(result.stderr, *mentions)


# (flags after TINY, what the error line must name)
INVALID = [
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--eval-every", "0"], "--eval-every"),
    (["--log-every", "0"], "--log-every"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--mesh-data", "0"], "--mesh-data"),
    (["--mesh-fsdp", "-2"], "--mesh-fsdp"),
    (["--mesh-tensor", "0"], "--mesh-tensor"),
    (["--d-model", "0"], "--d-model"),
    (["--n-heads", "0"], "--n-heads"),
    (["--n-layers", "0"], "--n-layers"),
    (["--max-bytes", "-1"], "--max-bytes"),
    (["--eval-tokens", "0"], "--eval-tokens"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--seed", "-1"], "--seed"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.01"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--rank-fraction", "0"], "--rank-fraction"),
    (["--rank-fraction", "1.5"], "--rank-fraction"),
    # Flags that are fine alone but not together.
    (["--mesh-fsdp", "3"], "--mesh-fsdp"),
    (["--d-model", "30", "--n-heads", "4"], "--n-heads"),
    (["--compressed-dp", "--optimizer", "adamw"], "--compressed-dp"),
    (["--right-factor", "polar", "--optimizer", "dion"], "--right-factor polar needs orth_dion"),
    (["--right-factor", "column"], "--right-factor"),
    (["--error-feedback", "beta", "--optimizer", "muon"], "--error-feedback needs"),
    (["--decay", "0.9", "--optimizer", "adamw"], "--decay needs"),
    (["--decay", "1"], "--decay 1 is not a mu"),
    (["--decay", "1.5"], "--decay"),
    (["--adaptive-rank", "--optimizer", "muon"], "--adaptive-rank needs orth_dion or dion"),
    # The rank controller's settings mean nothing without it.
    (["--rank-interval", "10"], "--rank-interval needs --adaptive-rank"),
    (["--min-rank", "4", "--optimizer", "dion"], "--min-rank needs --adaptive-rank"),
    (["--adaptive-rank", "--rank-multiple", "0"], "--rank-multiple"),
    (["--adaptive-rank", "--rank-interval", "-5"], "--rank-interval"),
    # Nothing to compress over one replica (and no mesh for the optimizer).
    (["--compressed-dp"], "--compressed-dp needs --mesh-data > 1"),
    (["--warmup-steps", "5"], "--warmup-steps 5 is more than --steps 4"),  # TINY has --steps 4
    (["--out", ""], "--out is empty"),  # not runs/<optimizer> in the current directory
    (["--resume", "--overwrite"], "--overwrite"),
    (["--resume"], "--checkpoint-every"),  # TINY has --checkpoint-every 0
    (["--data", "/nonexistent/corpus"], "--data /nonexistent/corpus"),
    (["--seq-len", "400", "--data", str(REPO / "examples" / "__init__.py")], "--seq-len"),
]


@pytest.mark.parametrize("flags, flag", INVALID, ids=[" ".join(f) for f, _ in INVALID])
def test_invalid_flags_are_refused_in_one_line(tmp_path, capsys, flags, flag):
  with pytest.raises(SystemExit) as exit_:
    train_lib.main([*TINY, "--out", str(tmp_path / "run"), *flags])
  assert exit_.value.code == 2
  _assert_one_line(capsys.readouterr().err, flag)
  assert not (tmp_path / "run").exists()


# Some of INVALID again, as a user runs them: each subprocess spends a second or two importing jax.
AS_COMMANDS = [(["--steps", "0"], "--steps"), (["--lr", "nan"], "--lr"),
               (["--mesh-fsdp", "3"], "--mesh-fsdp"), (["--data", "/nonexistent"], "--data"),
               (["--compressed-dp"], "--mesh-data")]


@pytest.mark.parametrize("flags, flag", AS_COMMANDS, ids=[" ".join(f) for f, _ in AS_COMMANDS])
def test_the_command_exits_with_status_2_without_a_traceback(tmp_path, flags, flag):
  _assert_refused(_cli(*TINY, "--out", str(tmp_path / "run"), *flags), flag)


def test_help_says_which_files_of_data_are_read(capsys):
  with pytest.raises(SystemExit) as exit_:
    parse_args(["--help"])
  assert exit_.value.code == 0
  assert "symlinked files are read only if they lead to a regular file inside" in (
      " ".join(capsys.readouterr().out.split()))


def _snapshot(directory: pathlib.Path) -> dict[str, str]:
  """Every file below `directory` and the sha256 of its bytes."""
  return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def tx():
  """One optimizer for the runs below: jit keys the compiled train step on it, so the runs share
  one compilation instead of taking some ten seconds each."""
  return train_lib.make_optimizer(parse_args(TINY))


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, tx) -> pathlib.Path:
  """A finished run with checkpoints at steps 2 and 4."""
  out = tmp_path_factory.mktemp("earlier") / "run"
  train_lib.train(parse_args([*TINY, "--checkpoint-every", "2", "--out", str(out)]),
                  tx=tx)
  assert committed_steps(out / "checkpoints") == [4, 2]
  return out


@pytest.fixture
def run_dir(earlier_run, tmp_path) -> pathlib.Path:
  """A copy of the earlier run, for a test to run over."""
  return pathlib.Path(shutil.copytree(earlier_run, tmp_path / "run", symlinks=True))


def test_a_fresh_run_leaves_an_earlier_runs_checkpoints_and_files_alone(run_dir):
  (run_dir / "checkpoints" / "notes.txt").write_text("mine")
  before = _snapshot(run_dir)
  line = _assert_refused(_cli(*TINY, "--checkpoint-every", "2", "--out", str(run_dir)),
                         str(run_dir / "checkpoints"), "--resume", "--overwrite")
  assert "2, 4, notes.txt" in line
  assert _snapshot(run_dir) == before


def test_a_run_that_writes_no_checkpoints_refuses_too(run_dir):
  # It would not delete them, but its metrics.jsonl would no longer belong to them.
  before = _snapshot(run_dir)
  _assert_refused(_cli(*TINY, "--out", str(run_dir)), "--overwrite")
  assert _snapshot(run_dir) == before


# (what the user put in checkpoints/, what the error line names). A step number for a name does not
# make a directory orbax's: only its contents do.
USERS_FILES = [("notes.txt", "notes.txt"), ("7/mine.txt", "7/mine.txt"),
               ("4/mine.txt", "4/mine.txt"), ("2/state/mine.txt", "2/state/mine.txt"),
               ("4/data/mine.txt", "4/data/mine.txt"),
               ("4/state/ocdbt.process_0/d/mine.txt", "4/state/ocdbt.process_0/d/mine.txt"),
               ("7/", "7 (empty)")]


@pytest.mark.parametrize("path, named", USERS_FILES, ids=[p for p, _ in USERS_FILES])
def test_overwrite_refuses_to_delete_what_orbax_did_not_write(run_dir, path, named):
  mine = run_dir / "checkpoints" / path
  if path.endswith("/"):
    mine.mkdir()
  else:
    mine.parent.mkdir(exist_ok=True)  # 7/ is the user's; the others are orbax's
    mine.write_text("mine")
  before = _snapshot(run_dir)
  _assert_refused(_cli(*TINY, "--checkpoint-every", "2", "--overwrite", "--out", str(run_dir)),
                  "--overwrite", f"holds {named}, which orbax did not write")
  assert _snapshot(run_dir) == before
  assert mine.exists()


def test_a_symlink_named_like_a_step_is_not_a_checkpoint(run_dir, tmp_path):
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "f").write_text("keep")
  shutil.rmtree(run_dir / "checkpoints" / "2")
  (run_dir / "checkpoints" / "2").symlink_to(precious, target_is_directory=True)
  assert not is_step_directory(run_dir / "checkpoints" / "2")
  assert not_written_by_orbax(run_dir / "checkpoints" / "2") == ["2"]
  assert is_step_directory(run_dir / "checkpoints" / "4")
  assert (precious / "f").read_text() == "keep"


def test_resume_past_steps_is_an_error(run_dir):
  # The checkpoint at step 4 has nothing left to do for --steps 3; it is not a finished run.
  before = _snapshot(run_dir)
  _assert_refused(_cli(*TINY, "--steps", "3", "--checkpoint-every", "2", "--resume",
                       "--out", str(run_dir)),
                  "--resume", "at step 4, already past --steps 3")
  assert _snapshot(run_dir) == before


def test_overwrite_replaces_only_the_checkpoints(run_dir, tx):
  (run_dir / "mine.txt").write_text("mine")
  records = train_lib.train(parse_args(
      [*TINY, "--checkpoint-every", "3", "--overwrite", "--out", str(run_dir)]), tx=tx)
  # Step 2 of the earlier run is gone; 3 and 4 are this run's.
  assert committed_steps(run_dir / "checkpoints") == [4, 3]
  assert (run_dir / "mine.txt").read_text() == "mine"
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("checkpoints", ["missing", "empty"])
def test_resume_with_nothing_to_resume_is_an_error(tmp_path, checkpoints):
  out = tmp_path / "mistyped"
  if checkpoints == "empty":
    (out / "checkpoints").mkdir(parents=True)
  _assert_refused(_cli(*TINY, "--checkpoint-every", "2", "--resume", "--out", str(out)),
                  "--resume", str(out / "checkpoints"))
  assert not (out / "metrics.jsonl").exists()


def test_max_bytes_bounds_what_is_read(tmp_path):
  # A sparse file: 256 MiB long, no disk or page cache spent until read.
  huge = tmp_path / "huge.txt"
  with huge.open("wb") as f:
    f.truncate(256 * 2**20)
  script = ("import sys\n"
            "from examples import data\n"
            "train, val = data.load_corpus(sys.argv[1], max_bytes=20_000)\n"
            "assert train.size + val.size == 20_000\n"
            # The peak resident memory of this process since it started. (getrusage's ru_maxrss
            # would count the parent's too: Linux carries it over fork and exec.)
            "status = open('/proc/self/status').read()\n"
            "print(status.split('VmHWM:')[1].split()[0])\n")
  result = subprocess.run([sys.executable, "-c", script, str(huge)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
  peak_mib = int(result.stdout) / 1024  # VmHWM is in KiB
  # numpy alone is some 30 MiB; reading the whole file would be 256 MiB more.
  assert peak_mib < 128, peak_mib


def test_data_directory_is_read_without_leaving_it(tmp_path):
  marker = f"SECRET-{uuid.uuid4()}"
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "secret.txt").write_text(marker)
  data = tmp_path / "data"
  data.mkdir()
  (data / "a.txt").write_text("inside text, " * 4_000)
  (data / "leak.txt").symlink_to(outside / "secret.txt")
  (data / "leak_dir").symlink_to(outside, target_is_directory=True)
  (data / "alias.txt").symlink_to(data / "a.txt")  # inside the tree: read
  os.mkfifo(data / "pipe")  # reading it would block forever

  # The listing first: were the FIFO in it, load_corpus below would hang.
  assert data_lib.text_files(data) == [data / "a.txt", data / "alias.txt"]
  train, val = data_lib.load_corpus(str(data), max_bytes=10**6)
  corpus = train.tobytes() + val.tobytes()
  assert marker.encode() not in corpus
  assert len(corpus) == 2 * len("inside text, " * 4_000)


def test_a_symlink_loop_in_data_is_skipped(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "a.txt").write_text("inside text, " * 4_000)
  (data / "loop_a").symlink_to(data / "loop_b")
  (data / "loop_b").symlink_to(data / "loop_a")
  (data / "self").symlink_to(data / "self")
  assert data_lib.text_files(data) == [data / "a.txt"]


def test_the_entropy_of_one_byte_value_prints_as_zero():
  # -(1 * log 1) is -0.0, which printed as "-0.000".
  entropy = data_lib.unigram_entropy(np.full(1_000, ord("a"), dtype=np.uint8))
  assert f"{entropy:.3f}" == "0.000"
  assert data_lib.unigram_entropy(np.arange(256, dtype=np.uint8)) == pytest.approx(np.log(256))
