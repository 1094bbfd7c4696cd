"""The branching rescue: the common read, and a ``lax.cond`` that reads again only when needed.

The CPU's and TPU's strategy, where a branch not taken costs nothing. A clip
takes one branch per scope: its update waits for the norm anyway, and one
branch costs less in a step than one per batch. A statistic that the update
does not wait for takes one branch per batch of leaves, so that no leaf is
held until the whole tree has been read.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_gradctl._reduction.plan import Plan, make_plan, read, rescue_read
from optax_gradctl._reduction.sums import (
  Scoped,
  Sums,
  candidate,
  candidate_scales,
  leaf_sums,
  per_scope,
  trusted,
)


def one_branch(floats: Sequence[jax.Array], plan: Plan, *, l1: bool, linf: bool):
  """The plain sums; where a scope's sum of squares left the range, a
  rescue under one ``lax.cond`` reads again, each leaf scaled by the
  candidate its own plain sum calls for. Every leaf is held until the
  scopes' sums are known."""
  common = read(floats, plan.batches, plan.acc)
  fast = leaf_sums(common, plan, None, l1=l1, linf=linf)
  plain = per_scope(fast, plan, scaled=False)
  ok = jnp.all(trusted(plain.sumsq.m, plan.acc) | (plan.n == 0))
  operands, reread = rescue_read(common, floats, plan)

  def rescue(ops):
    e = candidate_scales(plan.acc)[candidate(fast.sumsq, plan.acc)]
    sums = leaf_sums(reread(ops), plan, e, l1=l1, linf=False)
    sums = sums._replace(amax=fast.amax)
    return sums, per_scope(sums, plan, scaled=True)

  return lax.cond(ok, lambda _: (fast, plain), rescue, operands)


def branch_per_batch(
  floats: Sequence[jax.Array], plan: Plan, *, l1: bool, linf: bool
) -> tuple[Sums, Scoped]:
  """:func:`one_branch` run on each batch of leaves alone: where a leaf's own
  sum of squares left the range, its batch's ``lax.cond`` reads that batch
  again. One device only. The reads are those of :func:`one_branch`, which
  XLA computes once when a clip reads the same leaves. The cost: a leaf of
  zeros is read twice."""
  parts = []
  for b in plan.batches:
    batch = [floats[i] for i in b]
    parts.append(one_branch(batch, make_plan(batch, "leaf"), l1=l1, linf=linf)[0])
  perm = np.argsort([i for b in plan.batches for i in b])
  fields = [[getattr(p, f) for p in parts] for f in Sums._fields]
  sums = Sums(*(None if v[0] is None else jnp.concatenate(v)[perm] for v in fields))
  return sums, per_scope(sums, plan, scaled=True)
