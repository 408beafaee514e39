"""What the benchmarks measure: transformer-shaped weight sets and their updates.

A weight set of width ``d`` is one transformer block's hidden matrices in the
Flax layout ``(fan_in, fan_out)``: the attention projection ``d x d`` and the
MLP's ``d x 4d`` and ``4d x d``. Every optimizer is timed the way a training
loop runs it: ``params, state = update(params, state, grads)``, jitted with the
parameters and the state donated so that their buffers are reused in place.

The roofline of the low-rank step is its four ``(m x n x r)`` products per
matrix (``B Q``, ``B^T P``, ``P R^T``, ``P Q^T``; 8 m n r flops), timed here as
plain jitted matmuls in the same layout, on the same machine, in the same run.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import sys
import time
from fractions import Fraction
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

import orth_dion_jax

Shapes = dict[str, tuple[int, int]]

OPTIMIZERS = ("orth_dion", "orth_dion_polar", "dion", "muon", "adamw")
LOW_RANK = ("orth_dion", "orth_dion_polar", "dion")
PRODUCTS = ("B Q", "B^T P", "P R^T", "P Q^T")

# The alias and the settings each low-rank name stands for: orth_dion_polar
# is Orth-Dion with the exact rank-r polar right factor.
_LOW_RANK_ALIASES = {
    "orth_dion": (orth_dion_jax.orth_dion, {}),
    "orth_dion_polar": (orth_dion_jax.orth_dion, {"right_factor": "polar"}),
    "dion": (orth_dion_jax.dion, {}),
}

# Step sizes do not change the cost of an update; these are the usual ones.
_LEARNING_RATE = 0.01
_ADAM_LEARNING_RATE = 1e-3


def weight_shapes(d: int) -> Shapes:
  """One transformer block's hidden matrices, ``(fan_in, fan_out)``."""
  return {"attn": (d, d), "mlp_in": (d, 4 * d), "mlp_out": (4 * d, d)}


def num_params(shapes: Shapes) -> int:
  return sum(m * n for m, n in shapes.values())


def rank(shape: tuple[int, int], rank_fraction: float) -> int:
  """The optimizers' rank rule (``rank_multiple_of=1``): ceil(f * min(m, n))."""
  small = min(shape)
  return max(1, min(math.ceil(rank_fraction * small), small))


def low_rank_flops(shapes: Shapes, rank_fraction: float) -> int:
  """8 m n r summed over the set: the four products of the low-rank step."""
  return sum(8 * m * n * rank((m, n), rank_fraction)
             for m, n in shapes.values())


def fraction_label(rank_fraction: float) -> str:
  return str(Fraction(rank_fraction).limit_denominator(1024))


def parse_fraction(text: str) -> float:
  """``"1/4"`` or ``"0.25"`` to 0.25 (an argparse ``type``)."""
  return float(Fraction(text))


def weight_set(shapes: Shapes, seed: int = 0) -> tuple[dict, dict]:
  """Random float32 parameters and gradients of the given shapes."""
  keys = jax.random.split(jax.random.key(seed), 2 * len(shapes))
  params, grads = {}, {}
  for (name, shape), k_param, k_grad in zip(shapes.items(), keys[::2],
                                            keys[1::2]):
    params[name] = 0.02 * jax.random.normal(k_param, shape, jnp.float32)
    grads[name] = jax.random.normal(k_grad, shape, jnp.float32)
  return params, grads


def abstract(tree):
  """Shapes and dtypes only: enough to compile, nothing allocated."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def optimizer(name: str, *, rank_fraction: float, momentum_dtype,
              orthogonalize: str | None = None, **placement
              ) -> optax.GradientTransformation:
  """The optimizer ``name`` with its momentum stored in ``momentum_dtype``.

  ``orthogonalize=None`` keeps the package's default method. ``placement``
  (``mesh``, ``param_specs``, ``data_axis``) goes to Orth-Dion and Dion; Muon
  and AdamW take none: under ``jit`` the partitioner places them.
  """
  if name in LOW_RANK:
    factory, settings = _LOW_RANK_ALIASES[name]
    method = {} if orthogonalize is None else {"orthogonalize": orthogonalize}
    return factory(_LEARNING_RATE, rank_fraction=rank_fraction,
                   momentum_dtype=momentum_dtype, **settings, **method,
                   **placement)
  if placement:
    raise ValueError(f"{name} takes no placement; got {sorted(placement)}.")
  if name == "muon":
    return optax.contrib.muon(_LEARNING_RATE, mu_dtype=momentum_dtype)
  if name == "adamw":
    return optax.adamw(_ADAM_LEARNING_RATE, mu_dtype=momentum_dtype)
  raise ValueError(f"unknown optimizer {name!r}; expected one of "
                   f"{OPTIMIZERS}.")


def train_step(tx: optax.GradientTransformation) -> Callable:
  """``(params, state, grads) -> (params, state)``: one optimizer step."""
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def compile_update(tx: optax.GradientTransformation, params, grads):
  """The update ``(params, state, grads) -> (params, state)``, compiled ahead
  of time with params and state donated. Inputs may be abstract."""
  state = jax.eval_shape(tx.init, params)
  return jax.jit(train_step(tx), donate_argnums=(0, 1)).lower(
      params, state, grads).compile()


class DonatedUpdate:
  """One optimizer's compiled update, called like a training loop calls it.

  Each call feeds the previous call's (donated) parameters and state back in,
  with a fixed gradient.
  """

  def __init__(self, tx: optax.GradientTransformation, params, grads):
    self.compiled = compile_update(tx, abstract(params), abstract(grads))
    # A private copy: the first call donates it away.
    self.params = jax.tree.map(jnp.copy, params)
    self.state = tx.init(self.params)
    self.grads = grads

  def __call__(self):
    self.params, self.state = self.compiled(self.params, self.state,
                                            self.grads)
    return self.params, self.state


def _product_subscripts(shape: tuple[int, int]) -> dict[str, str]:
  """einsum subscripts of the four products in the layout ``io`` (fan_in,
  fan_out); ``P`` lives on the larger side, ``Q`` and ``R`` on the smaller."""
  small, big = ("o", "i") if shape[1] < shape[0] else ("i", "o")
  outer = f"{big}r,{small}r->io"
  return {"B Q": f"io,{small}r->{big}r", "B^T P": f"io,{big}r->{small}r",
          "P R^T": outer, "P Q^T": outer}


def roofline_products(shapes: Shapes, rank_fraction: float,
                      which: Sequence[str] = PRODUCTS, seed: int = 0
                      ) -> Callable[[], object]:
  """A runner of the plain jitted products ``which`` for every matrix.

  Operands are independent random arrays (``B`` is ``(fan_in, fan_out)``,
  ``P`` is ``(big, r)``, ``Q`` and ``R`` are ``(small, r)``) so that nothing
  is fused away or reused; every result is returned.
  """
  operands = []
  key = jax.random.key(seed)
  for index, shape in enumerate(shapes.values()):
    r = rank(shape, rank_fraction)
    k_b, k_p, k_q, k_r = jax.random.split(jax.random.fold_in(key, index), 4)
    operands.append({
        "B": jax.random.normal(k_b, shape, jnp.float32),
        "P": jax.random.normal(k_p, (max(shape), r), jnp.float32),
        "Q": jax.random.normal(k_q, (min(shape), r), jnp.float32),
        "R": jax.random.normal(k_r, (min(shape), r), jnp.float32),
    })
  subscripts = [_product_subscripts(shape) for shape in shapes.values()]
  inputs = {"B Q": ("B", "Q"), "B^T P": ("B", "P"), "P R^T": ("P", "R"),
            "P Q^T": ("P", "Q")}

  @jax.jit
  def products(operands):
    return [[jnp.einsum(subs[name], *(ops[x] for x in inputs[name]))
             for name in which] for subs, ops in zip(subscripts, operands)]

  return lambda: products(operands)


def _seconds(run: Callable[[], object], calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    result = run()
  jax.block_until_ready(result)
  return (time.perf_counter() - start) / calls


def time_round_robin(runners: Mapping[str, Callable[[], object]],
                     repeats: int, min_sample_s: float = 0.1
                     ) -> dict[str, list[float]]:
  """Seconds per call of each runner: ``repeats`` samples after a warm-up.

  The runners take turns, one sample each per round, so that the machine's
  slow drifts (other processes, clock changes) spread over all of them alike
  and ratios between them stay meaningful on a noisy machine. A runner faster
  than ``min_sample_s`` is called several times back to back per sample, so
  that one descheduled thread does not decide its time.
  """
  calls = {}
  for name, run in runners.items():
    warm_up_s = _seconds(run, 1)
    calls[name] = min(1000, max(1, math.ceil(min_sample_s / warm_up_s)))
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      times[name].append(_seconds(run, calls[name]))
  return times


def median(values: Sequence[float]) -> float:
  return statistics.median(values)


def spread(values: Sequence[float]) -> float:
  """(max - min) / median: how far to trust a median of noisy runs."""
  return (max(values) - min(values)) / statistics.median(values)


def device_description() -> str:
  """The backend, its devices, and the CPU thread settings that matter.

  On CPU, XLA runs the matmuls on its own threads while LAPACK calls (the
  Cholesky and triangular solves of the QR) go to OpenBLAS, whose threads
  keep spinning after each call; how many there are changes the low-rank
  updates' time a lot, so the variables that set it are part of the result
  (unset: the package's own limit of one thread, ``blas_threads``).
  """
  devices = jax.devices()
  text = (f"{jax.default_backend()}: {len(devices)} x "
          f"{devices[0].device_kind}, jax {jax.__version__}")
  if jax.default_backend() == "cpu":
    text += f", {os.cpu_count()} cores"
    for variable in ("OPENBLAS_NUM_THREADS", "ORTH_DION_BLAS_THREADS"):
      text += f", {variable}={os.environ.get(variable, 'unset')}"
  return text


def write_json(path: pathlib.Path | None, records) -> None:
  """The records, the device and the command line as JSON at ``path``
  (``--json``); nothing when ``path`` is None."""
  if path is None:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({
      "device": device_description(), "argv": sys.argv[1:],
      "records": records}, indent=1))


def format_table(columns: Sequence[tuple[str, str]],
                 rows: Sequence[Sequence[object]]) -> str:
  """Right-aligned text table; ``columns`` are ``(title, format spec)``, a
  ``None`` cell prints as ``-``."""
  cells = [[title for title, _ in columns]]
  for row in rows:
    cells.append(["-" if value is None else format(value, spec)
                  for value, (_, spec) in zip(row, columns)])
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths))
                   for line in cells)
