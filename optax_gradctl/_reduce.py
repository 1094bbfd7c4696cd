"""Every reduction over a gradient pytree.

This module is the only place that reduces over a pytree. A gradient flows
through it once per step:

1. :func:`split_floats` keeps the floating-point leaves; ``None``, integer
   and ``float0`` leaves pass through untouched and never count.
2. :func:`reduce` reads each float leaf once and returns, per *scope*
   (the whole tree, or each leaf), the requested norms and moments in a
   scaled form that cannot overflow or underflow, plus the global L2 norm of
   the tree as a float32 statistic.
3. The transforms turn those into one scale (and shift) per scope and apply it
   with :func:`apply`, which casts back to each leaf's dtype.

Numerics. All sums accumulate in at least float32 (float64 leaves in float64).
The common case costs one reduction pass: unscaled sums whose size shows that
no square overflowed or underflowed. Only when that check fails (gradients
near the dtype's limits, zero or constant gradients, or a mean that dwarfs the
spread) does a ``lax.cond`` branch re-read the leaves scaled by a power of two,
as LAPACK's ``nrm2`` scales. Results are carried as ``m * 2**e`` so that a norm
larger than the float32 range still clips to the right value.

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

# An unscaled sum of squares at least this large lost nothing that matters to
# underflow: any square that flushed to zero is below 2**-126, so it weighs
# less than 2**-66 of the total (2**-500 for float64 accumulation).
_TRUSTED_SUMSQ = {np.dtype(np.float32): 2.0**-60, np.dtype(np.float64): 2.0**-500}
# The one-pass variance sum(x**2) - sum(x)**2 / n is trusted while the mean
# accounts for less than 63/64 of sum(x**2), i.e. at most 6 bits cancel.
_CANCELLATION = 2.0**-6
# When fast sums of squares fail, the leaves are re-read times 2**-big (the
# sum overflowed) or 2**small (it was below the trusted size). Either keeps
# every square that matters normal and every sum finite for up to 2**38
# elements per scope.
_RESCALE = {np.dtype(np.float32): (100, 75), np.dtype(np.float64): (800, 600)}

# How norms handle the ends of the float range. "branch": one unscaled pass,
# and a lax.cond that re-reads the leaves rescaled when its sums fail (best on
# a CPU, where sibling reductions of one input are separate passes). "select":
# the unscaled and both rescaled sums in one pass, then a select (best on a
# GPU or TPU, which fuse sibling reductions and pay for a branch with a host
# round trip). "auto" picks by platform. Moments always branch.
RESCALING = "auto"


# --------------------------------------------------------------------------
# Leaves


def _leaf_dtype(x: Any) -> np.dtype | None:
  if x is None:
    return None
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
  dtype = np.dtype(np.float32)
  for x in floats:
    dtype = np.promote_types(dtype, x.dtype)
  return dtype


# --------------------------------------------------------------------------
# Powers of two


def exp2(k: jax.Array, dtype: np.dtype) -> jax.Array:
  """``2**k`` exactly, for integer ``k`` within the normal range of ``dtype``."""
  info = jnp.finfo(dtype)
  bits, itype = (23, jnp.int32) if dtype == np.float32 else (52, jnp.int64)
  k = jnp.clip(k, info.minexp, info.maxexp - 1).astype(itype)
  return lax.bitcast_convert_type((k + (info.maxexp - 1)) << bits, dtype)


def split_exp2(k: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
  """Two normal factors whose product is ``2**k``, for ``k`` beyond one float's range."""
  half = k // 2
  return exp2(half, dtype), exp2(k - half, dtype)


def exponent(x: jax.Array) -> jax.Array:
  """The int32 ``e`` with ``x = f * 2**e`` and ``0.5 <= |f| < 1``; 0 for 0, inf or NaN."""
  x = lax.stop_gradient(x)
  _, e = jnp.frexp(x)
  return jnp.where(jnp.isfinite(x) & (x != 0), e, 0).astype(jnp.int32)


class Pow2(NamedTuple):
  """A non-negative value per scope, ``m * 2**e``, safe from over- and underflow."""

  m: jax.Array  # accumulation dtype, shape [S]
  e: jax.Array  # int32, shape [S]

  def normalized(self) -> Pow2:
    """The same value with ``0.5 <= m < 1`` (``m`` unchanged if 0, inf or NaN)."""
    k = exponent(self.m)
    return Pow2(self.m * exp2(-k, self.m.dtype), self.e + k)

  def to_float32(self) -> jax.Array:
    """The value as float32: inf where it exceeds the float32 range."""
    a, b = split_exp2(self.e, self.m.dtype)
    return (self.m * a * b).astype(jnp.float32)


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
  return math.prod(lax.axis_size(n) for n in names)


def _weights(axes: Axes | None) -> list[float] | None:
  """Per leaf, 1 / (the number of copies of it among the devices of ``axes.union``):
  summing weighted partials over the union counts a replicated leaf once."""
  if axes is None:
    return None
  return [1.0 / _axis_size(tuple(a for a in axes.union if a not in names)) for names in axes.leaf]


def _weigh(parts: dict[str, jax.Array], weights: list[float] | None) -> dict[str, jax.Array]:
  """Per-leaf partials (vectors in leaf order) times each leaf's weight."""
  if weights is None or all(w == 1 for w in weights):
    return parts
  w = np.asarray(weights)
  return {k: v * w.astype(v.dtype) for k, v in parts.items()}


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
# The reduction


class Moments(NamedTuple):
  """Mean and centred sum of squares per scope, in units of ``2**e``."""

  mean: jax.Array  # [S], the mean of x * 2**-e
  m2: jax.Array  # [S], sum((x * 2**-e - mean)**2)
  e: jax.Array  # int32 [S]
  n: np.ndarray  # int64 [S], elements per scope (static)
  constant: jax.Array  # bool [S], every element equal (exactly)


class Reduction(NamedTuple):
  """What :func:`reduce` found. Fields not asked for are ``None``."""

  norm: jax.Array  # float32 scalar: global L2 norm of the whole tree
  l2: Pow2 | None = None
  l1: Pow2 | None = None
  linf: Pow2 | None = None
  moments: Moments | None = None


def scope_of(floats: Sequence[jax.Array], scope: Scope) -> list[int]:
  """The scope index of each float leaf."""
  return [0] * len(floats) if scope == "global" else list(range(len(floats)))


def _per_scope(values: jax.Array, scope: Scope, op: Callable = jnp.sum) -> jax.Array:
  """Per-leaf partials (a vector in leaf order) combined per scope."""
  return op(values, axis=0, keepdims=True) if scope == "global" else values


def _max_over(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
  return jnp.max(x, axis=axis, initial=-jnp.inf)


# Leaves of at most this many elements are reduced stacked with the other
# leaves of their shape and dtype: one kernel for the group instead of one
# per leaf. At this size the copy costs less than a kernel launch.
STACK_LIMIT = 4096
# At most this many leaves go into one stacked kernel. XLA's CPU compiler
# takes time quadratic in the operands of one fused concatenation (94 s for
# 5000 leaves in one kernel); in groups of 100 it is linear (7 s).
STACK_GROUP = 100


def _leafwise(
  leaves: Sequence[jax.Array],
  reducers: dict[str, tuple[Callable, Callable]],
  *,
  acc: np.dtype,
  owner: Sequence[int] | None = None,
  scale: jax.Array | None = None,
  shift: jax.Array | None = None,
  stack_limit: float = STACK_LIMIT,
) -> dict[str, jax.Array]:
  """Per-leaf reductions ``red(fn(x * scale, shift))`` for each ``(fn, red)``.

  ``x`` is each leaf in the accumulation dtype ``acc``; ``scale`` and
  ``shift`` are per scope, and ``owner`` gives each leaf's scope. Up to
  :data:`STACK_GROUP` leaves of one shape and dtype with at most
  ``stack_limit`` elements are stacked along a new axis (which keeps each
  leaf's sharding) and reduced by one kernel; larger leaves are read in place
  by a kernel each.

  Returns:
    For each reducer, a vector of the per-leaf results, in leaf order.
  """
  groups: dict[tuple, list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault((x.shape, x.dtype), []).append(i)
  pieces: dict[str, list[jax.Array]] = {name: [] for name in reducers}
  order: list[int] = []

  def per_member(values: jax.Array, members: list[int], ndim: int) -> jax.Array:
    # One scope for the whole batch is a scalar; several are gathered at once.
    scopes = sorted({owner[i] for i in members})
    if len(scopes) == 1:
      return values[scopes[0]]
    column = (len(members),) + (1,) * (ndim - 1)
    return values[np.asarray([owner[i] for i in members])].reshape(column)

  for idx in groups.values():
    if len(idx) > 1 and leaves[idx[0]].size <= stack_limit:
      chunks = [idx[k : k + STACK_GROUP] for k in range(0, len(idx), STACK_GROUP)]
      batches = [
        (c, jnp.stack([leaves[i] for i in c]) if len(c) > 1 else leaves[c[0]][None]) for c in chunks
      ]
    else:
      batches = [([i], leaves[i][None]) for i in idx]
    for members, y in batches:
      y = y.astype(acc)
      if scale is not None:
        y = y * per_member(scale, members, y.ndim)
      a = 0.0 if shift is None else per_member(shift, members, y.ndim)
      axes = tuple(range(1, y.ndim))
      if len(members) == 1:
        for name, (fn, red) in reducers.items():
          pieces[name].append(red(fn(y, a), axis=axes))
      else:
        # Reducers of one kind reduce together, as one [R, k, ...] array;
        # reduced one by one, XLA would split each back into per-leaf kernels.
        for red in dict.fromkeys(r for _, r in reducers.values()):
          names = [n for n, (_, r) in reducers.items() if r is red]
          stacked = jnp.stack([reducers[n][0](y, a) for n in names])
          values = red(stacked, axis=tuple(d + 1 for d in axes))
          for r, name in enumerate(names):
            pieces[name].append(values[r])
      order.extend(members)
  perm = np.argsort(order)
  identity = bool(np.all(perm == np.arange(len(order))))
  out = {}
  for name, vecs in pieces.items():
    vec = jnp.concatenate(vecs) if len(vecs) > 1 else vecs[0]
    out[name] = vec if identity else vec[perm]
  return out


def reduce(
  floats: Sequence[jax.Array],
  *,
  scope: Scope = "global",
  norms: Sequence[str] = (),
  moments: bool = False,
  axes: Axes | None = None,
) -> Reduction:
  """Reduces the float leaves once, per scope.

  Args:
    floats: the float leaves (from :func:`split_floats`).
    scope: ``"global"`` (one scope, the whole tree) or ``"leaf"``.
    norms: any of ``"l2"``, ``"l1"``, ``"linf"``.
    moments: also compute the mean and the centred sum of squares.
    axes: the mesh axes each leaf is partitioned over, inside ``shard_map``
      (from :func:`float_axes`); ``None`` on one device or under plain ``jit``.

  Returns:
    A :class:`Reduction`. Its ``norm`` is always the global L2 norm as float32.
  """
  norms = tuple(norms)
  if not floats:
    zero = Pow2(jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32))
    mom = None
    if moments:
      z = jnp.zeros((0,), jnp.float32)
      mom = Moments(z, z, zero.e, np.zeros((0,), np.int64), jnp.zeros((0,), bool))
    return Reduction(
      jnp.zeros((), jnp.float32),
      *(zero if n in norms else None for n in NORMS),
      mom,
    )
  acc = acc_dtype(floats)
  sizes = [
    x.size * (_axis_size(a) if axes else 1)
    for x, a in zip(floats, axes.leaf if axes else floats, strict=True)
  ]
  weights = _weights(axes)
  n = np.array([sum(sizes)] if scope == "global" else sizes, np.int64)
  n_acc = jnp.asarray(n, acc)
  need_sum = moments
  need_abs = "l1" in norms

  big, small = _RESCALE[acc]
  owner = scope_of(floats, scope)

  def fast_pass(leaves, rescaled: bool):
    """Unscaled sums, read once; with ``rescaled``, also the sums of the
    leaves times 2**-big and 2**small, which an accelerator computes in the
    same kernel (sibling reductions of one input fuse there, not on a CPU)."""
    reducers = {"sumsq": (lambda y, a: jnp.square(y), jnp.sum)}
    if need_abs:
      reducers["sumabs"] = (lambda y, a: jnp.abs(y), jnp.sum)
    if rescaled:
      for name, k in (("down", -big), ("up", small)):
        c = 2.0**k
        reducers[f"sumsq_{name}"] = (lambda y, a, c=c: jnp.square(y * c), jnp.sum)
        if need_abs:
          reducers[f"sumabs_{name}"] = (lambda y, a, c=c: jnp.abs(y * c), jnp.sum)
    if need_sum:
      reducers["sum"] = (lambda y, a: y, jnp.sum)
    if "linf" in norms:
      reducers["amax"] = (lambda y, a: jnp.abs(y), _max_over)
    fast = _leafwise(leaves, reducers, acc=acc)
    fast_max = {"amax": _per_scope(fast.pop("amax"), scope, jnp.max)} if "linf" in norms else {}
    fast = {k: _per_scope(v, scope) for k, v in _weigh(fast, weights).items()}
    return _allreduce(fast, lax.psum, axes), _allreduce(fast_max, lax.pmax, axes)

  def rescale_exponent(sumsq):
    # The unscaled sum tells which way to scale, by one power of two.
    trusted = jnp.isfinite(sumsq) & (sumsq >= _TRUSTED_SUMSQ[acc])
    return jnp.where(jnp.isfinite(sumsq), jnp.where(trusted, 0, -small), big).astype(jnp.int32)

  def assemble(parts, e, fast_max, extra=None):
    out = {"sumsq": parts["sumsq"], "e": e}
    # The global L2 statistic combines the scopes at the largest scale.
    top = jnp.max(e)
    a, b = split_exp2(2 * (e - top), acc)
    out["norm_e"], out["norm_sumsq"] = top, jnp.sum(parts["sumsq"] * a * b)
    if need_abs:
      out["sumabs"] = parts["sumabs"]
    if "linf" in norms:
      out["amax"] = fast_max["amax"]
    if moments:
      anchor, constant = extra
      out["mean"] = anchor + parts["dsum"] / n_acc
      out["m2"] = jnp.maximum(parts["dsumsq"] - jnp.square(parts["dsum"]) / n_acc, 0)
      out["m2"] = jnp.where(constant, 0, out["m2"])
      out["constant"] = constant
    return out

  def selecting(leaves):
    """Norms without a branch: every candidate sum in one pass, then a select."""
    fast, fast_max = fast_pass(leaves, rescaled=True)
    e = rescale_exponent(fast["sumsq"])
    parts = {}
    for name in ("sumsq", "sumabs") if need_abs else ("sumsq",):
      parts[name] = jnp.where(
        e > 0, fast[f"{name}_down"], jnp.where(e < 0, fast[f"{name}_up"], fast[name])
      )
    return assemble(parts, e, fast_max)

  def branching(leaves):
    """The common case reads once; a rarely taken branch re-reads rescaled."""
    fast, fast_max = fast_pass(leaves, rescaled=False)
    sumsq = fast["sumsq"]
    trusted = jnp.isfinite(sumsq) & (sumsq >= _TRUSTED_SUMSQ[acc])
    ok = jnp.all(trusted) & jnp.isfinite(jnp.sum(sumsq))
    if moments:
      fast_m2 = sumsq - jnp.square(fast["sum"]) / n_acc
      ok &= jnp.all(fast_m2 >= _CANCELLATION * sumsq)

    def fast_branch(_):
      out = {
        "sumsq": sumsq,
        "e": jnp.zeros(sumsq.shape, jnp.int32),
        "norm_e": jnp.zeros((), jnp.int32),
        "norm_sumsq": jnp.sum(sumsq),
      }
      if need_abs:
        out["sumabs"] = fast["sumabs"]
      if "linf" in norms:
        out["amax"] = fast_max["amax"]
      if moments:
        out["mean"] = fast["sum"] / n_acc
        out["m2"] = jnp.maximum(fast_m2, 0)
        out["constant"] = jnp.zeros(sumsq.shape, bool)
      return out

    def slow_branch(leaves):
      parts, e, extra = (moments_pass if moments else rescaled_pass)(leaves)
      parts = {k: _per_scope(v, scope) for k, v in _weigh(parts, weights).items()}
      parts = _allreduce(parts, lax.psum, axes)
      return assemble(parts, e, fast_max, extra)

    def rescaled_pass(leaves):
      e = rescale_exponent(sumsq)
      reducers = {"sumsq": (lambda y, a: jnp.square(y), jnp.sum)}
      if need_abs:
        reducers["sumabs"] = (lambda y, a: jnp.abs(y), jnp.sum)
      parts = _leafwise(
        leaves, reducers, acc=acc, owner=owner, scale=exp2(-e, acc), stack_limit=np.inf
      )
      return parts, e, None

    def moments_pass(leaves):
      # One pass for the extremes: they give an exact power-of-two scale per
      # scope, and find constant scopes exactly. A second for the moments,
      # about an anchor near the mean.
      extremes = {"hi": (lambda y, a: y, _max_over), "neglo": (lambda y, a: -y, _max_over)}
      ext = _leafwise(leaves, extremes, acc=acc, stack_limit=np.inf)
      ext = {k: _per_scope(v, scope, jnp.max) for k, v in ext.items()}
      ext = _allreduce(ext, lax.pmax, axes)
      hi, lo = ext["hi"], -ext["neglo"]
      # Clamped so that 2**-e is a normal number: the largest scaled element
      # then lies in [0.5, 8).
      lim = jnp.finfo(acc).maxexp - 3
      e = jnp.clip(exponent(jnp.maximum(hi, -lo)), -lim, lim)
      constant = hi == lo
      fast_mean = fast["sum"] / n_acc
      anchor = jnp.where(jnp.isfinite(fast_mean), fast_mean, hi / 2 + lo / 2)
      anchor = lax.stop_gradient(jnp.where(constant, hi, anchor) * exp2(-e, acc))
      reducers = {
        "sumsq": (lambda y, a: jnp.square(y), jnp.sum),
        "dsum": (lambda y, a: y - a, jnp.sum),
        "dsumsq": (lambda y, a: jnp.square(y - a), jnp.sum),
      }
      parts = _leafwise(
        leaves,
        reducers,
        acc=acc,
        owner=owner,
        scale=exp2(-e, acc),
        shift=anchor,
        stack_limit=np.inf,
      )
      return parts, e, (anchor, constant)

    return lax.cond(ok, fast_branch, slow_branch, leaves)

  strategy = "branch" if moments else RESCALING
  if strategy == "auto":
    res = lax.platform_dependent(list(floats), cpu=branching, default=selecting)
  else:
    res = (branching if strategy == "branch" else selecting)(list(floats))
  e = res["e"]
  norm = Pow2(safe_sqrt(res["norm_sumsq"])[None], res["norm_e"][None]).to_float32()[0]
  out = Reduction(norm=norm)
  if "l2" in norms:
    out = out._replace(l2=Pow2(safe_sqrt(res["sumsq"]), e))
  if "l1" in norms:
    out = out._replace(l1=Pow2(res["sumabs"], e))
  if "linf" in norms:
    out = out._replace(linf=Pow2(res["amax"], jnp.zeros_like(e)))
  if moments:
    out = out._replace(moments=Moments(res["mean"], res["m2"], e, n, res["constant"]))
  return out


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
  for x, s in zip(floats, scope_of(floats, scope), strict=True):
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
  total = sum(jnp.sum(s.astype(jnp.float32)) for s in stats)
  w = jnp.where(jnp.isfinite(total), jnp.abs(total), 0)
  # +0, out of a divide: XLA copies cheap scalar arithmetic (here a sum over
  # every leaf's partials) into each consumer kernel, but not a divide.
  zero = w * 0 / (w + 1)
  return x - zero.astype(x.dtype)


def scale_factors(
  value: Pow2, target: ArrayLike, clip: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Two factors per scope whose product is ``target / value``.

  Multiplying a leaf by the first and then the second keeps every
  intermediate in range even when ``value`` exceeds the dtype.

  Args:
    value: the norm per scope.
    target: the norm to rescale to (``max_norm``, or 1).
    clip: rescale only where ``value > target``; elsewhere both factors are
      exactly 1, so the leaf is returned bitwise unchanged.

  Returns:
    ``(s1, s2, active)``, each of shape [S]: the factors, and where they
    rescale. Where ``value`` is not finite the factors are NaN, so the whole
    scope becomes NaN.
  """
  dtype = value.m.dtype
  v = value.normalized()  # v.m in [0.5, 1), or 0, inf, NaN
  target = jnp.asarray(target, dtype)
  t_m, t_e = jnp.frexp(target)
  positive = v.m > 0
  finite = jnp.isfinite(v.m)
  if clip:
    above = (v.e > t_e) | ((v.e == t_e) & (v.m > t_m)) | (target == 0)
    active = positive & above & jnp.isfinite(target)
  else:
    active = positive
  # value = v.m * 2**v.e, so target / value = (target / 2 / v.m) * 2**(1 - v.e).
  k1 = jnp.where(active, (1 - v.e) // 2, 0)
  k2 = jnp.where(active, (1 - v.e) - k1, 0)
  nan = jnp.asarray(jnp.nan, dtype)
  # Both factors end in a divide, which XLA computes once for all leaves.
  s1 = reciprocal_pow2(-k1, finite, dtype)
  numerator = jnp.where(active, target / 2 * exp2(k2, dtype), 1)
  s2 = jnp.where(finite, numerator, nan) / jnp.where(active, v.m, 1)
  return s1, s2, active


def fraction_outside(
  floats: Sequence[jax.Array], lower: jax.Array, upper: jax.Array, *, axes: Axes | None = None
) -> jax.Array:
  """The float32 fraction of all float elements outside ``[lower, upper]``.

  NaN elements make it NaN. Each element's excess ``max(x - upper, lower - x, 0)``
  is scaled so that the smallest possible excess, half an ulp of the smaller
  bound, reaches 1, and capped at 1: a count built from ``max``, ``min`` and a
  multiply, which XLA reduces several times faster than comparisons.
  """
  if not floats:
    return jnp.zeros((), jnp.float32)
  acc = acc_dtype(floats)
  lower, upper = jnp.asarray(lower, acc), jnp.asarray(upper, acc)
  info = jnp.finfo(acc)

  def binade(bound):
    return jnp.where(bound == 0, info.minexp, exponent(jnp.abs(bound)))

  k = jnp.clip(info.nmant + 2 - jnp.minimum(binade(lower), binade(upper)), 0, info.maxexp - 1)
  unit = exp2(k, acc)
  # With concrete bounds XLA would fold these into constants and then write a
  # full-size broadcast of them for the reduction kernel; the barrier keeps
  # them scalars.
  lower, upper, unit = lax.optimization_barrier((lower, upper, unit))

  def clipped(y, a):
    return jnp.minimum(jnp.maximum(jnp.maximum(y - upper, lower - y), 0) * unit, 1)

  counts = _leafwise(floats, {"count": (clipped, jnp.sum)}, acc=acc)
  total = jnp.sum(_weigh(counts, _weights(axes))["count"]).astype(jnp.float32)
  total = _allreduce({"count": total}, lax.psum, axes)["count"]
  sizes = [
    x.size * (_axis_size(a) if axes else 1)
    for x, a in zip(floats, axes.leaf if axes else floats, strict=True)
  ]
  return total / sum(sizes)


def global_norm(tree: Any, norm: NormOrd = "l2", *, axis_name: AxisName = None) -> jax.Array:
  """The norm of a whole pytree, as a float32 scalar.

  This is the same overflow-safe reduction the transforms use: it accumulates
  in at least float32 and scales by a power of two when squares would
  overflow or underflow, so 1000 bfloat16 leaves of norm 1 give 31.62 and
  float16 leaves of 300 give the right norm. Where the true norm exceeds the
  float32 range the result is inf. ``None``, integer and ``float0`` leaves do
  not count.

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
  red = reduce(floats, scope="global", norms=(norm,), axes=float_axes(axis_name, tree))
  return getattr(red, norm).to_float32()[0]
