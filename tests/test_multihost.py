"""Two processes, one mesh: multi-host training equals single-process training.

Two local processes with 4 CPU devices each form one 8-device mesh over
``jax.distributed`` (gloo collectives on 127.0.0.1) and run
``multihost_worker.train``: a few Orth-Dion steps with the weights sharded
over "fsdp" and "tensor", and with compressed data parallelism over "data".
The same function on this process's 8 devices must give the same parameters
and losses: where the devices live changes who sends the ``P`` and ``R``
pieces, never the result.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

import multihost_worker

WORKER = pathlib.Path(multihost_worker.__file__)
REPO_ROOT = WORKER.parent.parent
# Both processes must finish within this; a hung collective fails the test.
TIMEOUT_S = 180


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu",
      OPENBLAS_NUM_THREADS="1",
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      PYTHONPATH=os.pathsep.join(
          filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
  )
  return env


def _logs(paths) -> str:
  return "\n".join(f"--- process {i} ---\n{p.read_text()}"
                   for i, p in enumerate(paths))


def _run_two_processes(tmp_path: pathlib.Path) -> dict[str, np.ndarray]:
  """Runs both workers; their results, or a failure with both logs."""
  out_path = tmp_path / "multihost.npz"
  port = str(_free_port())
  log_paths = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = []
  try:
    for i, log_path in enumerate(log_paths):
      with open(log_path, "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), port, str(i), str(out_path)],
            env=_worker_env(), stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    # One process dying leaves the other waiting on a collective: stop at the
    # first failure rather than at the timeout.
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if time.monotonic() > deadline:
        pytest.fail(f"workers still running after {TIMEOUT_S} s\n"
                    f"{_logs(log_paths)}")
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  codes = [p.returncode for p in procs]
  if codes != [0, 0]:
    # -9: killed here after the other process failed.
    pytest.fail(f"workers exited with {codes}\n{_logs(log_paths)}")
  with np.load(out_path) as results:
    return dict(results)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
  return _run_two_processes(tmp_path_factory.mktemp("multihost"))


def _mode_results(results: dict, mode: str) -> dict[str, np.ndarray]:
  prefix = f"{mode}/"
  return {k[len(prefix):]: v for k, v in results.items()
          if k.startswith(prefix)}


@pytest.mark.parametrize("mode", list(multihost_worker.MODES))
def test_leading_mesh_axis_crosses_the_processes(two_process_results, mode):
  # Each device's process, indexed like the mesh: the leading axis alone
  # separates process 0 from process 1, so its collectives go over gloo.
  processes = two_process_results[f"mesh_processes/{mode}"]
  np.testing.assert_array_equal(
      processes, np.broadcast_to(np.arange(2)[:, None, None], (2, 2, 2)))


@pytest.mark.parametrize("mode", list(multihost_worker.MODES))
def test_two_processes_match_one(two_process_results, mode):
  expected = multihost_worker.train(mode)
  got = _mode_results(two_process_results, mode)
  if mode == "adaptive":
    # Every host chose the same ranks, those of the one-process run, and
    # they did change.
    by_process = got.pop("ranks_by_process")
    expected.pop("ranks_by_process")
    assert by_process.shape[0] == 2
    np.testing.assert_array_equal(by_process[0], by_process[1])
    np.testing.assert_array_equal(by_process[0], expected["ranks"])
    assert int(got["changes"]) >= 1
    assert np.all(got["ranks"] < 8), got["ranks"]
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)
  assert got["loss"][-1] < got["loss"][0]
