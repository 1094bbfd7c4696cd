"""Factors and the exact output: rescaling each scope to a target norm, and applying it.

A factor ``target / norm`` is one float where it lies within ``2**-64`` to
``2**64``, else two whose exponents are split so that neither leaves the
range. A leaf whose scope is not rescaled comes back bitwise unchanged,
subnormal elements included, which any multiply would flush on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from optax_gradctl._reduction import steering
from optax_gradctl._reduction.leaves import acc_dtype
from optax_gradctl._reduction.plan import Scope, scope_of_leaves
from optax_gradctl._reduction.pow2 import Pow2, exceeds, exp2


class Factors(NamedTuple):
  """Per scope, two factors whose product is the rescaling. ``s1 == 1``
  exactly where nothing is rescaled, or where the rescaling is exactly 1
  (then ``s2 == 1`` too)."""

  s1: jax.Array  #: [S]: the first factor.
  s2: jax.Array  #: [S]: the second, 1 unless the rescaling is beyond one float's range.


def scale_factors(
  value: Pow2, target: ArrayLike | Pow2, clip: bool, *, after: Sequence[jax.Array] = ()
) -> tuple[Factors, jax.Array]:
  """The factors per scope that rescale norm ``value`` to ``target``.

  Where ``target / value`` lies within ``2**-64`` to ``2**64`` it is one
  factor, ``s1``, and ``s2 == 1``; beyond, its exponent is split evenly
  between the two, ``s1 = 2**k1`` first, so that ``x * s1`` lies between
  ``x`` and the result. Nothing overflows or underflows on the way, even when
  ``value`` exceeds the dtype.

  Args:
    value: the norm per scope.
    target: the norm to rescale to (``max_norm``, or 1): a number, one per
      scope, or a :class:`Pow2` (a norm itself, which may exceed the dtype).
    clip: rescale only where ``value > target``; elsewhere both factors are
      exactly 1, and :func:`rescale` returns the leaf bitwise unchanged.
    after: statistics of the same leaves that the rescaling must wait for
      (see :func:`steering.ordered_after`): those from a reduction other than
      the one ``value`` comes from.

  Returns:
    ``(factors, active)``: the :class:`Factors`, and where they rescale a
    finite norm, each of shape [S]. Where ``value`` is not finite, or a
    traced ``target`` is NaN, both factors are NaN, so the whole scope
    becomes NaN.
  """
  dtype = value.m.dtype
  v = value.normalized()  # v.m in [0.5, 1), or 0, inf, NaN
  target, t_m, t_e = _split_target(target, dtype)
  finite = jnp.isfinite(v.m)
  if isinstance(target, jax.Array):  # a NaN target (a traced one out of range) poisons
    finite = finite & ~jnp.isnan(target)
  if clip:
    above = exceeds(v.m, v.e, t_m, t_e) | (target == 0)
    active = (v.m > 0) & above & jnp.isfinite(target)
  else:
    active = v.m > 0
  d = jnp.where(active, t_e - v.e, 0)  # target / value = (t_m / v.m) * 2**d
  split = active & (jnp.abs(d) >= 64)
  k1 = jnp.where(split, d // 2, 0)
  one = jnp.where(finite, 1, jnp.nan).astype(dtype) - steering.exact_zero_after(after).astype(dtype)
  power = steering.scaled_once(one, -k1, dtype)
  # The ratio is 4 * t_m * 2**(d - k1) / (4 * v.m): a numerator t_m * 2**-126
  # alone would be subnormal, and flushed, where the ratio itself is normal.
  numerator = jnp.where(active, t_m * exp2(d - k1 + 2, dtype), 1)
  ratio = jnp.where(finite, numerator, jnp.nan) / jnp.where(active, v.m * 4, 1)
  s1, s2 = jnp.where(split, power, ratio), jnp.where(split, ratio, power)
  return Factors(*steering.packed(s1, s2)), active & finite


def _split_target(target: ArrayLike | Pow2, dtype: np.dtype):
  """``target`` in ``dtype`` and its ``frexp``: worked out at trace time for a
  concrete number (a hyperparameter usually is), in the program for a
  traced one. A :class:`Pow2` stands for its value (its ``m`` for the zero
  and finiteness tests)."""
  if isinstance(target, Pow2):
    t = target.normalized()
    return t.m.astype(dtype), t.m.astype(dtype), t.e
  if isinstance(target, jax.Array):
    target = jnp.asarray(target, dtype)
    return (target, *jnp.frexp(target))
  with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as in the program
    target = np.asarray(target, np.float64).astype(dtype)
  m, e = np.frexp(target)
  return target, m, np.asarray(e, np.int32)


def times_factors(
  y: jax.Array, s1: jax.Array, s2: jax.Array, keep: jax.Array | None = None
) -> jax.Array:
  """``y * s1 * s2``, or ``y`` itself, bitwise, where ``keep`` (by default
  where ``s1 == 1``: nothing rescaled). The factors are scalars, or broadcast
  against ``y`` (per unit or per example). Scalar factors take three ``lax``
  primitives, each keeping the leaf's own sharding: at thousands of leaves
  each operation per leaf counts in trace and compile time."""
  keep = s1 == 1 if keep is None else keep
  if jnp.ndim(s1):
    return jnp.where(keep, y, y * s1 * s2)
  return lax.select_n(keep, lax.mul(lax.mul(y, s1), s2), y)


def rescale(floats: Sequence[jax.Array], scope: Scope, f: Factors) -> list[jax.Array]:
  """Each leaf times its scope's factors, in the accumulation dtype and cast
  back; a leaf its factors leave alone is returned bitwise unchanged."""
  acc = acc_dtype(floats)
  per_scope: dict[int, tuple[jax.Array, ...]] = {}
  out = []
  for x, s in zip(floats, scope_of_leaves(scope, len(floats)).tolist(), strict=True):
    if s not in per_scope:
      per_scope[s] = (f.s1[s], f.s2[s], f.s1[s] == 1)
    y = x if x.dtype == acc else lax.convert_element_type(x, acc)
    z = times_factors(y, *per_scope[s])
    out.append(z if z.dtype == x.dtype else lax.convert_element_type(z, x.dtype))
  return out


def apply(
  floats: Sequence[jax.Array],
  scope: Scope,
  fn: Callable[..., jax.Array],
  *per_scope: jax.Array,
  after: Sequence[jax.Array] = (),
) -> list[jax.Array]:
  """Applies ``fn(x, *factors)`` to each leaf, in its accumulation dtype and
  cast back; ``factors`` are the ``per_scope`` vectors [S] at the leaf's
  scope, each indexed once per scope. ``after``: statistics of the same
  leaves that the update must wait for (see :func:`steering.ordered_after`)."""
  acc = acc_dtype(floats)
  if after and per_scope:
    per_scope = (steering.ordered_after(per_scope[0], *after), *per_scope[1:])
  factors: dict[int, list[jax.Array]] = {}
  out = []
  for x, s in zip(floats, scope_of_leaves(scope, len(floats)).tolist(), strict=True):
    if s not in factors:
      factors[s] = [v[s] for v in per_scope]
    out.append(fn(x.astype(acc), *factors[s]).astype(x.dtype))
  return out


def reciprocal_pow2(k: jax.Array, valid: jax.Array, dtype: np.dtype) -> jax.Array:
  """``2**-k`` where ``valid``, NaN elsewhere."""
  one = jnp.where(valid, jnp.asarray(1, dtype), jnp.asarray(jnp.nan, dtype))
  return steering.scaled_once(one, k, dtype)
