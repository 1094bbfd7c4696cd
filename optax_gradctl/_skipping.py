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
from optax_gradctl._validation import (
  COUNT_OR_ZERO,
  POSITIVE,
  check_number,
  nan_unless,
  traced_ok,
)


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
  """State of :func:`~optax_gradctl.skip_on_spike`: statistics, estimators and inner state.

  ``threshold``, ``ema_mean`` and ``ema_std`` describe the norm's estimator
  as this step was judged against it. ``loss_threshold`` is the last
  accepted loss plus the largest rise let through, and ``loss_z`` the
  z-score of this step's rise; both are +inf and 0 without a loss.
  """

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming gradient.
  threshold: jax.Array  #: float32 scalar: this step's bound on the norm (+inf in warm-up).
  z: jax.Array  #: float32 scalar: the z-score of the norm (0 during warm-up).
  ema_mean: jax.Array  #: float32 scalar: the norm's mean the estimator held.
  ema_std: jax.Array  #: float32 scalar: its standard deviation.
  loss: jax.Array  #: float32 scalar: the loss passed with the step (0 without one).
  loss_threshold: jax.Array  #: float32 scalar: this step's bound on the loss (+inf in warm-up).
  loss_z: jax.Array  #: float32 scalar: the z-score of the loss's change.
  skipped: jax.Array  #: float32 scalar: 1.0 when this step was skipped.
  nonfinite: jax.Array  #: float32 scalar: 1.0 when the gradient or loss was not finite.
  norm_spike: jax.Array  #: float32 scalar: 1.0 when the norm was an outlier.
  loss_spike: jax.Array  #: float32 scalar: 1.0 when the loss was an outlier.
  skip_count: jax.Array  #: int32 scalar: steps skipped so far.
  consecutive_skips: jax.Array  #: int32 scalar: steps skipped in a row, up to this one.
  ema: _estimator.EmaState  #: The norm's estimator, after this step.
  loss_ema: _estimator.EmaState  #: The estimator of the loss's change, after this step.
  last_loss: jax.Array  #: float32 scalar: the last accepted loss (NaN before one).
  inner_state: Any  #: ``inner``'s state, untouched by a skipped step.


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

  The loss of the step may be passed too, as optax passes it, through the
  extra argument ``value``: ``tx.update(grads, state, params, value=loss)``,
  so that one call serves ``optax.contrib.reduce_on_plateau`` in the same
  chain. It must be a scalar. A step whose loss is non-finite is skipped, and
  so is one whose loss *rose* by an outlier: the change from the last
  accepted loss is judged, by the same estimator, against the changes before
  it, with ``loss_z_threshold``. Judging the change, not the level, keeps a
  loss that falls steeply, early in training, from hiding a spike: a level's
  spread over such a descent is the descent itself, which a jump of 100
  times the loss need not exceed by six standard deviations. Without a loss
  the transform behaves as if it had no loss statistics. Extra arguments, ``value``
  included, are passed on to ``inner``; ``loss=`` raises ``TypeError``
  rather than being ignored.

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
    :class:`SkipOnSpikeState`, records the norm's ``norm``, ``threshold``
    (the bound this step's norm was judged against: ``mu + z_threshold *
    (sigma + 1e-6)``, +inf during warm-up), ``z``, ``ema_mean`` and
    ``ema_std`` (the ``mu`` and ``sigma`` of that bound, before this step
    entered the estimator); the loss's ``loss``, ``loss_threshold`` (the
    last accepted loss plus the largest rise let through) and ``loss_z`` (of
    its change); whether the step was ``skipped`` and
    why (``nonfinite``, ``norm_spike``, ``loss_spike``: 0 or 1 each); and
    ``skip_count`` and ``consecutive_skips``. It holds ``inner``'s state.

  Raises:
    ValueError: if an argument is out of range, NaN or ``None``; in
      ``update``, if ``value`` is not a scalar.
    TypeError: if ``inner`` is not an ``optax.GradientTransformation`` (an
      optimizer factory such as ``optax.adamw`` itself, uncalled); in
      ``update``, for ``loss=``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optax_gradctl as gc
    >>> tx = gc.skip_on_spike(optax.sgd(1.0), warmup_steps=3)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g, loss in [(1.0, 2.0), (1.1, 2.1), (0.9, 1.9), (1.0, 2.0), (1.0, 90.0)]:
    ...   updates, state = tx.update(jnp.array([g]), state, value=loss)
    >>> float(updates[0]), int(state.skip_count), float(state.loss_spike), float(state.norm_spike)
    (0.0, 1, 1.0, 0.0)
  """
  owner = "skip_on_spike"
  _check_inner(inner)
  _estimator.check_estimator_args(owner, z_threshold, decay, warmup_steps)
  check_number(owner, "loss_z_threshold", loss_z_threshold, POSITIVE, optional=True)
  check_number(owner, "max_consecutive", max_consecutive, COUNT_OR_ZERO)
  inner = optax.with_extra_args_support(inner)
  rules = _Rules(
    z_threshold,
    z_threshold if loss_z_threshold is None else loss_z_threshold,
    decay,
    warmup_steps,
    max_consecutive,
  )
  checks = [
    *_estimator.estimator_checks(rules.z_threshold, decay, warmup_steps),
    (rules.loss_z_threshold, POSITIVE),
    (max_consecutive, COUNT_OR_ZERO),
  ]

  def init_fn(params: Any) -> SkipOnSpikeState:
    z, inf, zero = _stats.zeros(), jnp.asarray(jnp.inf, jnp.float32), jnp.zeros((), jnp.int32)
    statistics = dict.fromkeys(SkipOnSpikeState._fields[:14], z)
    statistics.update(threshold=inf, loss_threshold=inf, skip_count=zero, consecutive_skips=zero)
    ema, none = _estimator.ema_init(), jnp.asarray(jnp.nan, jnp.float32)
    return SkipOnSpikeState(
      **statistics, ema=ema, loss_ema=ema, last_loss=none, inner_state=inner.init(params)
    )

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    _check_extra_args(value, extra_args)
    _, _, red = reduce_tree(updates, axis_name, norms=("l2",))
    seen = _Seen.of(state, red, value, rules)
    if value is not None:
      extra_args = {**extra_args, "value": value}
    ok = traced_ok(checks)
    let_through = state.consecutive_skips >= jnp.asarray(max_consecutive).astype(jnp.int32)
    skip = ~seen.finite | ((seen.norm.spike | seen.loss.spike) & ~let_through)
    skip = skip if ok is None else skip | ~ok  # out of range: nothing enters; the update is NaN
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    keep = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
    inner_state = jax.tree.map(keep, inner_state, state.inner_state)
    out = jax.tree.map(lambda u: _skipped(u, skip, ok), inner_updates)
    return out, _next_state(state, red.norm, seen, skip, value is not None, rules, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_inner(inner: Any) -> None:
  if isinstance(inner, optax.GradientTransformation):
    return
  name = getattr(inner, "__qualname__", type(inner).__name__)
  hint = (
    f"; {name} is a function that makes one: call it, e.g. skip_on_spike({name}(1e-3))"
    if callable(inner)
    else ""
  )
  raise TypeError(
    f"skip_on_spike: inner must be an optax.GradientTransformation (an optimizer or a"
    f" chain), got {inner!r}{hint}"
  )


def _check_extra_args(value: Any, extra_args: dict) -> None:
  """The loss comes as ``value=``, a scalar; ``loss=`` is refused, never ignored."""
  if "loss" in extra_args:
    raise TypeError(
      "skip_on_spike: pass the loss as value=, optax's name for it (as"
      " optax.contrib.reduce_on_plateau reads it): tx.update(grads, state, params,"
      " value=loss); got loss="
    )
  if value is not None and jnp.ndim(value) != 0:
    raise ValueError(
      f"skip_on_spike: value (the step's loss) must be a scalar, got shape"
      f" {jnp.shape(value)}; pass the mean loss of the batch"
    )


def _skipped(u: jax.Array, skip: jax.Array, ok: jax.Array | None) -> jax.Array:
  """A leaf of the update: zeros where the step is skipped, NaN where a
  traced hyperparameter is out of range."""
  out = jnp.where(skip, jnp.zeros_like(u), u)
  return nan_unless(ok, out) if jnp.issubdtype(u.dtype, jnp.inexact) else out


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
  loss_change: jax.Array  # float32: from the last accepted loss (NaN without one)
  finite: jax.Array  # bool: the gradient and the loss

  @staticmethod
  def of(state: SkipOnSpikeState, red, loss, rules: _Rules) -> _Seen:
    finite = jnp.all(jnp.isfinite(red.l2.m))
    z_norm = _estimator.outlier(state.ema, red.norm, finite, rules.z_threshold, rules.warmup_steps)
    if loss is None:
      quiet = _estimator.Outlier(_stats.zeros(), jnp.zeros((), bool))
      return _Seen(z_norm, quiet, _stats.zeros(), jnp.asarray(jnp.nan, jnp.float32), finite)
    value = jnp.asarray(loss, jnp.float32)
    change = value - state.last_loss
    z_loss = _estimator.outlier(
      state.loss_ema, change, jnp.isfinite(change), rules.loss_z_threshold, rules.warmup_steps
    )
    return _Seen(z_norm, z_loss, value, change, finite & jnp.isfinite(value))


def _next_state(state, norm, seen: _Seen, skip, has_loss: bool, rules: _Rules, inner_state):
  """The state after this step: the statistics of this step, judged against
  the estimators as they were; the estimators with this step entered unless
  it was skipped."""
  warmup, decay = rules.warmup_steps, rules.decay
  ema = _estimator.ema_update(state.ema, norm, ~skip & jnp.isfinite(norm), warmup, decay)
  loss_ema, last_loss = state.loss_ema, state.last_loss
  if has_loss:
    enter = ~skip & jnp.isfinite(seen.loss_change)
    loss_ema = _estimator.ema_update(loss_ema, seen.loss_change, enter, warmup, decay)
    last_loss = jnp.where(skip, last_loss, seen.loss_value)
  ema_mean, ema_std = _estimator.mean_and_std(state.ema, warmup)
  rise = _estimator.bound(state.loss_ema, rules.loss_z_threshold, warmup)
  loss_bound = jnp.where(jnp.isfinite(state.last_loss), state.last_loss + rise, jnp.inf)
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
    last_loss=last_loss,
    inner_state=inner_state,
  )
