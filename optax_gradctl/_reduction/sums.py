"""Norm sums: the common read of every leaf, and what a rescue needs to read again.

The common read is what a plain clip does: one read of each leaf, summing its
squares (and magnitudes for L1, maxima for L-inf), with nothing else in the
kernel. A leaf whose sum of squares overflowed or lost precision to
underflow is *untrusted*; a rescue sums it again scaled by one of the
candidate powers of two, ``2**-88`` where it overflowed and ``2**75`` where
it underflowed. The strategies that run the rescue are the siblings
:mod:`rescue_branch` and :mod:`rescue_select`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradctl._reduction import steering
from optax_gradctl._reduction.plan import (
  Plan,
  Read,
  column,
  max_abs_over,
  per_leaf,
  scope_max,
  scope_sum,
  sum_over,
)
from optax_gradctl._reduction.pow2 import F32, F64, Pow2, exp2

# A sum of squares at least this large lost nothing that matters to
# underflow: any square that flushed to zero is below 2**-126, so together
# they weigh less than 2**-26 of the total for up to 2**40 elements (float64:
# 2**-500 against 2**-1022).
_TRUSTED_SUMSQ = {F32: 2.0**-60, F64: 2.0**-500}
# The candidate scales k of a leaf's sum of squares, sum((x * 2**-k)**2):
# unscaled, scaled down for a sum that overflowed and up for one below
# _TRUSTED_SUMSQ. float32: scaled by 2**-88, every square is below 2**80, so
# up to 2**47 elements sum finite, and the squares that flush (elements below
# 2**25) weigh less than 2**-38 of a sum beyond 2**128 for up to 2**40
# elements; scaled by 2**75, a sum below 2**-60 stays below 2**90 and every
# normal element's square is normal. float64 alike, with wider margins.
_CANDIDATES = {F32: (0, 88, -75), F64: (0, 800, -600)}


class Sums(NamedTuple):
  """Per-leaf partial norms, each leaf's in units of its own ``2**e``."""

  sumsq: jax.Array  #: [L]: ``sum((x * 2**-e)**2)``.
  e: jax.Array  #: int32 per leaf: each leaf's scale.
  sumabs: jax.Array | None = None  #: [L]: ``sum(|x * 2**-e|)``, when asked for.
  amax: jax.Array | None = None  #: [L]: ``max |x|``, unscaled, when asked for.

  def sum_of_squares(self) -> Pow2:
    """Each leaf's sum of squares."""
    return Pow2(self.sumsq, 2 * self.e)


class Scoped(NamedTuple):
  """The norms per scope ([S]), from the per-leaf :class:`Sums`."""

  sumsq: Pow2  #: Each scope's sum of squares.
  sumabs: Pow2 | None  #: Each scope's sum of magnitudes, when asked for.
  amax: jax.Array | None  #: Each scope's largest magnitude, unscaled, when asked for.


def per_scope(sums: Sums, plan: Plan, *, scaled: bool) -> Scoped:
  """The per-leaf ``sums`` per scope: plain sums where every leaf is unscaled
  (the common read), else totals taken at the scope's largest exponent."""

  def total(p: Pow2) -> Pow2:
    if not scaled:
      return Pow2(scope_sum(p.m, plan), jnp.zeros((plan.num_scopes,), jnp.int32))
    if plan.scope == "leaf":
      return p
    t = p.total(axis=0)
    return Pow2(t.m[None], t.e[None])

  sumabs = None if sums.sumabs is None else total(Pow2(sums.sumabs, sums.e))
  amax = None if sums.amax is None else scope_max(sums.amax, plan)
  return Scoped(total(sums.sum_of_squares()), sumabs, amax)


def trusted(sumsq: jax.Array, acc: np.dtype) -> jax.Array:
  """Whether sums of squares lost nothing to overflow or underflow."""
  return jnp.isfinite(sumsq) & (sumsq >= _TRUSTED_SUMSQ[acc])


def squares_always_fit(floats: Sequence[jax.Array]) -> bool:
  """float16 squares, summed in float32, can neither overflow nor underflow:
  65504**2 * 2**31 is below float32's maximum, and 2**-48 above its minimum."""
  return all(x.dtype == jnp.float16 for x in floats)


def candidate(sumsq: jax.Array, acc: np.dtype) -> jax.Array:
  """Per leaf, which candidate scale keeps its sum of squares in range,
  judged from its unscaled sum: 0 (it already is), 1 (it overflowed) or 2 (it
  underflowed, or the leaf is zero or empty: scaled, its sum stays 0)."""
  return jnp.where(trusted(sumsq, acc), 0, jnp.where(jnp.isfinite(sumsq), 2, 1))


def candidate_scales(acc: np.dtype) -> jax.Array:
  """The exponents k of the candidate scales, as int32."""
  return steering.not_folded(jnp.asarray(_CANDIDATES[acc], jnp.int32))


def leaf_sums(batches: Read, plan: Plan, e: jax.Array | None, *, l1: bool, linf: bool) -> Sums:
  """One read of every leaf: per leaf, the sums of ``x * 2**-e`` with ``e``
  per leaf [L], or of ``x`` itself (``e=None``: the common read, nothing in
  the kernel but the square and the sum)."""
  scale = None if e is None else exp2(-e, plan.acc)

  def reducer(y, members):
    if scale is not None:
      y = y * column(scale, np.asarray(members), y.ndim)
    out = [sum_over(jnp.square(y))]
    if l1:
      out.append(sum_over(jnp.abs(y)))
    return jnp.stack(out)

  sums = {"sums": per_leaf(batches, reducer)}
  maxes = {"amax": per_leaf(batches, lambda y, _: max_abs_over(y))} if linf else {}
  sums, maxes = plan.combine(sums, maxes)
  e_leaf = jnp.zeros(plan.scope_of.shape, jnp.int32) if e is None else e
  return Sums(sums["sums"][0], e_leaf, sums["sums"][1] if l1 else None, maxes.get("amax"))
