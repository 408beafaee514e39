"""One BLAS thread for XLA:CPU's LAPACK calls, with nothing for the user to set.

The pitfall: on CPU, jaxlib runs the r x r Cholesky, triangular solves, QR and
eigh of the update (``lapack_calls.per_matrix``) through SciPy's LAPACK: jaxlib
(0.10.x) takes its kernels from ``scipy.linalg.cython_lapack``, which calls the
OpenBLAS that SciPy's wheel bundles (``scipy.libs/libscipy_openblas*``, a
different library from NumPy's ``numpy.libs/libscipy_openblas64_*``). That
OpenBLAS starts one thread per core; once a call is large enough to wake them
(r = 64 is), its idle threads keep spinning after every call, taking the cores
from XLA's own threads, which run the matmuls between the calls. On a 2-core
machine an update then took from about as long to over 50x as long as with
``OPENBLAS_NUM_THREADS=1``, varying from run to run
(``python -m benchmarks.blas_threads``). The matrices are r x r (r = the rank,
8 to 512), too small for a second BLAS thread to pay off.

What ``limit_lapack_threads`` guarantees: when the default backend is CPU, the
first time the package traces a LAPACK call it sets the thread count of SciPy's
own BLAS library to 1, process-wide, for the rest of the process. That is a
setting of the library, so it holds when the compiled update runs, whenever
and however often that is, and costs nothing per call. Exactly the libraries
that lie inside SciPy's installation are limited:

* NumPy keeps its threads where it has its own BLAS (the PyPI wheels); a
  user's ``x @ y`` on NumPy arrays is as fast as before;
* the side effect: ``scipy.linalg`` in the same process also runs on one
  thread from then on;
* where SciPy has no BLAS of its own (conda or system packages that link a
  shared one, which NumPy then uses too) nothing is limited: taking NumPy's
  threads is not ours to decide. Set ``OPENBLAS_NUM_THREADS=1`` there.

Nothing is done when the user has chosen the threads: ``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set, or the opt-out
``ORTH_DION_BLAS_THREADS=keep`` (read at that first trace). Nor when the
default backend is not CPU (a GPU or TPU runs its own solvers; SciPy keeps its
threads), or when ``threadpoolctl`` or SciPy cannot be imported or finds no
BLAS: the update is then as fast or slow as the environment makes it, never
broken.
"""

from __future__ import annotations

import functools
import os
import pathlib

import jax

OPT_OUT = "ORTH_DION_BLAS_THREADS"
KEEP = "keep"
# Any of these set means the user already chose the BLAS threads.
USER_THREAD_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                        "MKL_NUM_THREADS")


def limit_lapack_threads() -> tuple[str, ...]:
  """Limits the BLAS of XLA:CPU's LAPACK calls to one thread, once per process.

  Called where the package traces its LAPACK calls; see the module docstring
  for when it does nothing.

  Returns:
    The paths of the libraries limited (by this call or an earlier one), empty
    where nothing was limited.

  Raises:
    ValueError: ``ORTH_DION_BLAS_THREADS`` is set to something else than
      ``keep``.
  """
  if jax.default_backend() != "cpu":
    return ()
  return _limit_scipy_blas()


@functools.cache
def _limit_scipy_blas() -> tuple[str, ...]:
  choice = os.environ.get(OPT_OUT, "")
  if choice not in ("", KEEP):
    raise ValueError(f"{OPT_OUT}={choice!r}: expected {KEEP!r} (leave the "
                     "BLAS threads alone) or unset.")
  if choice == KEEP or any(os.environ.get(name)
                           for name in USER_THREAD_SETTINGS):
    return ()
  try:
    # pylint: disable-next=import-outside-toplevel
    import scipy
    # Loads SciPy's BLAS now, so that it can be found; jaxlib would load it
    # anyway when the call is lowered.
    # pylint: disable-next=import-outside-toplevel,unused-import
    from scipy.linalg import cython_lapack  # noqa: F401
    import threadpoolctl  # pylint: disable=import-outside-toplevel
  except ImportError:
    return ()
  package = pathlib.Path(scipy.__file__).resolve().parent
  # Wheels keep their libraries in ``scipy.libs`` (Linux, Windows) or
  # ``scipy/.dylibs`` (macOS).
  homes = (package, package.with_name("scipy.libs"))
  controller = threadpoolctl.ThreadpoolController()
  paths = [info["filepath"] for info in controller.info()
           if info["user_api"] == "blas" and _inside(info["filepath"], homes)]
  if paths:
    controller.select(filepath=paths).limit(limits=1)
  return tuple(paths)


def _inside(path: str, folders) -> bool:
  resolved = pathlib.Path(path).resolve()
  return any(resolved.is_relative_to(folder) for folder in folders)
