"""Every reduction over a gradient pytree.

This module is the only place that reduces over a pytree. A gradient flows
through it once per step:

1. :func:`split_floats` keeps the floating-point leaves; ``None``, integer
   and ``float0`` leaves pass through untouched and never count.
2. :func:`reduce` reads each float leaf once and returns, per leaf and per
   *scope* (the whole tree, or each leaf), the requested norms and moments in
   a scaled form that cannot overflow or underflow, plus the global L2 norm
   of the tree as a float32 statistic.
3. The transforms turn those into one scale (and shift) per scope and apply
   it with :func:`rescale` or :func:`apply`, which cast back to each leaf's
   dtype.

Numerics. Sums accumulate in at least float32 (float64 leaves in float64).
The common case is what a plain clip does: one read of each leaf, summing
its squares, with nothing else in the kernel (on a CPU each extra operation
in a reduction kernel costs as much as the read). Float16 leaves never need
more: their squares always fit in float32. Where a leaf's sum shows that a
square overflowed or underflowed (norms beyond about 2**64 or below 2**-30),
a *rescue* sums again, each leaf scaled by the power of two its own plain sum
calls for: ``2**-88`` where it overflowed, ``2**75`` where it underflowed.
Results are carried as ``m * 2**e`` so that a norm larger than the float32
range still clips to the right value.

How the rescue runs depends on the platform (:data:`RESCALING`). On a CPU or
TPU it is a ``lax.cond`` that is taken only when needed: on one device one
per batch of leaves, decided by that batch's own sums, so that no leaf is
held until the whole tree has been read; for sharded leaves one per scope,
decided once the sums are combined. A GPU pays for a branch even when it is
not taken, so there every leaf is reduced once into the three candidate
sums, stacked into one reduction, and a select picks the one that is in
range.

Across devices. With ``axis_name`` every partial reduction is combined over
those mesh axes inside ``shard_map``: sums by ``psum``, maxima by ``pmax``,
each packed into one small vector so that a step needs a fixed number of
collectives whatever the number of leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

Scope = Literal["global", "leaf"]
NormOrd = Literal["l2", "l1", "linf"]
AxisName = Hashable | tuple[Hashable, ...] | None

SCOPES: tuple[str, ...] = ("global", "leaf")
NORMS: tuple[str, ...] = ("l2", "l1", "linf")

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
# A sum of squares at least this large lost nothing that matters to
# underflow: any square that flushed to zero is below 2**-126, so together
# they weigh less than 2**-26 of the total for up to 2**40 elements (float64:
# 2**-500 against 2**-1022).
_TRUSTED_SUMSQ = {_F32: 2.0**-60, _F64: 2.0**-500}
# The candidate scales k of a leaf's sum of squares, sum((x * 2**-k)**2):
# unscaled, scaled down for a sum that overflowed and up for one below
# _TRUSTED_SUMSQ. float32: scaled by 2**-88, every square is below 2**80, so
# up to 2**47 elements sum finite, and the squares that flush (elements below
# 2**25) weigh less than 2**-38 of a sum beyond 2**128 for up to 2**40
# elements; scaled by 2**75, a sum below 2**-60 stays below 2**90 and every
# normal element's square is normal. float64 alike, with wider margins.
_CANDIDATES = {_F32: (0, 88, -75), _F64: (0, 800, -600)}
# The one-pass variance sum((x-a)**2) - sum(x-a)**2 / n is trusted while the
# mean accounts for less than 63/64 of sum((x-a)**2): at most 6 bits cancel.
_CANCELLATION = 2.0**-6

# How the rescue runs: "branch" (a lax.cond, taken only when the common
# sums fail), "select" (three candidate sums in the same read, then a
# select), or "auto": branch on CPU and TPU, select elsewhere (GPUs pay for
# a branch even when it is not taken). Moments always branch.
RESCALING = "auto"


# --------------------------------------------------------------------------
# Leaves


def _leaf_dtype(x: Any) -> np.dtype | None:
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    if isinstance(x, (bool, int, np.integer, np.bool_)):
      return np.dtype(np.int32)
    if isinstance(x, (float, np.floating)):
      return np.dtype(jnp.result_type(float))
    return None
  return np.dtype(dtype)


def is_float(x: Any) -> bool:
  """Whether a leaf takes part in gradient control (a real floating array).

  Raises:
    TypeError: for a complex leaf, which no transform here defines.
  """
  dtype = _leaf_dtype(x)
  if dtype is None:
    return False
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
      f"optax_gradctl: complex gradient leaves are not supported, got a leaf"
      f" of dtype {dtype}; split it into real and imaginary parts."
    )
  return bool(jnp.issubdtype(dtype, jnp.floating))


def split_floats(tree: Any) -> tuple[list[jax.Array], Callable[[Sequence[Any]], Any]]:
  """Returns the float leaves of ``tree`` and a function that puts new ones back.

  ``None`` leaves vanish in flattening; integer and ``float0`` leaves are kept
  aside and returned unchanged by the rebuild function.
  """
  leaves, treedef = jax.tree.flatten(tree)
  index = [i for i, x in enumerate(leaves) if is_float(x)]
  floats = [jnp.asarray(leaves[i]) for i in index]

  def rebuild(new_floats: Sequence[Any]) -> Any:
    out = list(leaves)
    for i, x in zip(index, new_floats, strict=True):
      out[i] = x
    return jax.tree.unflatten(treedef, out)

  return floats, rebuild


def acc_dtype(floats: Sequence[jax.Array]) -> np.dtype:
  """The accumulation dtype: float32, or float64 when any leaf is float64."""
  dtype = _F32
  for x in floats:
    dtype = np.promote_types(dtype, x.dtype)
  return dtype


# --------------------------------------------------------------------------
# Powers of two


def exp2(k: jax.Array, dtype: np.dtype) -> jax.Array:
  """``2**k`` exactly, for integer ``k``, clamped to the normal range of ``dtype``."""
  info = jnp.finfo(dtype)
  bits, itype = (23, jnp.int32) if dtype == _F32 else (52, jnp.int64)
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


class Pow2(NamedTuple):
  """Non-negative values ``m * 2**e``, safe from over- and underflow."""

  m: jax.Array  # accumulation dtype
  e: jax.Array  # int32, the same shape

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

  def squared(self) -> Pow2:
    """The squares, exactly scaled: a norm's sum of squares."""
    return Pow2(jnp.square(self.m), 2 * self.e)

  @staticmethod
  def stack(parts: Sequence[Pow2]) -> Pow2:
    """The values of ``parts`` (of one shape) stacked on a new axis 0."""
    return Pow2(jnp.stack([p.m for p in parts]), jnp.stack([p.e for p in parts]))

  def sqrt(self) -> Pow2:
    """The square roots, exactly scaled: ``sqrt(m * 2**e)``."""
    odd = self.e % 2
    return Pow2(safe_sqrt(self.m * (1 + odd).astype(self.m.dtype)), (self.e - odd) // 2)

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
    segment's largest exponent, as :meth:`total`."""
    v = self.normalized()
    top = jax.ops.segment_max(_top_exponents(v), segment, count)
    m = jax.ops.segment_sum(v.m * exp2(v.e - top[segment], v.m.dtype), segment, count)
    return Pow2(m, jnp.where(top == _NO_EXPONENT, 0, top))


def _top_exponents(v: Pow2) -> jax.Array:
  """Each value's exponent, or a very low one where the value is 0."""
  return jnp.where(v.m > 0, v.e, _NO_EXPONENT)


_NO_EXPONENT = jnp.iinfo(jnp.int32).min // 2


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``sqrt`` with a finite gradient at 0 (the double-``where`` pattern)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), jnp.where(x == 0, 0, x))


# --------------------------------------------------------------------------
# Cross-device combination


class Axes(NamedTuple):
  """The mesh axes each float leaf is partitioned over, inside ``shard_map``."""

  leaf: tuple[tuple[Hashable, ...], ...]  # per float leaf, in split_floats order
  union: tuple[Hashable, ...]  # every axis named: the collectives run over these


def _is_axis_spec(x: Any) -> bool:
  return (
    x is None or isinstance(x, str) or (isinstance(x, tuple) and all(isinstance(a, str) for a in x))
  )


class _Spec:
  """An axis spec held as one pytree leaf (a tuple of names would be flattened)."""

  def __init__(self, names: tuple[Hashable, ...]):
    self.names = names


def float_axes(axis_name: Any, tree: Any) -> Axes | None:
  """Resolves ``axis_name`` for the float leaves of ``tree``.

  ``axis_name`` is a mesh axis name, a tuple of names, or a pytree prefix of
  ``tree`` with one of those (or ``None``, for leaves replicated over every
  axis) per subtree, e.g. ``{"kernel": "fsdp", "bias": None}``.
  """
  if axis_name is None:
    return None
  leaves = jax.tree.leaves(tree)
  if _is_axis_spec(axis_name):
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    per_leaf = [names] * len(leaves)
  else:
    try:
      spread = jax.tree.map(
        lambda spec, sub: jax.tree.map(
          lambda _: _Spec(() if spec is None else spec if isinstance(spec, tuple) else (spec,)), sub
        ),
        axis_name,
        tree,
        is_leaf=_is_axis_spec,
      )
    except ValueError as err:
      raise ValueError(f"axis_name: not a prefix of the gradient's structure: {err}") from None
    per_leaf = [s.names for s in jax.tree.leaves(spread, is_leaf=lambda x: isinstance(x, _Spec))]
  floats = [names for x, names in zip(leaves, per_leaf, strict=True) if is_float(x)]
  union = tuple(dict.fromkeys(a for names in floats for a in names))
  return Axes(tuple(floats), union) if union else None


def _axis_size(names: tuple[Hashable, ...]) -> int:
  return math.prod(_one_axis_size(n) for n in names)


def _one_axis_size(name: Hashable) -> int:
  try:
    return lax.axis_size(name)
  except NameError:
    raise ValueError(
      f"axis_name: {name!r} is not an axis of the mesh this runs on: axis_name names the"
      " mesh axes inside shard_map (under plain jit, over sharded arrays, leave it None)"
    ) from None


def _weights(axes: Axes | None) -> np.ndarray | None:
  """Per leaf, 1 / (the number of copies of it among the devices of ``axes.union``):
  summing weighted partials over the union counts a replicated leaf once."""
  if axes is None:
    return None
  w = [1.0 / _axis_size(tuple(a for a in axes.union if a not in names)) for names in axes.leaf]
  return None if all(x == 1 for x in w) else np.asarray(w)


def _allreduce(
  parts: dict[str, jax.Array], op: Callable, axes: Axes | None
) -> dict[str, jax.Array]:
  """One collective for all ``parts``: packed into a vector, reduced, unpacked."""
  if axes is None or not parts:
    return parts
  names = list(parts)
  dtype = jnp.result_type(*parts.values())
  sizes = [parts[n].size for n in names]
  packed = op(jnp.concatenate([parts[n].astype(dtype).ravel() for n in names]), axes.union)
  out, start = {}, 0
  for n, size in zip(names, sizes, strict=True):
    out[n] = packed[start : start + size].reshape(parts[n].shape).astype(parts[n].dtype)
    start += size
  return out


# --------------------------------------------------------------------------
# The plan: static facts about the leaves, and how they are read


# In the common read, leaves of at most this many elements are reduced
# stacked with the other leaves of their shape and dtype: one kernel for the
# group instead of one per leaf. At this size the copy costs less than a
# kernel launch. A rescue reads those stacked batches again, and stacks the
# larger leaves too: it is rarely run, and fewer kernels compile faster.
STACK_LIMIT = 4096
# At most this many leaves go into one stacked kernel. XLA's CPU compiler
# takes time quadratic in the operands of one fused concatenation (94 s for
# 5000 leaves in one kernel); in groups of 100 it is linear (7 s).
STACK_GROUP = 100


class Plan(NamedTuple):
  """How the float leaves are reduced: static, known at trace time."""

  acc: np.dtype  # the accumulation dtype
  scope: Scope
  owner: np.ndarray  # int [L]: the scope of each leaf
  n: np.ndarray  # int64 [S]: elements per scope, over every device
  weights: np.ndarray | None  # [L]: 1 / copies of each leaf among the devices
  axes: Axes | None
  batches: tuple[tuple[int, ...], ...]  # leaves read together in the common read
  groups: tuple[tuple[int, ...], ...]  # leaves read together in a rescue

  @property
  def num_scopes(self) -> int:
    return len(self.n)


def _batched(floats: Sequence[jax.Array], limit: float) -> tuple[tuple[int, ...], ...]:
  """Leaf indices in batches: up to STACK_GROUP leaves of one shape and dtype
  of at most ``limit`` elements together, larger leaves alone."""
  same: dict[tuple, list[int]] = {}
  for i, x in enumerate(floats):
    same.setdefault((x.shape, x.dtype), []).append(i)
  out: list[tuple[int, ...]] = []
  for idx in same.values():
    if floats[idx[0]].size <= limit:
      out += [tuple(idx[k : k + STACK_GROUP]) for k in range(0, len(idx), STACK_GROUP)]
    else:
      out += [(i,) for i in idx]
  return tuple(out)


def make_plan(floats: Sequence[jax.Array], scope: Scope, axes: Axes | None = None) -> Plan:
  """The :class:`Plan` of reducing ``floats`` per ``scope``."""
  sizes = [
    x.size * (_axis_size(a) if axes else 1)
    for x, a in zip(floats, axes.leaf if axes else floats, strict=True)
  ]
  owner = np.zeros(len(floats), int) if scope == "global" else np.arange(len(floats))
  n = np.array([sum(sizes)] if scope == "global" else sizes, np.int64)
  return Plan(
    acc_dtype(floats),
    scope,
    owner,
    n,
    _weights(axes),
    axes,
    _batched(floats, STACK_LIMIT),
    _batched(floats, np.inf),
  )


class _Read(NamedTuple):
  """The leaves as read together: one array [members, *shape] per batch."""

  arrays: list[jax.Array]
  batches: tuple[tuple[int, ...], ...]


def _read(floats: Sequence[jax.Array], batches, acc: np.dtype) -> _Read:
  """The batches as read. A leaf read alone passes an optimization barrier:
  else XLA merges this read's ``x * x`` with an identical one elsewhere in
  the step (Adam squares the same gradient when a transform returns it
  unchanged, as :func:`~optax_gradctl.monitor` does) and writes that square
  out in full for both to read, three times the cost of the Adam step on a
  CPU. A stacked batch is a new array, which no other code squares."""
  arrays = [
    (jnp.stack([floats[i] for i in b]) if len(b) > 1 else _unmerged(floats[b[0]])).astype(acc)
    for b in batches
  ]
  return _Read(arrays, batches)


def _unmerged(x: jax.Array) -> jax.Array:
  """``x`` as a batch of one that XLA cannot identify with ``x`` itself."""
  return lax.optimization_barrier(x)[None]


def _rescue_read(
  read: _Read, floats: Sequence[jax.Array], plan: Plan
) -> tuple[list[Any], Callable[[list[Any]], _Read]]:
  """The operands of a rescue under ``lax.cond``, and the function that
  reads them inside it. Per group of ``plan.groups``: the common read's
  stacked batch where it has one of several leaves (no second copy to
  compile), else the group's leaves, stacked inside the rescue. A leaf read
  alone thus goes in as it is, which leaves its read to the reduction alone:
  XLA then shares that reduction with any other transform reading the leaf."""
  common = {b: y for b, y in zip(read.batches, read.arrays, strict=True) if len(b) > 1}
  operands = [common[g] if g in common else [floats[i] for i in g] for g in plan.groups]

  def reread(ops: list[Any]) -> _Read:
    arrays = [
      o if g in common else jnp.stack(o).astype(plan.acc)
      for o, g in zip(ops, plan.groups, strict=True)
    ]
    return _Read(arrays, plan.groups)

  return operands, reread


def _column(values: jax.Array, index: np.ndarray, ndim: int) -> jax.Array:
  """``values`` (per scope or per leaf) at ``index``, the scopes or leaves of
  a batch's members, shaped to broadcast against the batch."""
  if np.all(index == index[0]):
    return values[int(index[0])]
  return values[index].reshape((len(index),) + (1,) * (ndim - 1))


def _per_leaf(read: _Read, reducer: Callable[[jax.Array, Sequence[int]], jax.Array]) -> jax.Array:
  """``reducer(batch, members)`` ([..., members] per batch) as [..., L] in leaf order."""
  order = [i for b in read.batches for i in b]
  pieces = [reducer(y, b) for y, b in zip(read.arrays, read.batches, strict=True)]
  out = jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]
  perm = np.argsort(order)
  return out if np.all(perm == np.arange(len(order))) else out[..., perm]


def _sum_over(y: jax.Array, extra: int = 0) -> jax.Array:
  """Sums each member of a batch (axis ``extra``) over its elements."""
  return jnp.sum(y, axis=tuple(range(extra + 1, y.ndim)))


def _max_abs_over(y: jax.Array) -> jax.Array:
  """The largest magnitude of each member of a batch (0 for an empty one)."""
  return jnp.max(jnp.abs(y), axis=tuple(range(1, y.ndim)), initial=0)


def _scope_sum(per_leaf: jax.Array, plan: Plan) -> jax.Array:
  """Per-leaf partials [..., L] summed per scope: [..., S]."""
  return jnp.sum(per_leaf, axis=-1, keepdims=True) if plan.scope == "global" else per_leaf


def _scope_max(per_leaf: jax.Array, plan: Plan) -> jax.Array:
  return jnp.max(per_leaf, axis=-1, keepdims=True) if plan.scope == "global" else per_leaf


def _combine(sums: dict[str, jax.Array], maxes: dict[str, jax.Array], plan: Plan):
  """Per-leaf partials of this device's shards, weighted and combined over
  the devices: sums by one psum, maxima by one pmax."""
  if plan.weights is not None:
    sums = {k: v * plan.weights.astype(v.dtype) for k, v in sums.items()}
  return _allreduce(sums, lax.psum, plan.axes), _allreduce(maxes, lax.pmax, plan.axes)


# --------------------------------------------------------------------------
# Norms


class Sums(NamedTuple):
  """Per-leaf partial norms, each leaf's in units of its own ``2**e``."""

  sumsq: jax.Array  # [L]: sum((x * 2**-e)**2)
  e: jax.Array  # int32 [L]
  sumabs: jax.Array | None = None  # [L]: sum(|x * 2**-e|)
  amax: jax.Array | None = None  # [L]: max |x|, unscaled

  def squares(self) -> Pow2:
    """Each leaf's sum of squares."""
    return Pow2(self.sumsq, 2 * self.e)


class Scoped(NamedTuple):
  """The norms per scope ([S]), from the per-leaf :class:`Sums`."""

  sumsq: Pow2
  sumabs: Pow2 | None
  amax: jax.Array | None  # unscaled


def _per_scope(sums: Sums, plan: Plan, *, scaled: bool) -> Scoped:
  """The per-leaf ``sums`` per scope: plain sums where every leaf is unscaled
  (the common read), else totals taken at the scope's largest exponent."""

  def total(p: Pow2) -> Pow2:
    if not scaled:
      return Pow2(_scope_sum(p.m, plan), jnp.zeros((plan.num_scopes,), jnp.int32))
    if plan.scope == "leaf":
      return p
    t = p.total(axis=0)
    return Pow2(t.m[None], t.e[None])

  sumabs = None if sums.sumabs is None else total(Pow2(sums.sumabs, sums.e))
  amax = None if sums.amax is None else _scope_max(sums.amax, plan)
  return Scoped(total(sums.squares()), sumabs, amax)


def _trusted(sumsq: jax.Array, acc: np.dtype) -> jax.Array:
  """Whether sums of squares lost nothing to overflow or underflow."""
  return jnp.isfinite(sumsq) & (sumsq >= _TRUSTED_SUMSQ[acc])


def _squares_always_fit(floats: Sequence[jax.Array]) -> bool:
  """float16 squares, summed in float32, can neither overflow nor underflow:
  65504**2 * 2**31 is below float32's maximum, and 2**-48 above its minimum."""
  return all(x.dtype == jnp.float16 for x in floats)


def _candidate(sumsq: jax.Array, acc: np.dtype) -> jax.Array:
  """Per leaf, which candidate scale of ``_CANDIDATES`` keeps its sum of
  squares in range, judged from its unscaled sum: 0 (it already is), 1 (it
  overflowed) or 2 (it underflowed, or the leaf is zero or empty: scaled, its
  sum stays 0)."""
  return jnp.where(_trusted(sumsq, acc), 0, jnp.where(jnp.isfinite(sumsq), 2, 1))


def _candidate_scales(acc: np.dtype) -> jax.Array:
  """The exponents k of ``_CANDIDATES`` as int32. Not constants: XLA would
  fold square(y * 2**75) of one element into y**2 * 2**150, which overflows."""
  return lax.optimization_barrier(jnp.asarray(_CANDIDATES[acc], jnp.int32))


def _sums(read: _Read, plan: Plan, e: jax.Array | None, *, l1: bool, linf: bool) -> Sums:
  """One read of every leaf: per leaf, the sums of ``x * 2**-e`` with ``e``
  per leaf [L], or of ``x`` itself (``e=None``: the common read, nothing in
  the kernel but the square and the sum)."""
  scale = None if e is None else exp2(-e, plan.acc)

  def reducer(y, members):
    if scale is not None:
      y = y * _column(scale, np.asarray(members), y.ndim)
    out = [_sum_over(jnp.square(y))]
    if l1:
      out.append(_sum_over(jnp.abs(y)))
    return jnp.stack(out)

  sums = {"sums": _per_leaf(read, reducer)}
  maxes = {"amax": _per_leaf(read, lambda y, _: _max_abs_over(y))} if linf else {}
  sums, maxes = _combine(sums, maxes, plan)
  e_leaf = jnp.zeros(plan.owner.shape, jnp.int32) if e is None else e
  return Sums(sums["sums"][0], e_leaf, sums["sums"][1] if l1 else None, maxes.get("amax"))


def _selected_sums(floats, plan: Plan, *, l1: bool, linf: bool) -> tuple[Sums, Scoped]:
  """One read into three candidate sums per leaf (unscaled, scaled down and
  up), stacked into one reduction; per leaf, the candidate in range wins."""
  ks = _candidate_scales(plan.acc)
  scales = exp2(-ks, plan.acc)

  def reducer(y, members):
    rows = [jnp.square(y * c) for c in scales]
    if l1:
      rows += [jnp.abs(y * c) for c in scales]
    return _sum_over(jnp.stack(rows), extra=1)

  read = _read(floats, plan.batches, plan.acc)
  sums = {"sums": _per_leaf(read, reducer)}
  maxes = {"amax": _per_leaf(read, lambda y, _: _max_abs_over(y))} if linf else {}
  sums, maxes = _combine(sums, maxes, plan)
  cands = sums["sums"]  # [3 or 6, L]
  pick = _candidate(cands[0], plan.acc)
  choose = lambda c: jnp.take_along_axis(c, pick[None], axis=0)[0]  # noqa: E731
  sums = Sums(choose(cands[:3]), ks[pick], choose(cands[3:]) if l1 else None, maxes.get("amax"))
  return sums, _per_scope(sums, plan, scaled=True)


def _branched_sums(floats, plan: Plan, *, l1: bool, linf: bool) -> tuple[Sums, Scoped]:
  """The plain sums; where a scope's sum of squares left the range, a
  rescue under one ``lax.cond`` reads again, each leaf scaled by the
  candidate its own plain sum calls for. The leaves are held until the
  scope's sum is known, which an update that waits for the norm (a clip)
  does anyway; one branch costs less in a step than one per batch."""
  read = _read(floats, plan.batches, plan.acc)
  fast = _sums(read, plan, None, l1=l1, linf=linf)
  plain = _per_scope(fast, plan, scaled=False)
  ok = jnp.all(_trusted(plain.sumsq.m, plan.acc) | (plan.n == 0))

  operands, reread = _rescue_read(read, floats, plan)

  def rescue(ops):
    e = _candidate_scales(plan.acc)[_candidate(fast.sumsq, plan.acc)]
    sums = _sums(reread(ops), plan, e, l1=l1, linf=False)
    sums = sums._replace(amax=fast.amax)
    return sums, _per_scope(sums, plan, scaled=True)

  return lax.cond(ok, lambda _: (fast, plain), rescue, operands)


def _batch_branched_sums(floats, plan: Plan, *, l1: bool, linf: bool) -> tuple[Sums, Scoped]:
  """As :func:`_branched_sums`, run on each batch of leaves alone: where a
  leaf's own sum of squares left the range, its batch's ``lax.cond`` reads
  that batch again. One device only.

  For a statistic that the update does not wait for (a monitor). Each batch
  decides alone, so no leaf is held until the whole tree has been read: one
  rescue for the whole tree keeps every leaf alive until the last one is
  read, which made a CPU MLP training step with a monitor 1.7 times slower.
  The reads are those of :func:`_branched_sums`, which XLA computes once
  when a clip reads the same leaves. The cost: a leaf of zeros is read
  twice."""
  parts = []
  for b in plan.batches:
    batch = [floats[i] for i in b]
    parts.append(_branched_sums(batch, make_plan(batch, "leaf"), l1=l1, linf=linf)[0])
  perm = np.argsort([i for b in plan.batches for i in b])
  fields = [[getattr(p, f) for p in parts] for f in Sums._fields]
  sums = Sums(*(None if v[0] is None else jnp.concatenate(v)[perm] for v in fields))
  return sums, _per_scope(sums, plan, scaled=True)


def _strategy() -> str:
  if RESCALING not in ("auto", "branch", "select"):
    raise ValueError(f"RESCALING must be 'auto', 'branch' or 'select', got {RESCALING!r}")
  return RESCALING


def norm_sums(
  floats: Sequence[jax.Array], plan: Plan, *, l1: bool, linf: bool, watch: bool = False
) -> tuple[Sums, Scoped]:
  """Partial norms of ``floats`` per leaf and per scope, exact over the whole
  float range. ``watch``: the norms are a statistic that the update does not
  wait for (see :func:`_batch_branched_sums`)."""
  if _squares_always_fit(floats):
    sums = _sums(_read(floats, plan.batches, plan.acc), plan, None, l1=l1, linf=linf)
    return sums, _per_scope(sums, plan, scaled=False)

  def branching(floats):
    branched = _batch_branched_sums if watch and plan.axes is None else _branched_sums
    return branched(floats, plan, l1=l1, linf=linf)

  def selecting(floats):
    return _selected_sums(floats, plan, l1=l1, linf=linf)

  floats = list(floats)
  strategy = _strategy()
  if strategy == "auto":
    return lax.platform_dependent(floats, cpu=branching, tpu=branching, default=selecting)
  return (branching if strategy == "branch" else selecting)(floats)


# --------------------------------------------------------------------------
# Moments


class Moments(NamedTuple):
  """Mean and centred sum of squares per scope, in units of ``2**e``."""

  mean: jax.Array  # [S], the mean of x * 2**-e
  m2: jax.Array  # [S], sum((x * 2**-e - mean)**2)
  sumsq: jax.Array  # [S], sum((x * 2**-e)**2)
  e: jax.Array  # int32 [S]
  n: np.ndarray | None  # int64 [S], elements per scope (static)
  constant: jax.Array  # bool [S], every element equal (exactly)

  def squares(self) -> Pow2:
    """The sums of squares per scope."""
    return Pow2(self.sumsq, 2 * self.e)


def _plain_moments(read: _Read, plan: Plan, scale=None, shift=None) -> jax.Array:
  """Per scope, ``sum(y)`` and ``sum(y**2)`` of ``y = x * scale - shift``
  (each per scope [S], or left out): [2, S]."""

  def reducer(y, members):
    if scale is not None:
      scopes = plan.owner[np.asarray(members)]
      y = y * _column(scale, scopes, y.ndim) - _column(shift, scopes, y.ndim)
    return jnp.stack([_sum_over(y), _sum_over(jnp.square(y))])

  sums, _ = _combine({"d": _per_leaf(read, reducer)}, {}, plan)
  return _scope_sum(sums["d"], plan)


def _about(d: jax.Array, anchor: jax.Array, plan: Plan) -> tuple[jax.Array, jax.Array]:
  """The mean and centred sum of squares from sums ``d`` about ``anchor``."""
  has = plan.n > 0
  n = jnp.asarray(np.maximum(plan.n, 1), plan.acc)
  mean = jnp.where(has, anchor + d[0] / n, 0)
  return mean, jnp.where(has, jnp.maximum(d[1] - jnp.square(d[0]) / n, 0), 0)


def _exact_moments(read: _Read, plan: Plan) -> Moments:
  """Three reads. The extremes give an exact power-of-two scale per scope
  and find constant scopes; the mean and the sum of squares are then summed
  in range, and the centred sum of squares taken about that mean."""

  def extremes(y, members):
    axes = tuple(range(1, y.ndim))
    top = jnp.max(y, axis=axes, initial=-jnp.inf)
    return jnp.stack([top, jnp.max(-y, axis=axes, initial=-jnp.inf)])

  ext = _combine({}, {"ext": _per_leaf(read, extremes)}, plan)[1]["ext"]
  hi, lo = _scope_max(ext[0], plan), -_scope_max(ext[1], plan)
  # Clamped so that 2**-e is a normal number: the largest scaled element
  # then lies in [0.5, 8).
  lim = jnp.finfo(plan.acc).maxexp - 3
  e = jnp.clip(exponent(jnp.maximum(hi, -lo)), -lim, lim)
  scale = exp2(-e, plan.acc)
  constant = (hi == lo) & (plan.n > 0)
  zero = jnp.zeros_like(hi)
  plain = _plain_moments(read, plan, scale, zero)
  first, _ = _about(plain, zero, plan)
  anchor = lax.stop_gradient(jnp.where(constant, hi * scale, first))
  mean, m2 = _about(_plain_moments(read, plan, scale, anchor), anchor, plan)
  return Moments(mean, jnp.where(constant, 0, m2), plain[1], e, None, constant)


def moment_sums(floats: Sequence[jax.Array], plan: Plan) -> Moments:
  """Mean, centred and plain sums of squares per scope. The common case
  reads once, summing ``x`` and ``x**2``; a scope whose one-pass variance
  cancels (a mean that dwarfs the spread, or a constant scope), or whose
  sums left the range, is read again under ``lax.cond``."""
  read = _read(floats, plan.batches, plan.acc)
  d = _plain_moments(read, plan)
  mean, m2 = _about(d, jnp.zeros((), plan.acc), plan)
  none = jnp.zeros(mean.shape, bool)
  fast = Moments(mean, m2, d[1], jnp.zeros(mean.shape, jnp.int32), None, none)
  ok = (plan.n == 0) | (
    _trusted(d[1], plan.acc) & jnp.isfinite(d[0]) & (m2 >= _CANCELLATION * d[1])
  )
  # n is static: it stays out of the branches' outputs.
  operands, reread = _rescue_read(read, floats, plan)
  rescue = lambda ops: _exact_moments(reread(ops), plan)  # noqa: E731
  out = lax.cond(jnp.all(ok), lambda _: fast, rescue, operands)
  return out._replace(n=plan.n)


# --------------------------------------------------------------------------
# The reduction


class Reduction(NamedTuple):
  """What :func:`reduce` found. Fields not asked for are ``None``."""

  norm: jax.Array  # float32 scalar: global L2 norm of the whole tree
  l2: Pow2 | None = None  # [S]
  l1: Pow2 | None = None  # [S]
  linf: Pow2 | None = None  # [S]
  moments: Moments | None = None
  leaf_sumsq: Pow2 | None = None  # [L]: each leaf's sum of squares


def _empty(scopes: int, norms: Sequence[str], with_moments: bool) -> Reduction:
  zero = Pow2(jnp.zeros((scopes,), jnp.float32), jnp.zeros((scopes,), jnp.int32))
  mom = None
  if with_moments:
    z = jnp.zeros((scopes,), jnp.float32)
    mom = Moments(z, z, z, zero.e, np.zeros((scopes,), np.int64), jnp.zeros((scopes,), bool))
  fields = {n: zero for n in norms}
  return Reduction(jnp.zeros((), jnp.float32), moments=mom, leaf_sumsq=zero, **fields)


def reduce(
  floats: Sequence[jax.Array],
  *,
  scope: Scope = "global",
  norms: Sequence[str] = (),
  moments: bool = False,
  axes: Axes | None = None,
  watch: bool = False,
) -> Reduction:
  """Reduces the float leaves once, per scope.

  Args:
    floats: the float leaves (from :func:`split_floats`).
    scope: ``"global"`` (one scope, the whole tree) or ``"leaf"``.
    norms: any of ``"l2"``, ``"l1"``, ``"linf"``.
    moments: also compute the mean and the centred sum of squares.
    axes: the mesh axes each leaf is partitioned over, inside ``shard_map``
      (from :func:`float_axes`); ``None`` on one device or under plain ``jit``.
    watch: the norms are a statistic only, which the update does not wait
      for: on one device no leaf is then held until the whole tree has been
      read (see :func:`_batch_branched_sums`).

  Returns:
    A :class:`Reduction`. Its ``norm`` is always the global L2 norm as float32.
  """
  norms = tuple(norms)
  if not floats:
    return _empty(1 if scope == "global" else 0, norms, moments)
  plan = make_plan(floats, scope, axes)
  if moments:
    mom = moment_sums(floats, plan)
    return Reduction(norm=_norm_statistic(mom.squares()), moments=mom)
  sums, scoped = norm_sums(floats, plan, l1="l1" in norms, linf="linf" in norms, watch=watch)
  out = Reduction(norm=_norm_statistic(scoped.sumsq), leaf_sumsq=sums.squares())
  if "l2" in norms:
    out = out._replace(l2=scoped.sumsq.sqrt())
  if "l1" in norms:
    out = out._replace(l1=scoped.sumabs)
  if "linf" in norms:
    out = out._replace(linf=Pow2(scoped.amax, jnp.zeros_like(scoped.sumsq.e)))
  return out


def _norm_statistic(squares: Pow2) -> jax.Array:
  """The global L2 norm, as float32, from the sums of squares of the scopes."""
  return squares.total().sqrt().to_float32()


# --------------------------------------------------------------------------
# Finer scopes: units within a leaf, examples within a batch, groups of leaves


def unit_norms(x: jax.Array, axis: tuple[int, ...]) -> Pow2:
  """The L2 norm of each unit of ``x`` (reduced over ``axis``, kept as size-1
  dimensions), exact over the whole float range: each unit's largest
  magnitude sets a power of two that scales its elements to at most 1
  before they are squared and summed in float32 (float64 for float64)."""
  acc = acc_dtype([x])
  y = x.astype(acc)
  info = jnp.finfo(acc)
  top = jnp.max(jnp.abs(y), axis=axis, keepdims=True, initial=0)
  e = jnp.clip(exponent(top), 1 - info.maxexp, -info.minexp)
  sumsq = jnp.sum(jnp.square(y * exp2(-e, acc)), axis=axis, keepdims=True)
  return Pow2(safe_sqrt(sumsq), e)


def example_norms(floats: Sequence[jax.Array], scope: Scope) -> Pow2:
  """Per example (axis 0 of every leaf), the L2 norm over the leaves
  (``scope="global"``: [B]) or of each leaf (``"leaf"``: [L, B]), exact over
  the whole float range like :func:`unit_norms`."""
  per_leaf = [unit_norms(x, tuple(range(1, x.ndim))) for x in floats]
  leaf = Pow2.stack([p.reshape_flat() for p in per_leaf])  # [L, B]
  if scope == "leaf":
    return leaf
  return leaf.squared().total(axis=0).sqrt()


def group_norms(leaf_sumsq: Pow2, groups: Sequence[Hashable]) -> dict[Hashable, jax.Array]:
  """The float32 L2 norm of each group of leaves, from the per-leaf sums of
  squares a reduction already has: no second read of the gradient. All
  groups are totalled together, so the program does not grow with their
  number (one total per group took a minute to compile at 1000 groups)."""
  ids: dict[Hashable, int] = {}
  segment = np.asarray([ids.setdefault(g, len(ids)) for g in groups])
  norms = leaf_sumsq.segment_total(segment, len(ids)).sqrt().to_float32()
  # Out of a divide (by 1): else XLA copies the arithmetic that makes the
  # norms into the output of each group, and the program grows with G**2.
  norms = norms / (1 + _zero_after([norms]))
  return {g: norms[i] for g, i in ids.items()}


# --------------------------------------------------------------------------
# Applying per-scope factors


def reciprocal_pow2(k: jax.Array, valid: jax.Array, dtype: np.dtype) -> jax.Array:
  """``2**-k`` where ``valid``, NaN elsewhere, computed as a divide.

  XLA copies cheap scalar arithmetic into every consumer fusion, which at
  thousands of leaves multiplies compile time; it does not copy a divide. The
  divide by a power of two is exact.
  """
  one = jnp.where(valid, jnp.asarray(1, dtype), jnp.asarray(jnp.nan, dtype))
  return one / exp2(k, dtype)


def apply(
  floats: Sequence[jax.Array],
  scope: Scope,
  fn: Callable[..., jax.Array],
  *per_scope: jax.Array,
  after: Sequence[jax.Array] = (),
) -> list[jax.Array]:
  """Applies ``fn(x, *factors)`` to each leaf, in its accumulation dtype and
  cast back to its own; ``factors`` are the ``per_scope`` vectors [S] at the
  leaf's scope, each indexed once per scope. ``after``: statistics of the
  same leaves that the update must wait for (see :func:`ordered_after`)."""
  acc = acc_dtype(floats)
  if after and per_scope:
    per_scope = (ordered_after(per_scope[0], *after), *per_scope[1:])
  factors: dict[int, list[jax.Array]] = {}
  out = []
  owner = [0] * len(floats) if scope == "global" else range(len(floats))
  for x, s in zip(floats, owner, strict=True):
    if s not in factors:
      factors[s] = [v[s] for v in per_scope]
    out.append(fn(x.astype(acc), *factors[s]).astype(x.dtype))
  return out


def ordered_after(x: jax.Array, *stats: jax.Array) -> jax.Array:
  """``x``, unchanged, as a value computed after ``stats``.

  Unless the update of a leaf depends on every reduction that reads it, XLA
  copies a donated gradient so that the reductions can still read it while it
  is overwritten in place (5-10x slower on a CPU). Subtracting an exact zero
  made from the reductions orders the update after them.
  """
  return x - _zero_after(stats).astype(x.dtype)


def _zero_after(stats: Sequence[jax.Array]) -> jax.Array:
  """An exact float32 zero computed from ``stats``, out of a divide: XLA
  copies cheap scalar arithmetic (here a sum over every leaf's partials) into
  each consumer kernel, but not a divide."""
  if not stats:
    return jnp.zeros((), jnp.float32)
  total = sum(jnp.sum(s.astype(jnp.float32)) for s in stats)
  w = jnp.where(jnp.isfinite(total), jnp.abs(total), 0)
  return w * 0 / (w + 1)


class Factors(NamedTuple):
  """Per scope, two factors whose product is the rescaling. ``s1 == 1``
  exactly where nothing is rescaled, or where the rescaling is exactly 1
  (then ``s2 == 1`` too)."""

  s1: jax.Array  # [S]
  s2: jax.Array  # [S]


def scale_factors(
  value: Pow2, target: ArrayLike | Pow2, clip: bool, *, after: Sequence[jax.Array] = ()
) -> tuple[Factors, jax.Array]:
  """The factors per scope that rescale norm ``value`` to ``target``.

  Where ``target / value`` lies within ``2**-64`` to ``2**64`` it is one
  factor, ``s1``, and ``s2 == 1``; beyond, its exponent is split evenly
  between the two, so that ``x * s1`` lies between ``x`` and the result.
  Nothing overflows or underflows on the way, even when ``value`` exceeds
  the dtype.

  Args:
    value: the norm per scope.
    target: the norm to rescale to (``max_norm``, or 1): a number, one per
      scope, or a :class:`Pow2` (a norm itself, which may exceed the dtype).
    clip: rescale only where ``value > target``; elsewhere both factors are
      exactly 1, and :func:`rescale` returns the leaf bitwise unchanged.
    after: statistics of the same leaves that the rescaling must wait for
      (see :func:`ordered_after`): those from a reduction other than the
      one ``value`` comes from.

  Returns:
    ``(factors, active)``: the :class:`Factors`, and where they rescale a
    finite norm, each of shape [S]. Where ``value`` is not finite both
    factors are NaN, so the whole scope becomes NaN.
  """
  dtype = value.m.dtype
  v = value.normalized()  # v.m in [0.5, 1), or 0, inf, NaN
  target, t_m, t_e = _split_target(target, dtype)
  finite = jnp.isfinite(v.m)
  if clip:
    above = (v.e > t_e) | ((v.e == t_e) & (v.m > t_m)) | (target == 0)
    active = (v.m > 0) & above & jnp.isfinite(target)
  else:
    active = v.m > 0
  # target / value = (t_m / v.m) * 2**d, d = t_e - v.e. Within 2**-64 to
  # 2**64 it is one factor, s1, and s2 == 1; beyond, the exponent is split in
  # two halves, s1 = 2**k1 (k1 != 0) first, so that x * s1 lies between x and
  # the result. Either way s1 == 1 says that the scope is not rescaled (or by
  # exactly 1), and the leaf is kept as it is.
  d = jnp.where(active, t_e - v.e, 0)
  split = active & (jnp.abs(d) >= 64)
  k1 = jnp.where(split, d // 2, 0)
  one = jnp.where(finite, 1, jnp.nan).astype(dtype) - _zero_after(after).astype(dtype)
  # Both come out of a divide, which XLA computes once for all leaves rather
  # than in each leaf's kernel; dividing by a power of two is exact. The
  # ratio is 4 * t_m * 2**(d - k1) / (4 * v.m): a numerator t_m * 2**-126
  # alone would be subnormal, and flushed, where the ratio itself is normal.
  power = one / exp2(-k1, dtype)
  numerator = jnp.where(active, t_m * exp2(d - k1 + 2, dtype), 1)
  ratio = jnp.where(finite, numerator, jnp.nan) / jnp.where(active, v.m * 4, 1)
  s1, s2 = jnp.where(split, power, ratio), jnp.where(split, ratio, power)
  # One kernel for both (each would be its own, with its own compile time);
  # the barrier keeps XLA from taking the stack apart again.
  packed = lax.optimization_barrier(jnp.stack([s1, s2]))
  return Factors(packed[0], packed[1]), active & finite


def times_factors(y: jax.Array, s1: jax.Array, s2: jax.Array) -> jax.Array:
  """``y * s1 * s2`` with factors that broadcast against ``y`` (per unit or
  per example); ``y`` itself, bitwise, where ``s1 == 1`` (nothing rescaled)."""
  return jnp.where(s1 == 1, y, y * s1 * s2)


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


def rescale(floats: Sequence[jax.Array], scope: Scope, f: Factors) -> list[jax.Array]:
  """Each leaf times its scope's factors, in the accumulation dtype and cast
  back; a leaf its factors leave alone is returned bitwise unchanged
  (subnormal elements included, which any multiply would flush on a CPU).

  Written in ``lax``, three primitives per leaf: at thousands of leaves, each
  operation per leaf counts in tracing and compile time.
  """
  acc = acc_dtype(floats)
  per_scope: dict[int, tuple[jax.Array, ...]] = {}
  out = []
  for i, x in enumerate(floats):
    s = 0 if scope == "global" else i
    if s not in per_scope:
      per_scope[s] = (f.s1[s], f.s2[s], f.s1[s] == 1)
    s1, s2, keep = per_scope[s]
    y = x if x.dtype == acc else lax.convert_element_type(x, acc)
    # scalar factors and predicate: each keeps the leaf's own sharding
    z = lax.select_n(keep, lax.mul(lax.mul(y, s1), s2), y)
    out.append(z if z.dtype == x.dtype else lax.convert_element_type(z, x.dtype))
  return out


def fraction_outside(
  floats: Sequence[jax.Array],
  lower: jax.Array,
  upper: jax.Array,
  *,
  axes: Axes | None = None,
) -> jax.Array:
  """The float32 fraction of all float elements outside ``[lower, upper]``.

  NaN elements make it NaN; an infinite bound clamps nothing, so ``inf``
  against an upper bound of ``inf`` is inside. No elements: 0. Each element's
  excess over a bound is taken with both scaled by a power of two that lifts
  the bound's half-ulp, the smallest possible excess, to at least 1: the
  difference then neither rounds nor flushes to zero. Capped at 1, the
  excesses sum to the count: ``max`` and multiplies, which XLA reduces
  faster than comparisons, and which its CPU reduction kernels take in.
  """
  plan = make_plan(floats, "global", axes)
  if not floats or plan.n[0] == 0:
    return jnp.zeros((), jnp.float32)
  acc, info = plan.acc, jnp.finfo(plan.acc)
  lower, upper = jnp.asarray(lower, acc), jnp.asarray(upper, acc)
  above = _excess_over(jnp.clip(upper, -info.max, info.max), acc)
  below = _excess_over(-jnp.clip(lower, -info.max, info.max), acc)
  # An infinite bound caps the elements at the largest finite number first:
  # inf - inf never happens, and nothing exceeds it.
  cap_hi = jnp.where(jnp.isposinf(upper), info.max, jnp.inf).astype(acc)
  cap_lo = jnp.where(jnp.isneginf(lower), -info.max, -jnp.inf).astype(acc)
  zero, one = jnp.zeros((), acc), jnp.ones((), acc)

  def counted(y, members):
    # Each batch's own copy of the scalars, through a barrier with the batch:
    # else XLA writes out a full-size broadcast of each scalar (a constant,
    # for concrete bounds) and shares it among the batches' kernels.
    (above_, below_, hi, lo, zero_, one_), y = lax.optimization_barrier(
      ((above, below, cap_hi, cap_lo, zero, one), y)
    )
    over = above_(jnp.minimum(y, hi))
    under = below_(-jnp.maximum(y, lo))
    # min(excess, 1) written with max alone: XLA turns min(max(...)) into a
    # clamp, which its CPU reduction kernels cannot take in, so it wrote the
    # clamped values out in full first (a step three times slower)
    excess = jnp.maximum(jnp.maximum(over, under), zero_)
    return _sum_over(one_ - jnp.maximum(one_ - excess, zero_))

  counts = _per_leaf(_read(floats, plan.batches, plan.acc), counted)
  counts = _combine({"count": counts}, {}, plan)[0]["count"]
  return (jnp.sum(counts) / plan.n[0]).astype(jnp.float32)


class _Excess(NamedTuple):
  """``x -> (x - bound) * u`` for a finite bound, with ``u = u1 * u2`` a power
  of two beyond one float's range, and ``bound * u`` precomputed."""

  u1: jax.Array
  u2: jax.Array
  bound_u: jax.Array

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.u1 * self.u2 - self.bound_u


def _excess_over(bound: jax.Array, acc: np.dtype) -> _Excess:
  info = jnp.finfo(acc)
  binade = jnp.where(bound == 0, info.minexp, exponent(jnp.abs(bound)))
  u1, u2 = split_exp2(info.nmant + 2 - binade, acc)
  return _Excess(u1, u2, bound * u1 * u2)


def global_norm(tree: Any, norm: NormOrd = "l2", *, axis_name: AxisName = None) -> jax.Array:
  """The norm of a whole pytree, as a float32 scalar.

  This is the same overflow-safe reduction the transforms use: it accumulates
  in at least float32 and scales by a power of two when squares would
  overflow or underflow, so 1000 bfloat16 leaves of norm 1 give 31.62 and
  float16 leaves of 300 give the right norm. Where the true norm exceeds the
  float32 range the result is inf. ``None``, integer and ``float0`` leaves do
  not count; empty leaves count as zeros.

  Args:
    tree: a pytree of arrays.
    norm: ``"l2"``, ``"l1"`` or ``"linf"``.
    axis_name: inside ``shard_map``, the mesh axes over which the leaves are
      partitioned (a name, a tuple of names, or a pytree prefix of ``tree``
      with ``None`` for replicated leaves): the norm then covers the whole
      sharded tree.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: if ``norm`` is unknown.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> g = {"w": jnp.full((2,), 300.0, jnp.float16), "step": jnp.array(3)}
    >>> gc.global_norm(g)
    Array(424.26407, dtype=float32)
    >>> gc.global_norm(g, "linf")
    Array(300., dtype=float32)
  """
  if norm not in NORMS:
    options = ", ".join(repr(c) for c in NORMS)
    raise ValueError(f"global_norm: norm must be one of {options}, got {norm!r}")
  floats, _ = split_floats(tree)
  if not floats:
    return jnp.zeros((), jnp.float32)
  axes = float_axes(axis_name, tree)
  red = reduce(floats, scope="global", norms=(norm,), axes=axes, watch=True)
  return getattr(red, norm).to_float32()[0]
