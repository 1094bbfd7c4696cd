"""Counting: the fraction of elements outside a band, for ``clip_by_value``'s statistics.

Each element's excess over a bound is taken with both scaled by a power of
two that lifts the bound's half-ulp, the smallest possible excess, to at
least 1: the difference then neither rounds nor flushes to zero. Capped at
1, the excesses sum to the count: ``max`` and multiplies, which XLA's CPU
reduction kernels take in, where comparisons and clamps they do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradctl._reduction import steering
from optax_gradctl._reduction.mesh import Axes
from optax_gradctl._reduction.plan import make_plan, per_leaf, read, sum_over
from optax_gradctl._reduction.pow2 import exponent, split_exp2


class _Excess(NamedTuple):
  """``x -> (x - bound) * u`` for a finite bound, with ``u = u1 * u2`` a power
  of two beyond one float's range, and ``bound * u`` precomputed."""

  u1: jax.Array
  u2: jax.Array
  bound_u: jax.Array

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.u1 * self.u2 - self.bound_u


def _excess_over(bound: jax.Array, acc: np.dtype) -> _Excess:
  info = jnp.finfo(acc)
  binade = jnp.where(bound == 0, info.minexp, exponent(jnp.abs(bound)))
  u1, u2 = split_exp2(info.nmant + 2 - binade, acc)
  return _Excess(u1, u2, bound * u1 * u2)


def fraction_outside(
  floats: Sequence[jax.Array],
  lower: jax.Array,
  upper: jax.Array,
  *,
  axes: Axes | None = None,
) -> jax.Array:
  """The float32 fraction of all float elements outside ``[lower, upper]``.

  NaN elements make it NaN; an infinite bound clamps nothing, so ``inf``
  against an upper bound of ``inf`` is inside. No elements: 0.
  """
  plan = make_plan(floats, "global", axes)
  if not floats or plan.n[0] == 0:
    return jnp.zeros((), jnp.float32)
  acc, info = plan.acc, jnp.finfo(plan.acc)
  lower, upper = jnp.asarray(lower, acc), jnp.asarray(upper, acc)
  above = _excess_over(jnp.clip(upper, -info.max, info.max), acc)
  below = _excess_over(-jnp.clip(lower, -info.max, info.max), acc)
  # An infinite bound caps the elements at the largest finite number first:
  # inf - inf never happens, and nothing exceeds it.
  cap_hi = jnp.where(jnp.isposinf(upper), info.max, jnp.inf).astype(acc)
  cap_lo = jnp.where(jnp.isneginf(lower), -info.max, -jnp.inf).astype(acc)
  scalars = (above, below, cap_hi, cap_lo, jnp.zeros((), acc), jnp.ones((), acc))

  def counted(y, members):
    (above_, below_, hi, lo, zero, one), y = steering.own_copies(scalars, y)
    over = above_(jnp.minimum(y, hi))
    under = below_(-jnp.maximum(y, lo))
    # min(excess, 1), written with max alone: XLA turns min(max(...)) into a
    # clamp, which its CPU reduction kernels cannot take in.
    excess = jnp.maximum(jnp.maximum(over, under), zero)
    return sum_over(one - jnp.maximum(one - excess, zero))

  counts = per_leaf(read(floats, plan.batches, plan.acc), counted)
  counts = plan.combine({"count": counts}, {})[0]["count"]
  return (jnp.sum(counts) / plan.n[0]).astype(jnp.float32)
