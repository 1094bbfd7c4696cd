"""Scaled floats: non-negative values held as ``m * 2**e``, safe from over- and underflow.

A norm beyond the float32 range, or a sum of squares below it, is carried as
a mantissa in the accumulation dtype and an int32 exponent, and compared,
summed and square-rooted exactly in that form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
_NO_EXPONENT = jnp.iinfo(jnp.int32).min // 2  # below any value's exponent


def exp2(k: jax.Array, dtype: np.dtype) -> jax.Array:
  """``2**k`` exactly, for integer ``k``, clamped to the normal range of ``dtype``."""
  info = jnp.finfo(dtype)
  bits, itype = (23, jnp.int32) if dtype == F32 else (52, jnp.int64)
  k = jnp.clip(jnp.asarray(k), info.minexp, info.maxexp - 1).astype(itype)
  return lax.bitcast_convert_type((k + (info.maxexp - 1)) << bits, dtype)


def split_exp2(k: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
  """Two normal factors whose product is ``2**k``, for ``k`` beyond one float's range."""
  half = k // 2
  return exp2(half, dtype), exp2(k - half, dtype)


def exponent(x: jax.Array) -> jax.Array:
  """The int32 ``e`` with ``x = f * 2**e`` and ``0.5 <= |f| < 1``; 0 for 0, inf or NaN."""
  _, e = jnp.frexp(lax.stop_gradient(x))
  return e.astype(jnp.int32)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt`` with a finite gradient at 0 (the double-``where`` pattern)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), jnp.where(x == 0, 0, x))


def exceeds(a_m, a_e, b_m, b_e) -> jax.Array:
  """``a > b`` for values given as normalized mantissas and exponents (as
  ``frexp`` gives them, both non-negative)."""
  return (a_e > b_e) | ((a_e == b_e) & (a_m > b_m))


class Pow2(NamedTuple):
  """Non-negative values ``m * 2**e``, safe from over- and underflow."""

  m: jax.Array  #: The mantissas, in the accumulation dtype.
  e: jax.Array  #: The exponents, int32, of ``m``'s shape.

  def normalized(self) -> Pow2:
    """The same values with ``0.5 <= m < 1`` (``m`` unchanged if 0, inf or NaN)."""
    m, k = jnp.frexp(self.m)
    return Pow2(m, self.e + k.astype(jnp.int32))

  def to_float32(self) -> jax.Array:
    """The values as float32: inf where they exceed the float32 range.

    ``m`` is multiplied by ``2**e`` in two steps, so the product lies
    between ``m`` and the result: exact for any finite ``m``.
    """
    a, b = split_exp2(self.e, self.m.dtype)
    return (self.m * a * b).astype(jnp.float32)

  def reshape_flat(self) -> Pow2:
    return Pow2(self.m.reshape(-1), self.e.reshape(-1))

  def square(self) -> Pow2:
    """The squares, exactly scaled: a norm's sum of squares."""
    return Pow2(jnp.square(self.m), 2 * self.e)

  def sqrt(self) -> Pow2:
    """The square roots, exactly scaled: ``sqrt(m * 2**e)``."""
    odd = self.e % 2
    return Pow2(safe_sqrt(self.m * (1 + odd).astype(self.m.dtype)), (self.e - odd) // 2)

  def at_least(self, floor: ArrayLike) -> Pow2:
    """``max(value, floor)``, for a number ``floor``."""
    f_m, f_e = jnp.frexp(jnp.asarray(floor, self.m.dtype))
    v = self.normalized()
    below = (v.m == 0) | exceeds(f_m, f_e, v.m, v.e)
    return Pow2(jnp.where(below, f_m, v.m).astype(v.m.dtype), jnp.where(below, f_e, v.e))

  def times(self, factor: ArrayLike) -> Pow2:
    """``factor * value``, the factor's exponent carried in ``e``."""
    f_m, f_e = jnp.frexp(jnp.asarray(factor, self.m.dtype))
    return Pow2(self.m * f_m, self.e + f_e.astype(jnp.int32))

  @staticmethod
  def stack(parts: Sequence[Pow2]) -> Pow2:
    """The values of ``parts`` (of one shape) stacked on a new axis 0."""
    return Pow2(jnp.stack([p.m for p in parts]), jnp.stack([p.e for p in parts]))

  def total(self, axis: int | None = -1) -> Pow2:
    """The sum along ``axis`` (all axes for ``None``), taken at the largest
    exponent so that it cannot overflow; terms more than the dtype's range
    below it are negligible."""
    if axis is None:
      flat = self.reshape_flat() if self.m.ndim != 1 else self
      return (
        flat.total(0)
        if flat.m.shape[0]
        else Pow2(jnp.zeros((), self.m.dtype), jnp.zeros((), jnp.int32))
      )
    if self.m.shape[axis] == 1:
      return Pow2(jnp.squeeze(self.m, axis), jnp.squeeze(self.e, axis))
    v = self.normalized()
    top = jnp.max(_top_exponents(v), axis=axis, keepdims=True)
    m = jnp.sum(v.m * exp2(v.e - top, v.m.dtype), axis=axis)
    top = jnp.squeeze(top, axis)
    return Pow2(m, jnp.where(top == _NO_EXPONENT, 0, top))

  def segment_total(self, segment: np.ndarray, count: int) -> Pow2:
    """The sums of 1-D values per segment (``segment``: the static segment
    of each value, each of ``range(count)`` present), each taken at its
    segment's largest exponent, as :meth:`total`. The values are gathered
    into a table of segment by member, padded with zeros, and totalled along
    it: work in proportion to ``count`` times the largest segment, and a
    gather rather than a scatter, which has no sharding rule under
    explicit mesh axes on jax 0.6."""
    members = _members(np.asarray(segment), count)
    table = Pow2(jnp.append(self.m, 0)[members], jnp.append(self.e, 0)[members])
    return table.total(axis=1)


def _members(segment: np.ndarray, count: int) -> np.ndarray:
  """[count, width]: the positions of each segment's values, in order, then
  ``len(segment)`` (a padding zero) up to the largest segment's size."""
  order = np.argsort(segment, kind="stable")
  sizes = np.bincount(segment, minlength=count)
  starts = np.cumsum(sizes) - sizes
  rank = np.arange(len(segment)) - starts[segment[order]]
  members = np.full((count, max(int(sizes.max(initial=0)), 1)), len(segment))
  members[segment[order], rank] = order
  return members


def _top_exponents(v: Pow2) -> jax.Array:
  """Each value's exponent, or a very low one where the value is 0."""
  return jnp.where(v.m > 0, v.e, _NO_EXPONENT)
