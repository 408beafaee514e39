"""Test configuration: 8 simulated CPU devices.

The device count must be set before JAX initialises its backend, so it lives
here, ahead of any test module's imports. The BLAS threads of the LAPACK calls
are the package's own business (``orth_dion_jax.blas_threads``), so
``OPENBLAS_NUM_THREADS`` is left as the environment has it, as a user's is.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + " --xla_force_host_platform_device_count=8").strip()
