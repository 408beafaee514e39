"""Where Orth-Dion's update time goes, part by part.

For one weight set (width d, rank fraction, momentum dtype) it times, taking
turns in one run:

* the whole donated update of Orth-Dion with each orthonormalization method,
  and of Dion with the first method;
* each of the four products alone, and all four together (the roofline);
* ``orthonormalize`` of Gaussian ``(big x r)`` and ``(small x r)`` factors,
  the shapes of ``P`` and of the new ``Q``, with each method;
* one elementwise pass over the set (``M <- M + G`` in place): the cost of
  reading two and writing one ``m x n`` float32 array per matrix.

Then it splits the Orth-Dion update into products + QR(big) + QR(small) +
the rest, expresses the rest in elementwise passes, and lists the ``m x n``
buffers the compiled update writes (instructions of its entry computation whose
result has ``m n`` elements): each one is a pass over memory that a fused
update might avoid.

    python -m benchmarks.breakdown --dims 2048 --rank-fractions 1/4
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re

import jax
import jax.numpy as jnp

import orth_dion_jax
from benchmarks import workload
from orth_dion_jax import ORTHOGONALIZE_METHODS as METHODS
from orth_dion_jax.orthogonalize import orthonormalize_many

DEFAULT_METHOD = inspect.signature(
    orth_dion_jax.orth_dion).parameters["orthogonalize"].default

_COLUMNS = (("part", ""), ("ms", ".1f"), ("spread", ".0%"),
            ("GFLOP/s", ".1f"), ("x update", ".3f"))

# `%name = f32[4096,1024]{1,0} opcode(...)`, also with a ROOT prefix.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<dtype>\w+)"
    r"\[(?P<dims>[\d,]*)\]\S* (?P<opcode>[\w\-]+)\(")
_NOT_WRITES = {"parameter", "bitcast", "constant", "get-tuple-element",
               "tuple"}


def _orthonormalize_runner(shapes, rank_fraction: float, side: str,
                           method: str):
  """Runner of ``orthonormalize`` on one Gaussian factor per matrix."""
  key = jax.random.key(1)
  factors = [
      jax.random.normal(jax.random.fold_in(key, i),
                        ((max if side == "big" else min)(shape),
                         workload.rank(shape, rank_fraction)), jnp.float32)
      for i, shape in enumerate(shapes.values())]

  @jax.jit
  def run(factors):
    # Batched over the factors of one rank, as the update does it.
    by_rank = {}
    for a in factors:
      by_rank.setdefault(a.shape[-1], []).append(a[None])
    return [orthonormalize_many(group, method, key=key)
            for group in by_rank.values()]

  return lambda: run(factors)


def _elementwise_pass_runner(shapes):
  """Runner of ``M <- M + G`` over the set, M donated: one memory pass."""
  momentum, grads = workload.weight_set(shapes)
  add = jax.jit(lambda m, g: jax.tree.map(jnp.add, m, g), donate_argnums=0)
  state = {"momentum": momentum}

  def run():
    state["momentum"] = add(state["momentum"], grads)
    return state["momentum"]

  return run


def matrix_sized_writes(hlo_text: str, shapes) -> collections.Counter:
  """Counts, by opcode and name, the entry computation's m x n results.

  A result counts when its shape, leading 1s dropped, is a weight's
  ``(m, n)`` or ``(n, m)``: a ``k x r`` factor with as many elements (at
  d = 2048, rank 1/4, ``8192 x 512`` holds as many as ``2048 x 2048``) does
  not.
  """
  sizes = {shape for m, n in shapes.values() for shape in ((m, n), (n, m))}
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  counts = collections.Counter()
  for line in entry.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None or match["opcode"] in _NOT_WRITES:
      continue
    dims = [int(x) for x in match["dims"].split(",") if x]
    while len(dims) > 2 and dims[0] == 1:
      dims = dims[1:]
    if tuple(dims) in sizes:
      stem = re.sub(r"\.\d+$", "", match["name"])
      counts[f"{match['opcode']} {stem} ({match['dtype']})"] += 1
  return counts


def _runners(d: int, rank_fraction: float, dtype: str, methods):
  shapes = workload.weight_shapes(d)
  params, grads = workload.weight_set(shapes)
  update = lambda name, method: workload.DonatedUpdate(
      workload.optimizer(name, rank_fraction=rank_fraction,
                         momentum_dtype=jnp.dtype(dtype),
                         orthogonalize=method), params, grads)
  runners = {f"update orth_dion [{m}]": update("orth_dion", m)
             for m in methods}
  runners[f"update dion [{methods[0]}]"] = update("dion", methods[0])
  runners["4 products (roofline)"] = workload.roofline_products(
      shapes, rank_fraction)
  for product in workload.PRODUCTS:
    runners[f"  {product}"] = workload.roofline_products(
        shapes, rank_fraction, which=(product,))
  for side in ("big", "small"):
    for method in methods:
      runners[f"orthonormalize {side} x r [{method}]"] = (
          _orthonormalize_runner(shapes, rank_fraction, side, method))
  runners["elementwise m x n pass"] = _elementwise_pass_runner(shapes)
  return shapes, runners


def report(d: int, rank_fraction: float, dtype: str, methods, repeats: int
           ) -> str:
  """The breakdown of one weight set, as text."""
  shapes, runners = _runners(d, rank_fraction, dtype, methods)
  times = workload.time_round_robin(runners, repeats)
  ms = {name: 1e3 * workload.median(t) for name, t in times.items()}
  main = methods[0]
  update_ms = ms[f"update orth_dion [{main}]"]
  flops = workload.low_rank_flops(shapes, rank_fraction)
  rows = []
  for name, t in times.items():
    product = name.strip()
    if product in workload.PRODUCTS:
      gflops = flops / 4 / (ms[name] * 1e6)
    elif name.startswith("4 products"):
      gflops = flops / (ms[name] * 1e6)
    else:
      gflops = None
    rows.append([name, ms[name], workload.spread(t), gflops,
                 ms[name] / update_ms])
  products = ms["4 products (roofline)"]
  qr_big = ms[f"orthonormalize big x r [{main}]"]
  qr_small = ms[f"orthonormalize small x r [{main}]"]
  rest = update_ms - products - qr_big - qr_small
  passes = rest / ms["elementwise m x n pass"]
  writes = matrix_sized_writes(
      runners[f"update orth_dion [{main}]"].compiled.as_text(), shapes)
  ranks = sorted({workload.rank(s, rank_fraction) for s in shapes.values()})
  lines = [
      f"d = {d}, rank {workload.fraction_label(rank_fraction)} (r = "
      f"{', '.join(map(str, ranks))}), momentum {dtype}; "
      f"{workload.device_description()}",
      workload.format_table(_COLUMNS, rows),
      f"orth_dion [{main}] = {update_ms:.1f} ms: products {products:.1f} "
      f"({products / update_ms:.0%}) + QR big {qr_big:.1f} "
      f"({qr_big / update_ms:.0%}) + QR small {qr_small:.1f} "
      f"({qr_small / update_ms:.0%}) + rest {rest:.1f} ({rest / update_ms:.0%}"
      f", = {passes:.1f} elementwise passes)",
      f"m x n buffers written by the compiled update: "
      f"{sum(writes.values())} for {len(shapes)} matrices",
  ]
  lines += [f"  {count:3d}  {what}" for what, count in writes.most_common()]
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dims", type=int, nargs="+", default=[2048])
  parser.add_argument("--rank-fractions", type=workload.parse_fraction,
                      nargs="+", default=[0.25])
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--orthogonalize", nargs="+", choices=METHODS,
                      default=[DEFAULT_METHOD] + [
                          m for m in METHODS if m != DEFAULT_METHOD],
                      help="methods to time; the first is split into parts")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: d = 256 and 2 repeats")
  args = parser.parse_args(argv)
  if args.quick:
    args.dims, args.repeats = [256], 2
  for d in args.dims:
    for rank_fraction in args.rank_fractions:
      print(report(d, rank_fraction, args.dtype, args.orthogonalize,
                   args.repeats), flush=True)


if __name__ == "__main__":
  main()
