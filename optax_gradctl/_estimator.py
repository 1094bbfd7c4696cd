"""The outlier estimator of ``zclip`` and ``skip_on_spike``: a warm-up, then an EMA of mean and variance.

For the first ``warmup_steps`` values entered, the estimator keeps their
running mean and population variance (Welford); the step that completes the
warm-up starts an exponential moving mean and variance from them. Once past
the warm-up, a value's z-score against the estimator, and the bound above
which it is an outlier, are read from the state *before* the value enters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from optax_gradctl import _stats
from optax_gradctl._validation import COUNT, OPEN_UNIT, POSITIVE, Range, check_number

EPS = 1e-6  # added to the std in z = (x - mean) / (std + eps), as in ZClip


class EmaState(NamedTuple):
  """The estimator of :func:`zclip` and :func:`skip_on_spike`: warm-up
  accumulators, then an exponential moving mean and variance."""

  count: jax.Array  #: int32 scalar: finite values entered, saturating at ``warmup_steps``.
  warm_mean: jax.Array  #: float32 scalar: the running mean of the warm-up's values (Welford).
  warm_m2: jax.Array  #: float32 scalar: their running sum of squared deviations.
  mean: jax.Array  #: float32 scalar: the EMA mean, once past the warm-up.
  var: jax.Array  #: float32 scalar: the EMA variance, once past the warm-up.


def ema_init() -> EmaState:
  z = _stats.zeros()
  return EmaState(jnp.zeros((), jnp.int32), z, z, z, z)


def past_warmup(ema: EmaState, warmup_steps: ArrayLike) -> jax.Array:
  """Whether the warm-up is over: z-scores and bounds are defined."""
  return ema.count >= jnp.asarray(warmup_steps).astype(jnp.int32)


def z_score(ema: EmaState, x: jax.Array) -> jax.Array:
  """The z-score of ``x``: +inf for an overflowing ``x``, NaN for a NaN one."""
  std = jnp.sqrt(ema.var)
  return jnp.where(jnp.isinf(x), jnp.inf, (x - ema.mean) / (std + EPS))


class Outlier(NamedTuple):
  """A value's z-score against the estimator, and whether it is an outlier."""

  z: jax.Array  #: float32: the z-score (0 during the warm-up or for a non-finite value).
  spike: jax.Array  #: bool: past the warm-up, and ``z > z_threshold``.


def outlier(ema: EmaState, x: jax.Array, finite: jax.Array, z_threshold, warmup_steps) -> Outlier:
  """Whether ``x`` (a finite one where ``finite``) is an outlier of ``ema``."""
  warm = past_warmup(ema, warmup_steps)
  z = jnp.where(warm & finite, z_score(ema, x), 0.0).astype(jnp.float32)
  return Outlier(z, warm & (z > jnp.asarray(z_threshold, jnp.float32)))


def bound(ema: EmaState, z_threshold, warmup_steps) -> jax.Array:
  """The value above which :func:`outlier` calls a value an outlier:
  ``mean + z_threshold * (std + 1e-6)``; +inf during the warm-up."""
  cap = ema.mean + jnp.asarray(z_threshold, jnp.float32) * (jnp.sqrt(ema.var) + EPS)
  return jnp.where(past_warmup(ema, warmup_steps), cap, jnp.inf).astype(jnp.float32)


def ema_update(ema: EmaState, x: jax.Array, enter: jax.Array, warmup_steps, decay) -> EmaState:
  """``ema`` with ``x`` entered where ``enter``; bitwise unchanged elsewhere.

  During warm-up ``x`` joins the running mean and population variance; the
  step that completes the warm-up sets the EMA from them. Afterwards
  ``mean <- decay*mean + (1-decay)*x``, then
  ``var <- decay*var + (1-decay)*(x - mean)**2`` with the new mean.
  """
  warmup_steps = jnp.asarray(warmup_steps).astype(jnp.int32)
  decay = jnp.asarray(decay, jnp.float32)
  x = jnp.where(enter, x, 0.0).astype(jnp.float32)  # keeps NaN out of the unused branch
  warm = ema.count >= warmup_steps
  # warm-up: Welford's update
  count = ema.count + 1
  delta = x - ema.warm_mean
  warm_mean = ema.warm_mean + delta / count.astype(jnp.float32)
  warm_m2 = ema.warm_m2 + delta * (x - warm_mean)
  done = count >= warmup_steps
  during = EmaState(
    count,
    warm_mean,
    warm_m2,
    jnp.where(done, warm_mean, ema.mean),
    jnp.where(done, warm_m2 / count.astype(jnp.float32), ema.var),
  )
  # afterwards: the EMA
  mean = decay * ema.mean + (1 - decay) * x
  after = ema._replace(mean=mean, var=decay * ema.var + (1 - decay) * jnp.square(x - mean))
  new = jax.tree.map(lambda a, b: jnp.where(warm, a, b), after, during)
  return jax.tree.map(lambda a, b: jnp.where(enter, a, b), new, ema)


def mean_and_std(ema: EmaState, warmup_steps) -> tuple[jax.Array, jax.Array]:
  """The mean and std the estimator holds: the warm-up's so far, then the EMA's."""
  warm = past_warmup(ema, warmup_steps)
  n = jnp.maximum(ema.count, 1).astype(jnp.float32)
  mean = jnp.where(warm, ema.mean, ema.warm_mean)
  var = jnp.where(warm, ema.var, ema.warm_m2 / n)
  return mean, jnp.sqrt(jnp.maximum(var, 0.0))


def _ranges(z_threshold, decay, warmup_steps) -> list[tuple[str, Any, Range]]:
  return [
    ("z_threshold", z_threshold, POSITIVE),
    ("decay", decay, OPEN_UNIT),
    ("warmup_steps", warmup_steps, COUNT),
  ]


def check_estimator_args(owner: str, z_threshold, decay, warmup_steps) -> None:
  """Raises ``ValueError`` for a concrete argument out of range (see
  :mod:`optax_gradctl._validation`)."""
  for name, value, allowed in _ranges(z_threshold, decay, warmup_steps):
    check_number(owner, name, value, allowed)


def estimator_checks(z_threshold, decay, warmup_steps) -> list[tuple[Any, Range]]:
  """The arguments and their ranges, for :func:`~optax_gradctl._validation.traced_ok`."""
  return [(v, r) for _, v, r in _ranges(z_threshold, decay, warmup_steps)]
