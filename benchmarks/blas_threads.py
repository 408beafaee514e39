"""Orth-Dion's update on CPU with no BLAS thread variable, against one thread.

jaxlib's LAPACK calls run on SciPy's OpenBLAS, whose idle threads spin
against XLA's for the cores (``orth_dion_jax.blas_threads``). The package now
limits that library to one thread itself. Each case's update is timed in three
fresh processes, one per setting, since OpenBLAS reads its variables when it
is loaded:

* ``package``: no thread variable set: what a user gets;
* ``before``: the same with ``ORTH_DION_BLAS_THREADS=keep``, the package's
  opt-out: the package as it was before it limited the threads;
* ``one thread``: ``OPENBLAS_NUM_THREADS=1``, the reference.

``after x`` is ``package`` over ``one thread`` (1 when the package's limit
does all that the variable did) and ``before x`` is ``before`` over ``one
thread``. Each process runs on one CPU device with the cases taking turns
(``workload.time_round_robin``); times are medians of ``--repeats`` samples.
Cases: the four layers of ``tests/test_end_to_end.py`` (128 x 384, 128 x 128,
128 x 512, 512 x 128), one 256 x 256 layer and, with ``--large``, one 2048 x 2048
layer; rank 1/4, float32 momentum.

    python -m benchmarks.blas_threads
    python -m benchmarks.blas_threads --large --json runs/blas_threads.json

``--worker`` is the timed process itself: it prints one JSON line with the
times and, for every BLAS library, its thread count before and after the
updates, the library loaded by SciPy's LAPACK (the one jaxlib calls) apart.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp

from benchmarks import workload

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# The end-to-end test's four layers, one small layer, one large one.
CASES = {
    "4 layers d=128": [(128, 384), (128, 128), (128, 512), (512, 128)],
    "1 x 256x256": [(256, 256)],
    "1 x 2048x2048": [(2048, 2048)],
}
SMALL_CASES = ("4 layers d=128", "1 x 256x256")
RANK_FRACTION = 0.25

SETTINGS = {
    "package": {},
    "before": {"ORTH_DION_BLAS_THREADS": "keep"},
    "one thread": {"OPENBLAS_NUM_THREADS": "1"},
}
# Every variable that changes the BLAS threads; each setting starts without.
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                     "MKL_NUM_THREADS", "ORTH_DION_BLAS_THREADS")

_COLUMNS = (("case", ""), ("rank", ""), ("one thread ms", ".2f"),
            ("package ms", ".2f"), ("before ms", ".2f"), ("after x", ".2f"),
            ("before x", ".2f"))


def environment(overrides: dict[str, str]) -> dict[str, str]:
  """This process's environment on one CPU device, no thread variable but
  ``overrides``."""
  env = {name: value for name, value in os.environ.items()
         if name not in _THREAD_VARIABLES}
  env["XLA_FLAGS"] = " ".join(
      flag for flag in env.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in flag)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
  return {**env, **overrides}


def run_worker(cases, overrides: dict[str, str], repeats: int,
               timeout_s: float) -> dict:
  """The worker's report, from a fresh process with ``environment(overrides)``.

  Raises:
    RuntimeError: the worker failed.
    subprocess.TimeoutExpired: it ran past ``timeout_s`` (it is killed).
  """
  command = [sys.executable, "-m", "benchmarks.blas_threads", "--worker",
             "--repeats", str(repeats), "--cases", *cases]
  done = subprocess.run(command, env=environment(overrides), cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout_s,
                        check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{overrides or 'no variable'}: the worker exited with "
                       f"{done.returncode}:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.splitlines()[-1])


def _blas_threads() -> dict[str, int]:
  import threadpoolctl  # pylint: disable=import-outside-toplevel
  return {info["filepath"]: info["num_threads"]
          for info in threadpoolctl.threadpool_info()
          if info["user_api"] == "blas"}


def _work(cases, repeats: int) -> dict:
  """Times each case's update in this process; see the module docstring."""
  others = _blas_threads()
  # What jaxlib loads for its LAPACK kernels, loaded here first to tell it
  # apart from NumPy's.
  # pylint: disable-next=import-outside-toplevel,unused-import
  from scipy.linalg import cython_lapack  # noqa: F401
  lapack = {path: threads for path, threads in _blas_threads().items()
            if path not in others}
  runners = {}
  for name in cases:
    shapes = {f"layer{i}": shape for i, shape in enumerate(CASES[name])}
    params, grads = workload.weight_set(shapes)
    tx = workload.optimizer("orth_dion", rank_fraction=RANK_FRACTION,
                            momentum_dtype=jnp.float32)
    runners[name] = workload.DonatedUpdate(tx, params, grads)
  times = workload.time_round_robin(runners, repeats)
  after = _blas_threads()
  return {
      "time_s": {name: workload.median(t) for name, t in times.items()},
      "times_s": times,
      "lapack_blas": {p: [n, after[p]] for p, n in lapack.items()},
      "other_blas": {p: [n, after[p]] for p, n in others.items()},
  }


def measure(cases, repeats: int, timeout_s: float) -> list[dict]:
  """One record per case: its median time under each of ``SETTINGS``."""
  reports = {}
  for setting, overrides in SETTINGS.items():
    reports[setting] = run_worker(cases, overrides, repeats, timeout_s)
    print(f"  measured {setting}", file=sys.stderr, flush=True)
  records = []
  for name in cases:
    ms = {s: 1e3 * reports[s]["time_s"][name] for s in SETTINGS}
    records.append({
        "case": name, "shapes": CASES[name], "rank_fraction": RANK_FRACTION,
        "ranks": [workload.rank(s, RANK_FRACTION) for s in CASES[name]],
        "ms": ms, "after_x": ms["package"] / ms["one thread"],
        "before_x": ms["before"] / ms["one thread"],
        "blas": {s: reports[s]["lapack_blas"] for s in SETTINGS},
    })
  return records


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", nargs="+", choices=list(CASES),
                      default=list(SMALL_CASES))
  parser.add_argument("--large", action="store_true",
                      help="also one 2048 x 2048 layer")
  parser.add_argument("--repeats", type=int, default=7,
                      help="timed samples per case, after one warm-up")
  parser.add_argument("--timeout", type=float, default=600,
                      help="seconds each process may take")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the records here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  large = [name for name in CASES if name not in SMALL_CASES]
  cases = list(dict.fromkeys(args.cases + (large if args.large else [])))
  if args.worker:
    print(json.dumps(_work(cases, args.repeats)))
    return
  records = measure(cases, args.repeats, args.timeout)
  print(f"cpu, {os.cpu_count()} cores, one device per process; "
        f"rank {workload.fraction_label(RANK_FRACTION)}, float32 momentum")
  print(workload.format_table(_COLUMNS, [
      [r["case"], "/".join(map(str, r["ranks"])), r["ms"]["one thread"],
       r["ms"]["package"], r["ms"]["before"], r["after_x"], r["before_x"]]
      for r in records]))
  workload.write_json(args.json, records)


if __name__ == "__main__":
  main()
