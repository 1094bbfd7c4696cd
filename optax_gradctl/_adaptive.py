"""Spike-aware adaptive clipping: thresholds from the history of the gradient norm.

All state is a fixed-shape pytree updated without host syncs, so these work
under ``jit``, ``lax.scan`` and checkpointing like any optax state. A
non-finite norm never enters the statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_gradctl import _reduce, _stats
from optax_gradctl._validation import check_choice, check_number, concrete

_EPS = 1e-6  # added to the std in z = (norm - mean) / (std + eps), as in ZClip
ZCLIP_MODES = ("adaptive", "mean", "percentile")


# --------------------------------------------------------------------------- shared steps


def _measure(updates: Any, axis_name: Any):
  """The float leaves, the global L2 norm (exact, and as the float32 statistic),
  and whether the gradient is finite."""
  floats, rebuild = _reduce.split_floats(updates)
  axes = _reduce.float_axes(axis_name, updates)
  red = _reduce.reduce(floats, norms=("l2",), axes=axes)
  return floats, rebuild, red.l2, red.norm, jnp.all(jnp.isfinite(red.l2.m))


def _clip_global(floats, l2: _reduce.Pow2, limit: jax.Array, finite: jax.Array):
  """The leaves clipped to global norm ``limit``, and whether that clipped."""
  factors, clipped = _reduce.scale_factors(l2, limit, clip=True)
  return _reduce.rescale(floats, "global", factors), jnp.any(clipped) & finite


# --------------------------------------------------------------------------- the EMA estimator


class EmaState(NamedTuple):
  """The estimator of :func:`zclip` and :func:`skip_on_spike`: warm-up
  accumulators, then an exponential moving mean and variance."""

  count: jax.Array  # int32: finite norms seen, saturating at warmup_steps
  warm_mean: jax.Array  # float32: running mean of the warm-up norms (Welford)
  warm_m2: jax.Array  # float32: running sum of squared deviations
  mean: jax.Array  # float32: EMA mean, once warm
  var: jax.Array  # float32: EMA variance, once warm


def _ema_init() -> EmaState:
  z = _stats.zeros()
  return EmaState(jnp.zeros((), jnp.int32), z, z, z, z)


def _ema_warm(ema: EmaState, warmup_steps: ArrayLike) -> jax.Array:
  return ema.count >= jnp.asarray(warmup_steps).astype(jnp.int32)


def _ema_z(ema: EmaState, norm: jax.Array) -> jax.Array:
  """The z-score of ``norm``: +inf for an overflowing norm, NaN for a NaN one."""
  std = jnp.sqrt(ema.var)
  return jnp.where(jnp.isinf(norm), jnp.inf, (norm - ema.mean) / (std + _EPS))


def _ema_update(ema: EmaState, x: jax.Array, enter: jax.Array, warmup_steps, decay) -> EmaState:
  """``ema`` with ``x`` entered where ``enter``; bitwise unchanged elsewhere.

  During warm-up ``x`` joins the running mean and population variance; the
  step that completes the warm-up sets the EMA from them. Afterwards
  ``mean <- decay*mean + (1-decay)*x``, then
  ``var <- decay*var + (1-decay)*(x - mean)**2`` with the new mean.
  """
  warmup_steps = jnp.asarray(warmup_steps).astype(jnp.int32)
  decay = jnp.asarray(decay, jnp.float32)
  x = jnp.where(enter, x, 0.0).astype(jnp.float32)  # keeps NaN out of the unused branch
  warm = ema.count >= warmup_steps
  # warm-up: Welford's update
  count = ema.count + 1
  delta = x - ema.warm_mean
  warm_mean = ema.warm_mean + delta / count.astype(jnp.float32)
  warm_m2 = ema.warm_m2 + delta * (x - warm_mean)
  done = count >= warmup_steps
  during = EmaState(
    count,
    warm_mean,
    warm_m2,
    jnp.where(done, warm_mean, ema.mean),
    jnp.where(done, warm_m2 / count.astype(jnp.float32), ema.var),
  )
  # afterwards: the EMA
  mean = decay * ema.mean + (1 - decay) * x
  after = ema._replace(mean=mean, var=decay * ema.var + (1 - decay) * jnp.square(x - mean))
  new = jax.tree.map(lambda a, b: jnp.where(warm, a, b), after, during)
  return jax.tree.map(lambda a, b: jnp.where(enter, a, b), new, ema)


def _ema_std_now(ema: EmaState, warmup_steps) -> tuple[jax.Array, jax.Array]:
  """The mean and std to report: the warm-up's so far, then the EMA's."""
  warm = _ema_warm(ema, warmup_steps)
  n = jnp.maximum(ema.count, 1).astype(jnp.float32)
  mean = jnp.where(warm, ema.mean, ema.warm_mean)
  var = jnp.where(warm, ema.var, ema.warm_m2 / n)
  return mean, jnp.sqrt(jnp.maximum(var, 0.0))


def _check_ema_args(owner: str, z_threshold, decay, warmup_steps) -> None:
  check_number(owner, "z_threshold", z_threshold, low=0.0, low_open=True)
  check_number(owner, "decay", decay, low=0.0, high=1.0, low_open=True, high_open=True)
  check_number(owner, "warmup_steps", warmup_steps, low=1.0, allow_inf=False, integer=True)


# --------------------------------------------------------------------------- zclip


@_stats.register("zclip", ("norm", "threshold", "z", "clipped_fraction", "ema_mean", "ema_std"))
class ZClipState(NamedTuple):
  """State of :func:`~optax_gradctl.zclip`: its statistics, then its estimator."""

  norm: jax.Array  # float32: global L2 norm before clipping (non-finite on a non-finite step)
  threshold: jax.Array  # float32: the largest norm let through this step (+inf when none is)
  z: jax.Array  # float32: the z-score of the norm (0 during warm-up)
  clipped_fraction: jax.Array  # float32: 1.0 when this step was clipped, else 0.0
  ema_mean: jax.Array  # float32: mean of the norm (of the warm-up so far, then the EMA)
  ema_std: jax.Array  # float32: its standard deviation
  ema: EmaState  # the estimator


def zclip(
  z_threshold: ArrayLike = 2.5,
  *,
  decay: ArrayLike = 0.97,
  warmup_steps: ArrayLike = 25,
  mode: str = "adaptive",
  max_norm: ArrayLike | None = None,
  axis_name: _reduce.AxisName = None,
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

  The ``threshold`` statistic is the largest norm let through at this step,
  whether or not the step was clipped, so it plots against ``norm``: after
  warm-up ``mu + z_threshold * (sigma + 1e-6)`` on an ordinary step (the
  norm at which clipping starts), the cap on a clipped step, never above
  ``max_norm``; during warm-up ``max_norm`` (+inf without one).

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
  _check_ema_args(owner, z_threshold, decay, warmup_steps)
  check_choice(owner, "mode", mode, ZCLIP_MODES)
  if max_norm is not None:
    check_number(owner, "max_norm", max_norm, low=0.0)

  def init_fn(params: Any) -> ZClipState:
    del params
    z = _stats.zeros()
    return ZClipState(z, jnp.asarray(jnp.inf, jnp.float32), z, z, z, z, _ema_init())

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild, l2, norm, finite = _measure(updates, axis_name)
    ema = state.ema
    warm = _ema_warm(ema, warmup_steps)
    z = jnp.where(warm & finite, _ema_z(ema, norm), 0.0)
    mean, std = ema.mean, jnp.sqrt(ema.var)
    zt = jnp.asarray(z_threshold, jnp.float32)
    if mode == "adaptive":
      cap = mean + jnp.square(zt) * std / jnp.where(jnp.isinf(z), jnp.inf, jnp.maximum(z, zt))
    elif mode == "mean":
      cap = mean
    else:
      cap = mean + zt * std
    spike = warm & finite & (z > zt)
    zcap = jnp.where(spike, cap, jnp.inf)
    fixed = jnp.inf if max_norm is None else jnp.asarray(max_norm, jnp.float32)
    limit = jnp.minimum(zcap, fixed)
    out, did_clip = _clip_global(floats, l2, limit, finite)
    # A finite gradient enters: its norm, or on a spike (an overflowing
    # norm included) its cap. During warm-up an overflowing norm cannot.
    entered = jnp.where(spike, zcap, norm)
    ema = _ema_update(ema, entered, finite & jnp.isfinite(entered), warmup_steps, decay)
    ema_mean, ema_std = _ema_std_now(ema, warmup_steps)
    boundary = mean + zt * (std + _EPS)  # the norm at which z reaches z_threshold
    in_force = jnp.where(spike, cap, jnp.where(warm, boundary, jnp.inf))
    new = ZClipState(
      norm=norm,
      threshold=jnp.minimum(in_force, fixed).astype(jnp.float32),
      z=z.astype(jnp.float32),
      clipped_fraction=did_clip.astype(jnp.float32),
      ema_mean=ema_mean,
      ema_std=ema_std,
      ema=ema,
    )
    return rebuild(out), new

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- autoclip


@_stats.register("autoclip", ("norm", "threshold", "clipped_fraction"))
class AutoClipState(NamedTuple):
  """State of :func:`~optax_gradctl.autoclip`: its statistics and norm history."""

  norm: jax.Array  # float32: global L2 norm before clipping
  threshold: jax.Array  # float32: the percentile clipped to (+inf with no history)
  clipped_fraction: jax.Array  # float32: 1.0 when this step was clipped, else 0.0
  history: jax.Array  # float32 [history]: the last finite norms (a ring buffer)
  count: jax.Array  # int32: finite norms ever entered


def autoclip(
  percentile: ArrayLike = 10.0,
  *,
  history: int = 1000,
  axis_name: _reduce.AxisName = None,
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
  check_number(owner, "percentile", percentile, low=0.0, high=100.0)
  check_number(owner, "history", history, low=1.0, allow_inf=False, integer=True)

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
    floats, rebuild, l2, norm, finite = _measure(updates, axis_name)
    enter = finite  # an overflowing norm of a finite gradient enters as +inf
    buffer = state.history
    n = buffer.shape[0]  # read from the state, never from a traced argument
    slot = state.count % n
    buffer = jnp.where(enter, buffer.at[slot].set(norm), buffer)
    count = state.count + enter.astype(jnp.int32)
    threshold = _percentile(buffer, jnp.minimum(count, n), percentile)
    out, did_clip = _clip_global(floats, l2, threshold, finite)
    new = AutoClipState(
      norm=norm,
      threshold=threshold,
      clipped_fraction=did_clip.astype(jnp.float32),
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


# --------------------------------------------------------------------------- adagc


@_stats.register("adagc", ("norm", "clipped_fraction", "thresholds"))
class AdaGCState(NamedTuple):
  """State of :func:`~optax_gradctl.adagc`: its statistics and per-tensor estimator."""

  norm: jax.Array  # float32: global L2 norm of the incoming gradient
  clipped_fraction: jax.Array  # float32: fraction of tensors clipped at this step
  thresholds: jax.Array  # float32 [L]: each tensor's cap in force (+inf during warm-up)
  gamma: jax.Array  # float32 [L]: EMA of each tensor's clipped norm (+inf until it has one)
  count: jax.Array  # int32: finite steps seen


def adagc(
  *,
  beta: ArrayLike = 0.98,
  lambda_abs: ArrayLike = 1.0,
  lambda_rel: ArrayLike = 1.05,
  warmup_steps: ArrayLike = 100,
  axis_name: _reduce.AxisName = None,
) -> optax.GradientTransformation:
  """AdaGC: clips each tensor against an EMA of its own clipped norm.

  Global clipping shrinks every layer's step when one layer spikes; AdaGC
  keeps one threshold per tensor (leaf). For the first ``warmup_steps - 1``
  finite steps the whole gradient is clipped to global norm ``lambda_abs``,
  and each tensor's ``gamma`` tracks the smallest clipped norm it has had.
  Afterwards each tensor ``i`` is clipped to ``lambda_rel * gamma_i``, and
  ``gamma_i <- beta * gamma_i + (1 - beta) * ||clipped g_i||``.

  As in the paper's reference code, the warm-up is counted in steps (step
  ``t`` warms up while ``t < warmup_steps``) and the first step sets
  ``gamma`` outright. Where the paper is silent, this implementation:

  - never lets a non-finite step into any ``gamma`` or the step count (the
    gradient passes through as NaN, for ``optax.apply_if_finite``);
  - leaves ``gamma_i`` alone when tensor ``i``'s gradient is exactly zero (a
    zero norm would otherwise freeze the tensor at zero for good); a tensor
    whose ``gamma`` is still unset when warm-up ends takes its first nonzero
    clipped norm as ``gamma``, and is not clipped until then.

  Norms are exact over the whole float range, as everywhere here.

  Args:
    beta: the EMA's decay, in ``(0, 1)``.
    lambda_abs: the global norm clipped to during warm-up, ``> 0``.
    lambda_rel: the multiple of ``gamma_i`` a tensor is clipped to, ``> 0``.
    warmup_steps: ``>= 1``; 1 starts per-tensor clipping at once (every
      tensor unclipped until its first nonzero step).
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``.

  Returns:
    An :class:`optax.GradientTransformation` whose state,
    :class:`AdaGCState`, records ``norm``, ``clipped_fraction`` (of tensors)
    and ``thresholds``: one vector, each tensor's cap in force, in the order
    of ``jax.tree.leaves`` over the float leaves.

  Raises:
    ValueError: if an argument is out of range or NaN; in ``update``, if the
      gradient has another number of float leaves than ``init``'s params.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> tx = gc.adagc(lambda_abs=10.0, warmup_steps=3)
    >>> g = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.6, 0.8])}
    >>> state = tx.init(g)
    >>> for scale in [1.0, 1.0, 1.0, 1.0]:
    ...   updates, state = tx.update({"a": g["a"] * scale, "b": g["b"] * scale}, state)
    >>> spike = {"a": g["a"], "b": g["b"] * 100}  # one tensor spikes
    >>> updates, state = tx.update(spike, state)
    >>> [round(float(jnp.linalg.norm(u)), 3) for u in (updates["a"], updates["b"])]
    [0.5, 1.05]

  References:
    Wang et al., `Adaptive Gradient Clipping for Robust Large Language Model
    Pretraining (AdaGC) <https://arxiv.org/abs/2502.11034>`_, 2025
  """
  owner = "adagc"
  check_number(owner, "beta", beta, low=0.0, high=1.0, low_open=True, high_open=True)
  check_number(owner, "lambda_abs", lambda_abs, low=0.0, low_open=True)
  check_number(owner, "lambda_rel", lambda_rel, low=0.0, low_open=True)
  check_number(owner, "warmup_steps", warmup_steps, low=1.0, allow_inf=False, integer=True)

  def init_fn(params: Any) -> AdaGCState:
    n = len(_reduce.split_floats(params)[0])
    z, inf = _stats.zeros(), jnp.full((n,), jnp.inf, jnp.float32)
    return AdaGCState(z, z, inf, inf, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild = _reduce.split_floats(updates)
    if len(floats) != state.gamma.shape[0]:
      raise ValueError(
        f"{owner}: the gradient has {len(floats)} float leaves, the state"
        f" {state.gamma.shape[0]} (init's params must have the gradient's structure)"
      )
    if not floats:
      return rebuild(floats), state
    axes = _reduce.float_axes(axis_name, updates)
    red = _reduce.reduce(floats, scope="leaf", norms=("l2",), axes=axes)
    finite = jnp.all(jnp.isfinite(red.l2.m))
    warm = state.count + 1 >= jnp.asarray(warmup_steps).astype(jnp.int32)
    factors, active, clipped_norms, caps = _adagc_clip(
      red, state.gamma, warm, lambda_abs, lambda_rel
    )
    gamma = _adagc_gamma(state.gamma, clipped_norms, warm, beta)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new = AdaGCState(
      norm=red.norm,
      clipped_fraction=jnp.mean((active & finite).astype(jnp.float32)),
      thresholds=caps,
      gamma=keep(gamma, state.gamma),
      count=keep(state.count + 1, state.count),
    )
    return rebuild(_reduce.rescale(floats, "leaf", factors)), new

  return optax.GradientTransformation(init_fn, update_fn)


def _adagc_clip(red: _reduce.Reduction, gamma, warm, lambda_abs, lambda_rel):
  """The per-tensor factors of this step, where they clip, each tensor's
  clipped norm (float32) and the cap in force."""
  leaf = red.l2  # [L]
  total = leaf.squared().total().sqrt()  # the global norm
  g_factors, g_active = _reduce.scale_factors(
    _reduce.Pow2(total.m[None], total.e[None]), lambda_abs, clip=True
  )
  caps = jnp.asarray(lambda_rel, jnp.float32) * gamma
  l_factors, l_active = _reduce.scale_factors(leaf, caps, clip=True)
  factors = _reduce.Factors(
    jnp.where(warm, l_factors.s1, g_factors.s1[0]), jnp.where(warm, l_factors.s2, g_factors.s2[0])
  )
  active = jnp.where(warm, l_active, g_active[0])
  # warm-up: ||g_i|| * min(1, lambda_abs / ||g||), as ||g_i|| / ||g|| * min(||g||, lambda_abs)
  share = _reduce.Pow2(leaf.m / jnp.where(total.m > 0, total.m, 1), leaf.e - total.e).to_float32()
  cap_g = jnp.minimum(total.to_float32(), jnp.asarray(lambda_abs, jnp.float32))
  clipped = jnp.where(warm, jnp.minimum(leaf.to_float32(), caps), share * cap_g)
  return factors, active, clipped, jnp.where(warm, caps, jnp.inf).astype(jnp.float32)


def _adagc_gamma(gamma, clipped, warm, beta):
  """``gamma`` after this step: the running minimum during warm-up, then the
  EMA; a tensor with a zero norm keeps its own, and the first norm of a
  tensor without one sets it."""
  beta = jnp.asarray(beta, jnp.float32)
  unset = jnp.isinf(gamma)
  ema = jnp.where(unset, clipped, beta * gamma + (1 - beta) * clipped)
  new = jnp.where(warm, ema, jnp.minimum(gamma, clipped))
  return jnp.where(clipped > 0, new, gamma).astype(jnp.float32)


# --------------------------------------------------------------------------- skip_on_spike


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

  norm: jax.Array  # float32: global L2 norm of the incoming gradient
  threshold: jax.Array  # float32: the norm above which a step is skipped (+inf in warm-up)
  z: jax.Array  # float32: the z-score of the norm (0 during warm-up)
  ema_mean: jax.Array  # float32
  ema_std: jax.Array  # float32
  loss: jax.Array  # float32: the loss passed with the step (0 without one)
  loss_threshold: jax.Array  # float32: the loss above which a step is skipped (+inf in warm-up)
  loss_z: jax.Array  # float32: the z-score of the loss (0 during warm-up or without a loss)
  skipped: jax.Array  # float32: 1.0 when this step was skipped
  nonfinite: jax.Array  # float32: 1.0 when the gradient or the loss was not finite
  norm_spike: jax.Array  # float32: 1.0 when the norm was an outlier
  loss_spike: jax.Array  # float32: 1.0 when the loss was an outlier
  skip_count: jax.Array  # int32: steps skipped so far
  consecutive_skips: jax.Array  # int32: steps skipped in a row, up to this one
  ema: EmaState  # of the norm
  loss_ema: EmaState  # of the loss
  inner_state: Any


def skip_on_spike(
  inner: optax.GradientTransformation,
  *,
  z_threshold: ArrayLike = 6.0,
  loss_z_threshold: ArrayLike | None = None,
  decay: ArrayLike = 0.99,
  warmup_steps: ArrayLike = 100,
  max_consecutive: ArrayLike = 10,
  axis_name: _reduce.AxisName = None,
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
  _check_ema_args(owner, z_threshold, decay, warmup_steps)
  if loss_z_threshold is not None:
    check_number(owner, "loss_z_threshold", loss_z_threshold, low=0.0, low_open=True)
  check_number(owner, "max_consecutive", max_consecutive, low=0.0, allow_inf=False, integer=True)
  inner = optax.with_extra_args_support(inner)
  loss_zt = z_threshold if loss_z_threshold is None else loss_z_threshold

  def init_fn(params: Any) -> SkipOnSpikeState:
    z, inf = _stats.zeros(), jnp.asarray(jnp.inf, jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    return SkipOnSpikeState(
      z,
      inf,
      z,
      z,
      z,
      z,
      inf,
      z,
      z,
      z,
      z,
      z,
      zero,
      zero,
      _ema_init(),
      _ema_init(),
      inner.init(params),
    )

  def update_fn(updates, state, params=None, *, loss=None, **extra_args):
    _, _, _, norm, finite = _measure(updates, axis_name)
    norm_check = _Spike.check(state.ema, norm, finite, z_threshold, warmup_steps)
    if loss is None:
      loss_value, loss_check = _stats.zeros(), _Spike.quiet()
    else:
      extra_args = {**extra_args, "loss": loss}
      loss_value = jnp.asarray(loss, jnp.float32)
      loss_ok = jnp.isfinite(loss_value)
      loss_check = _Spike.check(state.loss_ema, loss_value, loss_ok, loss_zt, warmup_steps)
      finite = finite & loss_ok
    let_through = state.consecutive_skips >= jnp.asarray(max_consecutive).astype(jnp.int32)
    skip = ~finite | ((norm_check.spike | loss_check.spike) & ~let_through)
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    keep = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
    inner_state = jax.tree.map(keep, inner_state, state.inner_state)
    out = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), inner_updates)
    ema = _ema_update(state.ema, norm, ~skip & jnp.isfinite(norm), warmup_steps, decay)
    loss_ema = state.loss_ema
    if loss is not None:
      loss_ema = _ema_update(loss_ema, loss_value, ~skip, warmup_steps, decay)
    ema_mean, ema_std = _ema_std_now(ema, warmup_steps)
    skip_i = skip.astype(jnp.int32)
    as_f32 = lambda b: b.astype(jnp.float32)  # noqa: E731
    new = SkipOnSpikeState(
      norm=norm,
      threshold=_Spike.cap(ema, z_threshold, warmup_steps),
      z=norm_check.z,
      ema_mean=ema_mean,
      ema_std=ema_std,
      loss=loss_value,
      loss_threshold=_Spike.cap(loss_ema, loss_zt, warmup_steps),
      loss_z=loss_check.z,
      skipped=as_f32(skip),
      nonfinite=as_f32(~finite),
      norm_spike=as_f32(norm_check.spike),
      loss_spike=as_f32(loss_check.spike),
      skip_count=state.skip_count + skip_i,
      consecutive_skips=(state.consecutive_skips + 1) * skip_i,
      ema=ema,
      loss_ema=loss_ema,
      inner_state=inner_state,
    )
    return out, new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Spike(NamedTuple):
  """A value's z-score against its estimator, and whether it is an outlier."""

  z: jax.Array  # float32
  spike: jax.Array  # bool

  @staticmethod
  def check(ema: EmaState, x: jax.Array, finite: jax.Array, z_threshold, warmup_steps) -> _Spike:
    warm = _ema_warm(ema, warmup_steps)
    z = jnp.where(warm & finite, _ema_z(ema, x), 0.0).astype(jnp.float32)
    return _Spike(z, warm & (z > jnp.asarray(z_threshold, jnp.float32)))

  @staticmethod
  def quiet() -> _Spike:
    return _Spike(_stats.zeros(), jnp.zeros((), bool))

  @staticmethod
  def cap(ema: EmaState, z_threshold, warmup_steps) -> jax.Array:
    """The value above which the next step is an outlier (+inf in warm-up)."""
    cap = ema.mean + jnp.asarray(z_threshold, jnp.float32) * (jnp.sqrt(ema.var) + _EPS)
    return jnp.where(_ema_warm(ema, warmup_steps), cap, jnp.inf).astype(jnp.float32)
