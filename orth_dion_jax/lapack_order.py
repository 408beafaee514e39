"""One LAPACK call in flight at a time: the ordering that keeps XLA:CPU alive.

The pitfall (docs/design.md, "Concurrent LAPACK calls on CPU"): on XLA:CPU a
batched linear-algebra custom call (QR, Cholesky, triangular solve, eigh)
splits its batch over the same thread pool that runs the program, and its
thread blocks until those pieces are done. When the executor starts two such
calls at once, each can hold a pool thread while its pieces wait in the queue
behind the other's: with two threads (a 2-core machine) the process hangs
forever at 0% CPU. Nothing the user can set fixes it (``OPENBLAS_NUM_THREADS``
does not); a single-core process, or an accelerator, does not have it.

The fix, by construction: every such call of an update reads an input that is
*computed from* the previous call's outputs, so no two are ever ready at the
same time. XLA:CPU orders its work by the buffers each instruction reads and
writes, not by the edges of the HLO graph, so ``lax.optimization_barrier`` is
not enough (it produces no instruction of its own; it was tried and still
hangs). ``after`` adds ``0 * isfinite(p)`` for one element ``p`` of each
previous output: exact (the term is always 0, also when ``p`` is NaN), and one
elementwise pass over an ``r x r`` or ``k x r`` input. XLA keeps ``0 * y`` for
floating ``y`` (it would be NaN for a NaN ``y``), so the dependency survives
compilation.

Callers thread the previous outputs through (``previous=``): the power
iteration orders all factor groups of both sides one after the other, and each
orthonormalization orders its own calls, the fallback branch included.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def after(x: Array, previous: Any) -> Array:
  """``x``, recomputed so that it cannot exist before every array of ``previous``.

  Args:
    x: the input of the next LAPACK call.
    previous: a pytree of arrays (the outputs of the previous call), or None.

  Returns:
    An array equal to ``x`` that depends on one element of each leaf of
    ``previous``.
  """
  leaves = [leaf for leaf in jax.tree.leaves(previous) if leaf.size]
  if not leaves:
    return x
  finite = functools.reduce(
      jnp.logical_and, [jnp.isfinite(leaf.reshape(-1)[0]) for leaf in leaves])
  return x + jnp.zeros((), x.dtype) * finite.astype(x.dtype)
