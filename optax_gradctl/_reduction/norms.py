"""Norms of the float leaves, exact over the whole float range: which path computes them.

:func:`norm_sums` alone decides; its docstring holds the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax import lax

from optax_gradctl._reduction import rescue_branch, rescue_select, settings
from optax_gradctl._reduction.plan import Plan, read
from optax_gradctl._reduction.sums import Scoped, Sums, leaf_sums, per_scope, squares_always_fit


def norm_sums(
  floats: Sequence[jax.Array], plan: Plan, *, l1: bool, linf: bool, watch: bool = False
) -> tuple[Sums, Scoped]:
  """Partial norms of ``floats`` per leaf and per scope, exact over the whole float range.

  The path, by the leaves' dtype, the ``rescue`` setting
  (:class:`~optax_gradctl.ReductionSettings`), the platform, whether the
  leaves are sharded (``plan.axes``) and whether the norms are a statistic
  the update does not wait for (``watch``):

  ============  ==========  ==========  =======  =====  ====================================
  dtypes        ``rescue``  platform    sharded  watch  path
  ============  ==========  ==========  =======  =====  ====================================
  all float16   any         any         any      any    the common read alone (squares fit)
  other         ``branch``  any         no       yes    :func:`rescue_branch.branch_per_batch`
  other         ``branch``  any         any      no     :func:`rescue_branch.one_branch`
  other         ``branch``  any         yes      any    :func:`rescue_branch.one_branch`
  other         ``select``  any         any      any    :func:`rescue_select.selected`
  other         ``auto``    CPU, TPU    as ``branch``
  other         ``auto``    GPU, other  as ``select``
  ============  ==========  ==========  =======  =====  ====================================

  ``auto`` is resolved when the program is lowered for its platform
  (``lax.platform_dependent``); the other columns at trace time.
  """
  if squares_always_fit(floats):
    sums = leaf_sums(read(floats, plan.batches, plan.acc), plan, None, l1=l1, linf=linf)
    return sums, per_scope(sums, plan, scaled=False)

  def branching(floats):
    per_batch = watch and plan.axes is None
    path = rescue_branch.branch_per_batch if per_batch else rescue_branch.one_branch
    return path(floats, plan, l1=l1, linf=linf)

  def selecting(floats):
    return rescue_select.selected(floats, plan, l1=l1, linf=linf)

  floats = list(floats)
  rescue = settings.active().rescue
  if rescue == "auto":
    return lax.platform_dependent(floats, cpu=branching, tpu=branching, default=selecting)
  return (branching if rescue == "branch" else selecting)(floats)
