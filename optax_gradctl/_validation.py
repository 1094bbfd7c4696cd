"""Checks of hyperparameters at construction.

A hyperparameter is checked only when it is concrete (a Python or NumPy
number, or a concrete jax scalar). Under ``optax.inject_hyperparams`` it is a
tracer inside ``update``, and is then taken as given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


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
  owner: str,
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  allow_inf: bool = True,
  integer: bool = False,
) -> None:
  """Raises ``ValueError`` naming ``owner``, ``name`` and ``value`` if out of range."""
  try:
    x = concrete(value)
  except ValueError as err:
    raise ValueError(f"{owner}: {name} {err}") from None
  if x is None:
    return
  bad = math.isnan(x) or (not allow_inf and math.isinf(x))
  if low is not None:
    bad |= x <= low if low_open else x < low
  if high is not None:
    bad |= x >= high if high_open else x > high
  if integer and not bad and math.isfinite(x):
    bad |= x != int(x)
  if bad:
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    what = "an integer" if integer else "a number"
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
    finite = ", finite," if not allow_inf else ""
    raise ValueError(f"{owner}: {name} must be {what}{finite}{where}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
  """Raises ``ValueError`` if ``value`` is not one of ``choices``."""
  if value not in choices:
    options = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{owner}: {name} must be one of {options}, got {value!r}")
