"""Clipping finer than a leaf: per unit of a layer (AGC), per example (DP-SGD)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_gradctl import _stats
from optax_gradctl._reduction.factors import scale_factors, times_factors
from optax_gradctl._reduction.finer import example_norms, unit_norms
from optax_gradctl._reduction.leaves import float_positions, split_floats
from optax_gradctl._reduction.plan import SCOPES, Scope
from optax_gradctl._reduction.pow2 import Pow2
from optax_gradctl._validation import (
  NON_NEGATIVE,
  Range,
  check_choice,
  check_number,
  nan_unless,
  traced_ok,
)

EPS_RANGE = Range(low=0.0, allow_inf=False)

UnitAxis = int | tuple[int, ...] | None


@_stats.register("adaptive_grad_clip")
class AdaptiveGradClipState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.adaptive_grad_clip`.

  Its threshold differs from unit to unit (``clipping`` times the unit's
  parameter norm), so the state records how many units met it.
  """

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming gradient.
  clipped_fraction: jax.Array  #: float32 scalar: the fraction of units clipped.


@_stats.register("per_example_clip")
class PerExampleClipState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.per_example_clip`."""

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming per-example gradients.
  clipped_fraction: jax.Array  #: float32 scalar: the fraction of examples clipped.
  max_example_norm: jax.Array  #: float32 scalar: the largest example's norm.
  threshold: jax.Array  #: float32 scalar: the ``l2_norm_clip`` applied at this step.


# --------------------------------------------------------------------------- AGC


def _unit_axes(shape: tuple[int, ...], axis: UnitAxis, owner: str) -> tuple[int, ...]:
  """The axes a unit's norm is taken over, as ``optax.adaptive_grad_clip``
  chooses them: everything for scalars and vectors, the input axis of a
  linear layer (rank 2 or 3, axis 0), the spatial and input axes of a
  convolution (rank 4 or 5, all but the last)."""
  ndim = len(shape)
  if axis is not None:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes) if ndim else ()
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(ndim))
  if ndim in (2, 3):
    return (0,)
  if ndim in (4, 5):
    return tuple(range(ndim - 1))
  raise ValueError(
    f"{owner}: no default unit for a leaf of shape {shape} (rank {ndim}); pass axis= the axes"
    " each unit's norm is taken over"
  )


def adaptive_grad_clip(
  clipping: ArrayLike, *, eps: ArrayLike = 1e-3, axis: UnitAxis = None
) -> optax.GradientTransformation:
  """Adaptive gradient clipping (AGC): each unit's gradient norm at most
  ``clipping`` times its parameter norm.

  .. math::
    g_u \\leftarrow g_u \\cdot \\min\\left(1, \\frac{\\lambda \\max(\\|w_u\\|, \\epsilon)}{\\|g_u\\|}\\right)

  A *unit* is one output of a layer: the norms are taken over the axes
  ``optax.adaptive_grad_clip`` uses (the input axis of a dense kernel, the
  spatial and input axes of a convolution, the whole of a bias or scalar), or
  over ``axis``. On ordinary inputs the result equals
  ``optax.adaptive_grad_clip``'s. Its norms, though, are computed like every
  norm here, scaled by a power of two and summed in float32: float16 and
  bfloat16 gradients and parameters of any magnitude clip to the right
  value, where optax's float16 norms overflow and return zeros.

  ``update`` needs ``params``, with the structure of the updates.

  Args:
    clipping: the largest ratio of a unit's gradient norm to its parameter
      norm, ``>= 0``.
    eps: the parameter norm below which ``eps`` is used instead, ``>= 0``:
      zero-initialized parameters still move.
    axis: the axes each unit's norm is taken over, for every leaf; ``None``
      chooses by rank as above.

  Returns:
    An :class:`optax.GradientTransformation` whose state,
    :class:`AdaptiveGradClipState`, records ``norm`` (the global L2 norm of
    the incoming gradient) and ``clipped_fraction`` (the fraction of units
    clipped).

  Raises:
    ValueError: if ``clipping`` or ``eps`` is negative or NaN; in ``update``,
      without ``params``, or for a leaf of rank above 5 without ``axis``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.adaptive_grad_clip(0.1)
    >>> w = {"kernel": jnp.array([[3.0, 0.1], [4.0, 0.1]])}  # unit norms 5 and 0.14
    >>> g = {"kernel": jnp.array([[3.0, 0.01], [4.0, 0.01]])}  # 5 and 0.014
    >>> updates, state = tx.update(g, tx.init(w), w)
    >>> updates["kernel"]  # the first unit to 0.1 * 5, the second left alone
    Array([[0.3 , 0.01],
           [0.4 , 0.01]], dtype=float32)
    >>> float(state.clipped_fraction)
    0.5

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
  """
  owner = "adaptive_grad_clip"
  check_number(owner, "clipping", clipping, NON_NEGATIVE)
  check_number(owner, "eps", eps, EPS_RANGE)

  def init_fn(params: Any) -> AdaptiveGradClipState:
    del params
    return AdaptiveGradClipState(norm=_stats.zeros(), clipped_fraction=_stats.zeros())

  def update_fn(updates, state, params=None):
    del state
    if params is None:
      raise ValueError(
        f"{owner}: update needs params (pass them as tx.update(updates, state, params))"
      )
    leaves, treedef = jax.tree.flatten(updates)
    weights = treedef.flatten_up_to(params)
    ok = traced_ok([(clipping, NON_NEGATIVE), (eps, EPS_RANGE)])
    out, squares, clipped, units = list(leaves), [], [], 0
    for i in float_positions(leaves):
      g = jnp.asarray(leaves[i])
      axes = _unit_axes(g.shape, axis, owner)
      g_norm = unit_norms(g, axes)
      limit = unit_norms(jnp.asarray(weights[i]), axes).at_least(eps).times(clipping)
      limit = limit._replace(m=nan_unless(ok, limit.m))
      factors, active = scale_factors(g_norm, limit, clip=True)
      y = g.astype(g_norm.m.dtype)
      out[i] = times_factors(y, factors.s1, factors.s2).astype(g.dtype)
      squares.append(g_norm.square().total(axis=None))
      clipped.append(jnp.sum(active))
      units += active.size
    if not squares:
      return jax.tree.unflatten(treedef, out), init_fn(None)
    norm = Pow2.stack(squares).total().sqrt().to_float32()
    fraction = (sum(clipped) / units).astype(jnp.float32)
    return jax.tree.unflatten(treedef, out), AdaptiveGradClipState(norm, fraction)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- per-example clipping


def per_example_clip(
  l2_norm_clip: ArrayLike, *, scope: Scope = "global"
) -> optax.GradientTransformation:
  """Clips each example's gradient to norm ``l2_norm_clip`` and sums them (DP-SGD).

  ``update`` takes per-example gradients: every float leaf has the batch on
  its axis 0. Each example's gradient is clipped to its own L2 norm, taken
  over all leaves (``scope="global"``, as
  ``optax.per_example_global_norm_clip``) or over each leaf alone
  (``scope="leaf"``), and the clipped gradients are summed over the batch,
  in float32 and cast back. The norms are exact over the whole float range.
  Non-float leaves pass through.

  Args:
    l2_norm_clip: the largest norm of one example's gradient, ``>= 0``.
    scope: ``"global"`` or ``"leaf"``.

  Returns:
    An :class:`optax.GradientTransformation` whose state,
    :class:`PerExampleClipState`, records ``norm`` (the global L2 norm of the
    incoming per-example gradients), ``clipped_fraction`` (the fraction of
    examples clipped; of (leaf, example) pairs with ``scope="leaf"``) and
    ``max_example_norm`` and ``threshold`` (the ``l2_norm_clip`` applied).

  Raises:
    ValueError: if ``l2_norm_clip`` is negative or NaN or ``scope`` unknown;
      in ``update``, if the float leaves do not share a batch axis 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.per_example_clip(1.0)
    >>> g = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # two examples, norms 5 and 0.5
    >>> updates, state = tx.update(g, tx.init(g))
    >>> updates["w"], float(state.clipped_fraction)
    (Array([0.90000004, 1.2       ], dtype=float32), 0.5)

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016
  """
  owner = "per_example_clip"
  check_number(owner, "l2_norm_clip", l2_norm_clip, NON_NEGATIVE)
  check_choice(owner, "scope", scope, SCOPES)

  def init_fn(params: Any) -> PerExampleClipState:
    del params
    z = _stats.zeros()
    return PerExampleClipState(*(z for _ in PerExampleClipState._fields))

  def update_fn(updates, state, params=None):
    del state, params
    floats, rebuild = split_floats(updates)
    if not floats:
      return rebuild(floats), init_fn(None)
    _check_batch(floats, owner)
    norms = example_norms(floats, scope)  # [B] or [L, B]
    target = nan_unless(traced_ok([(l2_norm_clip, NON_NEGATIVE)]), l2_norm_clip)
    factors, active = scale_factors(norms, target, clip=True)
    out = []
    for i, x in enumerate(floats):
      s1, s2 = (factors.s1, factors.s2) if scope == "global" else (factors.s1[i], factors.s2[i])
      column = (-1,) + (1,) * (x.ndim - 1)
      s1, s2 = s1.reshape(column), s2.reshape(column)
      y = x.astype(norms.m.dtype)
      out.append(jnp.sum(times_factors(y, s1, s2), axis=0).astype(x.dtype))
    squares = norms.square().reshape_flat()
    new = PerExampleClipState(
      norm=squares.total().sqrt().to_float32(),
      clipped_fraction=jnp.mean(active.astype(jnp.float32)),
      max_example_norm=jnp.max(norms.to_float32()),
      threshold=_stats.as_statistic(l2_norm_clip),
    )
    return rebuild(out), new

  return optax.GradientTransformation(init_fn, update_fn)


def _check_batch(floats: Sequence[jax.Array], owner: str) -> None:
  sizes = {x.shape[0] if x.ndim else None for x in floats}
  if None in sizes or len(sizes) != 1:
    shapes = [tuple(x.shape) for x in floats]
    raise ValueError(
      f"{owner}: every float leaf needs the batch on axis 0, with one batch size; got shapes {shapes}"
    )
