"""Dividing by a largest magnitude exactly, without flushing to zero.

Before squaring a factor or a buffer (Gram matrices, column norms, the
captured energy), the step divides it by its largest magnitude, so that
entries at 1e30 do not overflow and entries at 1e-30 do not underflow. A
plain ``x / m`` is not safe at the top of the float32 range: XLA:CPU computes
it as ``x * (1 / m)``, and for ``m >= 2^126`` the reciprocal is subnormal and
flushed to zero, so the result would be all zeros.

``unit_scaled`` divides by the power of two of ``m`` instead: with
``m = f 2^e``, ``f`` in [0.5, 1), it multiplies by ``2^-e`` in two halves,
each a normal number. Multiplying by a power of two changes only exponents,
so the result is exact, and its largest magnitude is ``f``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def abs_max(x: Array, axis, keepdims: bool = False) -> Array:
  """``max |x|`` over ``axis``, and +Inf wherever an entry is NaN or Inf.

  Every largest magnitude the step takes goes through here, because the
  guards read it as their test of finiteness as well. A plain
  ``jnp.max(jnp.abs(x))`` cannot be trusted with that: XLA:CPU (jax 0.10)
  reduces 4096 or more entries with a vectorized max that drops NaN, and
  even returns -Inf when the NaN is the last entry. Mapping non-finite
  entries to +Inf first leaves no NaN for the reduction to drop; the select
  runs in the reduction's own pass.
  """
  return jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), jnp.inf), axis=axis,
                 keepdims=keepdims)


def unit_scaled(x: Array, largest: Array) -> Array:
  """``x / 2^e`` for ``largest = f 2^e`` (``f`` in [0.5, 1)), exactly.

  ``largest`` broadcasts against ``x`` (e.g. ``(n, 1, 1)`` or ``(n, 1, r)``).
  Where it is 0 or not finite, ``x`` is returned as is (there is nothing to
  scale by; the non-finite guards look at ``largest`` itself).
  """
  return scaled_by(x, unit_scale(largest, x.dtype))


def unit_scale(largest: Array, dtype=jnp.float32) -> tuple[Array, Array]:
  """The two normal powers of two whose product is ``2^-e`` (``largest =
  f 2^e``; 1 and 1 where it is 0 or not finite), shaped like ``largest``.

  ``unit_scaled(x, largest) == scaled_by(x, unit_scale(largest))``: taken
  apart so that the exponent is found once for a megabatch and the arrays
  of its members are each scaled by their rows of it.
  """
  _, exponent = jnp.frexp(largest)
  usable = (largest > 0) & jnp.isfinite(largest)
  exponent = jnp.where(usable, exponent, 0)
  half = exponent // 2
  one = jnp.ones((), dtype)
  return jnp.ldexp(one, -half), jnp.ldexp(one, half - exponent)


def scaled_by(x: Array, factors: tuple[Array, Array]) -> Array:
  """``x`` times both of ``unit_scale``'s factors, one after the other (their
  product could be subnormal)."""
  low, high = factors
  return x * low * high


def mantissa(largest: Array) -> Array:
  """``f`` of ``largest = f 2^e``: the largest magnitude ``unit_scaled``
  leaves (1 where ``largest`` is 0 or not finite)."""
  fraction, _ = jnp.frexp(largest)
  usable = (largest > 0) & jnp.isfinite(largest)
  return jnp.where(usable, fraction, 1.0)
