"""The XLA flags of a test run, worked out before jax is imported.

- 8 simulated CPU devices: the sharding tests need a mesh of 8. Everything
  else runs on the first one, as it would on a single device.
- XLA's loop emitters for the CPU (``FAST_CODEGEN``): they compile the
  suite's two thousand small programs faster than the default fusion
  emitters (the suite runs in about three quarters of the time). At a
  thousand leaves they are far slower; no test compiles that many.
  The programs (the optimized HLO, buffer assignment included) are the
  same; only their translation to machine code differs.
  ``GRADCTL_TEST_XLA_DEFAULTS=1`` runs with XLA's defaults, as ``.ci/run``
  does for the exactness tests; so do the multi-process workers, always.
"""

from __future__ import annotations

import os
import subprocess
import sys

DEVICES = "--xla_force_host_platform_device_count=8"
FAST_CODEGEN = "--xla_cpu_use_fusion_emitters=false"
_WORKED_OUT = "GRADCTL_TEST_XLA_FLAGS"  # set once, inherited by the xdist workers


def for_tests() -> str:
  """The flags, on top of any the caller set; the same in every xdist worker."""
  if _WORKED_OUT not in os.environ:
    flags = [os.environ.get("XLA_FLAGS", ""), DEVICES]
    if os.environ.get("GRADCTL_TEST_XLA_DEFAULTS") != "1" and _xla_accepts(FAST_CODEGEN):
      flags.append(FAST_CODEGEN)
    os.environ[_WORKED_OUT] = " ".join(f for f in flags if f)
  return os.environ[_WORKED_OUT]


def _xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA knows ``flag``: it aborts on an unknown one."""
  env = dict(os.environ, XLA_FLAGS=flag)
  probe = [sys.executable, "-c", "import jax; jax.devices()"]
  return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
