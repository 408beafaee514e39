"""Adaptive rank (Ada-Orth-Dion): each matrix's rank follows its effective rank.

Under ``jax.jit`` a rank is a shape, so it cannot change inside a step. The
work is split in two (docs/design.md, "Adaptive rank"):

* inside the jitted step (``adaptive_rank=True``): each matrix estimates its
  effective rank from ``r x r`` quantities it already has
  (``low_rank.energy_rank``: how many directions hold ``rank_energy`` of the
  buffer's energy), smooths it by a moving average, and keeps the energy
  Gram of its new right factor's columns (``low_rank.spectrum``);
* between steps, on the host: ``RankController`` reads the smoothed
  estimates every ``interval`` steps, applies ``RankPolicy`` (bounds,
  multiples, hysteresis) and, when some rank changes, ``resize_ranks``
  returns the state with the new shapes. The next call of the jitted step
  sees new shapes and compiles once for them (jit's cache keeps the earlier
  ones), so a run compiles at most once per interval.

``resize_ranks`` touches only the right factors and their energy Grams (the
momentum keeps its shape, the weight's). Shrinking ``Q`` (``k x r``) to
``r'`` keeps ``Q V``, ``V`` the top ``r'`` eigenvectors of the energy Gram
``G``: for an orthonormal ``Q`` spanning the last ``R``, the ``r'``-column
basis that held the most of the last step's captured energy. Growing appends
``r' - r`` orthonormal columns orthogonal to ``Q``, from a Gaussian draw
seeded by the seed, the path and the new rank: every replica and host gets
the same factors. A resize to the same rank returns the leaf unchanged.

Example (a training loop; ``train_step`` is jitted)::

    tx = orth_dion_jax.orth_dion(0.02, adaptive_rank=True)
    opt_state = tx.init(params)
    ranks = orth_dion_jax.RankController(interval=100)
    for step in range(steps):
      params, opt_state = train_step(params, opt_state, batch)
      opt_state = ranks.update(step + 1, opt_state)

References:
  Nakamori et al., Orth-Dion, https://arxiv.org/abs/2605.16341 (Ada-Orth-Dion)
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from orth_dion_jax import nnx_interop
from orth_dion_jax import orthogonalize
from orth_dion_jax import settings
from orth_dion_jax import validation
from orth_dion_jax.lapack_calls import per_matrix
from orth_dion_jax.scaling import abs_max, unit_scaled
from orth_dion_jax.settings import RankPolicy
from orth_dion_jax.transform import LowRankState, OrthDionState

Array = jax.Array


def _is_state(x: Any) -> bool:
  return isinstance(x, (OrthDionState, LowRankState))


def _states(opt_state: Any) -> list[OrthDionState | LowRankState]:
  # NNX Variables unwrapped, so that paths read as the parameters' do.
  return [s for s in jax.tree.leaves(nnx_interop.unboxed(opt_state),
                                     is_leaf=_is_state) if _is_state(s)]


def _adaptive_states(opt_state: Any) -> list[OrthDionState | LowRankState]:
  states = _states(opt_state)
  if not states:
    raise ValueError("opt_state holds no Orth-Dion / Dion state: pass the "
                     "state of orth_dion, dion or scale_by_orth_dion.")
  if any(s.right_energy is None for s in states):
    raise ValueError("the optimizer was built without adaptive_rank=True: "
                     "its state has no effective ranks to follow.")
  return states


def _by_path(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def current_ranks(opt_state: Any) -> dict[str, int]:
  """The rank each low-rank matrix of ``opt_state`` holds, by parameter path
  (the last axis of its right factor)."""
  return {path: int(jnp.shape(q)[-1]) for s in _states(opt_state)
          for path, q in _by_path(s.right_factor).items()}


def effective_ranks(opt_state: Any) -> dict[str, np.ndarray]:
  """The smoothed effective ranks (host copies, each with its weight's batch
  shape; 0 before the first step), by parameter path."""
  return {path: _host(x) for s in _adaptive_states(opt_state)
          for path, x in _by_path(s.effective_rank).items()}


def _host(x: Any) -> np.ndarray:
  """A whole copy of ``x`` on this host, also when other hosts hold parts
  of it (a stack of layers split over a mesh axis that crosses hosts)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable
                                       or x.is_fully_replicated):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _leaf_key(seed: int, path: str, rank: int) -> Array:
  # crc32, not hash(): Python salts str hashes per process, and every host
  # must draw the same columns.
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
  return jax.random.fold_in(key, rank)


@functools.partial(jax.jit, static_argnames="rank")
def _resized(q: Array, energy: Array, key: Array, *, rank: int
             ) -> tuple[Array, Array]:
  """One leaf's right factors ``batch + (k, r)`` and energy Grams
  ``batch + (r, r)`` at the new rank."""
  batch, (k, r) = q.shape[:-2], q.shape[-2:]
  qs, gs = q.reshape(-1, k, r), energy.reshape(-1, r, r)
  # A Gram that is not finite (a corrupt checkpoint) says nothing about the
  # columns: rank them in order, so that a shrink keeps the first ones. (A
  # non-finite Q itself is repaired by the next step's guard.)
  in_order = jnp.diag(jnp.arange(r, 0, -1, dtype=jnp.float32))
  gs = jnp.where(jnp.all(jnp.isfinite(gs), axis=(-2, -1))[:, None, None],
                 gs, in_order)
  if rank < r:
    # Only the eigenvectors matter: scaled exactly by a power of two to
    # largest entry about 1, a finite Gram near the top of the range cannot
    # overflow inside eigh (nor a reciprocal flush to zero).
    largest = abs_max(gs, axis=(-2, -1), keepdims=True)
    values, vectors = per_matrix(jnp.linalg.eigh, unit_scaled(gs, largest))
    top = vectors[..., ::-1][..., :rank]
    new_q = jnp.einsum("nkr,nrs->nks", qs, top)
    new_g = jnp.einsum("nrs,nrt,ntu->nsu", top, gs, top)
  else:
    # An orthonormal basis of [Q, Z]: its last r' - r columns are orthogonal
    # to span(Q) (Q has full column rank after any step) and to each other.
    z = jax.random.normal(key, (qs.shape[0], k, rank - r), jnp.float32)
    basis = orthogonalize.orthonormalize(
        jnp.concatenate([qs, z], axis=-1), "householder")
    new_q = jnp.concatenate([qs, basis[..., r:]], axis=-1)
    new_g = jnp.pad(gs, ((0, 0), (0, rank - r), (0, rank - r)))
  return (new_q.reshape(batch + (k, rank)),
          new_g.reshape(batch + (rank, rank)))


def _replicated(x: Any) -> Any:
  """``x`` whole on every device of its mesh: a resize works on whole
  ``k x r`` factors (small), and an Explicit mesh refuses to join a split
  factor with a fresh unsplit draw."""
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.device_put(x, jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec()))
  return x


def _placed_like(x: Array, like: Any) -> Array:
  """``x`` with ``like``'s sharding (its spec: only r changed)."""
  sharding = getattr(like, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.device_put(x, sharding)
  return x


def resize_ranks(opt_state: Any, ranks: Mapping[str, int], *, seed: int = 0
                 ) -> Any:
  """``opt_state`` with the right factors of the paths in ``ranks`` resized.

  Args:
    opt_state: the state of an optimizer built with ``adaptive_rank=True``
      (any chain or partition holding ``OrthDionState`` / ``LowRankState``).
    ranks: ``{path: new rank}``, paths as ``current_ranks`` names them;
      paths not given keep their rank.
    seed: seeds the columns drawn when a rank grows (use the optimizer's).

  Returns:
    The state with new right factors and energy Grams for the changed
    paths, placed with the old ones' shardings; every other leaf is the
    same object.

  Raises:
    ValueError: naming the path, for an unknown path or a rank outside
      ``[1, k]`` (``k`` the matrix's smaller side).

  NNX ``Variable`` boxes are unwrapped: for an ``nnx.Optimizer``, write the
  result back with ``nnx.update(optimizer.opt_state, nnx.state(result))``.
  """
  if not isinstance(ranks, Mapping):
    raise TypeError("resize_ranks: ranks must be a mapping {path: rank}, "
                    f"got {type(ranks).__name__}.")
  validation.check_seed(seed)
  opt_state = nnx_interop.unboxed(opt_state)
  states = _adaptive_states(opt_state)
  known = {p for s in states for p in _by_path(s.right_factor)}
  for path, rank in ranks.items():
    if path not in known:
      raise ValueError(f"resize_ranks: no low-rank matrix at {path!r}; the "
                       f"paths are {sorted(known)}.")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
      raise TypeError(f"resize_ranks: the rank for {path} must be an int, "
                      f"got {type(rank).__name__} {rank!r}.")

  def resize(state):
    if not _is_state(state):
      return state
    qs, gs = _by_path(state.right_factor), _by_path(state.right_energy)
    new = {}
    for path, q in qs.items():
      rank, (k, r) = ranks.get(path), jnp.shape(q)[-2:]
      if rank is None or rank == r:
        continue
      if not 1 <= rank <= k:
        raise ValueError(f"resize_ranks: {path} is a matrix with {k} "
                         f"columns on its smaller side: its rank must be in "
                         f"[1, {k}], got {rank}.")
      new_q, new_g = _resized(_replicated(q), _replicated(gs[path]),
                              _leaf_key(seed, path, rank), rank=int(rank))
      new[path] = (_placed_like(new_q, q), _placed_like(new_g, gs[path]))
    if not new:
      return state
    def swap(index):
      def leaf(path, x):
        changed = new.get(jax.tree_util.keystr(path))
        return x if changed is None else changed[index]
      return leaf
    return state._replace(
        right_factor=jax.tree_util.tree_map_with_path(swap(0),
                                                      state.right_factor),
        right_energy=jax.tree_util.tree_map_with_path(swap(1),
                                                      state.right_energy))
  return jax.tree.map(resize, opt_state, is_leaf=_is_state)


def target_rank(estimate: float, current: int, *, lowest: int, highest: int,
                policy: RankPolicy) -> int:
  """The policy's rank for one matrix, given its smoothed effective rank.

  Grows to the multiple of ``multiple_of`` at or above ``estimate`` when the
  estimate exceeds the current rank; shrinks to the multiple at or above
  ``estimate + hysteresis`` when that is below the current rank; otherwise
  keeps it. Clipped to ``[lowest, highest]``. An estimate of 0 (no step
  yet) keeps the rank.
  """
  if not (math.isfinite(estimate) and estimate > 0):
    return current
  step = policy.multiple_of
  if estimate > current:
    target = step * math.ceil(estimate / step)
  else:
    target = step * math.ceil((estimate + policy.hysteresis) / step)
    if target >= current:
      return current
  return int(min(max(target, lowest), highest))


@settings.accepts(RankPolicy)
class RankController:
  """Changes the ranks of an adaptive optimizer's state between steps.

  ``update(step, opt_state)`` every step: every ``interval`` steps it reads
  the smoothed effective ranks (one small device-to-host copy), applies the
  policy (``target_rank``; a stack of matrices takes its largest estimate,
  since they share a rank) and resizes what changed. The bounds per matrix
  are ``min_rank`` and ``max_rank`` (default: the rank it had when the
  controller first saw it), each clipped to the matrix's smaller side.

  Attributes:
    policy: the ``RankPolicy`` built from the keywords.
    changes: how many decisions changed some rank; the recompiles they
      cause are at most this many (fewer when a set of ranks recurs).
    history: ``(step, {path: new rank})`` of each change.
    fixed: the paths that started below ``min_rank`` with no ``max_rank``
      above it: they keep their rank (a warning says so when all do).
  """

  def __init__(self, *, seed: int = 0, **policy):
    self.policy: RankPolicy = settings.parse(RankController,
                                             policy)[RankPolicy]
    validation.check_seed(seed)
    self.seed = seed
    self.changes = 0
    self.history: list[tuple[int, dict[str, int]]] = []
    self.fixed: list[str] = []
    self._bounds: dict[str, tuple[int, int]] = {}
    self._warned = False

  def resume(self, history: list[tuple[int, dict[str, int]]]) -> None:
    """Continues a run that made the changes in ``history`` (from a
    checkpoint). Bounds are not restored: they come from the ranks the
    controller first sees, so call ``update(0, fresh_state)`` on the freshly
    initialized state before resizing it to a checkpoint's ranks."""
    self.history = [(int(step), dict(ranks)) for step, ranks in history]
    self.changes = len(self.history)

  def _see(self, opt_state: Any) -> None:
    """Records each new matrix's bounds, from the rank it has now."""
    for s in _states(opt_state):
      for path, q in _by_path(s.right_factor).items():
        if path not in self._bounds:
          k, rank = jnp.shape(q)[-2:]
          lowest = min(self.policy.min_rank, k)
          highest = min(self.policy.max_rank or rank, k)
          if lowest > highest:
            # Below min_rank from the start, with no room to grow: it keeps
            # its rank (a small matrix in a model of large ones).
            self.fixed.append(path)
            lowest = highest
          self._bounds[path] = (lowest, highest)
    if self._bounds and len(self.fixed) == len(self._bounds) and not (
        self._warned):
      self._warned = True
      warnings.warn(
          "RankController: every matrix starts below min_rank="
          f"{self.policy.min_rank} with max_rank="
          f"{self.policy.max_rank}: no rank can change. Lower min_rank or "
          "raise max_rank.", stacklevel=3)

  def targets(self, opt_state: Any) -> dict[str, int]:
    """The rank the policy gives each matrix now (changed or not)."""
    self._see(opt_state)
    estimates = effective_ranks(opt_state)
    out = {}
    for path, rank in current_ranks(opt_state).items():
      lowest, highest = self._bounds[path]
      out[path] = target_rank(float(np.max(estimates[path], initial=0.0)),
                              rank, lowest=lowest, highest=highest,
                              policy=self.policy)
    return out

  def update(self, step: int, opt_state: Any) -> Any:
    """``opt_state``, resized when ``step`` is a decision step and some
    rank changes (otherwise the same object)."""
    _adaptive_states(opt_state)   # refuses a state without adaptive rank
    self._see(opt_state)
    if step <= 0 or step % self.policy.interval:
      return opt_state
    ranks = current_ranks(opt_state)
    changed = {p: r for p, r in self.targets(opt_state).items()
               if r != ranks[p]}
    if not changed:
      return opt_state
    self.changes += 1
    self.history.append((step, changed))
    return resize_ranks(opt_state, changed, seed=self.seed)
