"""AutoClip: clipping the global norm to a percentile of its recent history."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_gradctl import _stats
from optax_gradctl._reduction.mesh import AxisName
from optax_gradctl._reduction.reduce import reduce_tree, rescaled_to_norm
from optax_gradctl._validation import (
  COUNT,
  Range,
  and_ok,
  check_number,
  concrete,
  nan_unless,
  traced_ok,
)

PERCENTILE = Range(low=0.0, high=100.0)


@_stats.register("autoclip", ("norm", "threshold", "clipped_fraction"))
class AutoClipState(NamedTuple):
  """State of :func:`~optax_gradctl.autoclip`: its statistics and norm history."""

  norm: jax.Array  #: float32 scalar: the global L2 norm before clipping.
  threshold: jax.Array  #: float32 scalar: this step's bound, the percentile (+inf with no history).
  clipped_fraction: jax.Array  #: float32 scalar: 1.0 when this step was clipped, else 0.0.
  history: jax.Array  #: float32 ring buffer of ``history`` entries: the last finite norms.
  count: jax.Array  #: int32 scalar: finite norms ever entered.


def autoclip(
  percentile: ArrayLike = 10.0,
  *,
  history: int = 1000,
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """AutoClip: clips the global norm to a percentile of its recent history.

  The global L2 norms of the last ``history`` finite gradients are kept in a
  fixed-size ring buffer. At each step the current norm enters the buffer
  first, as in the paper's code; the gradient is then clipped to the
  ``percentile``-th percentile of the buffer, interpolated linearly like
  ``numpy.percentile``. A finite gradient whose norm overflows float32
  enters as ``+inf`` (at the 100th percentile it is never clipped). A
  non-finite gradient never enters the buffer and passes through as NaN.

  Args:
    percentile: in ``[0, 100]``.
    history: the buffer's size, ``>= 1``. It fixes the state's shape, so
      ``init`` needs it concrete; ``update`` reads it from the state, so under
      ``inject_hyperparams`` it may be traced.
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``.

  Returns:
    An :class:`optax.GradientTransformation` whose state,
    :class:`AutoClipState`, records ``norm``, ``threshold`` and
    ``clipped_fraction``.

  Raises:
    ValueError: if ``percentile`` or ``history`` is out of range or NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.autoclip(50.0, history=4)
    >>> state = tx.init(jnp.zeros(1))
    >>> for norm in [1.0, 3.0, 2.0, 10.0]:
    ...   updates, state = tx.update(jnp.array([norm]), state)
    >>> float(state.threshold), float(updates[0])  # the median of [1, 3, 2, 10]
    (2.5, 2.5)

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
  """
  owner = "autoclip"
  check_number(owner, "percentile", percentile, PERCENTILE)
  check_number(owner, "history", history, COUNT)

  def init_fn(params: Any) -> AutoClipState:
    del params
    size = concrete(history)
    if size is None:
      raise TypeError(
        f"{owner}: history fixes the state's shape, so init needs a concrete int, got a tracer"
        f" ({history!r}); call init outside jit, or with optax.inject_hyperparams pass"
        " static_args=('history',)"
      )
    size = int(size)
    z = _stats.zeros()
    return AutoClipState(
      z,
      jnp.asarray(jnp.inf, jnp.float32),
      z,
      jnp.zeros((size,), jnp.float32),
      jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild, red = reduce_tree(updates, axis_name, norms=("l2",))
    norm = red.norm
    finite = jnp.all(jnp.isfinite(red.l2.m))  # an overflowing norm enters as +inf
    ok = traced_ok([(percentile, PERCENTILE)])
    enter = and_ok(finite, ok)
    buffer = state.history
    n = buffer.shape[0]  # read from the state, never from a traced argument
    slot = state.count % n
    # a select, not a scatter: elementwise ops have a sharding rule on every jax
    buffer = jnp.where(enter & (jnp.arange(n) == slot), norm, buffer)
    count = state.count + enter.astype(jnp.int32)
    threshold = nan_unless(ok, _percentile(buffer, jnp.minimum(count, n), percentile))
    out, clipped = rescaled_to_norm(floats, red, "l2", "global", threshold, clip=True)
    new = AutoClipState(
      norm=norm,
      threshold=threshold,
      clipped_fraction=(jnp.any(clipped) & finite).astype(jnp.float32),
      history=buffer,
      count=count,
    )
    return rebuild(out), new

  return optax.GradientTransformation(init_fn, update_fn)


def _percentile(buffer: jax.Array, valid: jax.Array, q: ArrayLike) -> jax.Array:
  """``numpy.percentile(buffer[:valid], q)`` (linear), +inf when ``valid == 0``."""
  n = buffer.shape[0]
  ordered = jnp.sort(jnp.where(jnp.arange(n) < valid, buffer, jnp.inf))
  pos = jnp.asarray(q, jnp.float32) / 100 * jnp.maximum(valid - 1, 0).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(valid - 1, 0))
  frac = pos - lo.astype(jnp.float32)
  a, b = ordered[lo], ordered[hi]
  value = jnp.where((frac == 0) | (a == b), a, a + (b - a) * frac)  # no inf - inf
  return jnp.where(valid > 0, value, jnp.inf).astype(jnp.float32)
