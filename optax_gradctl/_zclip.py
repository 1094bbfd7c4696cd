"""ZClip: clipping the global norm when it is a z-score outlier of its own history."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_gradctl import _estimator, _stats
from optax_gradctl._reduction.mesh import AxisName
from optax_gradctl._reduction.reduce import reduce_tree, rescaled_to_norm
from optax_gradctl._validation import (
  NON_NEGATIVE,
  and_ok,
  check_choice,
  check_number,
  nan_unless,
  traced_ok,
)

ZCLIP_MODES = ("adaptive", "mean", "percentile")


@_stats.register("zclip", ("norm", "threshold", "z", "clipped_fraction", "ema_mean", "ema_std"))
class ZClipState(NamedTuple):
  """State of :func:`~optax_gradctl.zclip`: its statistics, then its estimator.

  ``threshold``, ``ema_mean`` and ``ema_std`` describe the estimator this
  step's norm was judged against, before the norm entered it.
  """

  norm: jax.Array  #: float32 scalar: the global L2 norm before clipping.
  threshold: jax.Array  #: float32 scalar: this step's bound, the largest norm let through.
  z: jax.Array  #: float32 scalar: the z-score of the norm (0 during warm-up).
  clipped_fraction: jax.Array  #: float32 scalar: 1.0 when this step was clipped, else 0.0.
  ema_mean: jax.Array  #: float32 scalar: the mean the estimator held at this step.
  ema_std: jax.Array  #: float32 scalar: its standard deviation.
  ema: _estimator.EmaState  #: The estimator, after this step's norm entered it.


def zclip(
  z_threshold: ArrayLike = 2.5,
  *,
  decay: ArrayLike = 0.97,
  warmup_steps: ArrayLike = 25,
  mode: str = "adaptive",
  max_norm: ArrayLike | None = None,
  axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """ZClip: clips the global norm when it is a z-score outlier of its own history.

  For the first ``warmup_steps`` finite steps the global L2 norms are only
  collected (and the gradient clipped to ``max_norm`` if given); their mean
  and population variance then start an exponential moving mean ``mu`` and
  variance ``sigma**2``. Afterwards, with ``z = (||g|| - mu) / (sigma + 1e-6)``,
  a step with ``z > z_threshold`` has its norm clipped to

  - ``mode="adaptive"``: ``mu + z_threshold * sigma / (z / z_threshold)``,
    a lower cap for a larger outlier;
  - ``mode="mean"``: ``mu``;
  - ``mode="percentile"``: ``mu + z_threshold * sigma``;

  and never above ``max_norm``. The EMA is then updated with that cap (taken
  before ``max_norm``) on a clipped step and with the raw norm otherwise. A
  non-finite gradient passes through as NaN and leaves the statistics
  bitwise unchanged. A finite gradient whose norm overflows float32 counts
  as ``z = +inf``: after warm-up it is clipped and its cap enters the EMA;
  during warm-up it is let through (clipped to ``max_norm`` if given) and
  not collected.

  The ``threshold`` statistic is the bound applied to this step's norm, the
  largest norm let through, whether or not the step was clipped, so it plots
  against ``norm``: after warm-up ``mu + z_threshold * (sigma + 1e-6)`` on an
  ordinary step (the norm at which clipping starts), the cap on a clipped
  step, never above ``max_norm``; during warm-up ``max_norm`` (+inf without
  one). ``ema_mean`` and ``ema_std`` are the ``mu`` and ``sigma`` it came
  from, as :func:`skip_on_spike` reports them.

  Args:
    z_threshold: the z-score above which a norm is clipped, ``> 0``.
    decay: the EMA decay, in ``(0, 1)``.
    warmup_steps: finite steps collected before clipping starts, ``>= 1``.
    mode: ``"adaptive"``, ``"mean"`` or ``"percentile"``.
    max_norm: an optional fixed cap, ``>= 0``, applied at every step.
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``.

  Returns:
    An :class:`optax.GradientTransformation` whose state, :class:`ZClipState`,
    records ``norm``, ``threshold``, ``z``, ``clipped_fraction``, ``ema_mean``
    and ``ema_std``.

  Raises:
    ValueError: if an argument is out of range or NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.zclip(2.5, warmup_steps=3)
    >>> state = tx.init(jnp.zeros(2))
    >>> for norm in [1.0, 1.2, 0.8, 1.1, 50.0]:  # a spike after warm-up
    ...   updates, state = tx.update(jnp.array([norm, 0.0]), state)
    >>> round(float(state.norm), 2), round(float(state.threshold), 3), round(float(updates[0]), 3)
    (50.0, 1.006, 1.006)

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025
  """
  owner = "zclip"
  _estimator.check_estimator_args(owner, z_threshold, decay, warmup_steps)
  check_choice(owner, "mode", mode, ZCLIP_MODES)
  check_number(owner, "max_norm", max_norm, NON_NEGATIVE, optional=True)
  fixed = jnp.inf if max_norm is None else max_norm
  checks = [*_estimator.estimator_checks(z_threshold, decay, warmup_steps), (fixed, NON_NEGATIVE)]

  def init_fn(params: Any) -> ZClipState:
    del params
    z = _stats.zeros()
    return ZClipState(z, jnp.asarray(jnp.inf, jnp.float32), z, z, z, z, _estimator.ema_init())

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild, red = reduce_tree(updates, axis_name, norms=("l2",))
    finite = jnp.all(jnp.isfinite(red.l2.m))
    found = _Judged.of(state.ema, red.norm, finite, z_threshold, warmup_steps, mode)
    ok = traced_ok(checks)
    limit = nan_unless(ok, jnp.minimum(found.cap, jnp.asarray(fixed, jnp.float32)))
    out, clipped = rescaled_to_norm(floats, red, "l2", "global", limit, clip=True)
    # A finite gradient enters: its norm, or on a spike (an overflowing
    # norm included) its cap. During warm-up an overflowing norm cannot.
    entered = jnp.where(found.spike, found.cap, red.norm)
    enter = and_ok(finite & jnp.isfinite(entered), ok)
    ema = _estimator.ema_update(state.ema, entered, enter, warmup_steps, decay)
    ema_mean, ema_std = _estimator.mean_and_std(state.ema, warmup_steps)
    new = ZClipState(
      norm=red.norm,
      threshold=jnp.minimum(found.threshold, jnp.asarray(fixed, jnp.float32)),
      z=found.z,
      clipped_fraction=(jnp.any(clipped) & finite).astype(jnp.float32),
      ema_mean=ema_mean,
      ema_std=ema_std,
      ema=ema,
    )
    return rebuild(out), new

  return optax.GradientTransformation(init_fn, update_fn)


class _Judged(NamedTuple):
  """A norm judged against ZClip's estimator."""

  z: jax.Array  # float32
  spike: jax.Array  # bool
  cap: jax.Array  # float32: the norm clipped to (+inf where not a spike)
  threshold: jax.Array  # float32: the bound in force: the cap, else the z boundary

  @staticmethod
  def of(ema, norm, finite, z_threshold, warmup_steps, mode) -> _Judged:
    z, spike = _estimator.outlier(ema, norm, finite, z_threshold, warmup_steps)
    mean, std = ema.mean, jnp.sqrt(ema.var)
    zt = jnp.asarray(z_threshold, jnp.float32)
    if mode == "adaptive":
      cap = mean + jnp.square(zt) * std / jnp.where(jnp.isinf(z), jnp.inf, jnp.maximum(z, zt))
    elif mode == "mean":
      cap = mean
    else:
      cap = mean + zt * std
    cap = jnp.where(spike, cap, jnp.inf)
    boundary = _estimator.bound(ema, z_threshold, warmup_steps)
    return _Judged(z, spike, cap, jnp.where(spike, cap, boundary).astype(jnp.float32))
