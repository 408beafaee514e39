"""Bytes per device and step each optimizer moves on a 1024-device pod.

What is measured: for one transformer layer of Llama-3 8B, 70B and 405B
(``layer_shapes``: the seven matrices and two norm scales, float32), the
payload bytes per device that one optimizer step moves across each axis of a
mesh data x fsdp x tensor = 8 x 16 x 8, for Orth-Dion, Dion, Muon
(``optax.contrib.muon``) and AdamW, and the time those bytes take at stated
link bandwidths. The step is the optimizer's part of a train step:
``(params, state, grads) -> (params, state)``.

How: the step is compiled, never run, for 1024 simulated CPU devices
(``jax_num_cpu_devices``; the weights are ``jax.ShapeDtypeStruct``s carrying
their shardings, so nothing is allocated), and every collective of the
optimized program is read with ``orth_dion_jax.communication`` (payload bytes
per device, see its docstring). Collectives are inserted by the SPMD
partitioner during compilation, so the lowered StableHLO would not show them;
compiling for 1024 fake devices takes seconds per step on 2 cores, so no
smaller mesh and no scaling law is needed. Collectives inside ``lax.cond``
branches (the Householder fallback of CholeskyQR2) run only when taken and
are reported apart (``cond MB``), not in the bytes per step. A collective
whose device groups span several axes counts in each of their columns, once
in ``total MB``.

Layout (MaxText / Megatron): column-parallel ``(d, out)`` weights (q, k, v,
gate, up) split ("fsdp", "tensor"), row-parallel ``(in, d)`` ones (o, down)
split ("tensor", "fsdp"), norm scales replicated; "data" replicates the
weights. The gradients come in per replica, ``(replicas, *shape)`` split
("data", ...), already reduced over "fsdp" by the backward pass (the same for
every optimizer, not counted). Two layouts:

* ``plain``: the gradients are averaged over "data" (the dense gradient
  all-reduce, ``data_parallel.average_replicas``) and then the optimizer
  runs; the all-reduce is counted, for every optimizer.
* ``compressed``: Orth-Dion and Dion with ``data_axis="data"``: each replica
  keeps its momentum and only the factors ``P`` and ``R`` are averaged.

``ideal`` is what the "data" column should read from the block sizes alone
(``data_ideal_bytes``): the device's block of every gradient (plain), or of
``P`` and ``R`` (compressed). ``P`` is split only along the axis that splits
the big side of its matrix and ``R`` along the small side's, so each device
averages a factor block that is replicated over the other model axis: per
device, compressed data parallelism moves less than the plain all-reduce only
when ``r (m / s_m + n / s_n) < m n / (s_m s_n)`` (at 8 x 16 x 8, rank
fractions below 1/24 to 1/12, depending on the matrix).

Whole model: each matrix's step is its own collectives (XLA may combine
several matrices' all-reduces into one instruction; the bytes add), so a
model's bytes are one layer's times the layer count; ``--check-layers 2``
compiles two layers and checks that they move twice one layer's bytes.
Embeddings and the LM head are not included (AdamW under every optimizer).

Time (``link_seconds``): each collective is run on its own, without overlap or
latency, as a ring over its group of ``g`` devices: a device sends
``2 (g - 1) / g`` times an all-reduce's payload, ``(g - 1) / g`` times an
all-gather's, reduce-scatter's or all-to-all's and a permute's payload once,
at the bandwidth of the slowest axis its group spans. Defaults: "tensor" is
the 8 GPUs of a node at 100 GB/s per GPU; "fsdp" and "data" cross nodes at
25 GB/s (``--bandwidth AXIS=GB/s``).

Muon and AdamW know no mesh, so they run on ``Auto`` axes and the
partitioner places their step (benchmarks.communication); Orth-Dion and Dion
run on ``Explicit`` axes with the mesh given.

    python -m benchmarks.pod_communication --json runs/pod_communication.json
    python -m benchmarks.pod_communication --models 8b --rank-fractions 1/4
    python -m benchmarks.pod_communication --quick
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from typing import NamedTuple

import jax
from jax.sharding import PartitionSpec

from benchmarks import communication as layouts
from benchmarks import workload
from orth_dion_jax import communication

DATA, FSDP, TENSOR = layouts.DATA, layouts.FSDP, layouts.TENSOR
PLAIN, COMPRESSED = layouts.PLAIN, layouts.COMPRESSED
AXES = (DATA, FSDP, TENSOR)
POD_MESH = (8, 16, 8)
QUICK_MESH = (2, 2, 2)
BANDWIDTH_GB_S = {DATA: 25.0, FSDP: 25.0, TENSOR: 100.0}
_BYTES = 4  # float32
_MB = 1e6

COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")  # (d, out): ("fsdp", "tensor")
ROW_PARALLEL = ("o", "down")                     # (in, d): ("tensor", "fsdp")

_COLUMNS = (
    ("rank", ""), ("optimizer", ""), ("layout", ""), ("data MB", ",.3f"),
    ("fsdp MB", ",.3f"), ("tensor MB", ",.3f"), ("total MB", ",.3f"),
    ("ms", ",.2f"), ("data / ideal", ".4f"), ("cond MB", ",.3f"))


class Model(NamedTuple):
  """A Llama-3-like decoder's layer geometry."""
  name: str
  d: int          # model width
  layers: int
  heads: int      # query heads
  kv_heads: int
  mlp: int        # MLP hidden width
  head_dim: int = 128


MODELS = {m.name: m for m in (
    Model("8b", d=4096, layers=32, heads=32, kv_heads=8, mlp=14336),
    Model("70b", d=8192, layers=80, heads=64, kv_heads=8, mlp=28672),
    Model("405b", d=16384, layers=126, heads=128, kv_heads=8, mlp=53248),
)}
QUICK_MODEL = Model("quick", d=256, layers=2, heads=4, kv_heads=2, mlp=512,
                    head_dim=64)


def layer_shapes(model: Model) -> dict[str, tuple[int, ...]]:
  """One layer's weights, ``(fan_in, fan_out)``, and its two norm scales."""
  d, q, kv = model.d, model.heads * model.head_dim, (
      model.kv_heads * model.head_dim)
  return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d),
          "gate": (d, model.mlp), "up": (d, model.mlp),
          "down": (model.mlp, d), "attn_norm": (d,), "mlp_norm": (d,)}


def stacked_layers(shapes: dict, copies: int) -> dict:
  """``copies`` layers as separate leaves, ``layer{i}_{name}``."""
  return {f"layer{i}_{name}": shape for i in range(copies)
          for name, shape in shapes.items()}


def layer_specs(leaves) -> dict[str, PartitionSpec]:
  """Megatron's splits over ("fsdp", "tensor") of ``stacked_layers``'
  leaves; norm scales replicated."""
  def spec(leaf):
    role = leaf.split("_", 1)[1]
    if role in COLUMN_PARALLEL:
      return PartitionSpec(FSDP, TENSOR)
    if role in ROW_PARALLEL:
      return PartitionSpec(TENSOR, FSDP)
    return PartitionSpec()
  return {leaf: spec(leaf) for leaf in leaves}


def _split(spec: PartitionSpec, dim: int, mesh_shape: dict) -> int:
  """How many blocks the mesh cuts dimension ``dim`` of ``spec`` into."""
  axis = spec[dim] if dim < len(spec) else None
  return 1 if axis is None else mesh_shape[axis]


def data_ideal_bytes(shapes: dict, specs: dict, mesh_shape: dict,
                     layout: str, rank_fraction: float | None) -> int:
  """Bytes per device crossing "data" by the block sizes alone.

  Plain: the device's block of every gradient. Compressed: the device's
  blocks of ``P`` (big side x r, split as the big side) and ``R`` (small
  side x r, split as the small side) for each matrix that compresses, the
  gradient block of the others.
  """
  total = 0
  for name, shape in shapes.items():
    splits = [_split(specs[name], i, mesh_shape) for i in range(len(shape))]
    block = math.prod(n // s for n, s in zip(shape, splits))
    if layout == COMPRESSED and len(shape) == 2:
      r = workload.rank(shape, rank_fraction)
      if sum(shape) * r < math.prod(shape):
        block = r * sum(n // s for n, s in zip(shape, splits))
    total += _BYTES * block
  return total


def link_seconds(op: communication.CollectiveOp,
                 bandwidth_gb_s: dict[str, float]) -> float:
  """One collective's time as a ring at its slowest axis' bandwidth."""
  g = op.group_size
  sent = {"all-reduce": 2 * (g - 1) / g,
          "collective-permute": 1.0}.get(op.kind, (g - 1) / g) * op.bytes
  return sent / (1e9 * min(bandwidth_gb_s[a] for a in op.axes))


def measure(model: Model, name: str, layout: str,
            rank_fraction: float | None, mesh: jax.sharding.Mesh,
            bandwidth_gb_s: dict[str, float], copies: int = 1) -> dict:
  """One optimizer's compiled step over ``copies`` layers: bytes crossing
  each axis and link time, per device, for those layers."""
  shapes = stacked_layers(layer_shapes(model), copies)
  specs = layer_specs(shapes)
  records, branches = layouts.step_collectives(
      name, layout, rank_fraction, mesh, shapes, specs, mesh.shape[DATA],
      mesh_when_plain=True)
  records = [r for r in records if r.bytes]
  per_step = [r for r in records if r.name not in branches]
  return {
      "model": model.name, "optimizer": name, "layout": layout,
      "rank_fraction": rank_fraction, "layers_compiled": copies,
      "mesh": dict(mesh.shape),
      "crossing": {axis: communication.bytes_crossing(per_step, axis)
                   for axis in AXES},
      "total_bytes": sum(r.bytes for r in per_step),
      "seconds": sum(link_seconds(r, bandwidth_gb_s) for r in per_step),
      "cond_bytes": sum(r.bytes for r in records if r.name in branches),
      "data_ideal_bytes": data_ideal_bytes(shapes, specs, dict(mesh.shape),
                                           layout, rank_fraction),
      "records": [r._asdict() for r in per_step],
  }


def runs(optimizers, rank_fractions):
  """(optimizer, layout, rank fraction): Muon and AdamW once, plain only."""
  found = [(name, layout, f) for f in rank_fractions for name in optimizers
           if name in workload.LOW_RANK for layout in (PLAIN, COMPRESSED)]
  return found + [(name, PLAIN, None) for name in optimizers
                  if name not in workload.LOW_RANK]


def table_rows(records, layers: int):
  """One row per record, bytes and time scaled from one layer to ``layers``."""
  rows = []
  for r in records:
    scale = layers / r["layers_compiled"]
    rank = (None if r["rank_fraction"] is None
            else workload.fraction_label(r["rank_fraction"]))
    rows.append([
        rank, r["optimizer"], r["layout"],
        *(scale * r["crossing"][axis] / _MB for axis in AXES),
        scale * r["total_bytes"] / _MB, 1e3 * scale * r["seconds"],
        r["crossing"][DATA] / r["data_ideal_bytes"],
        scale * r["cond_bytes"] / _MB])
  return rows


def _bandwidth(text: str) -> tuple[str, float]:
  axis, _, value = text.partition("=")
  if axis not in AXES or not value:
    raise argparse.ArgumentTypeError(f"expected AXIS=GB/s with AXIS one of "
                                     f"{AXES}, got {text!r}")
  return axis, float(value)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", choices=list(MODELS),
                      default=list(MODELS))
  parser.add_argument("--rank-fractions", type=workload.parse_fraction,
                      nargs="+", default=[0.25, 1 / 16, 1 / 64],
                      help="e.g. 1/4 0.0625")
  parser.add_argument("--mesh", type=int, nargs=3, default=list(POD_MESH),
                      metavar=("DATA", "FSDP", "TENSOR"))
  parser.add_argument("--optimizers", nargs="+", default=["orth_dion", "dion",
                      "muon", "adamw"], choices=workload.OPTIMIZERS)
  parser.add_argument("--bandwidth", type=_bandwidth, action="append",
                      default=[], help="AXIS=GB/s per device, e.g. fsdp=50")
  parser.add_argument("--check-layers", type=int, default=0, metavar="N",
                      help="also compile N layers of the first model and "
                      "compare with N times one layer")
  parser.add_argument("--quick", action="store_true",
                      help=f"d = {QUICK_MODEL.d} on a {QUICK_MESH} mesh, "
                      "rank 1/4")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the records here")
  args = parser.parse_args(argv)
  models = [MODELS[m] for m in args.models]
  mesh_shape = args.mesh
  if args.quick:
    models, mesh_shape, args.rank_fractions = [QUICK_MODEL], QUICK_MESH, [0.25]
  bandwidth = {**BANDWIDTH_GB_S, **dict(args.bandwidth)}
  # Before anything touches a device: the backend is created once.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", math.prod(mesh_shape))
  print(workload.device_description(), flush=True)
  mesh = jax.make_mesh(tuple(mesh_shape), AXES)
  print(f"mesh {dict(mesh.shape)}; GB/s per device: "
        + ", ".join(f"{a} {b:g}" for a, b in bandwidth.items())
        + "; float32; bytes per device per step, whole model = one layer "
        "x layers")
  records = []
  for model in models:
    block = []
    for name, layout, f in runs(args.optimizers, args.rank_fractions):
      block.append(measure(model, name, layout, f, mesh, bandwidth))
      print(f"  compiled {model.name} {name} {layout} rank "
            f"{'-' if f is None else workload.fraction_label(f)}",
            file=sys.stderr, flush=True)
    shapes = layer_shapes(model)
    print(f"\n{model.name}: {model.layers} layers of "
          + ", ".join(f"{n} {s}" for n, s in shapes.items()))
    print(workload.format_table(_COLUMNS, table_rows(block, model.layers)))
    records += block
  if args.check_layers:
    model, f = models[0], args.rank_fractions[0]
    print(f"\n{model.name}: {args.check_layers} layers compiled together "
          "over the same layers compiled one by one (bytes, per axis)")
    for name, layout, rank in runs(args.optimizers, [f]):
      both = measure(model, name, layout, rank, mesh, bandwidth,
                     copies=args.check_layers)
      one = next(r for r in records if r["model"] == model.name
                 and (r["optimizer"], r["layout"], r["rank_fraction"])
                 == (name, layout, rank))
      ratios = [both["crossing"][a] / (args.check_layers * one["crossing"][a])
                if one["crossing"][a] else None for a in AXES]
      print(f"  {name:>9} {layout:>10}: " + "  ".join(
          f"{a} {'-' if x is None else format(x, '.4f')}"
          for a, x in zip(AXES, ratios)))
      records.append(both)
  workload.write_json(args.json, records)


if __name__ == "__main__":
  main()
