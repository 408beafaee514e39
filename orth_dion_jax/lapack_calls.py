"""Linear-algebra calls that cannot deadlock XLA:CPU: one matrix per call.

The pitfall (docs/design.md, "Concurrent LAPACK calls on CPU"): on XLA:CPU
(jaxlib 0.10.x) a batched QR, Cholesky, triangular solve or eigh splits its
batch over the same thread pool that runs the program, and its thread blocks
until the pieces are done. When two such calls run at once, each can hold a
pool thread while its pieces wait in the queue behind the other's: with two
threads (a 2-core machine) the process hangs forever at 0% CPU. Ordering the
calls of one program is not enough: each device of a mesh runs its own
program, and four devices' triangular solves fill the pool just the same.

A call on a single matrix has nothing to split: jaxlib runs it on the calling
thread and never waits on the pool. So on CPU ``per_matrix`` makes every call
on one matrix (side by side for a small batch, in a ``lax.map`` loop for a
large one); on accelerators, which
do not have the problem and gain from batched kernels, it makes one batched
call. The choice is made per platform when the program is lowered
(``lax.platform_dependent``), with nothing for the user to set.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from orth_dion_jax import blas_threads

Array = jax.Array

# Batches up to this size are unrolled into single calls; larger ones loop.
_MAX_UNROLLED = 8


def per_matrix(fn: Callable[..., object], *operands: Array):
  """``fn`` applied to ``operands`` batched along their leading axis.

  Args:
    fn: a function of single matrices (e.g. ``jnp.linalg.cholesky``) that
      also accepts a leading batch axis, as ``jnp.linalg``'s functions do.
    *operands: arrays with the same leading (batch) axis.

  Returns:
    ``fn``'s output, batched: one call per matrix on CPU, one batched call
    elsewhere.
  """
  blas_threads.limit_lapack_threads()  # before the calls can ever run
  def one_at_a_time(*xs):
    batch = xs[0].shape[0]
    if batch > _MAX_UNROLLED:   # one call in a loop: a compact program
      return jax.lax.map(lambda args: fn(*args), xs)
    # A few calls side by side: XLA schedules them like any other op, where
    # a loop would fix its operands' buffers for its whole duration (+4% of
    # the update's temporaries, measured on the one-block weight set).
    outs = [fn(*(x[i] for x in xs)) for i in range(batch)]
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)
  return jax.lax.platform_dependent(*operands, cpu=one_at_a_time, default=fn)
