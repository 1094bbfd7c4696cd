"""The selecting rescue: every candidate sum in the same read, then a select.

The GPU's strategy, where a branch costs even when it is not taken. Each
leaf is reduced once into its three candidate sums of squares (unscaled,
scaled down and up), stacked into one reduction; per leaf, the candidate in
range wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_gradctl._reduction.plan import Plan, max_abs_over, per_leaf, read, sum_over
from optax_gradctl._reduction.pow2 import exp2
from optax_gradctl._reduction.sums import Scoped, Sums, candidate, candidate_scales, per_scope


def selected(
  floats: Sequence[jax.Array], plan: Plan, *, l1: bool, linf: bool
) -> tuple[Sums, Scoped]:
  """The sums of every leaf, each from the candidate scale that keeps it in range."""
  ks = candidate_scales(plan.acc)
  scales = exp2(-ks, plan.acc)

  def reducer(y, members):
    rows = [jnp.square(y * c) for c in scales]
    if l1:
      rows += [jnp.abs(y * c) for c in scales]
    return sum_over(jnp.stack(rows), extra=1)

  batches = read(floats, plan.batches, plan.acc)
  sums = {"sums": per_leaf(batches, reducer)}
  maxes = {"amax": per_leaf(batches, lambda y, _: max_abs_over(y))} if linf else {}
  sums, maxes = plan.combine(sums, maxes)
  cands = sums["sums"]  # [3 or 6, L]
  pick = candidate(cands[0], plan.acc)
  choose = lambda c: jnp.take_along_axis(c, pick[None], axis=0)[0]  # noqa: E731
  sums = Sums(choose(cands[:3]), ks[pick], choose(cands[3:]) if l1 else None, maxes.get("amax"))
  return sums, per_scope(sums, plan, scaled=True)
