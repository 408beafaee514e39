"""Test configuration: 8 simulated CPU devices and float32 defaults.

The device count must be set before JAX initialises its backend, so it lives
here, ahead of any test module's imports.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + " --xla_force_host_platform_device_count=8").strip()
