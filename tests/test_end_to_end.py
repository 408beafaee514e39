"""End to end: a small transformer LM trains with every optimizer configuration a user can choose,
and none of them hangs.

Every combination of optimizer (Orth-Dion, right factor "qr"; its polar variant,
``right_factor="polar"``; Dion, right factor "column"), ``orthogonalize`` method (cholesky_qr,
householder, randomized_cholesky_qr) and placement (one device; a 2 x 2 fsdp x tensor mesh with
sharded weights, the optimizer given ``mesh=`` and ``param_specs=``), in the mu-form, and each
optimizer and placement in the paper's beta-form (``error_feedback="beta"``, with cholesky_qr),
trains a GPT-style byte-level LM (4 blocks,
d_model 128, 2-D weights: ``end_to_end_worker.py``) on real text for 40 jitted steps, and so does
compressed data parallelism over a "data" axis of 2 for each optimizer and form. Adaptive rank
(Ada-Orth-Dion, ``orth_dion(adaptive_rank=True)`` with its ``RankController`` deciding every 10
steps, from rank 64 of 128) trains in both forms on one device and with compressed data
parallelism, and must change some rank within the run: the state then has new shapes, and the
jitted step is built again. Each configuration is its own test and must finish, keep every loss
and parameter finite, and bring the mean loss of its last 5 steps at least ``LOSS_DROP`` nats
below that of its first 5. A last test
runs ``orth_dion(..., orthogonalize="householder")`` on four layers of (128 x 384, 128 x 128,
128 x 512, 512 x 128) weights with random gradients for 10 jitted updates. And the first-use
placement: a scanned MLP stack, kernels (layers, fan_in, fan_out) sharded over a 2 x 2 mesh with
Explicit axes, trained by ``orth_dion(lr, layer_axes=1)`` without ``mesh=`` (the mesh is read from
the parameters), must lower its loss the same way.

Each group of configurations runs in one subprocess (sharing JAX's start-up) under a watchdog, in
the environment a user has: JAX on CPU, ``OPENBLAS_NUM_THREADS`` unset, one device for the
single-device runs (no simulated devices) and 4 simulated devices for the meshes. A configuration
that deadlocks fails its test instead of hanging the suite. XLA:CPU deadlocks when batched LAPACK
calls (QR, Cholesky, triangular solve, eigh) that split their batch over the thread pool running
the program fill every pool thread, each waiting for pieces queued behind the others: the process
then sits at 0% CPU forever. The watchdog kills the worker when it sees no progress and ~0% CPU
for ``IDLE_WINDOW_S`` seconds, or no "done" within ``CONFIG_TIMEOUT_S`` of a configuration's
"start" (``ADAPTIVE_TIMEOUT_S`` for adaptive rank, which compiles its step again at each
change); the failure names the configuration, says it hung and at which step, and a fresh worker
takes the group's remaining configurations. ``PARALLEL_WORKERS`` groups run at once (XLA compiles
on one core). Run with ``-s`` to see each configuration's timings.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

WORKER = pathlib.Path(__file__).with_name("end_to_end_worker.py")
REPO_ROOT = WORKER.parent.parent
WORKER_COMMAND = [sys.executable, str(WORKER)]

STARTUP_TIMEOUT_S = 120  # worker start (or a finished configuration) -> the next "start"
CONFIG_TIMEOUT_S = 150  # a configuration's "start" -> its "done"
# Adaptive rank: a compilation of the step for each of up to 3 rank changes (steps 10, 20, 30).
ADAPTIVE_TIMEOUT_S = 400
# A running configuration that used less than IDLE_CPU_S of CPU over IDLE_WINDOW_S seconds, with no
# event in between, is deadlocked: a process that computes or compiles is never that idle, even
# on a busy machine.
IDLE_WINDOW_S = 20
IDLE_CPU_S = 0.2
PARALLEL_WORKERS = 2
LOSS_DROP = 1.0  # nats; 40 steps take the LM from ~4.4 (first 5 steps) to ~2.8 (last 5)

OPTIMIZERS = ("orth_dion", "polar", "dion")
METHODS = ("cholesky_qr", "householder", "randomized_cholesky_qr")
FORMS = ("mu", "beta")
HOUSEHOLDER = "householder_four_layers"
STACKED = "stacked_layers_inferred_mesh"  # layer_axes=1, mesh read from the parameters


def _group(optimizer: str, placement: str) -> list[str]:
  """Every method in the mu-form and the default method in the beta-form: the form changes only
  the momentum's elementwise update, never which LAPACK calls run (what can hang), so each method
  meets each optimizer and placement and each form does too, in 4 runs instead of 6."""
  return ([f"{optimizer}-{method}-mu-{placement}" for method in METHODS]
          + [f"{optimizer}-{METHODS[0]}-{form}-{placement}" for form in FORMS[1:]])


# group -> (the devices its worker sees, its configurations). One device: no simulated devices.
# The longest first: with PARALLEL_WORKERS at a time they then finish together.
GROUPS = {
    **{f"{optimizer}-mesh": (4, _group(optimizer, "mesh")) for optimizer in OPTIMIZERS},
    **{f"{optimizer}-single": (1, _group(optimizer, "single")) for optimizer in OPTIMIZERS},
    "data-parallel": (4, [f"{optimizer}-cholesky_qr-{form}-dp" for optimizer in OPTIMIZERS
                          for form in FORMS]),
    # Adaptive rank: the compressed data-parallel placement holds what a resize must keep (per
    # replica momenta, factors split over fsdp); the single device, the plain step.
    **{f"ada-{placement}": (devices, [f"ada-cholesky_qr-{form}-{placement}" for form in FORMS])
       for placement, devices in (("dp", 4), ("single", 1))},
    "householder": (1, [HOUSEHOLDER]),
    "stacked": (4, [STACKED]),
}
GROUP_OF = {config: group for group, (_, configs) in GROUPS.items() for config in configs}
TRAINING_CONFIGS = [config for config in GROUP_OF if config != HOUSEHOLDER]
ADAPTIVE_CONFIGS = [config for config in GROUP_OF if config.startswith("ada-")]


def _timeout(config: str) -> float:
  return ADAPTIVE_TIMEOUT_S if config in ADAPTIVE_CONFIGS else CONFIG_TIMEOUT_S


@dataclasses.dataclass
class Outcome:
  config: str
  status: str  # "done", "hung", "error" (it raised), "crashed" (the worker died), "not run"
  message: str = ""
  result: dict = dataclasses.field(default_factory=dict)


def _worker_env(devices: int) -> dict[str, str]:
  """The environment a user has: CPU, no OPENBLAS_NUM_THREADS, simulated devices only for a mesh."""
  env = dict(os.environ)
  env.pop("OPENBLAS_NUM_THREADS", None)  # conftest sets it; users don't
  flags = [flag for flag in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in flag]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
  return env


def _cpu_seconds(pid: int) -> float | None:
  """User + system CPU time of the process (all its threads), None where it can't be read."""
  try:
    import psutil  # pylint: disable=import-outside-toplevel
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system
  except ImportError:
    pass
  except Exception:  # pylint: disable=broad-except
    return None
  try:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None


class _IdleMeter:
  """How long the process has used (almost) no CPU: since it last used IDLE_CPU_S, or an event."""

  def __init__(self, pid: int):
    self.pid = pid
    self.reset()

  def reset(self) -> None:
    self.mark_time, self.mark_cpu = time.monotonic(), _cpu_seconds(self.pid)

  def idle_for(self) -> float:
    cpu = _cpu_seconds(self.pid)
    if cpu is None or self.mark_cpu is None:
      return 0.0  # unmeasurable: only the timeouts apply
    if cpu - self.mark_cpu >= IDLE_CPU_S:
      self.mark_time, self.mark_cpu = time.monotonic(), cpu
    return time.monotonic() - self.mark_time

  def cpu_percent(self) -> float:
    cpu = _cpu_seconds(self.pid)
    elapsed = time.monotonic() - self.mark_time
    if cpu is None or self.mark_cpu is None or elapsed <= 0:
      return float("nan")
    return 100.0 * (cpu - self.mark_cpu) / elapsed


def _pump(stream, lines: queue.Queue) -> None:
  for line in stream:
    lines.put(line)
  lines.put(None)


def _stderr(path: pathlib.Path, chars: int = 3000) -> str:
  """The end of the worker's stderr, to append to a failure message; "" if it is empty."""
  try:
    text = path.read_text(errors="replace").strip()
  except OSError:
    return ""
  return f"\nworker stderr (end):\n{text[-chars:]}" if text else ""


def _kill(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # the worker leads its own process group
    except ProcessLookupError:
      pass
  proc.wait()


def _run_worker(configs: list[str], devices: int, log_dir: pathlib.Path,
                attempt: int) -> dict[str, Outcome]:
  """Runs one worker on `configs` until it exits or hangs; the outcome of each configuration it
  got to (a hung or crashed one included). The caller reruns the rest in a fresh worker."""
  stderr_path = log_dir / f"worker_{attempt}.stderr"
  with open(stderr_path, "wb") as stderr:
    proc = subprocess.Popen([*WORKER_COMMAND, *configs], cwd=REPO_ROOT, env=_worker_env(devices),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, start_new_session=True)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
  outcomes: dict[str, Outcome] = {}
  meter = _IdleMeter(proc.pid)
  current, since, last = None, time.monotonic(), "no step finished"
  try:
    while True:
      try:
        line = lines.get(timeout=1.0)
      except queue.Empty:
        line = ""
      if line is None:
        break  # the worker closed stdout: it exited
      event = None
      if line.startswith("{"):
        try:
          event = json.loads(line)
        except json.JSONDecodeError:
          pass
      if event is not None:
        meter.reset()
        kind, config = event.get("event"), event.get("config")
        if kind == "start":
          current, since, last = config, time.monotonic(), "no step finished"
        elif kind == "step":
          last = f"step {event['step']} at {event['elapsed_s']} s"
        elif kind in ("done", "error"):
          outcomes[config] = Outcome(config, kind, event.get("error", ""), event)
          current, since = None, time.monotonic()
      idle = meter.idle_for()
      waited = time.monotonic() - since
      if current is not None and idle >= IDLE_WINDOW_S:
        why = (f"no progress and {meter.cpu_percent():.1f}% CPU for {idle:.0f} s (a deadlock), "
               f"{waited:.0f} s after its start; last: {last}")
      elif current is not None and waited > _timeout(current):
        why = (f"not done {_timeout(current)} s after its start ({meter.cpu_percent():.1f}% CPU "
               f"over the last {idle:.0f} s); last: {last}")
      elif current is None and waited > STARTUP_TIMEOUT_S:
        why = f"the worker did not start it within {STARTUP_TIMEOUT_S} s"
      else:
        continue
      _kill(proc)
      for config in [current] if current is not None else configs:
        if config not in outcomes:
          outcomes[config] = Outcome(config, "hung" if current else "not run",
                                     why + _stderr(stderr_path))
      return outcomes
  finally:
    _kill(proc)
  if current is not None:
    outcomes[current] = Outcome(
        current, "crashed", f"the worker exited with status {proc.returncode} during it "
        f"(last: {last})" + _stderr(stderr_path))
  for config in configs:
    if config not in outcomes:
      outcomes[config] = Outcome(
          config, "not run", f"the worker exited with status {proc.returncode} before it"
          + _stderr(stderr_path))
  return outcomes


def run_group(configs: list[str], devices: int, log_dir: pathlib.Path) -> dict[str, Outcome]:
  """Every configuration's outcome; after a hang or crash the rest go to a fresh worker."""
  outcomes: dict[str, Outcome] = {}
  attempt = 0
  while len(outcomes) < len(configs):
    remaining = [config for config in configs if config not in outcomes]
    outcomes.update(_run_worker(remaining, devices, log_dir, attempt))
    attempt += 1
  return outcomes


class _Runs:
  """Runs the groups of the selected configurations, PARALLEL_WORKERS at a time, in test order."""

  def __init__(self, selected: list[str], log_root: pathlib.Path):
    self.pool = concurrent.futures.ThreadPoolExecutor(PARALLEL_WORKERS)
    self.started = time.monotonic()
    self.futures = {}
    for config in selected:
      group = GROUP_OF[config]
      if group not in self.futures:
        devices, configs = GROUPS[group]
        chosen = [c for c in configs if c in selected]
        log_dir = log_root / group
        log_dir.mkdir(parents=True, exist_ok=True)
        self.futures[group] = self.pool.submit(self._timed, run_group, chosen, devices, log_dir)

  @staticmethod
  def _timed(fn, *args):
    start = time.monotonic()
    return fn(*args), time.monotonic() - start

  def outcome(self, config: str) -> Outcome:
    outcomes, _ = self.futures[GROUP_OF[config]].result()
    return outcomes[config]

  def timings(self) -> str:
    rows = [f"{group}: {future.result()[1]:.1f} s" for group, future in self.futures.items()
            if future.done() and not future.cancelled() and future.exception() is None]
    total = time.monotonic() - self.started
    return f"end-to-end groups ({total:.1f} s in all): " + ", ".join(rows)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
  selected = [item.callspec.params["config"] for item in request.session.items
              if getattr(getattr(item, "module", None), "__name__", None) == __name__
              and hasattr(item, "callspec")]
  result = _Runs(selected, tmp_path_factory.mktemp("end_to_end"))
  yield result
  # Groups no test asked for yet (a run stopped early, -x) are not started.
  result.pool.shutdown(wait=True, cancel_futures=True)
  print("\n" + result.timings())


def _finished(runs: _Runs, config: str) -> dict:
  outcome = runs.outcome(config)
  if outcome.status != "done":
    pytest.fail(f"{config}: {outcome.status}: {outcome.message}", pytrace=False)
  result = outcome.result
  print(f"{config}: {result['seconds']} s (first step, with compilation: {result['compile_s']} s; "
        f"the rest: {result['train_s']} s)")
  return result


@pytest.mark.parametrize("config", TRAINING_CONFIGS)
def test_training_finishes_and_lowers_the_loss(runs, config):
  result = _finished(runs, config)
  first, last = result["first_loss"], result["last_loss"]
  assert result["finite"], f"{config}: a loss or a parameter is not finite ({first} -> {last})"
  assert last < first - LOSS_DROP, (
      f"{config}: the loss fell from {first:.3f} to only {last:.3f} (means of the first and the "
      f"last 5 of {result['steps']} steps); expected a drop of at least {LOSS_DROP}")


@pytest.mark.parametrize("config", ADAPTIVE_CONFIGS)
def test_adaptive_rank_changes_ranks_within_the_run(runs, config):
  result = _finished(runs, config)
  print(f"{config}: {result['rank_changes']} rank changes, ranks per matrix type "
        f"{result['initial_ranks']} -> {result['final_ranks']}")
  assert result["rank_changes"] >= 1 and result["final_ranks"] != result["initial_ranks"], result


@pytest.mark.parametrize("config", [HOUSEHOLDER])
def test_householder_on_four_layers_finishes(runs, config):
  result = _finished(runs, config)
  assert result["finite"], f"{config}: a parameter is not finite"
  assert result["moved"], f"{config}: a weight did not change"
