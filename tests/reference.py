"""An independent float64 NumPy implementation of Dion / Orth-Dion.

Written from docs/design.md alone (it imports nothing from ``orth_dion_jax``),
so that the tests can hold the package to it. Everything here is in the
reference (PyTorch) layout: a weight ``X`` is ``(fan_out, fan_in)``, the
transpose of a Flax kernel. Each step turns the buffer so that its rows are
the larger side (``oriented``); the right factor ``Q`` lives on the smaller
side, shape ``(min(fan_out, fan_in), r)``.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import numpy as np


def qr_pos(a: np.ndarray) -> np.ndarray:
  """Q of A = Q T with diag(T) >= 0 (docs/design.md, "The sign of the QR")."""
  q, t = np.linalg.qr(a, mode="reduced")
  return q * np.where(np.diag(t) < 0, -1.0, 1.0)


def polar(r: np.ndarray) -> np.ndarray:
  """The polar factor V U^T of R = V S U^T, from a float64 SVD; singular
  values at or below r * eps(float32) * s_max count as zero and their
  directions are dropped (docs/design.md, "The polar right factor")."""
  v, s, ut = np.linalg.svd(r, full_matrices=False)
  kept = s > r.shape[1] * np.finfo(np.float32).eps * s[0]
  return (v * kept) @ ut


def alignment(r: np.ndarray, q: np.ndarray) -> float:
  """<B, P Q^T> / ||P^T B||_* = trace(Q^T R) / ||R||_*."""
  nuclear = np.sum(np.linalg.svd(r, compute_uv=False))
  return float(np.sum(q * r) / nuclear) if nuclear > 0 else 0.0


def energy_rank(r: np.ndarray, captured: float, share: float,
                small: int) -> float:
  """How many directions hold ``share`` of B's energy (docs/design.md,
  "Adaptive rank"), from the singular values of R = B^T P and the share
  ``captured`` = ||R||_F^2 / ||B||_F^2 that they hold together: walk down
  the squared singular values, largest first, until the running share
  reaches ``share`` (counting the crossing direction in part); if all r
  fall short, continue at the weakest one's share. At most ``small``; 0
  when nothing was captured."""
  s2 = np.sort(np.linalg.svd(r, compute_uv=False) ** 2)[::-1]
  if captured <= 0 or s2.sum() <= 0:
    return 0.0
  parts = captured * s2 / s2.sum()    # each direction's share of ||B||^2
  held = 0.0
  for i, part in enumerate(parts):
    if held + part >= share:
      return min(i + (share - held) / part, float(small))
    held += part
  if parts[-1] <= 0:
    return float(small)
  return min(len(parts) + (share - held) / parts[-1], float(small))


def right_energy(r: np.ndarray, q: np.ndarray) -> np.ndarray:
  """G = C C^T / trace(C C^T), C = Q^T R: the captured energy along pairs
  of the right factor's columns (zero for R = 0)."""
  c = q.T @ r
  g = c @ c.T
  return g / np.trace(g) if np.trace(g) > 0 else g


def right_factor_of(r: np.ndarray, kind: str, eps: float) -> np.ndarray:
  """The new right factor from R: "qr", "polar" or "column" (Dion)."""
  if kind == "qr":
    return qr_pos(r)
  if kind == "polar":
    return polar(r)
  return normalize_columns(r, eps)


def normalize_columns(r: np.ndarray, eps: float) -> np.ndarray:
  """Dion's right factor: each column over (its 2-norm + eps)."""
  return r / (np.linalg.norm(r, axis=0, keepdims=True) + eps)


def is_wide(x: np.ndarray) -> bool:
  """fan_out < fan_in: the step works on X^T."""
  return x.shape[0] < x.shape[1]


def oriented(x: np.ndarray) -> np.ndarray:
  """B = X if fan_out >= fan_in (square included), else X^T."""
  return x.T if is_wide(x) else x


def update_scale(fan_out: int, fan_in: int, scale: str) -> float:
  if scale == "spectral":
    return math.sqrt(fan_out / fan_in)
  if scale == "rms":
    return 0.2 * math.sqrt(max(fan_out, fan_in))
  raise ValueError(f"unknown scale {scale!r}")


class Factors(NamedTuple):
  p: np.ndarray   # (big, r), orthonormal columns
  r: np.ndarray   # (small, r), B^T P of the last power iteration
  q: np.ndarray   # (small, r), the new right factor


def low_rank_factors(b: np.ndarray, q: np.ndarray, *, right_factor: str,
                     eps: float, power_iters: int) -> Factors:
  """Warm-started power iteration(s) on an oriented buffer ``b``."""
  for _ in range(power_iters):
    p = qr_pos(b @ q)
    r = b.T @ p
    q = right_factor_of(r, right_factor, eps)
  return Factors(p, r, q)


class MatrixState(NamedTuple):
  """What the reference carries for one matrix (reference layout)."""
  weight: np.ndarray         # X, (fan_out, fan_in)
  momentum: np.ndarray       # M (mu-form), E (beta-form) or the trace
  right_factor: np.ndarray   # Q, (small, r)
  captured_fraction: float   # ||P R^T||_F^2 / ||B||_F^2 of the last step
  alignment: float           # <B, P Q^T> / ||P^T B||_* of the last step
  update: np.ndarray         # the last parameter update, (fan_out, fan_in)
  effective_rank: float = 0.0   # adaptive: moving average of energy_rank
  right_energy: np.ndarray | None = None   # adaptive: (r, r)


class ReferenceDion:
  """Dion / Orth-Dion on a dict of named matrices, in float64.

  ``form`` picks the momentum:

  * ``"mu"``: the reference mu-form (docs/design.md, "The step"), ``decay`` is mu:
    ``B = M + G; M <- B - (1 - mu) P R^T``;
  * ``"beta"``: the paper's analysed form (section 6), transcribed literally,
    ``decay`` is beta: ``M = G + E; U = qr(M V); W = M^T U; V = qr_pos(W);
    E <- beta (M - U U^T M)`` (``V = polar(W)`` or Dion's column
    normalization with the other right factors);
  * ``"trace"``: heavy-ball momentum ``B <- decay B + G`` with no error
    feedback (the low-rank step chained after ``optax.trace``).

  Every form then steps ``X <- X - lr (s P Q^T + wd X)``.
  """

  def __init__(self, weights: Mapping[str, np.ndarray],
               right_factors: Mapping[str, np.ndarray], *,
               learning_rate: float, form: str = "mu", decay: float = 0.95,
               weight_decay: float = 0.0, right_factor: str = "qr",
               power_iters: int = 1, eps: float = 1e-8,
               scale: str = "spectral", momentum_dtype=None,
               rank_energy: float | None = None, rank_ema: float = 0.9):
    self.learning_rate = learning_rate
    self.form = form
    self.decay = decay
    self.weight_decay = weight_decay
    self.right_factor = right_factor
    self.power_iters = power_iters
    self.eps = eps
    self.scale = scale
    # Momentum stored in a narrower dtype (e.g. ml_dtypes.bfloat16): each
    # new momentum is rounded to it, all arithmetic stays float64.
    self.momentum_dtype = momentum_dtype
    # Adaptive rank: the effective-rank estimate and energy Gram are kept
    # when rank_energy is given.
    self.rank_energy = rank_energy
    self.rank_ema = rank_ema
    self.state = {
        name: MatrixState(
            weight=np.asarray(x, np.float64),
            momentum=np.zeros(np.shape(x)),
            right_factor=np.asarray(right_factors[name], np.float64),
            captured_fraction=0.0, alignment=0.0,
            update=np.zeros(np.shape(x)))
        for name, x in weights.items()}

  def step(self, grads: Mapping[str, np.ndarray], *,
           learning_rate: float | None = None, decay: float | None = None,
           weight_decay: float | None = None) -> dict[str, MatrixState]:
    """One step on every matrix; per-step hyperparameters override defaults."""
    lr = self.learning_rate if learning_rate is None else learning_rate
    decay = self.decay if decay is None else decay
    wd = self.weight_decay if weight_decay is None else weight_decay
    for name, g in grads.items():
      self.state[name] = self._matrix_step(
          self.state[name], np.asarray(g, np.float64), lr=lr, decay=decay,
          wd=wd)
    return self.state

  def _matrix_step(self, s: MatrixState, g: np.ndarray, *, lr: float,
                   decay: float, wd: float) -> MatrixState:
    x = s.weight
    back = (lambda y: y.T) if is_wide(x) else (lambda y: y)
    if self.form == "beta":
      m = oriented(g + s.momentum)
      u = qr_pos(m @ s.right_factor)
      w = m.T @ u
      q = right_factor_of(w, self.right_factor, self.eps)
      new_momentum = back(decay * (m - u @ (u.T @ m)))
      direction = u @ q.T
      captured = np.sum(w**2) / np.sum(m**2)
      aligned = alignment(w, q)
      projected = w
    else:
      b = oriented((decay if self.form == "trace" else 1.0) * s.momentum + g)
      f = low_rank_factors(b, s.right_factor, right_factor=self.right_factor,
                           eps=self.eps, power_iters=self.power_iters)
      q = f.q
      if self.form == "trace":
        new_momentum = back(b)
      else:
        new_momentum = back(b - (1.0 - decay) * f.p @ f.r.T)
      direction = f.p @ f.q.T
      captured = np.sum(f.r**2) / np.sum(b**2)
      aligned = alignment(f.r, f.q)
      projected = f.r
    fan_out, fan_in = x.shape
    update = -lr * (update_scale(fan_out, fan_in, self.scale)
                    * back(direction) + wd * x)
    if self.momentum_dtype is not None:
      new_momentum = np.asarray(new_momentum, self.momentum_dtype).astype(
          np.float64)
    adaptive = {}
    if self.rank_energy is not None:
      estimate = energy_rank(projected, captured, self.rank_energy,
                             min(x.shape))
      previous = s.effective_rank
      adaptive = dict(
          effective_rank=(estimate if previous == 0 else
                          self.rank_ema * previous
                          + (1 - self.rank_ema) * estimate),
          right_energy=right_energy(projected, q))
    return MatrixState(weight=x + update, momentum=new_momentum,
                       right_factor=q, captured_fraction=float(captured),
                       alignment=aligned, update=update, **adaptive)
