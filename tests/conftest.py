"""Shared pytest settings: 8 simulated CPU devices, XLA's faster-compiling
CPU emitters, one directory (and one compilation cache) for the whole run,
the multi-process workers, hypothesis profiles, and the reduction-strategy
fixture."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from . import xla_flags

# Before jax is imported anywhere.
os.environ["XLA_FLAGS"] = xla_flags.for_tests()

import jax
import pytest
from hypothesis import HealthCheck, settings

import optax_gradctl as gc

from . import multiprocess_launch

_RUN_DIR_ENV = "GRADCTL_TEST_RUN_DIR"


def _run_dir() -> Path:
  return Path(os.environ[_RUN_DIR_ENV])


def pytest_configure(config):
  """One directory for the run, shared by the xdist workers (the controller
  makes it before they start, they inherit its path, and it is removed at the
  end). It holds one persistent compilation cache: many tests compile the same
  program, and a worker then loads what another compiled. It also holds the
  multi-process workers' results."""
  if not hasattr(config, "workerinput") and _RUN_DIR_ENV not in os.environ:
    os.environ[_RUN_DIR_ENV] = tempfile.mkdtemp(prefix="gradctl-tests-")
    config._gradctl_run_dir = os.environ[_RUN_DIR_ENV]
  jax.config.update("jax_compilation_cache_dir", str(_run_dir() / "jax-cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_collection_finish(session):
  """Starts the multi-process workers as soon as their tests are selected, so
  that they run alongside the rest of the suite."""
  if any(item.path.name == "test_multiprocess.py" for item in session.items):
    multiprocess_launch.start(_run_dir() / "multiprocess")


def pytest_sessionfinish(session, exitstatus):
  """Ends the multi-process workers this process started: at once if the run
  was interrupted, else once they finish (another test worker may still wait
  for them) or reach their time limit."""
  multiprocess_launch.stop(wait=exitstatus != pytest.ExitCode.INTERRUPTED)


def pytest_unconfigure(config):
  path = getattr(config, "_gradctl_run_dir", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)
    os.environ.pop(_RUN_DIR_ENV, None)


@pytest.fixture(scope="session")
def multiprocess_results() -> list[dict]:
  """What each multi-process worker saw (tests/multiprocess_launch.py)."""
  shared = _run_dir() / "multiprocess"
  multiprocess_launch.start(shared)  # a no-op when collection started them
  try:
    return multiprocess_launch.wait(shared)
  except RuntimeError as e:
    pytest.fail(str(e))


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
def strategy(request):
  """Runs a test with each way the reduction rescues sums out of range: "branch"
  (a lax.cond, the CPU's and TPU's) and "select" (the GPU's), whatever the
  platform, set as a user would (gc.reduction_settings)."""
  with gc.reduction_settings(rescue=request.param):
    yield request.param


@pytest.fixture
def reduction():
  """``reduction(**changes)`` sets gc.ReductionSettings for the rest of the test."""
  with contextlib.ExitStack() as stack:
    yield lambda **changes: stack.enter_context(gc.reduction_settings(**changes))


# A script the multi-process tests launch, not a module to import: it joins a
# distributed run at import.
collect_ignore = ["multiprocess_worker.py"]
