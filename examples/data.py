"""Byte-level text data: the default corpus, a train/validation split, and resumable batches.

The default corpus is the source of the running interpreter's standard library: every machine that
can run this example already has it, so nothing is downloaded. Files are read in sorted path order
and capped at `max_bytes`, so the corpus is the same on every run with the same Python version.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sysconfig
from typing import Iterable

import numpy as np

DEFAULT_MAX_BYTES = 4_000_000
# The corpus is cut into blocks of this many bytes and every VALIDATION_PERIOD-th block is held out:
# validation text is spread over the whole corpus rather than being its alphabetically last files.
BLOCK_BYTES = 16_384
VALIDATION_PERIOD = 10


def stdlib_sources() -> list[pathlib.Path]:
  """The interpreter's standard-library .py files (no tests, no site-packages), sorted."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
  return sorted(
      (path for path in root.rglob("*.py") if not skip.intersection(path.relative_to(root).parts)),
      key=lambda path: path.relative_to(root).as_posix())


def text_files(path: str | pathlib.Path) -> list[pathlib.Path]:
  """`path` itself if it is a file, else the regular files below it, sorted.

  Below a directory, only what lies inside it is read: symlinked directories are not followed, and
  a symlinked file is read only if it leads to a regular file inside the directory (a link to
  /proc/self/environ or ~/.ssh/id_rsa is skipped). FIFOs, sockets and devices are skipped: reading
  one would block or never end. So are symlinks that cannot be resolved (a loop).
  """
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if not path.exists():
    raise FileNotFoundError(f"--data {path}: no such file or directory")
  if not path.is_dir():
    raise ValueError(f"--data {path}: not a regular file or a directory")
  root = path.resolve()
  files = []
  for directory, _, names in os.walk(path):  # os.walk leaves symlinked directories alone
    for name in names:
      file = pathlib.Path(directory, name)
      try:
        target = file.resolve()  # the file itself, unless it is a symlink
      except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13), EACCES
        continue
      if target.is_relative_to(root) and target.is_file():
        files.append(file)
  if not files:
    raise ValueError(f"--data {path}: the directory holds no regular files (symlinks that lead "
                     "out of it are skipped)")
  return sorted(files)


def read_bytes(paths: Iterable[pathlib.Path], max_bytes: int) -> np.ndarray:
  """The concatenated bytes of `paths`, at most `max_bytes` of them, as uint8.

  Each file is read only up to what is left of `max_bytes`: a huge file costs no more memory than
  the cap (and files after the cap is reached are not opened).
  """
  chunks, total = [], 0
  for path in paths:
    if total >= max_bytes:
      break
    with open(path, "rb") as file:
      chunks.append(file.read(max_bytes - total))
    total += len(chunks[-1])
  return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def split(corpus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation): every VALIDATION_PERIOD-th block of BLOCK_BYTES goes to validation."""
  block = np.arange(corpus.size) // BLOCK_BYTES
  held_out = block % VALIDATION_PERIOD == VALIDATION_PERIOD - 1
  if not held_out.any():  # a corpus shorter than VALIDATION_PERIOD blocks: hold out its tail
    held_out = np.arange(corpus.size) >= corpus.size - corpus.size // VALIDATION_PERIOD
  return corpus[~held_out], corpus[held_out]


def load_corpus(data: str | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) bytes of `data` (a file or directory), or of the standard library."""
  files = stdlib_sources() if data is None else text_files(data)
  return split(read_bytes(files, max_bytes))


def check_corpus(corpus: tuple[np.ndarray, np.ndarray], seq_len: int) -> None:
  """Raises ValueError unless the training and the validation text each hold more than
  seq_len + 1 bytes: a window of seq_len inputs and their targets, and somewhere to place it."""
  for name, part in zip(("training", "validation"), corpus):
    if part.size <= seq_len + 1:
      raise ValueError(f"the corpus's {name} part is {part.size} bytes, too short for --seq-len "
                       f"{seq_len}: give more text (--data, --max-bytes) or a shorter --seq-len")


def unigram_entropy(data: np.ndarray) -> float:
  """Entropy in nats of the byte frequencies: the loss of the best model that ignores context."""
  counts = np.bincount(data, minlength=256).astype(np.float64)
  counts = counts[counts > 0]
  # p log(1/p) rather than -(p log p): each term is >= 0, so one byte value gives 0.0, not -0.0.
  return float((counts / counts.sum() * np.log(counts.sum() / counts)).sum())


@dataclasses.dataclass
class Batches:
  """Random windows of `data`; batch i depends only on (seed, i), so `position` alone resumes it.

  Each batch is (inputs, targets), two int32 arrays of shape (batch_size, seq_len) where targets
  are the inputs shifted by one byte.
  """
  data: np.ndarray
  batch_size: int
  seq_len: int
  seed: int
  position: int = 0

  def __post_init__(self):
    if self.data.size <= self.seq_len + 1:
      raise ValueError(f"{self.data.size} bytes of text is too short for seq_len={self.seq_len}")

  def __iter__(self):
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.position))
    self.position += 1
    starts = rng.integers(0, self.data.size - self.seq_len - 1, size=self.batch_size)
    return windows(self.data, starts, self.seq_len)


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  rows = data[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
  return rows[:, :-1], rows[:, 1:]


def validation_batches(data: np.ndarray, *, batch_size: int, seq_len: int,
                       max_tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Evenly spaced windows covering `data`, the same on every call: a fixed validation set."""
  n_windows = max(1, min(max_tokens // seq_len, (data.size - 1) // seq_len))
  n_batches = math.ceil(n_windows / batch_size)
  starts = np.linspace(0, data.size - seq_len - 1, n_batches * batch_size).astype(np.int64)
  return [windows(data, chunk, seq_len) for chunk in np.split(starts, n_batches)]
