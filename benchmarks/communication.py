"""Bytes each optimizer step moves between devices, read from compiled HLO.

The step ``(params, state, grads) -> (params, state)`` of Orth-Dion, Dion,
Muon (``optax.contrib.muon``) and AdamW is compiled for simulated CPU
devices, and every collective of the optimized program is read with
``orth_dion_jax.communication`` (payload bytes per device, see its
docstring). Nothing is run, so thread settings do not matter. The weights are
one transformer block's (``workload.weight_shapes``) and two ``d`` norm
scales, which every optimizer here hands to AdamW; all float32 (XLA CPU may
widen bf16 collectives to f32, which would blur the byte counts).

Three layouts:

* ``plain``: data parallel over a mesh ``(devices,)``, weights replicated;
  per-replica gradients ``(replicas, *shape)`` are averaged, the dense
  gradient all-reduce, and the optimizer runs on every replica.
* ``compressed``: Orth-Dion and Dion with ``data_axis="data"`` on the same
  mesh: each replica keeps its own momentum and only ``P`` (big x r) and
  ``R`` (small x r) are averaged (docs/design.md, "What crosses devices"). ``ideal`` is
  ``(m + n) r`` numbers for each matrix with ``(m + n) r < m n`` and the whole
  gradient of the others (AdamW leaves included); the specification asks for
  the measured bytes within 5% of it.
* ``fsdp_tp``: a mesh ``(1, devices / tensor, tensor)`` over ("data", "fsdp",
  "tensor"), matrices split ("fsdp", "tensor") (``4d x d`` transposed, as in
  Megatron's row-parallel layer), gradients already reduced. The table gives
  the bytes crossing each axis and the largest single payload against the
  largest weight and against one device's block of it: a gather of the whole
  weight reads 1.0 and ``devices``.

Orth-Dion and Dion run on ``Explicit`` mesh axes (the ``jax.make_mesh``
default), reading each weight's sharding from its type; Muon and AdamW know
no mesh, so they run on ``Auto`` axes over the same devices and the
partitioner inserts whatever their step needs (Newton-Schulz contracts a
sharded dimension, which ``Explicit`` axes refuse to place implicitly). Every
optimizer's state is laid out like its parameters, and the step returns
parameters and state in the layout it took them in.

``arrays`` counts the arrays moved per step (XLA combines several into one
all-reduce). Collectives inside a ``lax.cond`` branch run only when that
branch is taken, e.g. the Householder fallback of CholeskyQR2, which gathers a
``k x r`` factor; they are listed apart (``cond B``), not in the bytes per
step.

    python -m benchmarks.communication
    python -m benchmarks.communication --d 1024 --rank-fractions 1/4 \\
        --json runs/communication.json
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from benchmarks import workload
from orth_dion_jax import communication
from orth_dion_jax import data_parallel

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
PLAIN, COMPRESSED, FSDP_TP = "plain", "compressed", "fsdp_tp"
_BYTES = 4  # float32

_DATA_COLUMNS = (
    ("rank", ""), ("optimizer", ""), ("mode", ""), ("data B", ",d"),
    ("ideal B", ",d"), ("/ ideal", ".5f"), ("within 5%", ""),
    ("x dense", ".3f"), ("extra B", ",d"), ("arrays", "d"),
    ("cond B", ",d"))
_SHARDED_COLUMNS = (
    ("rank", ""), ("optimizer", ""), ("fsdp B", ",d"), ("tensor B", ",d"),
    ("x muon", ".3f"), ("largest B", ",d"), ("/ weight", ".3f"),
    ("/ shard", ".2f"), ("arrays", "d"), ("cond B", ",d"))

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{$")
_INSTRUCTION_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")


def leaf_shapes(d: int) -> dict[str, tuple[int, ...]]:
  """``workload.weight_shapes(d)`` and two norm scales (AdamW leaves)."""
  return {**workload.weight_shapes(d), "attn_norm": (d,), "mlp_norm": (d,)}


def sharded_specs(shapes) -> dict[str, PartitionSpec]:
  """Matrices split over ("fsdp", "tensor"), tall ones transposed; vectors
  replicated."""
  def spec(shape):
    if len(shape) != 2:
      return PartitionSpec()
    tall = shape[0] > shape[1]
    return PartitionSpec(TENSOR, FSDP) if tall else PartitionSpec(FSDP, TENSOR)
  return {name: spec(shape) for name, shape in shapes.items()}


def dense_bytes(shapes) -> int:
  """The plain gradient all-reduce: every gradient, whole."""
  return sum(_BYTES * math.prod(shape) for shape in shapes.values())


def compressed_ideal_bytes(shapes, rank_fraction: float) -> int:
  """``(m + n) r`` numbers per matrix that compresses, the rest whole."""
  total = 0
  for shape in shapes.values():
    size = math.prod(shape)
    if len(shape) == 2:
      size = min(size, sum(shape) * workload.rank(shape, rank_fraction))
    total += _BYTES * size
  return total


def _placed(shapes, specs, mesh, replicas: int | None = None):
  """Float32 shapes carrying their shardings; ``replicas`` prepends a
  replica axis split over "data" (per-replica gradients)."""
  def place(shape, spec):
    if replicas is not None:
      shape, spec = (replicas,) + shape, PartitionSpec(DATA, *spec)
    return jax.ShapeDtypeStruct(shape, jnp.float32,
                                sharding=NamedSharding(mesh, spec))
  return {name: place(shapes[name], specs[name]) for name in shapes}


def _rebound(tree, mesh):
  """The same specs on ``mesh`` (its axis types); an unsharded scalar is
  replicated."""
  def rebind(x):
    spec = PartitionSpec() if x.sharding is None else x.sharding.spec
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, spec))
  return jax.tree.map(rebind, tree)


def compile_step(tx: optax.GradientTransformation, mesh, params, grads):
  """The step compiled on ``mesh``, with the state laid out like the params.

  The state's layout comes from ``tx.init`` traced on ``Explicit`` axes,
  where every ``zeros_like`` carries its parameter's sharding in its type.
  """
  explicit = mesh.update(axis_types=(AxisType.Explicit,) * mesh.devices.ndim)
  with jax.set_mesh(explicit):
    state = jax.eval_shape(tx.init, _rebound(params, explicit))
  state = _rebound(state, mesh)
  layout = jax.tree.map(lambda x: x.sharding, (params, state))
  with jax.set_mesh(mesh):
    return jax.jit(workload.train_step(tx), donate_argnums=(0, 1),
                   out_shardings=layout).lower(params, state, grads).compile()


def in_cond_branches(hlo: str) -> set[str]:
  """Names of the instructions inside ``conditional`` branches (and in the
  computations those call), in an HLO module's text."""
  computations, body = {}, None
  for line in hlo.splitlines():
    if match := _COMPUTATION.match(line):
      body = computations.setdefault(match[1], [])
    elif body is not None and line.startswith(" "):
      body.append(line)
  called = lambda line: [name for name in re.findall(r"%([\w.\-]+)", line)
                         if name in computations]
  todo = [name for body in computations.values() for line in body
          if " conditional(" in line for name in called(line)]
  reached = set()
  while todo:
    name = todo.pop()
    if name not in reached:
      reached.add(name)
      todo += [c for line in computations[name] for c in called(line)]
  return {match[1] for name in reached for line in computations[name]
          if (match := _INSTRUCTION_NAME.match(line))}


def _meshes(devices: int, tensor: int) -> dict[str, jax.sharding.Mesh]:
  if devices % tensor:
    raise ValueError(f"--tensor {tensor} does not divide --devices "
                     f"{devices}.")
  return {
      DATA: jax.make_mesh((devices,), (DATA,)),
      FSDP_TP: jax.make_mesh((1, devices // tensor, tensor),
                             (DATA, FSDP, TENSOR)),
  }


def step_collectives(name: str, mode: str, rank_fraction: float | None,
                     mesh: jax.sharding.Mesh, shapes, specs,
                     replicas: int | None, *, mesh_when_plain: bool = False
                     ) -> tuple[list[communication.CollectiveOp], set[str]]:
  """One optimizer's step in one layout, compiled, and its collectives: the
  records and the names of those inside ``lax.cond`` branches.

  Orth-Dion and Dion are told the mesh in the sharded and compressed modes
  (and in ``PLAIN`` with ``mesh_when_plain``, for sharded weights); Muon and
  AdamW run on ``Auto`` axes of the same devices (module docstring).
  """
  low_rank = name in workload.LOW_RANK
  placement = {}
  if low_rank and (mode != PLAIN or mesh_when_plain):
    placement = {"mesh": mesh,
                 "data_axis": DATA if mode == COMPRESSED else None}
  tx = workload.optimizer(name, rank_fraction=rank_fraction,
                          momentum_dtype=jnp.float32, **placement)
  if mode == PLAIN:
    tx = optax.chain(data_parallel.average_replicas(), tx)
  if not low_rank:
    mesh = mesh.update(axis_types=(AxisType.Auto,) * mesh.devices.ndim)
  compiled = compile_step(tx, mesh, _placed(shapes, specs, mesh),
                          _placed(shapes, specs, mesh, replicas))
  hlo = compiled.as_text()
  return communication.collective_ops(hlo, mesh), in_cond_branches(hlo)


def measure(name: str, mode: str, rank_fraction: float | None, d: int,
            meshes) -> dict:
  """One optimizer's compiled step in one layout: its collectives."""
  shapes = leaf_shapes(d)
  mesh = meshes[FSDP_TP if mode == FSDP_TP else DATA]
  replicas = None if mode == FSDP_TP else mesh.shape[DATA]
  specs = (sharded_specs(shapes) if mode == FSDP_TP
           else {leaf: PartitionSpec() for leaf in shapes})
  low_rank = name in workload.LOW_RANK
  records, branches = step_collectives(name, mode, rank_fraction, mesh,
                                       shapes, specs, replicas)
  per_step = [r for r in records if r.bytes and r.name not in branches]
  in_cond = [r for r in records if r.bytes and r.name in branches]
  largest = max(per_step, key=lambda r: r.bytes, default=None)
  return {
      "optimizer": name, "mode": mode, "rank_fraction": rank_fraction,
      "d": d, "mesh": dict(mesh.shape),
      "axis_types": "explicit" if low_rank else "auto",
      "crossing": {axis: communication.bytes_crossing(per_step, axis)
                   for axis in mesh.axis_names},
      "total_bytes": sum(r.bytes for r in per_step),
      "arrays": len(per_step),
      "cond_bytes": sum(r.bytes for r in in_cond),
      "largest": None if largest is None else largest._asdict(),
      "records": [dict(r._asdict(), in_cond=r.name in branches)
                  for r in records],
  }


def _runs(optimizers, rank_fractions):
  """(optimizer, mode, rank fraction): Muon and AdamW once per mode."""
  runs = [(name, mode, f) for f in rank_fractions for name in optimizers
          if name in workload.LOW_RANK for mode in (PLAIN, COMPRESSED, FSDP_TP)]
  runs += [(name, mode, None) for name in optimizers
           if name not in workload.LOW_RANK for mode in (PLAIN, FSDP_TP)]
  return runs


def _rank_blocks(records, rank_fractions, mode_filter):
  """Per rank fraction, the records of ``mode_filter`` modes; the rank-free
  ones (Muon, AdamW) repeated in every block."""
  for f in rank_fractions:
    yield f, [r for r in records if r["mode"] in mode_filter
              and r["rank_fraction"] in (f, None)]


def _data_rows(records, rank_fractions, d):
  shapes = leaf_shapes(d)
  dense = dense_bytes(shapes)
  rows = []
  for f, block in _rank_blocks(records, rank_fractions, (PLAIN, COMPRESSED)):
    for r in block:
      measured = r["crossing"][DATA]
      ideal = (compressed_ideal_bytes(shapes, f) if r["mode"] == COMPRESSED
               else dense)
      ratio = measured / ideal
      rows.append([
          workload.fraction_label(f), r["optimizer"], r["mode"], measured,
          ideal, ratio, "yes" if abs(ratio - 1) <= 0.05 else "NO",
          measured / dense, measured - ideal, r["arrays"],
          r["cond_bytes"]])
  return rows


def _sharded_rows(records, rank_fractions, d):
  shapes = leaf_shapes(d)
  weight = max(_BYTES * math.prod(s) for s in shapes.values())
  rows = []
  for f, block in _rank_blocks(records, rank_fractions, (FSDP_TP,)):
    muon = [r["total_bytes"] for r in block if r["optimizer"] == "muon"]
    for r in block:
      largest = 0 if r["largest"] is None else r["largest"]["bytes"]
      devices = math.prod(r["mesh"].values())
      rows.append([
          workload.fraction_label(f), r["optimizer"], r["crossing"][FSDP],
          r["crossing"][TENSOR],
          r["total_bytes"] / muon[0] if muon else None, largest,
          largest / weight, largest / (weight / devices), r["arrays"],
          r["cond_bytes"]])
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--d", type=int, default=1024, help="model width")
  parser.add_argument("--rank-fractions", type=workload.parse_fraction,
                      nargs="+", default=[0.5, 0.25, 1 / 16],
                      help="e.g. 1/2 1/4 0.0625")
  parser.add_argument("--devices", type=int, default=8,
                      help="simulated CPU devices")
  parser.add_argument("--tensor", type=int, default=2,
                      help="size of the tensor axis of the fsdp_tp mesh")
  parser.add_argument("--optimizers", nargs="+", choices=workload.OPTIMIZERS,
                      default=list(workload.OPTIMIZERS))
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the records here")
  args = parser.parse_args(argv)
  # Before anything touches a device: the backend is created once.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.devices)
  print(workload.device_description(), flush=True)
  meshes = _meshes(args.devices, args.tensor)
  records = []
  for name, mode, f in _runs(args.optimizers, args.rank_fractions):
    records.append(measure(name, mode, f, args.d, meshes))
    rank = "-" if f is None else workload.fraction_label(f)
    print(f"  compiled {name} {mode} rank {rank}", file=sys.stderr,
          flush=True)
  shapes = leaf_shapes(args.d)
  print(f"d = {args.d}: {', '.join(f'{n} {s}' for n, s in shapes.items())}; "
        f"dense gradient {dense_bytes(shapes):,} B")
  print(f"Data parallel, mesh {dict(meshes[DATA].shape)}: payload bytes "
        "crossing 'data' per step")
  print(workload.format_table(
      _DATA_COLUMNS, _data_rows(records, args.rank_fractions, args.d)))
  print(f"FSDP x tensor parallel, mesh {dict(meshes[FSDP_TP].shape)}: "
        "payload bytes crossing each axis per step")
  print(workload.format_table(
      _SHARDED_COLUMNS, _sharded_rows(records, args.rank_fractions, args.d)))
  workload.write_json(args.json, records)


if __name__ == "__main__":
  main()
