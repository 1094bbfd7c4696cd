"""Skipping: a step whose gradient norm or loss spikes, or that is not finite, leaves the optimizer untouched."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_gradctl import _estimator, _stats
from optax_gradctl._reduction.mesh import AxisName
from optax_gradctl._reduction.reduce import reduce_tree
from optax_gradctl._validation import check_number


@_stats.register(
  "skip_on_spike",
  (
    "norm",
    "threshold",
    "z",
    "ema_mean",
    "ema_std",
    "loss",
    "loss_threshold",
    "loss_z",
    "skipped",
    "nonfinite",
    "norm_spike",
    "loss_spike",
    "skip_count",
    "consecutive_skips",
  ),
)
class SkipOnSpikeState(NamedTuple):
  """State of :func:`~optax_gradctl.skip_on_spike`: statistics, estimators and inner state."""

  #: float32 scalar: the global L2 norm of the incoming gradient.
  norm: jax.Array
  #: float32 scalar: the bound applied to this step's norm: a larger one is
  #: skipped (+inf during warm-up).
  threshold: jax.Array
  #: float32 scalar: the z-score of the norm (0 during warm-up).
  z: jax.Array
  #: float32 scalar: the mean of the norm the estimator held at this step.
  ema_mean: jax.Array
  #: float32 scalar: its standard deviation.
  ema_std: jax.Array
  #: float32 scalar: the loss passed with the step (0 without one).
  loss: jax.Array
  #: float32 scalar: the bound applied to this step's loss (+inf during
  #: warm-up or without a loss).
  loss_threshold: jax.Array
  #: float32 scalar: the z-score of the loss (0 during warm-up or without a loss).
  loss_z: jax.Array
  #: float32 scalar: 1.0 when this step was skipped.
  skipped: jax.Array
  #: float32 scalar: 1.0 when the gradient or the loss was not finite.
  nonfinite: jax.Array
  #: float32 scalar: 1.0 when the norm was an outlier.
  norm_spike: jax.Array
  #: float32 scalar: 1.0 when the loss was an outlier.
  loss_spike: jax.Array
  #: int32 scalar: steps skipped so far.
  skip_count: jax.Array
  #: int32 scalar: steps skipped in a row, up to this one.
  consecutive_skips: jax.Array
  #: The norm's estimator, after this step.
  ema: _estimator.EmaState
  #: The loss's estimator, after this step.
  loss_ema: _estimator.EmaState
  #: ``inner``'s state, untouched by a skipped step.
  inner_state: Any


def skip_on_spike(
  inner: optax.GradientTransformation,
  *,
  z_threshold: ArrayLike = 6.0,
  loss_z_threshold: ArrayLike | None = None,
  decay: ArrayLike = 0.99,
  warmup_steps: ArrayLike = 100,
  max_consecutive: ArrayLike = 10,
  axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips the step when the gradient norm or the loss spikes, like ``optax.apply_if_finite``.

  The global L2 norm of each gradient is tracked with the estimator of
  :func:`zclip`: the mean and population variance of the first
  ``warmup_steps`` finite norms, then an EMA with ``decay``. A step is
  skipped when its gradient is non-finite, or, after warm-up, when
  ``z = (||g|| - mu) / (sigma + 1e-6) > z_threshold``. A skipped step returns
  zero updates and leaves ``inner``'s state untouched, so Adam's moments are
  not polluted, and its norm does not enter the statistics.

  The loss of the step may be passed too, through optax's extra arguments:
  ``tx.update(grads, state, params, loss=loss)``. It is tracked the same way,
  by its own estimator, and a step whose loss is non-finite, or a z-score
  outlier above ``loss_z_threshold``, is skipped as well. Without a loss the
  transform behaves as if it had no loss statistics. Extra arguments,
  ``loss`` included, are passed on to ``inner``.

  So that training cannot stall, after ``max_consecutive`` skips in a row the
  next finite step passes whatever its z; its norm and loss enter the
  statistics and the counter resets. Non-finite steps are always skipped and
  count towards the run of skips. With ``max_consecutive=10`` and 2 skips
  already made, 8 more spikes are skipped and the 9th passes.

  Args:
    inner: the optimizer (or chain) to protect.
    z_threshold: the norm's z-score above which a step is skipped, ``> 0``.
    loss_z_threshold: the loss's, ``> 0``; ``None``: ``z_threshold``.
    decay: the EMAs' decay, in ``(0, 1)``.
    warmup_steps: finite steps before skipping starts, ``>= 1``.
    max_consecutive: skips in a row before a finite step is let through,
      ``>= 0``.
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state,
    :class:`SkipOnSpikeState`, records the norm's ``norm``, ``threshold``,
    ``z``, ``ema_mean`` and ``ema_std``; the loss's ``loss``,
    ``loss_threshold`` and ``loss_z``; whether the step was ``skipped`` and
    why (``nonfinite``, ``norm_spike``, ``loss_spike``: 0 or 1 each); and
    ``skip_count`` and ``consecutive_skips``. It holds ``inner``'s state.

  Raises:
    ValueError: if an argument is out of range or NaN.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optax_gradctl as gc
    >>> tx = gc.skip_on_spike(optax.sgd(1.0), warmup_steps=3)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g, loss in [(1.0, 2.0), (1.1, 2.1), (0.9, 1.9), (1.0, 2.0), (1.0, 90.0)]:
    ...   updates, state = tx.update(jnp.array([g]), state, loss=loss)
    >>> float(updates[0]), int(state.skip_count), float(state.loss_spike), float(state.norm_spike)
    (0.0, 1, 1.0, 0.0)
  """
  owner = "skip_on_spike"
  _estimator.check_estimator_args(owner, z_threshold, decay, warmup_steps)
  if loss_z_threshold is not None:
    check_number(owner, "loss_z_threshold", loss_z_threshold, low=0.0, low_open=True)
  check_number(owner, "max_consecutive", max_consecutive, low=0.0, allow_inf=False, integer=True)
  inner = optax.with_extra_args_support(inner)
  rules = _Rules(
    z_threshold,
    z_threshold if loss_z_threshold is None else loss_z_threshold,
    decay,
    warmup_steps,
    max_consecutive,
  )

  def init_fn(params: Any) -> SkipOnSpikeState:
    z, inf, zero = _stats.zeros(), jnp.asarray(jnp.inf, jnp.float32), jnp.zeros((), jnp.int32)
    statistics = dict.fromkeys(SkipOnSpikeState._fields[:14], z)
    statistics.update(threshold=inf, loss_threshold=inf, skip_count=zero, consecutive_skips=zero)
    ema = _estimator.ema_init()
    return SkipOnSpikeState(**statistics, ema=ema, loss_ema=ema, inner_state=inner.init(params))

  def update_fn(updates, state, params=None, *, loss=None, **extra_args):
    _, _, red = reduce_tree(updates, axis_name, norms=("l2",))
    seen = _Seen.of(state, red, loss, rules)
    if loss is not None:
      extra_args = {**extra_args, "loss": loss}
    let_through = state.consecutive_skips >= jnp.asarray(max_consecutive).astype(jnp.int32)
    skip = ~seen.finite | ((seen.norm.spike | seen.loss.spike) & ~let_through)
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    keep = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
    inner_state = jax.tree.map(keep, inner_state, state.inner_state)
    out = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), inner_updates)
    return out, _next_state(state, red.norm, seen, skip, loss is not None, rules, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Rules(NamedTuple):
  """The hyperparameters of :func:`skip_on_spike`."""

  z_threshold: ArrayLike
  loss_z_threshold: ArrayLike
  decay: ArrayLike
  warmup_steps: ArrayLike
  max_consecutive: ArrayLike


class _Seen(NamedTuple):
  """This step's norm and loss, judged against the estimators."""

  norm: _estimator.Outlier
  loss: _estimator.Outlier
  loss_value: jax.Array  # float32, 0 without a loss
  finite: jax.Array  # bool: the gradient and the loss

  @staticmethod
  def of(state: SkipOnSpikeState, red, loss, rules: _Rules) -> _Seen:
    finite = jnp.all(jnp.isfinite(red.l2.m))
    z_norm = _estimator.outlier(state.ema, red.norm, finite, rules.z_threshold, rules.warmup_steps)
    if loss is None:
      quiet = _estimator.Outlier(_stats.zeros(), jnp.zeros((), bool))
      return _Seen(z_norm, quiet, _stats.zeros(), finite)
    value = jnp.asarray(loss, jnp.float32)
    ok = jnp.isfinite(value)
    z_loss = _estimator.outlier(
      state.loss_ema, value, ok, rules.loss_z_threshold, rules.warmup_steps
    )
    return _Seen(z_norm, z_loss, value, finite & ok)


def _next_state(state, norm, seen: _Seen, skip, has_loss: bool, rules: _Rules, inner_state):
  """The state after this step: the statistics of this step, judged against
  the estimators as they were; the estimators with this step entered unless
  it was skipped."""
  warmup, decay = rules.warmup_steps, rules.decay
  ema = _estimator.ema_update(state.ema, norm, ~skip & jnp.isfinite(norm), warmup, decay)
  loss_ema = state.loss_ema
  if has_loss:
    loss_ema = _estimator.ema_update(loss_ema, seen.loss_value, ~skip, warmup, decay)
  ema_mean, ema_std = _estimator.mean_and_std(state.ema, warmup)
  loss_bound = _estimator.bound(state.loss_ema, rules.loss_z_threshold, warmup)
  skip_i = skip.astype(jnp.int32)
  as_f32 = lambda b: b.astype(jnp.float32)  # noqa: E731
  return SkipOnSpikeState(
    norm=norm,
    threshold=_estimator.bound(state.ema, rules.z_threshold, warmup),
    z=seen.norm.z,
    ema_mean=ema_mean,
    ema_std=ema_std,
    loss=seen.loss_value,
    loss_threshold=loss_bound if has_loss else jnp.asarray(jnp.inf, jnp.float32),
    loss_z=seen.loss.z,
    skipped=as_f32(skip),
    nonfinite=as_f32(~seen.finite),
    norm_spike=as_f32(seen.norm.spike),
    loss_spike=as_f32(seen.loss.spike),
    skip_count=state.skip_count + skip_i,
    consecutive_skips=(state.consecutive_skips + 1) * skip_i,
    ema=ema,
    loss_ema=loss_ema,
    inner_state=inner_state,
  )
