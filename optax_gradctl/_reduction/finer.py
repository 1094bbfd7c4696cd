"""Norms finer than a scope: of units within a leaf, of examples within a batch, of groups of leaves.

Units and examples are scaled by their own largest magnitude before they are
squared, so their norms are exact over the whole float range. Group norms are
totalled from the per-leaf sums a reduction already has.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_gradctl._reduction import steering
from optax_gradctl._reduction.leaves import acc_dtype
from optax_gradctl._reduction.plan import Scope
from optax_gradctl._reduction.pow2 import Pow2, exp2, exponent, safe_sqrt


def unit_norms(x: jax.Array, axis: tuple[int, ...]) -> Pow2:
  """The L2 norm of each unit of ``x`` (reduced over ``axis``, kept as size-1
  dimensions): each unit's largest magnitude sets a power of two that scales
  its elements to at most 1 before they are squared and summed in float32
  (float64 for float64)."""
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
  return leaf.square().total(axis=0).sqrt()


def group_norms(leaf_sumsq: Pow2, groups: Sequence[Hashable]) -> dict[Hashable, jax.Array]:
  """The float32 L2 norm of each group of leaves, from the per-leaf sums of
  squares a reduction already has: no second read of the gradient. All
  groups are totalled together, so the program does not grow with their
  number."""
  ids: dict[Hashable, int] = {}
  segment = np.asarray([ids.setdefault(g, len(ids)) for g in groups])
  norms = leaf_sumsq.segment_total(segment, len(ids)).sqrt().to_float32()
  norms = steering.computed_once(norms)
  return {g: norms[i] for g, i in ids.items()}
