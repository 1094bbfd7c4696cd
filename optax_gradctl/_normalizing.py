"""Normalizing: rescaling to unit norm, and z-scoring."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gradctl import _stats
from optax_gradctl._reduction.factors import apply, reciprocal_pow2
from optax_gradctl._reduction.mesh import AxisName
from optax_gradctl._reduction.moments import Moments
from optax_gradctl._reduction.plan import SCOPES, Scope
from optax_gradctl._reduction.pow2 import Pow2, safe_sqrt
from optax_gradctl._reduction.reduce import NORMS, NormOrd, reduce_tree, rescaled_to_norm
from optax_gradctl._validation import (
  Range,
  check_choice,
  check_number,
  concrete,
  nan_unless,
  traced_ok,
)

DDOF = Range(low=0.0, allow_inf=False)


@_stats.register("unit_rescale")
class UnitRescaleState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.unit_rescale`."""

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming gradient.


@_stats.register("zscore")
class ZScoreState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.zscore`, global scope."""

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming gradient.
  mean: jax.Array  #: float32 scalar: the mean of all gradient elements.
  std: jax.Array  #: float32 scalar: their standard deviation (with ``ddof``).


@_stats.register("zscore")
class ZScoreLeafState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.zscore`, leaf scope."""

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming gradient.


def unit_rescale(
  *,
  norm: NormOrd = "l2",
  scope: Scope = "global",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Rescales the gradient to unit norm: ``g / ||g||``.

  A zero gradient stays zero. For another target norm ``c``, chain a scale:
  ``optax.chain(gc.unit_rescale(), optax.scale(c))``. Gradients of any finite
  magnitude, including those whose squares overflow their dtype, come out with
  norm 1 in the right direction; a gradient holding NaN or inf becomes all NaN.

  Args:
    norm: ``"l2"``, ``"l1"`` or ``"linf"``.
    scope: ``"global"`` (the whole pytree has norm 1) or ``"leaf"`` (each array
      has norm 1).
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``.

  Returns:
    An :class:`optax.GradientTransformation` whose state,
    :class:`UnitRescaleState`, holds ``norm``, the global L2 norm of the
    incoming gradient.

  Raises:
    ValueError: if ``norm`` or ``scope`` is unknown.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> g = jnp.array([0.7, 1.1, 3.4])
    >>> tx = gc.unit_rescale()
    >>> updates, state = tx.update(g, tx.init(g))
    >>> [round(float(u), 3) for u in updates], round(float(state.norm), 3)
    ([0.192, 0.302, 0.934], 3.641)
  """
  owner = "unit_rescale"
  check_choice(owner, "norm", norm, NORMS)
  check_choice(owner, "scope", scope, SCOPES)

  def init_fn(params: Any) -> UnitRescaleState:
    del params
    return UnitRescaleState(norm=_stats.zeros())

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild, red = reduce_tree(updates, axis_name, scope=scope, norms=(norm,))
    out, _ = rescaled_to_norm(floats, red, norm, scope, 1.0, clip=False)
    return rebuild(out), UnitRescaleState(norm=red.norm)

  return optax.GradientTransformation(init_fn, update_fn)


def zscore(
  *,
  scope: Scope = "global",
  ddof: jax.typing.ArrayLike = 0,
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Standardizes the gradient: ``(g - mean) / std``.

  ``std`` is the standard deviation with ``ddof`` as in :func:`numpy.std`.
  A constant gradient (zero included) gives zeros. The moments are computed
  stably: for a float32 gradient whose mean is 1000 times its spread, the
  outputs are within 1e-3 of the float64 answer and ``std`` within 1e-4 of
  it, relative, where ``E[g**2] - E[g]**2`` gives noise.
  A gradient holding NaN or inf becomes all NaN.

  The often-quoted result ``[-0.73, -0.45, 1.18]`` for ``[0.7, 1.1, 3.4]``
  divides by the variance (1.4156) instead of the standard deviation (1.1898).

  Args:
    scope: ``"global"`` (one mean and std over the whole pytree) or ``"leaf"``.
    ddof: delta degrees of freedom, ``>= 0``: the divisor is ``n - ddof``.
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``.

  Returns:
    An :class:`optax.GradientTransformation`. Its state holds ``norm``, the
    global L2 norm of the incoming gradient, and, with ``scope="global"``,
    the ``mean`` and ``std`` it removed (:class:`ZScoreState`).

  Raises:
    ValueError: if ``scope`` is unknown or ``ddof`` is negative or NaN; in
      ``update``, if a scope has no more elements than a concrete ``ddof``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.zscore()
    >>> g = jnp.array([0.7, 1.1, 3.4])
    >>> updates, state = tx.update(g, tx.init(g))
    >>> [round(float(u), 3) for u in updates]
    [-0.869, -0.532, 1.401]
    >>> round(float(state.mean), 4), round(float(state.std), 4)
    (1.7333, 1.1898)
  """
  owner = "zscore"
  check_choice(owner, "scope", scope, SCOPES)
  check_number(owner, "ddof", ddof, DDOF)
  state_type = ZScoreState if scope == "global" else ZScoreLeafState

  def init_fn(params: Any):
    del params
    return state_type(*(_stats.zeros() for _ in state_type._fields))

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild, red = reduce_tree(updates, axis_name, scope=scope, moments=True)
    mom = red.moments
    std = _std(mom, ddof, owner)
    out = _standardized(floats, scope, mom, std)
    if scope == "leaf":
      return rebuild(out), ZScoreLeafState(norm=red.norm)
    if not floats:
      return rebuild(out), ZScoreState(red.norm, _stats.zeros(), _stats.zeros())
    mean = Pow2(jnp.abs(mom.mean), mom.e).to_float32()[0] * jnp.sign(mom.mean[0]).astype(
      jnp.float32
    )
    sd = Pow2(std, mom.e).to_float32()[0]
    return rebuild(out), ZScoreState(norm=red.norm, mean=mean, std=sd)

  return optax.GradientTransformation(init_fn, update_fn)


def _std(mom: Moments, ddof: Any, owner: str) -> jax.Array:
  """The standard deviation per scope, in units of ``2**e``; NaN with no
  degrees of freedom left, 0 for an empty scope."""
  dof = _degrees_of_freedom(mom.n, ddof, owner).astype(mom.m2.dtype)
  undefined = jnp.where(mom.n == 0, 0.0, jnp.nan)  # an empty scope has std 0
  var = jnp.where(dof > 0, mom.m2 / jnp.where(dof > 0, dof, 1), undefined)
  return nan_unless(traced_ok([(ddof, DDOF)]), safe_sqrt(var))


def _standardized(floats, scope: Scope, mom: Moments, std: jax.Array) -> list[jax.Array]:
  """``(x * 2**-e - mean) / std`` per leaf; zeros for a constant scope, NaN
  for a non-finite one."""
  finite = jnp.isfinite(mom.mean) & jnp.isfinite(std)
  inv = jnp.where(finite, jnp.where(std > 0, 1.0, 0.0), jnp.nan) / jnp.where(std > 0, std, 1)
  half = mom.e // 2
  ok = jnp.ones(mom.e.shape, bool)
  p1 = reciprocal_pow2(half, ok, mom.mean.dtype)
  p2 = reciprocal_pow2(mom.e - half, ok, mom.mean.dtype)
  return apply(
    floats, scope, lambda x, a, b, mean, i: (x * a * b - mean) * i, p1, p2, mom.mean, inv
  )


def _degrees_of_freedom(n: np.ndarray, ddof: Any, owner: str) -> jax.Array:
  value = concrete(ddof)
  if value is not None:
    short = (n > 0) & (n <= value)
    if np.any(short):
      raise ValueError(
        f"{owner}: ddof={ddof!r} leaves no degrees of freedom in a scope of"
        f" {int(n[short][0])} element(s)"
      )
  return jnp.asarray(n) - jnp.asarray(ddof)
