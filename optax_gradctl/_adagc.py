"""AdaGC: clipping each tensor against an EMA of its own clipped norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_gradctl import _stats
from optax_gradctl._reduction.factors import Factors, rescale, scale_factors
from optax_gradctl._reduction.leaves import split_floats
from optax_gradctl._reduction.mesh import AxisName, float_axes
from optax_gradctl._reduction.pow2 import Pow2
from optax_gradctl._reduction.reduce import Reduction, reduce
from optax_gradctl._validation import (
  COUNT,
  OPEN_UNIT,
  POSITIVE,
  and_ok,
  check_number,
  nan_unless,
  traced_ok,
)


@_stats.register("adagc", ("norm", "clipped_fraction", "thresholds"))
class AdaGCState(NamedTuple):
  """State of :func:`~optax_gradctl.adagc`: its statistics and per-tensor estimator."""

  norm: jax.Array  #: float32 scalar: the global L2 norm of the incoming gradient.
  clipped_fraction: jax.Array  #: float32 scalar: the fraction of tensors clipped at this step.
  thresholds: jax.Array  #: float32 per tensor: each tensor's cap in force (+inf during warm-up).
  gamma: jax.Array  #: float32 per tensor: the EMA of its clipped norm (+inf before one).
  count: jax.Array  #: int32 scalar: finite steps seen.


def adagc(
  *,
  beta: ArrayLike = 0.98,
  lambda_abs: ArrayLike = 1.0,
  lambda_rel: ArrayLike = 1.05,
  warmup_steps: ArrayLike = 100,
  axis_name: AxisName = None,
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
  check_number(owner, "beta", beta, OPEN_UNIT)
  check_number(owner, "lambda_abs", lambda_abs, POSITIVE)
  check_number(owner, "lambda_rel", lambda_rel, POSITIVE)
  check_number(owner, "warmup_steps", warmup_steps, COUNT)

  def init_fn(params: Any) -> AdaGCState:
    n = len(split_floats(params)[0])
    z, inf = _stats.zeros(), jnp.full((n,), jnp.inf, jnp.float32)
    return AdaGCState(z, z, inf, inf, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    floats, rebuild = split_floats(updates)
    if len(floats) != state.gamma.shape[0]:
      raise ValueError(
        f"{owner}: the gradient has {len(floats)} float leaves, the state"
        f" {state.gamma.shape[0]} (init's params must have the gradient's structure)"
      )
    if not floats:
      return rebuild(floats), state
    axes = float_axes(axis_name, updates)
    red = reduce(floats, scope="leaf", norms=("l2",), axes=axes)
    ok = traced_ok(
      [(beta, OPEN_UNIT), (lambda_abs, POSITIVE), (lambda_rel, POSITIVE), (warmup_steps, COUNT)]
    )
    finite = and_ok(jnp.all(jnp.isfinite(red.l2.m)), ok)
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
    factors = factors._replace(s1=nan_unless(ok, factors.s1))
    return rebuild(rescale(floats, "leaf", factors)), new

  return optax.GradientTransformation(init_fn, update_fn)


def _adagc_clip(red: Reduction, gamma, warm, lambda_abs, lambda_rel):
  """The per-tensor factors of this step, where they clip, each tensor's
  clipped norm (float32) and the cap in force."""
  leaf = red.l2  # [L]
  total = leaf.square().total().sqrt()  # the global norm
  g_factors, g_active = scale_factors(Pow2(total.m[None], total.e[None]), lambda_abs, clip=True)
  caps = jnp.asarray(lambda_rel, jnp.float32) * gamma
  l_factors, l_active = scale_factors(leaf, caps, clip=True)
  factors = Factors(
    jnp.where(warm, l_factors.s1, g_factors.s1[0]), jnp.where(warm, l_factors.s2, g_factors.s2[0])
  )
  active = jnp.where(warm, l_active, g_active[0])
  # warm-up: ||g_i|| * min(1, lambda_abs / ||g||), as ||g_i|| / ||g|| * min(||g||, lambda_abs)
  share = Pow2(leaf.m / jnp.where(total.m > 0, total.m, 1), leaf.e - total.e).to_float32()
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
