"""The entry point: one reduction of a gradient's float leaves, per scope, as the transforms ask for it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradctl._reduction.factors import rescale, scale_factors
from optax_gradctl._reduction.leaves import split_floats
from optax_gradctl._reduction.mesh import Axes, AxisName, float_axes
from optax_gradctl._reduction.moments import Moments, moment_sums
from optax_gradctl._reduction.norms import norm_sums
from optax_gradctl._reduction.plan import Scope, make_plan
from optax_gradctl._reduction.pow2 import Pow2

NormOrd = Literal["l2", "l1", "linf"]
NORMS: tuple[str, ...] = ("l2", "l1", "linf")


class Reduction(NamedTuple):
  """What :func:`reduce` found. Fields not asked for are ``None``."""

  norm: jax.Array  #: float32 scalar: the global L2 norm of the whole tree.
  l2: Pow2 | None = None  #: [S]: each scope's L2 norm.
  l1: Pow2 | None = None  #: [S]: each scope's L1 norm.
  linf: Pow2 | None = None  #: [S]: each scope's L-infinity norm.
  moments: Moments | None = None  #: Each scope's mean and spread.
  leaf_sumsq: Pow2 | None = None  #: [L]: each leaf's sum of squares.


def _empty(scopes: int, norms: Sequence[str], with_moments: bool) -> Reduction:
  zero = Pow2(jnp.zeros((scopes,), jnp.float32), jnp.zeros((scopes,), jnp.int32))
  mom = None
  if with_moments:
    z = jnp.zeros((scopes,), jnp.float32)
    mom = Moments(z, z, z, zero.e, np.zeros((scopes,), np.int64), jnp.zeros((scopes,), bool))
  fields = {n: zero for n in norms}
  return Reduction(jnp.zeros((), jnp.float32), moments=mom, leaf_sumsq=zero, **fields)


def reduce(
  floats: Sequence[jax.Array],
  *,
  scope: Scope = "global",
  norms: Sequence[str] = (),
  moments: bool = False,
  axes: Axes | None = None,
  watch: bool = False,
) -> Reduction:
  """Reduces the float leaves once, per scope.

  Args:
    floats: the float leaves (from :func:`split_floats`).
    scope: ``"global"`` (one scope, the whole tree) or ``"leaf"``.
    norms: any of ``"l2"``, ``"l1"``, ``"linf"``.
    moments: also compute the mean and the centred sum of squares.
    axes: the mesh axes each leaf is partitioned over, inside ``shard_map``
      (from :func:`float_axes`); ``None`` on one device or under plain ``jit``.
    watch: the norms are a statistic only, which the update does not wait
      for (see :func:`norm_sums`).

  Returns:
    A :class:`Reduction`. Its ``norm`` is always the global L2 norm as float32.
  """
  norms = tuple(norms)
  if not floats:
    return _empty(1 if scope == "global" else 0, norms, moments)
  plan = make_plan(floats, scope, axes)
  if moments:
    mom = moment_sums(floats, plan)
    return Reduction(norm=_norm_statistic(mom.sum_of_squares()), moments=mom)
  sums, scoped = norm_sums(floats, plan, l1="l1" in norms, linf="linf" in norms, watch=watch)
  out = Reduction(norm=_norm_statistic(scoped.sumsq), leaf_sumsq=sums.sum_of_squares())
  if "l2" in norms:
    out = out._replace(l2=scoped.sumsq.sqrt())
  if "l1" in norms:
    out = out._replace(l1=scoped.sumabs)
  if "linf" in norms:
    out = out._replace(linf=Pow2(scoped.amax, jnp.zeros_like(scoped.sumsq.e)))
  return out


def _norm_statistic(squares: Pow2) -> jax.Array:
  """The global L2 norm, as float32, from the sums of squares of the scopes."""
  return squares.total().sqrt().to_float32()


def reduce_tree(
  tree: Any, axis_name: AxisName = None, **kwargs
) -> tuple[list[jax.Array], Callable[[Sequence[Any]], Any], Reduction]:
  """:func:`reduce` of the float leaves of ``tree``: the leaves, the function
  that puts new ones back (:func:`split_floats`), and the reduction."""
  floats, rebuild = split_floats(tree)
  return floats, rebuild, reduce(floats, axes=float_axes(axis_name, tree), **kwargs)


def rescaled_to_norm(
  floats: Sequence[jax.Array], red: Reduction, norm: str, scope: Scope, target, *, clip: bool
) -> tuple[list[jax.Array], jax.Array]:
  """The leaves rescaled per scope so that their ``norm`` is ``target``
  (where it exceeds it, with ``clip``), and where that rescaled. An L1 or
  L-inf clip waits for the statistic's own L2 reduction too."""
  after = () if norm == "l2" else (red.norm,)
  factors, active = scale_factors(getattr(red, norm), target, clip, after=after)
  return rescale(floats, scope, factors), active
