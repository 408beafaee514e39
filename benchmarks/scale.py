"""Compile time and step time against depth, with layers unscanned and scanned.

A model of L layers of width d holds, per layer, the attention projections
q, k, v, o (``d x d``) and the MLP's ``d x 4d`` and ``4d x d``: 6 L matrices
in the Flax layout ``(fan_in, fan_out)``, in one of two layouts:

* ``unscanned``: one 2-D leaf per matrix per layer (6 L leaves), as a model
  whose layers are a Python loop;
* ``scanned``: one leaf per matrix kind with a leading layer axis, ``(L, m,
  n)`` (6 leaves), as ``nnx.scan`` stacks them. Orth-Dion and Dion get
  ``layer_axes=1``; Muon gets ``MuonDimensionNumbers`` with the layer axis as
  a batch axis; AdamW, which is elementwise, nothing.

Both layouts hold the same matrices; only the number of leaves differs. For
AdamW, optax Muon, Orth-Dion and Dion, in each layout and at each L:

* **compile**: the wall time of ``jax.jit(update).lower(...).compile()``
  on a fresh ``jax.jit`` (so no in-memory cache; the persistent compilation
  cache is switched off), for the update of ``workload``: parameters and
  state donated. ``trace s`` is the part up to the lowered module (Python
  tracing and lowering), ``compile s`` the whole;
* **step**: the median of ``--repeats`` calls of that compiled update. All
  candidates of one L, both layouts, take turns call by call
  (``workload.time_round_robin``), so the ratios between them hold on a
  noisy machine;
* **temp MiB**: the temporaries XLA assigned to the compiled update
  (``memory_analysis()``), its working memory beyond the donated parameters
  and state;

and the two ratios the layouts are judged by, with their targets: each
optimizer's unscanned compile over Muon's unscanned compile (Orth-Dion's
target: at most 1), and its unscanned step over its scanned step (target: at
most 1.1), read at the largest L.

    python -m benchmarks.scale                        # L = 4, 16, 48
    python -m benchmarks.scale --layers 48 --optimizers orth_dion muon \\
        --json runs/scale.json
    python -m benchmarks.scale --quick                # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import workload

OPTIMIZERS = ("adamw", "muon", "orth_dion", "dion")
# Leading axes that stack layers in each layout.
LAYER_AXES = {"unscanned": 0, "scanned": 1}
# The targets for Orth-Dion at the largest L.
COMPILE_TARGET = 1.0
STEP_TARGET = 1.1

# As in workload: step sizes do not change the cost of an update.
_LEARNING_RATE = 0.01


def layer_shapes(d: int) -> workload.Shapes:
  """One layer's matrices, ``(fan_in, fan_out)``."""
  return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
          "mlp_in": (d, 4 * d), "mlp_out": (4 * d, d)}


def model_shapes(d: int, layers: int, layout: str
                 ) -> dict[str, tuple[int, ...]]:
  """Leaf shapes of ``layers`` layers in ``layout``."""
  block = layer_shapes(d)
  if LAYER_AXES[layout]:
    return {name: (layers, *shape) for name, shape in block.items()}
  return {f"layer_{index:02d}_{name}": shape
          for index in range(layers) for name, shape in block.items()}


def matrix_counts(shapes: dict[str, tuple[int, ...]], layout: str
                  ) -> dict[str, int]:
  """How many matrices of each shape ``"m x n"`` the leaves hold."""
  axes = LAYER_AXES[layout]
  counts = collections.Counter()
  for shape in shapes.values():
    counts[" x ".join(map(str, shape[axes:]))] += math.prod(shape[:axes])
  return dict(sorted(counts.items()))


def optimizer(name: str, layout: str, *, rank_fraction: float,
              momentum_dtype) -> optax.GradientTransformation:
  """``workload.optimizer(name)``, told which axes stack layers."""
  axes = LAYER_AXES[layout]
  if name in workload.LOW_RANK:
    return workload.optimizer(name, rank_fraction=rank_fraction,
                              momentum_dtype=momentum_dtype, layer_axes=axes)
  if name == "muon" and axes:
    # Without dimension numbers optax's Muon hands every non-2-D leaf to Adam.
    numbers = optax.contrib.MuonDimensionNumbers(reduction_axis=axes,
                                                 output_axis=axes + 1)
    return optax.contrib.muon(
        _LEARNING_RATE, mu_dtype=momentum_dtype,
        muon_weight_dimension_numbers=lambda params: jax.tree.map(
            lambda _: numbers, params))
  return workload.optimizer(name, rank_fraction=rank_fraction,
                            momentum_dtype=momentum_dtype)


class TimedUpdate(workload.DonatedUpdate):
  """``workload.DonatedUpdate`` that times its own compilation.

  The update is compiled once, here, so that the executable that is timed is
  the one whose compilation was timed.
  """

  def __init__(self, tx: optax.GradientTransformation, params, grads):
    start = time.perf_counter()
    abstract_params = workload.abstract(params)
    lowered = jax.jit(workload.train_step(tx), donate_argnums=(0, 1)).lower(
        abstract_params, jax.eval_shape(tx.init, abstract_params),
        workload.abstract(grads))
    self.trace_s = time.perf_counter() - start
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    # The temporaries XLA assigned to the update (parameters and state are
    # donated, so what is left is the working memory of the step).
    memory = self.compiled.memory_analysis()
    self.temp_bytes = getattr(memory, "temp_size_in_bytes", None)
    self.params = jax.tree.map(jnp.copy, params)
    self.state = tx.init(self.params)
    self.grads = grads


def measure(d: int, layers: int, layouts, optimizers, rank_fraction: float,
            dtype: str, repeats: int) -> list[dict]:
  """Records of one L: every optimizer in every layout."""
  runners, records = {}, {}
  for layout in layouts:
    shapes = model_shapes(d, layers, layout)
    params, grads = workload.weight_set(shapes)
    for name in optimizers:
      tx = optimizer(name, layout, rank_fraction=rank_fraction,
                     momentum_dtype=jnp.dtype(dtype))
      runner = runners[layout, name] = TimedUpdate(tx, params, grads)
      print(f"  compiled {name}, {layers} layers {layout}: "
            f"{runner.compile_s:.1f} s", file=sys.stderr, flush=True)
      records[layout, name] = {
          "optimizer": name, "layout": layout, "layers": layers, "d": d,
          "rank_fraction": rank_fraction, "dtype": dtype,
          "leaves": len(shapes), "matrices": layers * len(layer_shapes(d)),
          "matrix_counts": matrix_counts(shapes, layout),
          "trace_s": runner.trace_s, "compile_s": runner.compile_s,
          "temp_bytes": runner.temp_bytes}
  times = workload.time_round_robin(runners, repeats)
  for key, record in records.items():
    record.update(step_s=workload.median(times[key]), steps_s=times[key],
                  spread=workload.spread(times[key]))
  for (layout, name), record in records.items():
    muon = records.get((layout, "muon"))
    scanned = records.get(("scanned", name))
    record["x_muon_compile"] = (None if muon is None else
                                record["compile_s"] / muon["compile_s"])
    record["x_scanned_step"] = (None if scanned is None else
                                record["step_s"] / scanned["step_s"])
  return list(records.values())


_DETAIL_COLUMNS = (
    ("layers", "d"), ("layout", ""), ("matrices", "d"), ("leaves", "d"),
    ("optimizer", ""), ("trace s", ".2f"), ("compile s", ".2f"),
    ("step ms", ".1f"), ("spread", ".0%"), ("temp MiB", ".0f"),
    ("compile / muon", ".2f"), ("step / scanned", ".2f"))


def _detail_row(record: dict) -> list[object]:
  return [record["layers"], record["layout"], record["matrices"],
          record["leaves"], record["optimizer"], record["trace_s"],
          record["compile_s"], 1e3 * record["step_s"], record["spread"],
          None if record["temp_bytes"] is None else record["temp_bytes"] / 2**20,
          record["x_muon_compile"], record["x_scanned_step"]]


def summary_table(records: list[dict], optimizers) -> str:
  """One row per L and layout: each optimizer's compile s / step ms."""
  columns = [("layers", "d"), ("layout", ""), ("matrices", "d")]
  for name in optimizers:
    columns += [(f"{name} compile s", ".2f"), (f"{name} step ms", ".1f")]
  by_row = collections.defaultdict(dict)
  for record in records:
    by_row[record["layers"], record["layout"], record["matrices"]][
        record["optimizer"]] = record
  rows = []
  for (layers, layout, matrices), found in by_row.items():
    row = [layers, layout, matrices]
    for name in optimizers:
      row += [found[name]["compile_s"], 1e3 * found[name]["step_s"]]
    rows.append(row)
  return workload.format_table(columns, rows)


def _verdict(value: float | None, target: float) -> str:
  if value is None:
    return "-"
  return f"{value:.2f} ({'met' if value <= target else 'not met'})"


def target_table(records: list[dict], optimizers) -> str:
  """Both ratios of each optimizer at the largest L, against the targets."""
  layers = max(record["layers"] for record in records)
  unscanned = {record["optimizer"]: record for record in records
               if (record["layers"], record["layout"]) == (layers,
                                                           "unscanned")}
  rows = [[name, unscanned[name]["x_muon_compile"],
           unscanned[name]["x_scanned_step"]]
          for name in optimizers if name in unscanned]
  orth_dion = unscanned.get("orth_dion")
  lines = [f"At {layers} layers, unscanned (targets for Orth-Dion: compile "
           f"/ Muon's <= {COMPILE_TARGET}, step / scanned <= {STEP_TARGET}):",
           workload.format_table(
               (("optimizer", ""), ("compile / muon's", ".2f"),
                ("step / scanned", ".2f")), rows)]
  if orth_dion is not None:
    lines.append(
        "orth_dion: compile / Muon's = "
        f"{_verdict(orth_dion['x_muon_compile'], COMPILE_TARGET)}, "
        "step / scanned = "
        f"{_verdict(orth_dion['x_scanned_step'], STEP_TARGET)}")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 48])
  parser.add_argument("--d", type=int, default=256, help="model width")
  parser.add_argument("--optimizers", nargs="+", choices=workload.OPTIMIZERS,
                      default=list(OPTIMIZERS))
  parser.add_argument("--layouts", nargs="+", choices=list(LAYER_AXES),
                      default=list(LAYER_AXES))
  parser.add_argument("--rank-fraction", type=workload.parse_fraction,
                      default=0.25, help="Orth-Dion/Dion rank, e.g. 1/4")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"], help="momentum dtype")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed calls per candidate, after one warm-up")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the records here")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: d = 16, 2 layers, 2 repeats")
  args = parser.parse_args(argv)
  if args.quick:
    args.d, args.layers, args.repeats = 16, [2], 2
  jax.config.update("jax_enable_compilation_cache", False)
  print(workload.device_description(), flush=True)
  print(f"d = {args.d}, rank {workload.fraction_label(args.rank_fraction)}, "
        f"momentum {args.dtype}, {args.repeats} repeats", flush=True)
  records = []
  for layers in args.layers:
    records += measure(args.d, layers, args.layouts, args.optimizers,
                       args.rank_fraction, args.dtype, args.repeats)
  print(summary_table(records, args.optimizers))
  print(workload.format_table(_DETAIL_COLUMNS,
                              [_detail_row(r) for r in records]))
  print(target_table(records, args.optimizers))
  workload.write_json(args.json, records)


if __name__ == "__main__":
  main()
