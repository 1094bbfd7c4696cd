"""Across devices: which mesh axes each leaf is split over, and the packed collectives.

Inside ``shard_map`` every partial reduction is combined over the mesh axes
named by ``axis_name``: sums by ``psum``, maxima by ``pmax``, each packed into
one small vector, so that a step needs a fixed number of collectives whatever
the number of leaves. A leaf replicated over some axes is weighted so that it
counts once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_gradctl._reduction.leaves import float_positions

AxisName = Hashable | tuple[Hashable, ...] | None


class Axes(NamedTuple):
  """The mesh axes each float leaf is partitioned over, inside ``shard_map``."""

  leaf: tuple[tuple[Hashable, ...], ...]  #: Per float leaf, in order: the axes it is split over.
  union: tuple[Hashable, ...]  #: Every axis named: the collectives run over these.


def _is_axis_spec(x: Any) -> bool:
  return (
    x is None or isinstance(x, str) or (isinstance(x, tuple) and all(isinstance(a, str) for a in x))
  )


class _Spec:
  """An axis spec held as one pytree leaf (a tuple of names would be flattened)."""

  def __init__(self, names: tuple[Hashable, ...]):
    self.names = names


def _spread(axis_name: Any, tree: Any) -> list[tuple[Hashable, ...]]:
  """The axis names of each leaf of ``tree``, from a prefix ``axis_name``."""
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
  return [s.names for s in jax.tree.leaves(spread, is_leaf=lambda x: isinstance(x, _Spec))]


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
    per_leaf = _spread(axis_name, tree)
  floats = [per_leaf[i] for i in float_positions(leaves)]
  union = tuple(dict.fromkeys(a for names in floats for a in names))
  return Axes(tuple(floats), union) if union else None


def axis_size(names: tuple[Hashable, ...]) -> int:
  """The number of devices along the mesh axes ``names``."""
  return math.prod(_one_axis_size(n) for n in names)


def _one_axis_size(name: Hashable) -> int:
  try:
    return lax.axis_size(name)
  except NameError:
    raise ValueError(
      f"axis_name: {name!r} is not an axis of the mesh this runs on: axis_name names the"
      " mesh axes inside shard_map (under plain jit, over sharded arrays, leave it None)"
    ) from None


def replica_weights(axes: Axes | None) -> np.ndarray | None:
  """Per leaf, 1 / (the number of copies of it among the devices of ``axes.union``):
  summing weighted partials over the union counts a replicated leaf once."""
  if axes is None:
    return None
  w = [1.0 / axis_size(tuple(a for a in axes.union if a not in names)) for names in axes.leaf]
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


def combine(
  sums: dict[str, jax.Array],
  maxes: dict[str, jax.Array],
  weights: np.ndarray | None,
  axes: Axes | None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Per-leaf partials of this device's shards, weighted and combined over
  the devices: sums by one psum, maxima by one pmax."""
  if weights is not None:
    sums = {k: v * weights.astype(v.dtype) for k, v in sums.items()}
  return _allreduce(sums, lax.psum, axes), _allreduce(maxes, lax.pmax, axes)
