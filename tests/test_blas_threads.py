"""On CPU the package keeps LAPACK's BLAS threads off XLA's cores by itself.

jaxlib runs the update's r x r factorizations on SciPy's OpenBLAS, whose idle
threads spin against XLA's; ``orth_dion_jax.blas_threads`` limits that library
to one thread, so that a user needs no ``OPENBLAS_NUM_THREADS=1``. OpenBLAS
reads its variables when it is loaded, so each property is checked in fresh
processes (``benchmarks/blas_threads.py``'s worker: one CPU device, no thread
variable but the test's), each bounded by ``TIMEOUT_S``:

* an update without the variable is about as fast as with it;
* the library jaxlib calls runs one thread after an update, and NumPy's own
  library (where it is a separate one) keeps its threads;
* a thread count the user set, or the opt-out, is left alone.

The last tests call the module in this process: a wrong opt-out value is an
error, and with no CPU backend or no threadpoolctl nothing is limited.
"""

from __future__ import annotations

import os
import sys

import pytest

from benchmarks import blas_threads as worker
from orth_dion_jax import blas_threads

TIMEOUT_S = 300
REPEATS = 7  # timed samples per case, each >= 0.1 s of updates
# Without the limit an update took up to tens of times as long on a 2-core
# machine (benchmarks/blas_threads.py); a shared machine's noise stays below 2x.
MAX_SLOWDOWN = 2.0
CASES = worker.SMALL_CASES

several_cores = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2, reason="one core: OpenBLAS runs one thread")


@pytest.fixture(scope="module")
def unset():
  """The worker's report with no thread variable set: a user's process."""
  return worker.run_worker(CASES, {}, REPEATS, TIMEOUT_S)


def _after(libraries: dict[str, list[int]]) -> dict[str, int]:
  return {path: after for path, (_, after) in libraries.items()}


def test_update_without_the_variable_is_as_fast_as_with_it(unset):
  one_thread = worker.run_worker(CASES, {"OPENBLAS_NUM_THREADS": "1"},
                                 REPEATS, TIMEOUT_S)
  for case in CASES:
    ratio = unset["time_s"][case] / one_thread["time_s"][case]
    assert ratio < MAX_SLOWDOWN, (
        f"{case}: {1e3 * unset['time_s'][case]:.2f} ms without "
        f"OPENBLAS_NUM_THREADS, {1e3 * one_thread['time_s'][case]:.2f} ms "
        f"with it set to 1")


def test_lapack_library_runs_one_thread(unset):
  # The README installs pip wheels, whose SciPy bundles its own OpenBLAS: it
  # must be found (a conda SciPy sharing NumPy's BLAS is not what CI runs).
  assert unset["lapack_blas"], ("no BLAS of SciPy's own was found", unset)
  assert set(_after(unset["lapack_blas"]).values()) == {1}, unset


def test_numpy_library_keeps_its_threads(unset):
  # NumPy's wheel bundles its own OpenBLAS, loaded before SciPy's LAPACK.
  assert unset["other_blas"], ("NumPy's BLAS was not found", unset)
  for before, after in unset["other_blas"].values():
    assert after == before, unset["other_blas"]


@several_cores
def test_user_thread_count_is_kept():
  report = worker.run_worker(CASES[1:], {"OPENBLAS_NUM_THREADS": "2"}, 1,
                             TIMEOUT_S)
  assert report["lapack_blas"]
  assert set(_after(report["lapack_blas"]).values()) == {2}, report


@several_cores
def test_opt_out_keeps_the_threads():
  report = worker.run_worker(CASES[1:], {blas_threads.OPT_OUT: "keep"}, 1,
                             TIMEOUT_S)
  assert report["lapack_blas"]
  for before, after in report["lapack_blas"].values():
    assert after == before > 1, report


@pytest.fixture
def fresh_limit(monkeypatch):
  """No thread variable, and the once-per-process limit forgotten."""
  for name in blas_threads.USER_THREAD_SETTINGS + (blas_threads.OPT_OUT,):
    monkeypatch.delenv(name, raising=False)
  blas_threads._limit_scipy_blas.cache_clear()  # pylint: disable=protected-access
  yield
  blas_threads._limit_scipy_blas.cache_clear()  # pylint: disable=protected-access


def test_unknown_opt_out_value_is_an_error(fresh_limit, monkeypatch):
  del fresh_limit
  monkeypatch.setenv(blas_threads.OPT_OUT, "1")
  with pytest.raises(ValueError, match=blas_threads.OPT_OUT):
    blas_threads.limit_lapack_threads()


def test_only_the_cpu_backend_is_limited(fresh_limit, monkeypatch):
  del fresh_limit
  monkeypatch.setattr(blas_threads.jax, "default_backend", lambda: "gpu")
  assert blas_threads.limit_lapack_threads() == ()
  monkeypatch.setattr(blas_threads.jax, "default_backend", lambda: "cpu")
  assert blas_threads.limit_lapack_threads()


def test_nothing_limited_without_threadpoolctl(fresh_limit, monkeypatch):
  del fresh_limit
  monkeypatch.setitem(sys.modules, "threadpoolctl", None)
  assert blas_threads.limit_lapack_threads() == ()
