"""The few jax and optax APIs the tests use that moved within the supported window."""

import importlib.metadata

import jax
import pytest


def _version(package: str) -> tuple[int, ...]:
  return tuple(int(p) for p in importlib.metadata.version(package).split(".")[:3])


# jax.enable_x64 and jax.set_mesh are public from jax 0.7; before, they lived
# in jax.experimental and jax.sharding (as use_mesh).
enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
set_mesh = jax.set_mesh if hasattr(jax, "set_mesh") else jax.sharding.use_mesh

OPTAX = _version("optax")
needs_optax_0_2_8 = pytest.mark.skipif(
  OPTAX < (0, 2, 8), reason=f"optax {OPTAX}: the peer feature compared here is from 0.2.8"
)
