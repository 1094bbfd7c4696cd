"""The plan of a reduction: its scopes, and how the leaves are batched and read.

Everything here is static, known at trace time. Small leaves of one shape
and dtype are stacked into one batch, so that a thousand biases are reduced
by a few kernels; larger leaves are read alone. ``per_leaf`` runs a reducer
over every batch and returns its results in leaf order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradctl._reduction import mesh, settings, steering
from optax_gradctl._reduction.leaves import acc_dtype

Scope = Literal["global", "leaf"]
SCOPES: tuple[str, ...] = ("global", "leaf")
Batches = tuple[tuple[int, ...], ...]


def scope_of_leaves(scope: Scope, count: int) -> np.ndarray:
  """The scope of each of ``count`` leaves: all 0 for ``"global"``, each its
  own for ``"leaf"``."""
  return np.zeros(count, int) if scope == "global" else np.arange(count)


class Plan(NamedTuple):
  """How the float leaves are reduced: static, known at trace time."""

  acc: np.dtype  #: The accumulation dtype.
  scope: Scope  #: ``"global"`` or ``"leaf"``.
  scope_of: np.ndarray  #: int per leaf: the scope of each leaf.
  n: np.ndarray  #: int64 per scope: elements per scope, over every device.
  weights: np.ndarray | None  #: [L]: 1 / the copies of each leaf among the devices, or ``None``.
  axes: mesh.Axes | None  #: The mesh axes of each leaf, inside ``shard_map``.
  batches: Batches  #: Leaves read together in the common read.
  groups: Batches  #: Leaves read together in a rescue: the larger ones stacked too.

  @property
  def num_scopes(self) -> int:
    return len(self.n)

  def combine(self, sums: dict, maxes: dict) -> tuple[dict, dict]:
    """Per-leaf partials combined over the devices (see :func:`mesh.combine`)."""
    return mesh.combine(sums, maxes, self.weights, self.axes)


def _batched(floats: Sequence[jax.Array], limit: float, group: int) -> Batches:
  """Leaf indices in batches: up to ``group`` leaves of one shape and dtype
  of at most ``limit`` elements together, larger leaves alone."""
  same: dict[tuple, list[int]] = {}
  for i, x in enumerate(floats):
    same.setdefault((x.shape, x.dtype), []).append(i)
  out: list[tuple[int, ...]] = []
  for idx in same.values():
    if floats[idx[0]].size <= limit:
      out += [tuple(idx[k : k + group]) for k in range(0, len(idx), group)]
    else:
      out += [(i,) for i in idx]
  return tuple(out)


def make_plan(floats: Sequence[jax.Array], scope: Scope, axes: mesh.Axes | None = None) -> Plan:
  """The :class:`Plan` of reducing ``floats`` per ``scope``, batched as the
  active :class:`~optax_gradctl.ReductionSettings` say."""
  sizes = [
    x.size * (mesh.axis_size(a) if axes else 1)
    for x, a in zip(floats, axes.leaf if axes else floats, strict=True)
  ]
  n = np.array([sum(sizes)] if scope == "global" else sizes, np.int64)
  config = settings.active()
  return Plan(
    acc_dtype(floats),
    scope,
    scope_of_leaves(scope, len(floats)),
    n,
    mesh.replica_weights(axes),
    axes,
    _batched(floats, config.stack_limit, config.stack_group),
    _batched(floats, np.inf, config.stack_group),
  )


class Read(NamedTuple):
  """The leaves as read together: one array [members, *shape] per batch."""

  arrays: list[jax.Array]
  batches: Batches


def read(floats: Sequence[jax.Array], batches: Batches, acc: np.dtype) -> Read:
  """The batches as read: a stacked batch is a new array; a leaf read alone
  is kept apart from any other computation on it (:func:`steering.kept_apart`)."""
  arrays = [
    (
      jnp.stack([floats[i] for i in b]) if len(b) > 1 else steering.kept_apart(floats[b[0]])[None]
    ).astype(acc)
    for b in batches
  ]
  return Read(arrays, batches)


def rescue_read(
  common: Read, floats: Sequence[jax.Array], plan: Plan
) -> tuple[list[Any], Callable[[list[Any]], Read]]:
  """The operands of a rescue under ``lax.cond``, and the function that
  reads them inside it. Per group of ``plan.groups``: the common read's
  stacked batch where it has one of several leaves (no second copy to
  compile), else the group's leaves, stacked inside the rescue. A leaf read
  alone thus goes in as it is, which leaves its read to the reduction alone:
  XLA then shares that reduction with any other transform reading the leaf."""
  stacked = {b: y for b, y in zip(common.batches, common.arrays, strict=True) if len(b) > 1}
  operands = [stacked[g] if g in stacked else [floats[i] for i in g] for g in plan.groups]

  def reread(ops: list[Any]) -> Read:
    arrays = [
      o if g in stacked else jnp.stack(o).astype(plan.acc)
      for o, g in zip(ops, plan.groups, strict=True)
    ]
    return Read(arrays, plan.groups)

  return operands, reread


def column(values: jax.Array, index: np.ndarray, ndim: int) -> jax.Array:
  """``values`` (per scope or per leaf) at ``index``, the scopes or leaves of
  a batch's members, shaped to broadcast against the batch."""
  if np.all(index == index[0]):
    return values[int(index[0])]
  return values[index].reshape((len(index),) + (1,) * (ndim - 1))


def per_leaf(batches: Read, reducer: Callable[[jax.Array, Sequence[int]], jax.Array]) -> jax.Array:
  """``reducer(batch, members)`` ([..., members] per batch) as [..., L] in leaf order."""
  order = [i for b in batches.batches for i in b]
  pieces = [reducer(y, b) for y, b in zip(batches.arrays, batches.batches, strict=True)]
  out = jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]
  perm = np.argsort(order)
  return out if np.all(perm == np.arange(len(order))) else out[..., perm]


def sum_over(y: jax.Array, extra: int = 0) -> jax.Array:
  """Sums each member of a batch (axis ``extra``) over its elements."""
  return jnp.sum(y, axis=tuple(range(extra + 1, y.ndim)))


def max_abs_over(y: jax.Array) -> jax.Array:
  """The largest magnitude of each member of a batch (0 for an empty one)."""
  return jnp.max(jnp.abs(y), axis=tuple(range(1, y.ndim)), initial=0)


def scope_sum(partials: jax.Array, plan: Plan) -> jax.Array:
  """Per-leaf partials [..., L] summed per scope: [..., S]."""
  return jnp.sum(partials, axis=-1, keepdims=True) if plan.scope == "global" else partials


def scope_max(partials: jax.Array, plan: Plan) -> jax.Array:
  """Per-leaf maxima [..., L] per scope: [..., S]."""
  return jnp.max(partials, axis=-1, keepdims=True) if plan.scope == "global" else partials
