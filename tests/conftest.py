"""Test configuration: 8 simulated CPU devices, one OpenBLAS thread.

The device count must be set before JAX initialises its backend, so it lives
here, ahead of any test module's imports.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The r x r Cholesky and triangular solves go to LAPACK (OpenBLAS) on CPU; its
# spinning threads otherwise compete with XLA's for the same cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + " --xla_force_host_platform_device_count=8").strip()
