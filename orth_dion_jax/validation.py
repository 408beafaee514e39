"""Eager checks of hyperparameters, each error naming the argument.

Values may be Python numbers, concrete arrays (``optax.inject_hyperparams``
passes numeric hyperparameters as arrays) or schedules; traced values and
schedules cannot be checked before they run and are let through.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_STATIC_HINT = ("; under optax.inject_hyperparams pass "
                "static_args=orth_dion_jax.STATIC_ARGS")


def _concrete(name: str, value: Any) -> float | None:
  """The value as a float, or None for schedules and traced arrays."""
  if callable(value):
    return None
  try:
    array = np.asarray(value)
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None  # traced under jit: checked where it is concrete
  except (TypeError, ValueError):
    array = None   # e.g. a ragged list: refused below, naming the argument
  # np.asarray("0.1") is a string array that float() would accept.
  if array is None or array.dtype.kind not in "iuf" or array.ndim != 0:
    raise TypeError(f"{name} must be a real number, a scalar array or a "
                    f"schedule, got {type(value).__name__} {value!r}.")
  return float(array.reshape(()))


def check_static_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be a Python int, got "
                    f"{type(value).__name__} {value!r}{_STATIC_HINT}.")


def check_static_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be True or False, got "
                    f"{type(value).__name__} {value!r}{_STATIC_HINT}.")


def check_static_fraction(name: str, value: Any, *, closed_left: bool,
                          closed_right: bool) -> None:
  """A Python real in the unit interval, ends open or closed as given."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a Python float, got "
                    f"{type(value).__name__} {value!r}{_STATIC_HINT}.")
  low_ok = value >= 0 if closed_left else value > 0
  high_ok = value <= 1 if closed_right else value < 1
  if not (low_ok and high_ok):
    interval = ("[" if closed_left else "(") + "0, 1" + (
        "]" if closed_right else ")")
    raise ValueError(f"{name} must be in {interval}, got {value}.")


def check_static_real(name: str, value: Any) -> None:
  """A Python (or NumPy) real number, not a schedule or an array."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a Python float, got "
                    f"{type(value).__name__} {value!r}.")


def check_seed(seed: Any) -> None:
  check_static_int("seed", seed)
  # jax.random.key keeps 32 bits: 2**32 would silently be seed 0.
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")


def check_positive_int(name: str, value: Any) -> None:
  check_static_int(name, value)
  if value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value}.")


def check_rank_arguments(rank: Any, rank_fraction: Any,
                         rank_multiple_of: Any) -> None:
  if rank is not None:
    check_positive_int("rank", rank)
  if isinstance(rank_fraction, bool) or not isinstance(rank_fraction,
                                                       numbers.Real):
    raise TypeError("rank_fraction must be a Python float, got "
                    f"{type(rank_fraction).__name__}{_STATIC_HINT}.")
  if not 0 < rank_fraction <= 1:
    raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction}.")
  check_positive_int("rank_multiple_of", rank_multiple_of)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got "
                     f"{value!r}.")


def check_unit_interval(name: str, value: Any, *, closed_right: bool) -> None:
  """value in [0, 1] (closed_right) or [0, 1)."""
  v = _concrete(name, value)
  if v is None:
    return
  ok = 0 <= v <= 1 if closed_right else 0 <= v < 1
  if not ok:
    interval = "[0, 1]" if closed_right else "[0, 1)"
    raise ValueError(f"{name} must be in {interval}, got {v}.")


def check_nonnegative(name: str, value: Any) -> None:
  """A finite value >= 0 (NaN fails ``v >= 0``, Inf is refused too)."""
  v = _concrete(name, value)
  if v is not None and not (v >= 0 and math.isfinite(v)):
    raise ValueError(f"{name} must be finite and >= 0, got {v}.")


def check_scale(scale: Any) -> None:
  if scale is None or scale in ("spectral", "rms"):
    return
  if isinstance(scale, str):
    raise ValueError("scale must be 'spectral', 'rms', a positive float or "
                     f"None, got {scale!r}.")
  v = _concrete("scale", scale)
  if v is None or not (v > 0 and math.isfinite(v)):
    raise ValueError(f"scale must be 'spectral', 'rms', a positive float or "
                     f"None, got {scale!r}.")


def check_float_dtype(name: str, value: Any) -> None:
  """None, or a floating dtype: an int8 or bool momentum would hold zeros."""
  if value is None:
    return
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise TypeError(f"{name} must be a floating dtype such as jnp.bfloat16, "
                    f"got {value!r}.") from e
  # 8-bit floats have too few bits for the error feedback's residuals, and
  # jnp does not promote them with float32 gradients.
  if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2:
    raise ValueError(f"{name} must be a floating dtype of 16 bits or more, "
                     f"such as jnp.bfloat16, got {dtype.name}.")


def check_tall_matrices(fn: str, a: Any) -> None:
  """``a`` is a real floating array of shape ``(..., k, r)`` with ``k >= r``:
  what ``orthonormalize`` and ``polar`` take."""
  dtype = getattr(a, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: a must be a real floating array, got "
                    f"{type(a).__name__} of dtype {dtype}.")
  if a.ndim < 2 or a.shape[-2] < a.shape[-1]:
    raise ValueError(f"{fn}: a must have shape (..., k, r) with k >= r (tall "
                     f"or square matrices), got shape {a.shape}.")
