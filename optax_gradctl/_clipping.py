"""Clipping: elementwise by value, and by norm (global or per leaf)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike

from optax_gradctl import _stats
from optax_gradctl._reduction.counting import fraction_outside
from optax_gradctl._reduction.factors import apply
from optax_gradctl._reduction.leaves import acc_dtype, split_floats
from optax_gradctl._reduction.mesh import AxisName, float_axes
from optax_gradctl._reduction.plan import SCOPES, Scope
from optax_gradctl._reduction.reduce import (
  NORMS,
  NormOrd,
  Reduction,
  reduce,
  reduce_tree,
  rescaled_to_norm,
)
from optax_gradctl._validation import (
  NON_NEGATIVE,
  check_choice,
  check_number,
  concrete,
  nan_unless,
  traced_ok,
)


@_stats.register("clip_by_value")
class ClipByValueState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.clip_by_value`."""

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming gradient.
  clipped_fraction: jax.Array  #: float32 scalar: the fraction of elements clamped.


@_stats.register("clip_by_norm")
class ClipByNormState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.clip_by_norm`.

  ``threshold`` is the ``max_norm`` applied (a schedule's value under
  ``inject_hyperparams``); ``compared_norm`` the norm compared with it, in
  the order ``norm=`` names: of the whole gradient with ``scope="global"``
  (the value PyTorch's ``clip_grad_norm_`` returns), of the largest leaf
  with ``scope="leaf"``.
  """

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming gradient.
  clipped_fraction: jax.Array  #: float32 scalar: the fraction of scopes rescaled.
  threshold: jax.Array  #: float32 scalar: the ``max_norm`` applied at this step.
  compared_norm: jax.Array  #: float32 scalar: the norm compared with ``threshold``.


@_stats.register("clip_by_global_norm")
class ClipByGlobalNormState(ClipByNormState):
  """Statistics of the last step of :func:`~optax_gradctl.clip_by_global_norm`."""


def clip_by_value(
  max_value: ArrayLike,
  min_value: ArrayLike | None = None,
  *,
  stats: bool = False,
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clamps every gradient element to ``[min_value, max_value]``.

  .. math::
    g_i \\leftarrow \\min(\\max(g_i, \\text{min\\_value}), \\text{max\\_value})

  Unlike ``optax.clip``, the interval need not be symmetric; equal bounds set
  every element to that value. NaN stays NaN; ``+inf`` and ``-inf`` clamp to
  the bounds. An element within the bounds comes back bitwise unchanged,
  subnormal ones included (a clamp on a CPU flushes them). Each element is
  clamped in float32 (or float64) and cast back, so a 16-bit gradient keeps
  its dtype.

  The clamp costs what ``optax.clip`` costs: it fuses into the optimizer's
  own kernel. Statistics are recorded only when asked for (``stats=True``):
  they read the gradient twice more, for the norm and for the count of
  clamped elements. In a CPU Adam step over 1e7 parameters that took the
  step's overhead from +2.4% (``optax.clip``: +0.5%) to +94%, and alone it
  takes 4.3 to 8.8 times the clamp's time (``docs/performance.rst``).

  Args:
    max_value: the upper bound.
    min_value: the lower bound; ``-max_value`` if ``None``.
    stats: record ``norm`` and ``clipped_fraction`` in the state.
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``; only the statistics need it.

  Returns:
    An :class:`optax.GradientTransformation`. With ``stats=True`` its state,
    :class:`ClipByValueState`, holds ``norm`` (the global L2 norm of the
    incoming gradient) and ``clipped_fraction`` (the fraction of elements that
    were clamped: 0 with no elements, NaN, like ``norm``, when the gradient
    holds NaN; an element equal to an infinite bound is not clamped). With
    ``stats=False`` (the default) the state is ``optax.EmptyState()``.

  Raises:
    ValueError: if a bound is ``None`` where a number is needed, or NaN, or
      ``min_value > max_value`` (with ``min_value=None``, if
      ``max_value < 0``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.clip_by_value(1.0, stats=True)
    >>> g = jnp.array([0.7, 1.1, 3.4])
    >>> updates, state = tx.update(g, tx.init(g))
    >>> updates
    Array([0.7, 1. , 1. ], dtype=float32)
    >>> round(float(state.clipped_fraction), 4)
    0.6667
  """
  owner = "clip_by_value"
  check_number(owner, "max_value", max_value)
  check_number(owner, "min_value", min_value, optional=True)
  hi, lo = concrete(max_value), concrete(min_value)
  if min_value is None and hi is not None and hi < 0:
    raise ValueError(f"{owner}: max_value must be >= 0 when min_value is None, got {max_value!r}")
  if hi is not None and lo is not None and lo > hi:
    raise ValueError(
      f"{owner}: min_value must be <= max_value, got min_value={min_value!r} > max_value={max_value!r}"
    )

  def init_fn(params: Any):
    del params
    if not stats:
      return optax.EmptyState()
    return ClipByValueState(norm=_stats.zeros(), clipped_fraction=_stats.zeros())

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild = split_floats(updates)
    lower, upper = _bounds(max_value, min_value, acc_dtype(floats))
    if not stats:
      return rebuild(apply(floats, "global", _clamp, lower[None], upper[None])), state
    axes = float_axes(axis_name, updates)
    red = reduce(floats, axes=axes)
    fraction = fraction_outside(floats, lower, upper, axes=axes)
    clamped = apply(floats, "global", _clamp, lower[None], upper[None], after=(red.norm, fraction))
    return rebuild(clamped), ClipByValueState(norm=red.norm, clipped_fraction=fraction)

  return optax.GradientTransformation(init_fn, update_fn)


def _bounds(max_value, min_value, acc) -> tuple[jax.Array, jax.Array]:
  """The bounds in ``acc``. Where a bound is traced and the two are NaN or
  crossed, both are NaN, and so is every clamped element: XLA's ``min`` and
  ``max``, which make the clamp, propagate NaN."""
  upper = jnp.asarray(max_value, acc)
  lower = -upper if min_value is None else jnp.asarray(min_value, acc)
  if isinstance(max_value, jax.core.Tracer) or isinstance(min_value, jax.core.Tracer):
    ok = lower <= upper  # false for a NaN bound too
    return nan_unless(ok, lower), nan_unless(ok, upper)
  return lower, upper


def _clamp(x: jax.Array, lower: jax.Array, upper: jax.Array) -> jax.Array:
  """``x`` clamped to ``[lower, upper]``; an element within the bounds is
  ``x``'s own, bitwise, and NaN stays NaN. On a CPU a clamp flushes a
  subnormal element, which then compares equal to its clamp: the select
  returns the element. Two selects would not do, as XLA makes a clamp of
  them; the bitwise test in ``tests/test_clipping.py`` fails with either."""
  clamped = lax.clamp(lower, x, upper)  # lax, not jnp: a third less to trace and compile
  return lax.select(lax.eq(clamped, x), x, clamped)


def clip_by_norm(
  max_norm: ArrayLike,
  *,
  norm: NormOrd = "l2",
  scope: Scope = "global",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Rescales the gradient to norm ``max_norm`` where its norm exceeds it.

  .. math::
    g \\leftarrow g \\cdot \\min\\left(1, \\frac{\\text{max\\_norm}}{\\|g\\|}\\right)

  With ``scope="global"`` the whole pytree is one vector, as in PyTorch's
  ``clip_grad_norm_``; with ``scope="leaf"`` each array is clipped on its own,
  like Keras' ``clipnorm``. A gradient within the bound is returned bitwise
  unchanged, subnormal elements included.

  The norm is computed safely over the whole float range: float16 gradients of
  300 or float32 gradients of 1e20, whose squares overflow, are still clipped
  to the right norm and direction, as are gradients of 1e-30. A gradient
  holding NaN or inf becomes all NaN, so ``optax.apply_if_finite`` can skip it.

  Args:
    max_norm: the largest norm let through, ``>= 0`` (0 zeroes the gradient;
      inf never clips).
    norm: ``"l2"``, ``"l1"`` or ``"linf"``.
    scope: ``"global"`` or ``"leaf"``.
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``, so that the norm covers the whole sharded gradient.

  Returns:
    An :class:`optax.GradientTransformation` whose state,
    :class:`ClipByNormState`, holds ``norm`` (the global L2 norm of the
    incoming gradient), ``clipped_fraction`` (the fraction of scopes that
    were rescaled), ``threshold`` (the ``max_norm`` applied) and
    ``compared_norm`` (the norm compared with it, as ``norm=`` says).

  Raises:
    ValueError: if ``max_norm`` is negative or NaN, or ``norm`` or ``scope``
      is unknown.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.clip_by_norm(1.0, norm="l2", scope="leaf")
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> updates, state = tx.update(g, tx.init(g))
    >>> updates["a"], updates["b"]
    (Array([0.6, 0.8], dtype=float32), Array([0.3, 0.4], dtype=float32))
    >>> float(state.clipped_fraction)
    0.5

  References:
    Pascanu et al., `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  return _clip_by_norm(max_norm, norm, scope, axis_name, "clip_by_norm", ClipByNormState)


def clip_by_global_norm(
  max_norm: ArrayLike,
  *,
  norm: NormOrd = "l2",
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips the norm of the whole gradient pytree to ``max_norm``.

  The same as :func:`clip_by_norm` with ``scope="global"``; its statistics
  appear in :func:`stats` under ``clip_by_global_norm``.

  Args:
    max_norm: the largest norm let through, ``>= 0``.
    norm: ``"l2"``, ``"l1"`` or ``"linf"``.
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``.

  Returns:
    An :class:`optax.GradientTransformation` whose state,
    :class:`ClipByGlobalNormState`, holds ``norm``, ``clipped_fraction``
    (1.0 when the step was clipped, else 0.0), ``threshold`` and
    ``compared_norm``, as :func:`clip_by_norm`'s.

  Raises:
    ValueError: if ``max_norm`` is negative or NaN, or ``norm`` is unknown.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.clip_by_global_norm(1.0)
    >>> g = jnp.array([300.0, 400.0], jnp.float16)  # its squares overflow float16
    >>> updates, state = tx.update(g, tx.init(g))
    >>> updates, float(state.norm)
    (Array([0.6, 0.8], dtype=float16), 500.0)

  References:
    Pascanu et al., `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  return _clip_by_norm(
    max_norm, norm, "global", axis_name, "clip_by_global_norm", ClipByGlobalNormState
  )


def _clip_by_norm(
  max_norm, norm, scope, axis_name, owner, state_type
) -> optax.GradientTransformation:
  check_number(owner, "max_norm", max_norm, NON_NEGATIVE)
  check_choice(owner, "norm", norm, NORMS)
  check_choice(owner, "scope", scope, SCOPES)

  def init_fn(params: Any):
    del params
    return state_type(*(_stats.zeros() for _ in state_type._fields))

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild, red = reduce_tree(updates, axis_name, scope=scope, norms=(norm,))
    target = nan_unless(traced_ok([(max_norm, NON_NEGATIVE)]), max_norm)
    out, clipped = rescaled_to_norm(floats, red, norm, scope, target, clip=True)
    if not floats:
      return rebuild(out), init_fn(None)._replace(threshold=_stats.as_statistic(max_norm))
    return rebuild(out), state_type(
      norm=red.norm,
      clipped_fraction=jnp.mean(clipped.astype(jnp.float32)),
      threshold=_stats.as_statistic(max_norm),
      compared_norm=_compared_norm(red, norm, scope),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _compared_norm(red: Reduction, norm: NormOrd, scope: Scope) -> jax.Array:
  """The largest norm compared with the threshold: for the global L2 norm,
  the ``norm`` statistic itself, read from the same sum of squares."""
  if norm == "l2" and scope == "global":
    return red.norm
  return jnp.max(getattr(red, norm).to_float32())
