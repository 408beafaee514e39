"""Routes to the polar right factor in float32: accuracy and time.

Orth-Dion's ``right_factor="polar"`` takes ``Q = polar(R)`` of ``R = B^T P``
(``k x r``, ``k >= r``). The routes compared, all in float32 on ``R`` divided
by its largest magnitude:

* ``gram_eigh``: ``R (R^T R)^(-1/2)`` from an eigendecomposition of the Gram
  ``R^T R``, whose eigenvalues at or below ``r * eps * max`` (the Gram's own
  rank tolerance) are dropped. The Gram squares ``R``'s condition number:
  this drops every singular value below ``sqrt(r eps) s_max``;
* ``gram_eigh_keep``: the same with the tolerance ``(r eps)^2 max``, the
  library's rule on singular values, squared: nothing the library keeps is
  dropped, but the eigenvalues below ``eps * max`` are rounding noise;
* ``qr_svd``: the library's route (``orth_dion_jax.polar``): sign-safe QR
  ``R = Q_R T``, ``T = Q_R^T R``, ``Q = Q_R polar(T)``, ``polar(T)`` from the
  SVD of the ``r x r`` ``T``;
* ``qr_newton_schulz``: the same QR, then ``--ns-steps`` cubic Newton-Schulz
  steps ``X <- 1.5 X - 0.5 X X^T X`` from ``X = T / ||T||_F``: matrix products
  only. A singular value ``x`` far below 1 grows by 1.5 a step, so one of
  ``1e-4 / sqrt(r)`` needs about ``log(1e4 sqrt(r)) / log(1.5)`` steps;
* ``qr_eigh``: the same QR, then ``polar(T)`` from an eigendecomposition of
  ``T^T T``: the Gram again, after the QR.

Inputs: (a) random ``R``, ``k = 4 r``, random orthonormal bases, singular
values log-spaced from 1 down to 1e-4 or to 1e-7, ``r`` from 16 to 512;
(b) the example model's own factors: a short Orth-Dion run of
``examples.train``, then for each hidden matrix the factor its next step
would take, ``B = M + G`` (the state's momentum and a fresh gradient),
``P = orth(B Q)`` with the state's right factor ``Q``, ``R = B^T P``, in
float64 NumPy and rounded to float32.

The reference is the float64 SVD ``R = V S U^T`` of the float32 input, with
the rank rule of the library's ``polar``: singular values at or below
``r * eps * s_max`` count as zero (``kept`` is how many do not), and
``Q_ref = V_kept U_kept^T``. Per route and input:

* ``orth``: ``max |Q^T Q - I|`` on a full-rank input (``kept = r``);
  otherwise ``max |U_kept^T Q^T Q U_kept - I|``, orthonormality on the
  directions the rank rule keeps (the others may be dropped or kept);
* ``align``: ``|<R, Q> - ||R||_*| / ||R||_*``: how far the step's alignment
  with the buffer is from the best any rank-r partial isometry reaches;
* ``dist``: ``max |Q - Q_ref|``;
* ``ms`` and ``x qr`` (random inputs only; time depends on the shape): the
  median of the jitted route and its ratio to the QR right factor of the
  same input (``orthonormalize``, cholesky_qr), all candidates taking turns
  call by call (``workload.time_round_robin``).

    python -m benchmarks.polar_routes           # r = 16 ... 512, two models
    python -m benchmarks.polar_routes --quick   # r = 16, 64, one model
    python -m benchmarks.polar_routes --json runs/polar_routes.json

A last table (``--step-dim``, default 2048, rank 1/4) times what the polar
right factor adds to Orth-Dion's whole update (``step_pieces``).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import orth_dion_jax
from benchmarks import workload
from examples import data as data_lib
from examples import train
from examples.config import TrainConfig
from examples.model import ModelConfig, cross_entropy, dimension_numbers
from orth_dion_jax import lapack_calls
from orth_dion_jax import matrix_view

ROUTES = ("gram_eigh", "gram_eigh_keep", "qr_svd", "qr_newton_schulz",
          "qr_eigh")
QR = "qr"
METHOD = "cholesky_qr"
RANKS = (16, 32, 64, 128, 256, 512)
FLOORS = (1e-4, 1e-7)
NEWTON_SCHULZ_STEPS = 30
# (name, model, rank fraction): the example's default model, and a wider one
# whose rank is 128.
EXAMPLE_MODELS = (
    ("d96", ModelConfig(), 0.25),
    ("d256", ModelConfig(d_model=256, n_layers=2, n_heads=8), 0.5),
)
_EPS = float(np.finfo(np.float32).eps)

Array = jax.Array


# --- The routes: (k, r) float32 -> (k, r) float32. ---

def _by_largest(a: Array) -> Array:
  largest = jnp.max(jnp.abs(a))
  return a / jnp.where(largest > 0, largest, 1.0)


def _polar_from_gram(a: Array, tolerance: float | None = None) -> Array:
  """``a (a^T a)^(-1/2)``, the Gram's eigenvalues at or below
  ``tolerance * max`` dropped (default ``r eps``)."""
  if tolerance is None:
    tolerance = a.shape[-1] * _EPS
  w, v = jnp.linalg.eigh(a.T @ a)
  kept = w > tolerance * w[-1]
  inverse_root = jnp.where(kept, jax.lax.rsqrt(jnp.where(kept, w, 1.0)), 0.0)
  return a @ ((v * inverse_root) @ v.T)


def _qr_and_t(a: Array) -> tuple[Array, Array]:
  """``Q_R`` and ``T = Q_R^T a`` of the sign-safe QR ``a = Q_R T``."""
  a = _by_largest(a)
  q = orth_dion_jax.orthonormalize(a, METHOD)
  return q, q.T @ a


def gram_eigh(a: Array) -> Array:
  return _polar_from_gram(_by_largest(a))


def gram_eigh_keep(a: Array) -> Array:
  # The library's rule on singular values, squared: nothing it keeps is
  # dropped, but the Gram's eigenvalues below eps * max are rounding noise.
  return _polar_from_gram(_by_largest(a), (a.shape[-1] * _EPS)**2)


def qr_svd(a: Array) -> Array:
  return orth_dion_jax.polar(a, METHOD)


def qr_newton_schulz(a: Array, steps: int = NEWTON_SCHULZ_STEPS) -> Array:
  q, t = _qr_and_t(a)
  # ||T||_2 <= ||T||_F: the start has every singular value in (0, 1], where
  # the cubic iteration converges to 1.
  x = t / jnp.maximum(jnp.linalg.norm(t), jnp.finfo(jnp.float32).tiny)
  x = jax.lax.fori_loop(0, steps,
                        lambda _, x: 1.5 * x - 0.5 * x @ (x.T @ x), x)
  return q @ x


def qr_eigh(a: Array) -> Array:
  q, t = _qr_and_t(a)
  return q @ _polar_from_gram(t)


def qr(a: Array) -> Array:
  """The QR right factor, the baseline of ``x qr``."""
  return orth_dion_jax.orthonormalize(a, METHOD)


def route_functions(ns_steps: int = NEWTON_SCHULZ_STEPS
                    ) -> dict[str, Callable[[Array], Array]]:
  """Every route and the QR baseline, jitted."""
  functions = {"gram_eigh": gram_eigh, "gram_eigh_keep": gram_eigh_keep,
               "qr_svd": qr_svd,
               "qr_newton_schulz": functools.partial(qr_newton_schulz,
                                                     steps=ns_steps),
               "qr_eigh": qr_eigh, QR: qr}
  return {name: jax.jit(f) for name, f in functions.items()}


# --- The float64 reference and the errors. ---

class Reference(NamedTuple):
  """The float64 polar factor of a float32 ``R`` and what is measured with
  it."""
  polar: np.ndarray      # Q_ref = V_kept U_kept^T, (k, r)
  kept_right: np.ndarray  # U_kept, (r, kept): the directions Q must keep
  nuclear: float         # ||R||_*
  cond: float            # s_max / s_min
  kept: int              # singular values above r eps s_max


def reference(a: np.ndarray) -> Reference:
  a = np.asarray(a, np.float64)
  v, s, ut = np.linalg.svd(a, full_matrices=False)
  kept = s > a.shape[1] * _EPS * s[0]
  return Reference(polar=v[:, kept] @ ut[kept], kept_right=ut[kept].T,
                   nuclear=float(s.sum()),
                   cond=float(s[0] / s[-1]) if s[-1] > 0 else float("inf"),
                   kept=int(kept.sum()))


def errors(a: np.ndarray, q: np.ndarray, ref: Reference) -> dict[str, float]:
  """``orth``, ``align`` and ``dist`` of a route's ``q`` for the input
  ``a`` (see the module docstring)."""
  a, q = np.asarray(a, np.float64), np.asarray(q, np.float64)
  gram = q.T @ q
  if ref.kept < a.shape[1]:
    # Directions the rank rule drops may be dropped or kept: Q is judged on
    # the others only.
    gram = ref.kept_right.T @ gram @ ref.kept_right
  return {
      "orth": float(np.max(np.abs(gram - np.eye(len(gram))))),
      "align": float(abs(np.sum(a * q) - ref.nuclear) / ref.nuclear),
      "dist": float(np.max(np.abs(q - ref.polar))),
  }


# --- The inputs. ---

def random_factor(r: int, floor: float, seed: int = 0) -> np.ndarray:
  """``(4 r, r)`` float32 with random orthonormal bases and singular values
  log-spaced from 1 down to ``floor``."""
  rng = np.random.default_rng([seed, r, round(-np.log10(floor))])
  left, _ = np.linalg.qr(rng.standard_normal((4 * r, r)))
  right, _ = np.linalg.qr(rng.standard_normal((r, r)))
  s = np.logspace(0, np.log10(floor), r)
  return ((left * s) @ right.T).astype(np.float32)


def _orth_dion_state(tree) -> orth_dion_jax.OrthDionState:
  found = []
  def is_state(x):
    if isinstance(x, orth_dion_jax.OrthDionState):
      found.append(x)
      return True
    return False
  jax.tree.leaves(tree, is_leaf=is_state)
  [state] = found
  return state


def _by_path(tree, is_leaf=None) -> dict[str, object]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def example_factors(model: ModelConfig, rank_fraction: float, steps: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """The float32 ``R = B^T P`` of every hidden matrix of the example model
  after ``steps`` Orth-Dion steps, as its next step would compute it.

  ``B = M + G``: the state's momentum and the gradient of the next batch;
  ``P = orth(B Q)`` with the state's right factor, ``P`` on ``B``'s larger
  side as in the library. All in float64, then rounded.
  """
  config = TrainConfig(model=model, rank_fraction=rank_fraction, steps=steps,
                       seed=seed, progress=False, checkpoint_every=0)
  mesh = train.make_mesh(config)
  network, optimizer = train.build(config, mesh)
  train_bytes, _ = data_lib.load_corpus(config.data, config.max_bytes)
  batches = data_lib.Batches(train_bytes, config.batch_size, config.seq_len,
                             seed=seed)
  graphdef, state = nnx.split((network, optimizer))
  step = jax.jit(train.train_step, static_argnums=0)
  for _ in range(steps):
    state, _, _ = step(graphdef, state, *next(batches))
  nnx.update((network, optimizer), state)
  _, grads = nnx.value_and_grad(cross_entropy)(network, *next(batches))
  orth_state = _orth_dion_state(nnx.as_pure(optimizer.opt_state))
  momenta = _by_path(orth_state.momentum)
  rights = _by_path(orth_state.right_factor)
  gradients = _by_path(nnx.as_pure(grads))
  dims = _by_path(
      dimension_numbers(nnx.as_pure(nnx.state(network, nnx.Param)),
                        orth_dion_jax.DionDimensionNumbers),
      is_leaf=matrix_view.is_dimension_numbers_leaf)
  factors = {}
  for path, numbers in dims.items():
    if numbers is None:
      continue
    buffer = (np.asarray(momenta[path], np.float64)
              + np.asarray(gradients[path], np.float64))
    view = matrix_view.matrix_view(
        path, buffer.shape, numbers, rank=None, rank_fraction=rank_fraction,
        rank_multiple_of=1, scale="spectral")
    right = np.asarray(rights[path], np.float64)
    right = right.reshape(-1, *right.shape[-2:])
    for i, layout in enumerate(view.to_layout(buffer)):
      # Rows on the larger side: B as the reference writes it.
      big_by_small = layout.T if view.small_axis == "in" else layout
      p, _ = np.linalg.qr(big_by_small @ right[i])
      name = path if len(right) == 1 else f"{path}[{i}]"
      factors[name] = (big_by_small.T @ p).astype(np.float32)
  return factors


# --- Measuring. ---

def accuracy(a: np.ndarray, functions) -> dict[str, dict[str, float]]:
  """``errors`` of every route, and of the QR baseline, on one input."""
  ref = reference(a)
  device_a = jnp.asarray(a)
  return {name: errors(a, f(device_a), ref) for name, f in functions.items()}


def measure_random(ranks, floors, functions, repeats: int) -> list[dict]:
  """Accuracy and interleaved time of every route on random inputs."""
  records = []
  for floor in floors:
    for r in ranks:
      a = random_factor(r, floor)
      ref = reference(a)
      device_a = jnp.asarray(a)
      times = workload.time_round_robin(
          {name: functools.partial(f, device_a)
           for name, f in functions.items()}, repeats)
      qr_s = workload.median(times[QR])
      for name, error in accuracy(a, functions).items():
        records.append({
            "input": f"random, floor {floor:.0e}", "r": r, "k": a.shape[0],
            "cond": ref.cond, "kept": ref.kept, "route": name, **error,
            "time_s": workload.median(times[name]), "times_s": times[name],
            "qr_time_s": qr_s, "x_qr": workload.median(times[name]) / qr_s})
      print(f"  measured r = {r}, floor {floor:.0e}", file=sys.stderr,
            flush=True)
  return records


def measure_example(name: str, model: ModelConfig, rank_fraction: float,
                    steps: int, functions) -> list[dict]:
  """Per route, the worst errors over the example model's factors, and
  their condition numbers."""
  factors = example_factors(model, rank_fraction, steps)
  refs = {path: reference(a) for path, a in factors.items()}
  per_matrix = {path: accuracy(a, functions) for path, a in factors.items()}
  conds = [ref.cond for ref in refs.values()]
  a = next(iter(factors.values()))
  records = []
  for route in functions:
    worst = {field: max(e[route][field] for e in per_matrix.values())
             for field in ("orth", "align", "dist")}
    records.append({
        "input": f"example {name}, {steps} steps", "r": a.shape[1],
        "k": a.shape[0], "matrices": len(factors),
        "cond_median": float(np.median(conds)), "cond_max": max(conds),
        "kept_min": min(ref.kept for ref in refs.values()), "route": route,
        **worst, "conds": {p: ref.cond for p, ref in refs.items()},
        "per_matrix": {p: e[route] for p, e in per_matrix.items()}})
  print(f"  measured example {name}", file=sys.stderr, flush=True)
  return records


def step_pieces(d: int, rank_fraction: float, repeats: int) -> list[dict]:
  """What the polar right factor adds to Orth-Dion's update at width ``d``.

  Timed in turns: the whole update with each right factor, and on the
  weight set's ``R`` factors (one ``(d, r)`` per matrix, stacked) the QR
  right factor, the polar one, and the polar's extra pieces: the SVDs of the
  ``r x r`` matrices ``T`` (one call per matrix on CPU, as in the library)
  and the two ``k x r x r`` products ``T = Q_R^T R`` and ``Q_R polar(T)``.
  """
  shapes = workload.weight_shapes(d)
  params, grads = workload.weight_set(shapes)
  r = workload.rank((d, d), rank_fraction)
  key_r, key_t = jax.random.split(jax.random.key(1))
  stacked = jax.random.normal(key_r, (len(shapes), d, r), jnp.float32)
  t = jax.random.normal(key_t, (len(shapes), r, r), jnp.float32)
  q = qr(stacked)
  products = jax.jit(lambda q, a, w: (jnp.einsum("nkr,nks->nrs", q, a),
                                      jnp.einsum("nkr,nrs->nks", q, w)))
  svd = jax.jit(lambda t: lapack_calls.per_matrix(jnp.linalg.svd, t))
  runners = {
      f"{name} update": workload.DonatedUpdate(
          workload.optimizer(name, rank_fraction=rank_fraction,
                             momentum_dtype=jnp.float32), params, grads)
      for name in ("orth_dion", "orth_dion_polar")}
  runners.update({
      "qr of R": functools.partial(jax.jit(qr), stacked),
      "polar of R": functools.partial(jax.jit(qr_svd), stacked),
      "svd of T": functools.partial(svd, t),
      "T and Q_R polar(T) products": functools.partial(products, q, stacked,
                                                       t),
  })
  times = workload.time_round_robin(runners, repeats)
  qr_update_s = workload.median(times["orth_dion update"])
  return [{"d": d, "rank_fraction": rank_fraction, "r": r,
           "matrices": len(shapes), "piece": name,
           "time_s": workload.median(times[name]), "times_s": times[name],
           "spread": workload.spread(times[name]),
           "x_qr_update": workload.median(times[name]) / qr_update_s}
          for name in runners]


def markdown(columns, rows) -> str:
  """A markdown table; ``columns`` are ``(title, format spec)``."""
  lines = ["| " + " | ".join(title for title, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(
        "-" if v is None else format(v, spec)
        for v, (_, spec) in zip(row, columns)) + " |")
  return "\n".join(lines)


_RANDOM_COLUMNS = (("input", ""), ("r", "d"), ("cond", ".1e"), ("kept", "d"),
                   ("route", ""), ("ms", ".2f"), ("x qr", ".2f"),
                   ("orth", ".1e"), ("align", ".1e"), ("dist", ".1e"))
_PIECE_COLUMNS = (("d", "d"), ("r", "d"), ("piece", ""), ("ms", ".1f"),
                  ("spread", ".0%"), ("x qr update", ".3f"))
_EXAMPLE_COLUMNS = (("input", ""), ("k x r", ""), ("matrices", "d"),
                    ("cond median", ".1e"), ("cond max", ".1e"),
                    ("kept min", "d"), ("route", ""), ("orth", ".1e"),
                    ("align", ".1e"), ("dist", ".1e"))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed calls per route, after one warm-up")
  parser.add_argument("--ns-steps", type=int, default=NEWTON_SCHULZ_STEPS,
                      help="cubic Newton-Schulz steps of qr_newton_schulz")
  parser.add_argument("--example-steps", type=int, default=40,
                      help="Orth-Dion steps of the example runs")
  parser.add_argument("--step-dim", type=int, default=2048,
                      help="width d of the update whose polar pieces are "
                           "timed (0: skip)")
  parser.add_argument("--step-rank-fraction", type=workload.parse_fraction,
                      default=0.25)
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the records here")
  parser.add_argument("--quick", action="store_true",
                      help="r = 16, 64, 3 repeats, the default model, 10 "
                           "steps")
  args = parser.parse_args(argv)
  models = EXAMPLE_MODELS
  if args.quick:
    args.ranks, args.repeats, args.example_steps = [16, 64], 3, 10
    args.step_dim = min(args.step_dim, 256)
    models = EXAMPLE_MODELS[:1]
  print(workload.device_description(), flush=True)
  print(f"qr_newton_schulz: {args.ns_steps} cubic steps", flush=True)
  functions = route_functions(args.ns_steps)
  random_records = measure_random(args.ranks, FLOORS, functions,
                                  args.repeats)
  example_records = []
  for name, model, rank_fraction in models:
    example_records += measure_example(name, model, rank_fraction,
                                       args.example_steps, functions)
  piece_records = (step_pieces(args.step_dim, args.step_rank_fraction,
                               args.repeats) if args.step_dim else [])
  print(markdown(_RANDOM_COLUMNS, [
      [x["input"], x["r"], x["cond"], x["kept"], x["route"],
       1e3 * x["time_s"], x["x_qr"], x["orth"], x["align"], x["dist"]]
      for x in random_records]))
  print()
  print(markdown(_EXAMPLE_COLUMNS, [
      [x["input"], f"{x['k']} x {x['r']}", x["matrices"], x["cond_median"],
       x["cond_max"], x["kept_min"], x["route"], x["orth"], x["align"],
       x["dist"]] for x in example_records]))
  if piece_records:
    print()
    print(markdown(_PIECE_COLUMNS, [
        [x["d"], x["r"], x["piece"], 1e3 * x["time_s"], x["spread"],
         x["x_qr_update"]] for x in piece_records]))
  workload.write_json(args.json,
                      random_records + example_records + piece_records)


if __name__ == "__main__":
  main()
