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

import pytest  # noqa: E402  (after the flags, which must come first)


@pytest.fixture(params=["joined", "apart"])
def megabatch_form(request, monkeypatch):
  """Runs a test with each megabatch's weight-sized arrays joined and with
  them kept apart.

  ``megabatch.kept_apart`` chooses by matrix size, and most of the tests'
  matrices are small enough to be joined; the size bound is moved so that
  both forms are stepped.
  """
  from orth_dion_jax import megabatch
  monkeypatch.setattr(megabatch, "JOIN_BELOW",
                      0 if request.param == "apart" else 2 ** 62)
  return request.param
