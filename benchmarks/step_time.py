"""Update time of Orth-Dion (QR or polar right factor), Dion, Muon and AdamW
against the matmul roofline.

For each width d (a weight set ``d x d``, ``d x 4d``, ``4d x d``), momentum
dtype and rank fraction, the table gives each optimizer's median update time
and its ratios:

* ``x roofline``: to the low-rank step's four products per matrix (8 m n r
  flops) run as plain jitted matmuls, timed in the same run. The ``roofline``
  row is that time; ``GFLOP/s`` is the matmul rate it implies;
* ``x muon`` and ``x dion``: to ``optax.contrib.muon`` and to Dion;
* ``x qr``: to Orth-Dion with its QR right factor (``orth_dion``); the
  ``orth_dion_polar`` row is Orth-Dion with ``right_factor="polar"``;
* the memory columns of ``benchmarks.memory`` for the same compiled update.

Muon and AdamW do not depend on the rank: they are timed once per d and dtype
and repeated in each rank block. All candidates of one d take turns call by
call (``workload.time_round_robin``), so the ratios hold on a noisy machine;
``spread`` is (max - min) / median of a candidate's runs.

On CPU the low-rank updates depend on the BLAS threads of jaxlib's LAPACK
calls, which the package limits to one unless a thread variable says otherwise
(``orth_dion_jax/blas_threads.py``); the header line records the variables.

    python -m benchmarks.step_time                      # the full table
    python -m benchmarks.step_time --quick              # a smoke run
    python -m benchmarks.step_time --dims 2048 --rank-fractions 1/4 \
        --dtype float32 bfloat16 --json runs/step_time.json
    python -m benchmarks.step_time --dims 2048 --rank-fractions 1/4 \
        --optimizers orth_dion orth_dion_polar      # polar against QR
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax.numpy as jnp

from benchmarks import memory
from benchmarks import workload
from orth_dion_jax import ORTHOGONALIZE_METHODS as METHODS

ROOFLINE = "roofline"
_FULL_RANK = ("muon", "adamw")

_COLUMNS = (("dtype", ""), ("d", "d"), ("rank", ""), ("optimizer", ""),
            ("ms", ".1f"), ("spread", ".0%"), ("GFLOP/s", ".1f"),
            ("x roofline", ".2f"), ("x muon", ".3f"), ("x dion", ".2f"),
            ("x qr", ".3f"),
            ("state B/param", ".3f"), ("temp MiB", ".1f"),
            ("temp [mn f32]", ".2f"))

# Reference ratios the d = 2048, rank 1/4, float32 case is compared with.
_TARGETS = {
    "orth_dion": (("x_roofline", 1.4), ("x_dion", 1.10), ("x_muon", 0.10),
                  ("temp_per_matrix_f32", 1.0)),
    "orth_dion_polar": (("x_qr", 1.10),),
}


def _key(name: str, rank_fraction: float) -> tuple[str, float | None]:
  """Runners are keyed by (name, rank fraction), None for rank-free ones."""
  return name, None if name in _FULL_RANK else rank_fraction


def _candidates(d: int, rank_fractions, dtype: str, orthogonalize,
                optimizers) -> dict[tuple[str, float | None], object]:
  shapes = workload.weight_shapes(d)
  params, grads = workload.weight_set(shapes)
  runners = {}
  for rank_fraction in rank_fractions:
    runners[ROOFLINE, rank_fraction] = workload.roofline_products(
        shapes, rank_fraction)
    for name in optimizers:
      key = _key(name, rank_fraction)
      if key not in runners:
        runners[key] = workload.DonatedUpdate(
            workload.optimizer(name, rank_fraction=rank_fraction,
                               momentum_dtype=jnp.dtype(dtype),
                               orthogonalize=orthogonalize), params, grads)
  return runners


def _ratio(time: float, reference: dict | None) -> float | None:
  return None if reference is None else time / reference["time_s"]


def measure(d: int, rank_fractions, dtype: str, orthogonalize, optimizers,
            repeats: int) -> list[dict]:
  """Records of one width and dtype: every candidate, every rank fraction."""
  shapes = workload.weight_shapes(d)
  runners = _candidates(d, rank_fractions, dtype, orthogonalize, optimizers)
  times = workload.time_round_robin(runners, repeats)
  records = []
  for rank_fraction in rank_fractions:
    flops = workload.low_rank_flops(shapes, rank_fraction)
    roofline_s = workload.median(times[ROOFLINE, rank_fraction])
    by_name = {}
    for name in (ROOFLINE, *optimizers):
      key = _key(name, rank_fraction)
      record = {
          "dtype": dtype, "d": d, "rank_fraction": rank_fraction,
          "ranks": {m: workload.rank(s, rank_fraction)
                    for m, s in shapes.items()},
          "optimizer": name,
          "orthogonalize": orthogonalize if name in workload.LOW_RANK else None,
          "time_s": workload.median(times[key]), "times_s": times[key],
          "spread": workload.spread(times[key]),
          "roofline_s": roofline_s, "low_rank_flops": flops,
          "matmul_gflops": flops / roofline_s / 1e9,
      }
      runner = runners[key]
      if isinstance(runner, workload.DonatedUpdate):
        record.update(memory.memory_record(
            shapes, runner.params, runner.state, runner.compiled))
      by_name[name] = record
    for record in by_name.values():
      record["x_roofline"] = record["time_s"] / roofline_s
      record["x_muon"] = _ratio(record["time_s"], by_name.get("muon"))
      record["x_dion"] = _ratio(record["time_s"], by_name.get("dion"))
      record["x_qr"] = _ratio(record["time_s"], by_name.get("orth_dion"))
    records += by_name.values()
  return records


def _row(record: dict) -> list[object]:
  name = record["optimizer"]
  temp = record.get("temp_bytes")
  return [
      record["dtype"], record["d"],
      workload.fraction_label(record["rank_fraction"]), name,
      1e3 * record["time_s"], record["spread"],
      record["matmul_gflops"] if name == ROOFLINE else None,
      record["x_roofline"],
      record["x_muon"], record["x_dion"], record["x_qr"],
      record.get("state_bytes_per_param"),
      None if temp is None else temp / 2**20,
      record.get("temp_per_matrix_f32")]


def _target_lines(records: list[dict]) -> list[str]:
  lines = []
  for record in records:
    name = record["optimizer"]
    if (name not in _TARGETS or (record["d"], record["rank_fraction"],
                                 record["dtype"]) != (2048, 0.25, "float32")):
      continue
    for field, bound in _TARGETS[name]:
      value = record.get(field)
      verdict = ("n/a" if value is None else
                 "at or below" if value <= bound else "above")
      shown = "-" if value is None else f"{value:.3f}"
      lines.append(f"  {name} {field} = {shown} (reference {bound}: "
                   f"{verdict})")
  return lines


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048])
  parser.add_argument("--rank-fractions", type=workload.parse_fraction,
                      nargs="+", default=[0.5, 0.25, 1 / 16],
                      help="e.g. 1/2 1/4 0.0625")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed calls per candidate, after one warm-up")
  parser.add_argument("--dtype", nargs="+", default=["float32"],
                      choices=["float32", "bfloat16"],
                      help="momentum dtype(s) (momentum_dtype / mu_dtype)")
  parser.add_argument("--orthogonalize", default=None, choices=METHODS,
                      help="Orth-Dion/Dion method (default: the package's)")
  parser.add_argument("--optimizers", nargs="+", choices=workload.OPTIMIZERS,
                      default=list(workload.OPTIMIZERS))
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the records here")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: d = 128, 256 and 2 repeats")
  args = parser.parse_args(argv)
  if args.quick:
    args.dims, args.repeats = [128, 256], 2
  print(workload.device_description(), flush=True)
  records = []
  for dtype in args.dtype:
    for d in args.dims:
      records += measure(d, args.rank_fractions, dtype, args.orthogonalize,
                         args.optimizers, args.repeats)
      print(f"  measured d = {d}, {dtype}", file=sys.stderr, flush=True)
  print(workload.format_table(_COLUMNS, [_row(r) for r in records]))
  targets = _target_lines(records)
  if targets:
    print("Against reference ratios (d = 2048, rank 1/4, float32):")
    print("\n".join(targets))
  workload.write_json(args.json, records)


if __name__ == "__main__":
  main()
