"""Shared pytest settings: 8 simulated CPU devices, and a hypothesis profile that keeps CI quick."""

import os

# Before jax is imported anywhere: the sharding tests need a mesh of 8 devices.
# Everything else runs on the first one, as it would on a single device.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
  "ci",
  max_examples=30,
  deadline=None,
  suppress_health_check=[
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    # the strategy fixture only sets which reduction runs, the same for every example
    HealthCheck.function_scoped_fixture,
  ],
  print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["branch", "select"])
def strategy(request, monkeypatch):
  """Runs a test with each way the reduction rescues sums out of range: "branch"
  (a lax.cond, the CPU's and TPU's) and "select" (the GPU's), whatever the platform."""
  from optax_gradctl import _reduce

  monkeypatch.setattr(_reduce, "RESCALING", request.param)
  return request.param
