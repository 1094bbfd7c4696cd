"""Shared pytest settings: 8 simulated CPU devices, and a hypothesis profile that keeps CI quick."""

import os

# Before jax is imported anywhere: the sharding tests need a mesh of 8 devices.
# Everything else runs on the first one, as it would on a single device.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

from hypothesis import HealthCheck, settings

settings.register_profile(
  "ci",
  max_examples=30,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
