"""Shared pytest settings: 8 simulated CPU devices, one compilation cache for
the whole run, hypothesis profiles, and the reduction-strategy fixture."""

import os
import shutil
import tempfile

# Before jax is imported anywhere: the sharding tests need a mesh of 8 devices.
# Everything else runs on the first one, as it would on a single device.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import pytest
from hypothesis import HealthCheck, settings

_CACHE_ENV = "GRADCTL_TEST_COMPILATION_CACHE"


def pytest_configure(config):
  """One persistent compilation cache for the run, shared by the xdist workers:
  many tests compile the same program (a transform on the same tree), and a
  worker then loads what the other compiled. The controller makes it before
  the workers start, and they inherit its path; it is removed at the end."""
  if not hasattr(config, "workerinput") and _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="gradctl-jax-cache-")
    config._gradctl_cache = os.environ[_CACHE_ENV]
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
  path = getattr(config, "_gradctl_cache", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)
    os.environ.pop(_CACHE_ENV, None)


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


# A script the multi-process tests launch, not a module to import: it joins a
# distributed run at import.
collect_ignore = ["multiprocess_worker.py"]
