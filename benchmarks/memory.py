"""Optimizer state and temporary memory of each update, from the compiler alone.

Per weight set and optimizer:

* state bytes per parameter: the state's leaves summed, over the set's
  parameter count. Orth-Dion's floor is its momentum plus the float32 right
  factor, ``m n + min(m, n) r`` numbers per matrix; AdamW keeps ``2 m n``.
* temporaries: ``temp_size_in_bytes`` of the compiled, donated update
  (``compiled.memory_analysis()``), also in units of one float32 ``m x n``
  array per matrix of the set;
* donated: the share of parameters and state whose buffers the update reuses
  for its outputs (``alias_size_in_bytes``); below 100% the update allocates
  fresh copies.

Nothing is run and nothing of the weight set's size is allocated (the update
is compiled from shapes), so this is quick at any size:

    python -m benchmarks.memory --dims 512 1024 2048 --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import workload


def tree_nbytes(tree: Any) -> int:
  """Bytes of all array leaves; works on arrays and ShapeDtypeStructs."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def compiled_memory(compiled) -> dict[str, int] | None:
  """Argument, output, alias and temp bytes of a compiled function, or None
  where the backend does not report them."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if stats is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "temp_size_in_bytes")
  return {field.removesuffix("_size_in_bytes"): getattr(stats, field, None)
          for field in fields}


def low_rank_floor(shapes: workload.Shapes, rank_fraction: float,
                   momentum_dtype) -> int:
  """Bytes of ``m n`` momentum entries plus ``min(m, n) r`` float32 ones."""
  itemsize = jnp.dtype(momentum_dtype).itemsize
  return sum(m * n * itemsize + 4 * min(m, n) * workload.rank((m, n),
                                                              rank_fraction)
             for m, n in shapes.values())


def memory_record(shapes: workload.Shapes, params, state, compiled
                  ) -> dict[str, float | int | None]:
  """The memory columns of one optimizer's update on one weight set."""
  n = workload.num_params(shapes)
  state_bytes = tree_nbytes(state)
  stats = compiled_memory(compiled)
  temp = None if stats is None else stats["temp"]
  alias = None if stats is None else stats["alias"]
  donatable = tree_nbytes(params) + state_bytes
  return {
      "state_bytes": state_bytes,
      "state_bytes_per_param": state_bytes / n,
      "temp_bytes": temp,
      # One float32 m x n array per matrix of the set is 4 n bytes.
      "temp_per_matrix_f32": None if temp is None else temp / (4 * n),
      "alias_bytes": alias,
      "donated_fraction": None if alias is None else alias / donatable,
  }


_COLUMNS = (("dtype", ""), ("d", "d"), ("rank", ""), ("optimizer", ""),
            ("state B/param", ".3f"), ("floor B/param", ".3f"),
            ("x adamw state", ".3f"), ("temp MiB", ".1f"),
            ("temp [mn f32]", ".3f"), ("donated", ".0%"))


def _rows(dtype: str, d: int, rank_fractions, orthogonalize, optimizers
          ) -> list[list[object]]:
  """Low-rank optimizers per rank fraction, then the full-rank ones once."""
  shapes = workload.weight_shapes(d)
  params = {name: jax.ShapeDtypeStruct(shape, jnp.float32)
            for name, shape in shapes.items()}
  runs = [(name, f) for f in rank_fractions for name in optimizers
          if name in workload.LOW_RANK]
  runs += [(name, None) for name in optimizers
           if name not in workload.LOW_RANK]
  records = []
  for name, rank_fraction in runs:
    tx = workload.optimizer(name, rank_fraction=rank_fraction,
                            momentum_dtype=jnp.dtype(dtype),
                            orthogonalize=orthogonalize)
    compiled = workload.compile_update(tx, params, params)
    records.append((name, rank_fraction, memory_record(
        shapes, params, jax.eval_shape(tx.init, params), compiled)))
  adamw = [rec for name, _, rec in records if name == "adamw"]
  rows = []
  for name, rank_fraction, rec in records:
    temp = rec["temp_bytes"]
    floor = None if rank_fraction is None else low_rank_floor(
        shapes, rank_fraction, dtype) / workload.num_params(shapes)
    rows.append([
        dtype, d,
        None if rank_fraction is None else workload.fraction_label(
            rank_fraction),
        name, rec["state_bytes_per_param"], floor,
        rec["state_bytes"] / adamw[0]["state_bytes"] if adamw else None,
        None if temp is None else temp / 2**20,
        rec["temp_per_matrix_f32"], rec["donated_fraction"]])
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048])
  parser.add_argument("--rank-fractions", type=workload.parse_fraction,
                      nargs="+", default=[0.5, 0.25, 1 / 16])
  parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"],
                      help="momentum dtype(s) (momentum_dtype / mu_dtype)")
  parser.add_argument("--orthogonalize", default=None,
                      help="Orth-Dion/Dion orthonormalization method "
                      "(default: the package's)")
  parser.add_argument("--optimizers", nargs="+", default=list(
      workload.OPTIMIZERS), choices=workload.OPTIMIZERS)
  args = parser.parse_args(argv)
  print(workload.device_description())
  rows = []
  for dtype in args.dtype:
    for d in args.dims:
      rows += _rows(dtype, d, args.rank_fractions, args.orthogonalize,
                    args.optimizers)
  print(workload.format_table(_COLUMNS, rows))


if __name__ == "__main__":
  main()
