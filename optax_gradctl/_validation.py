"""Checks of hyperparameters: at construction when concrete, in the program when traced.

The rule, for every transform: a concrete hyperparameter (a Python or NumPy
number, or a concrete jax scalar) that is ``None``, NaN or out of its range
raises ``ValueError`` at construction, naming the transform, the argument
and the value. A traced one (a schedule under ``optax.inject_hyperparams``)
cannot raise; where it is out of range, that step's update is all NaN and
the transform's own estimators are left unchanged. A finiteness check after
it (``optax.apply_if_finite`` around the optimizer it feeds) skips the step;
without one, the parameters turn NaN, which no run misses. Never a silently
wrong update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Range(NamedTuple):
  """The values a numeric hyperparameter may take."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  allow_inf: bool = True
  integer: bool = False

  def describe(self) -> str:
    what = "an integer" if self.integer else "a number"
    finite = ", finite," if not self.allow_inf else ""
    if self.low is None and self.high is None:
      return f"{what}{finite}"
    lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
    hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
    return f"{what}{finite} in {lo}, {hi}"

  def holds(self, x):
    """Whether ``x`` lies in the range: a bool for a Python float, a jax
    bool for a traced value (NaN never does)."""
    traced = not isinstance(x, float)
    ok = ~jnp.isnan(x) if traced else not math.isnan(x)
    if not self.allow_inf:
      ok = ok & (jnp.isfinite(x) if traced else math.isfinite(x))
    if self.low is not None:
      ok = ok & ((x > self.low) if self.low_open else (x >= self.low))
    if self.high is not None:
      ok = ok & ((x < self.high) if self.high_open else (x <= self.high))
    if self.integer:
      ok = ok & ((x == jnp.round(x)) if traced else (not math.isfinite(x) or x == int(x)))
    return ok


ANY = Range()
NON_NEGATIVE = Range(low=0.0)
POSITIVE = Range(low=0.0, low_open=True)
OPEN_UNIT = Range(low=0.0, high=1.0, low_open=True, high_open=True)
COUNT = Range(low=1.0, allow_inf=False, integer=True)
COUNT_OR_ZERO = Range(low=0.0, allow_inf=False, integer=True)


def concrete(value: Any) -> float | None:
  """``value`` as a Python float when it is a concrete scalar, else ``None``."""
  if value is None or isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value)
  if array.ndim != 0:
    raise ValueError(f"expected a scalar hyperparameter, got shape {array.shape}: {value!r}")
  if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
    raise ValueError(f"expected a real number, got {value!r}")
  return float(array)


def check_number(
  owner: str, name: str, value: Any, allowed: Range = ANY, *, optional: bool = False
) -> None:
  """Raises ``ValueError`` naming ``owner``, ``name`` and ``value`` if it is
  ``None`` (unless ``optional``), NaN or out of ``allowed``; a traced value is
  checked in the program (:func:`traced_ok`)."""
  if value is None:
    if optional:
      return
    raise ValueError(f"{owner}: {name} must be {allowed.describe()}, got None")
  try:
    x = concrete(value)
  except ValueError as err:
    raise ValueError(f"{owner}: {name} {err}") from None
  if x is not None and not allowed.holds(x):
    raise ValueError(f"{owner}: {name} must be {allowed.describe()}, got {value!r}")


def traced_ok(checks: Sequence[tuple[Any, Range]]) -> jax.Array | None:
  """Whether the traced values among ``checks`` (value, range) lie in their
  ranges; ``None`` when none is traced (the concrete ones were checked at
  construction), so that a program without schedules carries no test."""
  ok = None
  for value, allowed in checks:
    if isinstance(value, jax.core.Tracer):
      holds = allowed.holds(jnp.asarray(value, jnp.float32))
      ok = holds if ok is None else ok & holds
  return ok


def and_ok(mask: jax.Array, ok: jax.Array | None) -> jax.Array:
  """``mask``, false where a traced hyperparameter is out of range (``ok``
  from :func:`traced_ok`; ``None``: ``mask`` as it is)."""
  return mask if ok is None else mask & ok


def nan_unless(ok: jax.Array | None, x: Any) -> Any:
  """``x``, or NaN of its shape where ``ok`` is false (``ok=None``: ``x``)."""
  return x if ok is None else jnp.where(ok, x, jnp.nan)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
  """Raises ``ValueError`` if ``value`` is not one of ``choices``."""
  if value not in choices:
    options = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{owner}: {name} must be one of {options}, got {value!r}")
