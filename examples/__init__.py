"""A Flax NNX language model trained with Orth-Dion: model, data, training, checkpoints, comparison."""

import os

# On CPU, jax runs the r x r Cholesky factorizations and triangular solves of Cholesky-QR through
# LAPACK (OpenBLAS). OpenBLAS's own worker threads then spin against XLA's for the same cores and
# a 32 x 32 solve takes milliseconds instead of microseconds. It reads this variable when it is
# loaded, so it has to be set before numpy or jax is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
