"""Moments per scope: the mean and the centred sum of squares, stable and exact in range.

The common case reads once, summing ``x`` and ``x**2``. A scope whose
one-pass variance cancels (a mean that dwarfs the spread, or a constant
scope), or whose sums left the range, is read again under ``lax.cond``: its
extremes give an exact power-of-two scale, and the spread is taken about
the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_gradctl._reduction.plan import (
  Plan,
  Read,
  column,
  per_leaf,
  read,
  rescue_read,
  scope_max,
  scope_sum,
  sum_over,
)
from optax_gradctl._reduction.pow2 import Pow2, exp2, exponent
from optax_gradctl._reduction.sums import trusted

# The one-pass variance sum((x-a)**2) - sum(x-a)**2 / n is trusted while the
# mean accounts for less than 63/64 of sum((x-a)**2): at most 6 bits cancel.
_CANCELLATION = 2.0**-6


class Moments(NamedTuple):
  """Mean and centred sum of squares per scope, in units of ``2**e``."""

  mean: jax.Array  #: [S]: the mean of ``x * 2**-e``.
  m2: jax.Array  #: [S]: ``sum((x * 2**-e - mean)**2)``.
  sumsq: jax.Array  #: [S]: ``sum((x * 2**-e)**2)``.
  e: jax.Array  #: int32 per scope: each scope's scale.
  n: np.ndarray | None  #: int64 per scope: elements per scope (static), once known.
  constant: jax.Array  #: bool per scope: every element of the scope equal (exactly).

  def sum_of_squares(self) -> Pow2:
    """The sums of squares per scope."""
    return Pow2(self.sumsq, 2 * self.e)


def _plain_moments(batches: Read, plan: Plan, scale=None, shift=None) -> jax.Array:
  """Per scope, ``sum(y)`` and ``sum(y**2)`` of ``y = x * scale - shift``
  (each per scope [S], or left out): [2, S]."""

  def reducer(y, members):
    if scale is not None:
      scopes = plan.scope_of[np.asarray(members)]
      y = y * column(scale, scopes, y.ndim) - column(shift, scopes, y.ndim)
    return jnp.stack([sum_over(y), sum_over(jnp.square(y))])

  sums, _ = plan.combine({"d": per_leaf(batches, reducer)}, {})
  return scope_sum(sums["d"], plan)


def _about(d: jax.Array, anchor: jax.Array, plan: Plan) -> tuple[jax.Array, jax.Array]:
  """The mean and centred sum of squares from sums ``d`` about ``anchor``."""
  has = plan.n > 0
  n = jnp.asarray(np.maximum(plan.n, 1), plan.acc)
  mean = jnp.where(has, anchor + d[0] / n, 0)
  return mean, jnp.where(has, jnp.maximum(d[1] - jnp.square(d[0]) / n, 0), 0)


def _extremes(batches: Read, plan: Plan) -> tuple[jax.Array, jax.Array]:
  """The largest and the smallest element of each scope."""

  def reducer(y, members):
    axes = tuple(range(1, y.ndim))
    top = jnp.max(y, axis=axes, initial=-jnp.inf)
    return jnp.stack([top, jnp.max(-y, axis=axes, initial=-jnp.inf)])

  ext = plan.combine({}, {"ext": per_leaf(batches, reducer)})[1]["ext"]
  return scope_max(ext[0], plan), -scope_max(ext[1], plan)


def _exact_moments(batches: Read, plan: Plan) -> Moments:
  """Three reads. The extremes give an exact power-of-two scale per scope
  and find constant scopes; the mean and the sum of squares are then summed
  in range, and the centred sum of squares taken about that mean."""
  hi, lo = _extremes(batches, plan)
  # Clamped so that 2**-e is a normal number: the largest scaled element
  # then lies in [0.5, 8).
  lim = jnp.finfo(plan.acc).maxexp - 3
  e = jnp.clip(exponent(jnp.maximum(hi, -lo)), -lim, lim)
  scale = exp2(-e, plan.acc)
  constant = (hi == lo) & (plan.n > 0)
  zero = jnp.zeros_like(hi)
  plain = _plain_moments(batches, plan, scale, zero)
  first, _ = _about(plain, zero, plan)
  anchor = lax.stop_gradient(jnp.where(constant, hi * scale, first))
  mean, m2 = _about(_plain_moments(batches, plan, scale, anchor), anchor, plan)
  return Moments(mean, jnp.where(constant, 0, m2), plain[1], e, None, constant)


def moment_sums(floats: Sequence[jax.Array], plan: Plan) -> Moments:
  """Mean, centred and plain sums of squares per scope."""
  common = read(floats, plan.batches, plan.acc)
  d = _plain_moments(common, plan)
  mean, m2 = _about(d, jnp.zeros((), plan.acc), plan)
  none = jnp.zeros(mean.shape, bool)
  fast = Moments(mean, m2, d[1], jnp.zeros(mean.shape, jnp.int32), None, none)
  ok = (plan.n == 0) | (trusted(d[1], plan.acc) & jnp.isfinite(d[0]) & (m2 >= _CANCELLATION * d[1]))
  # n is static: it stays out of the branches' outputs.
  operands, reread = rescue_read(common, floats, plan)
  rescue = lambda ops: _exact_moments(reread(ops), plan)  # noqa: E731
  out = lax.cond(jnp.all(ok), lambda _: fast, rescue, operands)
  return out._replace(n=plan.n)
