"""The benchmarks and the fast tests on one accelerator, in one bounded run.

Made for a single GPU lent for a few minutes (an NVIDIA H200 was the one in
view): it runs, one after another,

* ``device``: the backend, device kind, jax and jaxlib versions
  (``workload.device_description``) and ``nvidia-smi``'s line where there is
  one;
* ``step_time_<d>_<dtype>``: ``benchmarks.step_time`` at d = 2048 and d =
  4096, ranks 1/4 and 1/16, float32 and bfloat16 momentum (one part each):
  Orth-Dion, Dion, optax Muon and AdamW against the matmul roofline timed
  in the same run;
* ``memory``: ``benchmarks.memory``, state bytes and the compiled update's
  temporaries at d = 4096, rank 1/4, both momentum dtypes;
* ``scale``: ``benchmarks.scale`` at 48 layers, unscanned and scanned;
* ``tests``: ``tests/test_reference_match.py``, ``test_polar.py`` and
  ``test_properties.py`` (``pytest -x``) on the accelerator's platform
  (``JAX_PLATFORMS`` set to the backend ``device`` found; the suite's
  ``conftest`` would otherwise pick the CPU).

Each part is a subprocess with a timeout, since a running XLA call cannot
be interrupted from Python: a part that runs over is killed and recorded as
``timeout``, with what it had printed, and the next one starts. A part's
timeout is its share of the time left of ``--budget`` (450 s), so time an
earlier part did not use goes to the later ones, and the whole run ends
within 8 minutes. This process never starts a JAX backend, which would hold
the GPU memory that the parts need.

Everything goes to ``--out`` (default ``$OUT`` if set, else
``runs/accelerator``): ``<part>.txt`` (its output), ``<part>.json`` (its
records, where the part writes any), ``device.json``, and ``summary.json``
(each part's command, status, return code and wall time) and
``summary.txt``, the summary that is also printed. ``--quick`` runs the same
parts at tiny sizes, on a CPU in about a minute or two.

    python -m benchmarks.accelerator                 # on the accelerator
    python -m benchmarks.accelerator --quick --parts device memory scale
    python -m benchmarks.accelerator --probe device.json   # the device part
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple, Sequence

import jax
import jaxlib

from benchmarks import workload

REPO = pathlib.Path(__file__).resolve().parent.parent
FAST_TESTS = ("tests/test_reference_match.py", "tests/test_polar.py",
              "tests/test_properties.py")
BUDGET_S = 450


class Part(NamedTuple):
  """One subprocess of the run: its name, arguments after ``python``, the
  share of the budget it may take, and whether it writes ``<name>.json``."""
  name: str
  args: tuple[str, ...]
  share: float
  writes_json: bool = True


def _step_time(d: int, dtype: str, quick: bool) -> tuple[str, ...]:
  """``step_time`` at one width and momentum dtype: every candidate but
  Orth-Dion's polar variant, which the issue does not ask for here."""
  sizes = (("--dims", str(d // 32), "--rank-fractions", "1/4", "--repeats",
            "1") if quick else
           ("--dims", str(d), "--rank-fractions", "1/4", "1/16", "--repeats",
            "3"))
  return ("-m", "benchmarks.step_time", *sizes, "--dtype", dtype,
          "--optimizers", "orth_dion", "dion", "muon", "adamw")


def plan(quick: bool) -> list[Part]:
  """The parts in the order they run; shares add up to 1."""
  memory = (("--dims", "64", "--rank-fractions", "1/4", "--dtype", "float32",
             "--optimizers", "orth_dion", "adamw") if quick else
            ("--dims", "4096", "--rank-fractions", "1/4", "--dtype",
             "float32", "bfloat16", "--optimizers", "orth_dion", "dion",
             "muon", "adamw"))
  scale = ("--quick",) if quick else ("--layers", "48", "--repeats", "3")
  tests = FAST_TESTS[-1:] if quick else FAST_TESTS
  # One part per width and dtype, so that a timeout loses one table.
  step_times = [Part(f"step_time_{d}_{dtype}", _step_time(d, dtype, quick),
                     share)
                for d, share in ((2048, 0.09), (4096, 0.10))
                for dtype in ("float32", "bfloat16")]
  return [
      Part("device", ("-m", "benchmarks.accelerator", "--probe"), 0.04),
      *step_times,
      Part("memory", ("-m", "benchmarks.memory", *memory), 0.06, False),
      Part("scale", ("-m", "benchmarks.scale", *scale), 0.34),
      Part("tests", ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                     *tests), 0.18, False),
  ]


def probe(path: pathlib.Path) -> None:
  """The ``device`` part: what runs the benchmarks, printed and at ``path``."""
  smi = None
  if shutil.which("nvidia-smi"):
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
         "clocks.max.sm", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30, check=False).stdout.strip()
  device = jax.devices()[0]
  info = {"description": workload.device_description(),
          "backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__,
          "default_matmul_precision": jax.config.jax_default_matmul_precision,
          "nvidia_smi": smi}
  print(json.dumps(info, indent=1))
  path.write_text(json.dumps(info, indent=1))


def _command(part: Part, out: pathlib.Path) -> list[str]:
  command = [sys.executable, *part.args]
  if part.name == "device":
    command.append(str(out / "device.json"))
  elif part.writes_json:
    command += ["--json", str(out / f"{part.name}.json")]
  return command


def _environment(out: pathlib.Path, part: Part) -> dict[str, str]:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(
      filter(None, [str(REPO), env.get("PYTHONPATH")]))
  device = out / "device.json"
  if part.name == "tests" and device.exists() and "JAX_PLATFORMS" not in env:
    env["JAX_PLATFORMS"] = json.loads(device.read_text())["backend"]
  return env


def run_part(part: Part, out: pathlib.Path, timeout_s: float) -> dict:
  """Runs ``part`` with its output in ``<name>.txt``; kills its process group
  after ``timeout_s``."""
  command = _command(part, out)
  start = time.perf_counter()
  with open(out / f"{part.name}.txt", "w") as log:
    process = subprocess.Popen(command, cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT,
                               env=_environment(out, part),
                               start_new_session=True)
    try:
      returncode = process.wait(timeout=timeout_s)
      status = "ok" if returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      returncode = process.wait()
      status = "timeout"
  return {"part": part.name, "command": command[1:], "status": status,
          "returncode": returncode, "timeout_s": timeout_s,
          "wall_s": time.perf_counter() - start}


def _tail(path: pathlib.Path, lines: int) -> list[str]:
  if not path.exists():
    return []
  return path.read_text(errors="replace").splitlines()[-lines:]


def _step_time_rows(out: pathlib.Path, names: Sequence[str]) -> list[list]:
  rows = []
  for name in names:
    path = out / f"{name}.json"
    if not path.exists():
      continue
    for record in json.loads(path.read_text())["records"]:
      if record["optimizer"] in workload.LOW_RANK:
        rows.append([record["dtype"], record["d"],
                     workload.fraction_label(record["rank_fraction"]),
                     record["optimizer"], 1e3 * record["time_s"],
                     record["x_roofline"], record["x_dion"],
                     record["x_muon"]])
  return rows


def summary(out: pathlib.Path, results: list[dict]) -> str:
  """The parts' outcomes, the low-rank ratios of ``step_time``, the end of
  ``scale``'s output (its targets) and of the tests'."""
  lines = [f"jax {jax.__version__}, jaxlib {jaxlib.__version__}"]
  device = out / "device.json"
  lines.append(json.loads(device.read_text())["description"]
               if device.exists() else "device: not probed")
  lines.append(workload.format_table(
      (("part", ""), ("status", ""), ("rc", "d"), ("wall s", ".1f"),
       ("timeout s", ".0f")),
      [[r["part"], r["status"], r["returncode"], r["wall_s"], r["timeout_s"]]
       for r in results]))
  rows = _step_time_rows(out, [r["part"] for r in results
                               if r["part"].startswith("step_time")])
  if rows:
    lines.append(workload.format_table(
        (("dtype", ""), ("d", "d"), ("rank", ""), ("optimizer", ""),
         ("ms", ".2f"), ("x roofline", ".2f"), ("x dion", ".2f"),
         ("x muon", ".3f")), rows))
  parts = {r["part"] for r in results}
  if "scale" in parts:
    lines += ["scale:"] + _tail(out / "scale.txt", 7)
  if "tests" in parts:
    lines += ["tests:"] + _tail(out / "tests.txt", 3)
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  names = [part.name for part in plan(quick=False)]
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(os.environ.get(
                          "OUT", REPO / "runs" / "accelerator")))
  parser.add_argument("--parts", nargs="+", choices=names, default=names)
  parser.add_argument("--budget", type=float, default=BUDGET_S,
                      help="seconds for all parts together")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, the last test file only: a CPU check")
  parser.add_argument("--probe", type=pathlib.Path, default=None,
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.probe is not None:
    probe(args.probe)
    return
  args.out.mkdir(parents=True, exist_ok=True)
  deadline = time.perf_counter() + args.budget
  parts = [part for part in plan(args.quick) if part.name in args.parts]
  unspent = sum(part.share for part in parts)
  results = []
  for part in parts:
    # Its share of what is left: time an earlier part did not use is shared
    # among the later ones.
    timeout_s = (deadline - time.perf_counter()) * part.share / unspent
    unspent -= part.share
    if timeout_s < 1:
      results.append({"part": part.name, "command": part.args,
                      "status": "no time left",
                      "returncode": None, "timeout_s": 0.0, "wall_s": 0.0})
      continue
    results.append(run_part(part, args.out, timeout_s))
    print(f"  {part.name}: {results[-1]['status']} in "
          f"{results[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
  text = summary(args.out, results)
  (args.out / "summary.json").write_text(json.dumps(
      {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
       "budget_s": args.budget, "argv": sys.argv[1:], "parts": results},
      indent=1))
  (args.out / "summary.txt").write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
