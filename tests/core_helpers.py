"""Shared helpers of the core tests: test matrices, layouts, the reference run.

Weights here are Flax-layout trees; ``ReferenceDion`` (``reference.py``) works
on named matrices in the reference layout ``(fan_out, fan_in)``. The helpers
translate between the two on their own (they read the dimension numbers'
fields, nothing else from the package), so a layout bug in the package shows
up as a mismatch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import orth_dion_jax
import reference


def alias_for(right_factor: str, *args, **kwargs):
  """``orth_dion(*args, right_factor=..., **kwargs)`` ("qr" or "polar") or
  ``dion(*args, **kwargs)`` ("column"), by right factor."""
  if right_factor == "column":
    return orth_dion_jax.dion(*args, **kwargs)
  return orth_dion_jax.orth_dion(*args, right_factor=right_factor, **kwargs)


def well_conditioned(rng: np.random.Generator, shape: tuple[int, int],
                     smallest: float = 0.1) -> np.ndarray:
  """A gradient-like float64 matrix: random singular vectors, singular values
  spread evenly from 1 down to ``smallest``."""
  m, n = shape
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  return (u * np.linspace(1.0, smallest, k)) @ v.T


def _as_tuple(axes) -> tuple[int, ...]:
  return (axes,) if isinstance(axes, int) else tuple(axes)


def _permutation(ndim: int, dims) -> tuple[tuple[int, ...], int, int]:
  """(batch + reduction + output axes, #batch axes, #reduction axes)."""
  dims = dims or orth_dion_jax.DionDimensionNumbers()
  red = tuple(a % ndim for a in _as_tuple(dims.reduction_axis))
  out = tuple(a % ndim for a in _as_tuple(dims.output_axis))
  batch = tuple(a for a in range(ndim) if a not in red + out)
  return batch + red + out, len(batch), len(red)


def _layout(x: np.ndarray, dims) -> np.ndarray:
  """(n, fan_in, fan_out) slices of a weight-shaped array."""
  perm, nb, nr = _permutation(x.ndim, dims)
  y = np.transpose(x, perm)
  fan_in = math.prod(y.shape[nb:nb + nr])
  return y.reshape(-1, fan_in, math.prod(y.shape[nb + nr:]))


def well_conditioned_weight(rng: np.random.Generator, shape: Sequence[int],
                            dims=None) -> np.ndarray:
  """A weight-shaped array whose every matrix slice is ``well_conditioned``."""
  perm, nb, nr = _permutation(len(shape), dims)
  permuted = [shape[a] for a in perm]
  fan_in = math.prod(permuted[nb:nb + nr])
  fan_out = math.prod(permuted[nb + nr:])
  slices = [well_conditioned(rng, (fan_in, fan_out))
            for _ in range(math.prod(permuted[:nb]))]
  return np.stack(slices).reshape(permuted).transpose(np.argsort(perm))


def _is_dims(x) -> bool:
  return x is None or isinstance(x, orth_dion_jax.DionDimensionNumbers)


def _named(tree: Any, dims: Any, to_matrices: Callable) -> dict[str, Any]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  dims_leaves = ([None] * len(leaves) if dims is None
                 else jax.tree.leaves(dims, is_leaf=_is_dims))
  out = {}
  for (path, x), d in zip(leaves, dims_leaves):
    for i, m in enumerate(to_matrices(np.asarray(x, np.float64), d)):
      out[f"{jax.tree_util.keystr(path)}#{i}"] = m
  return out


def as_reference(tree: Any, dims: Any = None) -> dict[str, np.ndarray]:
  """Every matrix of a weight-shaped tree, reference layout, by name."""
  return _named(tree, dims, lambda x, d: [s.T for s in _layout(x, d)])


def right_factor_matrices(state: Any) -> dict[str, np.ndarray]:
  """Every right factor ``(small, r)`` in a state, named like as_reference."""
  return _named(optax.tree.get(state, "right_factor"), None,
                lambda q, _: q.reshape((-1,) + q.shape[-2:]))


def per_matrix_scalars(state: Any, field: str) -> dict[str, np.ndarray]:
  """A per-matrix state field (``captured_fraction``, ``alignment``), each
  leaf raveled to one value per matrix."""
  return _named(optax.tree.get(state, field), None, lambda c, _: np.ravel(c))


def assert_relative_close(actual, expected, rtol: float, what: str,
                          scale: float = 0.0) -> None:
  """Entrywise |actual - expected| <= rtol * max(max|expected|, scale)."""
  expected = np.asarray(expected, np.float64)
  atol = rtol * max(float(np.max(np.abs(expected))), scale, 1e-30)
  try:
    chex.assert_trees_all_close(np.asarray(actual, np.float64), expected,
                                rtol=0.0, atol=atol)
  except AssertionError as e:
    raise AssertionError(f"{what}: {e}") from None


def kernel_tree(rng: np.random.Generator, shapes: dict[str, Any],
                dims: Any = None, dtype=jnp.float32) -> dict[str, Any]:
  """{name: well-conditioned array} for a dict of shapes, as jax arrays."""
  dims = dims or {}
  return {name: jnp.asarray(well_conditioned_weight(rng, s, dims.get(name)),
                            dtype)
          for name, s in shapes.items()}


def gradient_steps(rng: np.random.Generator, shapes: dict[str, Any],
                   steps: int, dims: Any = None) -> list[dict[str, Any]]:
  return [kernel_tree(rng, shapes, dims) for _ in range(steps)]


def run_against_reference(
    tx: optax.GradientTransformation,
    params: Any,
    grads: Sequence[Any],
    *,
    dims: Any = None,
    reference_grads: Sequence[Any] | None = None,
    hyperparams: Callable[[int], dict[str, float]] | None = None,
    momentum_key: str | None = "momentum",
    orthonormal_start: bool = False,
    rebase: bool = False,
    rtol: float = 1e-5,
    state: Any = None,
    **reference_kwargs,
) -> Any:
  """Runs ``tx`` (jitted once) and checks every step against ReferenceDion.

  Compares, for every matrix and step: the update, the parameters, the
  momentum (state field ``momentum_key``), the right factor, the captured
  fraction and the alignment. ``reference_grads`` are what the reference sees (default:
  ``grads``), e.g. gradients already clipped by a transformation chained in
  front. ``hyperparams(t)`` gives step t's ``ReferenceDion.step`` overrides.
  The reference starts from the package's initial right factors,
  or, with ``orthonormal_start``, from orthonormal ones set into the state
  with ``optax.tree.set`` (a square Gaussian start can be so ill-conditioned
  that float32 cannot agree with float64 to 1e-5 on the first step).

  With ``rebase``, once a step has been compared the reference continues
  from the package's weights, momenta and right factors: every step, and
  the state it stores, is still checked from identical inputs, but float32
  rounding is not compounded along the trajectory. The beta-form on
  independent random gradients needs it: its rounding differences grow about
  twofold a step (measured for the QR and polar right factors alike, from
  4e-7 at step 0 to 1e-5 at step 9), a property of the trajectory, not of
  the step.

  ``state``: start from this optimizer state (e.g. a resized one) instead
  of ``tx.init(params)``; the reference takes its right factors, momenta
  and effective ranks. With ``rank_energy`` among the reference's keywords
  (adaptive rank), the effective ranks and energy Grams are compared too.

  Returns:
    The final optimizer state.
  """
  start = state
  state = tx.init(params) if start is None else start
  if orthonormal_start:
    state = optax.tree.set(state, right_factor=jax.tree.map(
        lambda q: jnp.asarray(np.linalg.qr(np.asarray(q, np.float64))[0],
                              jnp.float32),
        optax.tree.get(state, "right_factor")))
  ref = reference.ReferenceDion(as_reference(params, dims),
                                right_factor_matrices(state),
                                **reference_kwargs)
  adaptive = reference_kwargs.get("rank_energy") is not None
  if start is not None:
    momenta = as_reference(optax.tree.get(start, momentum_key), dims)
    ranks = (per_matrix_scalars(start, "effective_rank") if adaptive
             else {})
    for name, e in ref.state.items():
      ref.state[name] = e._replace(
          momentum=momenta[name],
          effective_rank=float(ranks.get(name, 0.0)))
  update = jax.jit(tx.update)
  for t, (g, ref_g) in enumerate(zip(grads, reference_grads or grads)):
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    expected = ref.step(as_reference(ref_g, dims),
                        **(hyperparams(t) if hyperparams else {}))
    actual = {
        "update": as_reference(updates, dims),
        "weight": as_reference(params, dims),
        "right_factor": right_factor_matrices(state),
        "captured_fraction": per_matrix_scalars(state, "captured_fraction"),
        "alignment": per_matrix_scalars(state, "alignment"),
    }
    if adaptive:
      actual["effective_rank"] = per_matrix_scalars(state, "effective_rank")
      actual["right_energy"] = _named(
          optax.tree.get(state, "right_energy"), None,
          lambda g, _: g.reshape((-1,) + g.shape[-2:]))
    if momentum_key is not None:
      actual["momentum"] = as_reference(optax.tree.get(state, momentum_key),
                                        dims)
    gradients = as_reference(ref_g, dims)
    for name, e in expected.items():
      for field, values in actual.items():
        # The momentum is B minus a part of B: its rounding is relative to
        # B's size (the beta-form at full rank keeps exactly 0).
        scale = (float(np.max(np.abs(gradients[name])))
                 if field == "momentum" else 0.0)
        assert_relative_close(values[name], getattr(e, field), rtol,
                              f"step {t}, {name}, {field}", scale)
      if rebase:
        ref.state[name] = e._replace(**{
            field: np.asarray(actual[field][name], np.float64).reshape(
                np.shape(getattr(e, field)))
            for field in ("weight", "momentum", "right_factor")})
  return state
