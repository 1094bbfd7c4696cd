"""Hypothesis strategies: gradient pytrees over every float dtype and its whole range."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from . import reference

# Leaf shapes of the whole-range suite: 0-d, size-1, empty, small, and one
# large enough to be read in place rather than stacked with the others. A
# short menu keeps the number of distinct compiled programs small.
RANGE_SHAPES = ((), (1,), (0,), (3,), (2, 3), (5000,))
RANGE_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


# Value sets per drawn structure, for the checks whose compiled program
# depends on the structure alone: they compile once and check each set.
VARIANTS = 3


def variant_settings(value_sets: int | None = None) -> settings:
  """Hypothesis settings that check about ``value_sets`` sets of values in
  cases of VARIANTS sets each; by default half the profile's examples, at
  least 10."""
  if value_sets is None:
    value_sets = max(settings().max_examples // 2, 10)
  return settings(max_examples=max(value_sets // VARIANTS, 3))


def per_variant(values: st.SearchStrategy) -> st.SearchStrategy:
  """One draw of ``values`` for each variant of a case."""
  return st.lists(values, min_size=VARIANTS, max_size=VARIANTS)


class RangeCase:
  """Leaves drawn over a dtype's whole normal range, built as jax arrays in
  the caller's context (so that float64 needs only ``jax.enable_x64`` there).

  A case has one structure (names, dtypes, shapes) and one or more sets of
  values for it, its *variants*: a jitted check compiles once per structure
  and runs every variant.
  """

  def __init__(self, specs, variants=()):
    self.specs = specs  # [(name, float64 values, dtype)], the first variant
    self.variants = [specs, *variants]

  def build(self, variant=0):
    tree = {name: jnp.asarray(values, dtype) for name, values, dtype in self.variants[variant]}
    return tree, [reference.f64(x) for x in jax.tree.leaves(tree)]

  def builds(self):
    """``(tree, float64 leaves)`` of each variant in turn."""
    return [self.build(v) for v in range(len(self.variants))]

  def __repr__(self):
    return "RangeCase(" + " | ".join(_describe(specs) for specs in self.variants) + ")"


def _describe(specs) -> str:
  return ", ".join(
    f"{n}: {jnp.dtype(d).name}{list(np.shape(v))} ~2**{np.log2(np.abs(v).max()):.0f}"
    if np.size(v)
    else f"{n}: {jnp.dtype(d).name}{list(np.shape(v))}"
    for n, v, d in specs
  )


@st.composite
def tree_and_magnitudes(draw, dtypes=RANGE_DTYPES, max_leaves=4, headroom=0, variants=1):
  """A :class:`RangeCase`: 1..max_leaves leaves of shapes from RANGE_SHAPES, each
  of its own dtype and magnitude, from the dtype's smallest normal number to
  its largest finite one (squares that overflow float32 included), less
  ``headroom`` binades at the top. ``variants`` sets of values share the
  structure, each leaf's magnitude drawn anew for each."""
  n = draw(st.integers(1, max_leaves))
  structure = [
    (jnp.dtype(draw(st.sampled_from(dtypes))), draw(st.sampled_from(RANGE_SHAPES)))
    for _ in range(n)
  ]
  sets = [_values(draw, structure, headroom) for _ in range(variants)]
  return RangeCase(sets[0], sets[1:])


def _values(draw, structure, headroom):
  """Values for each leaf of ``structure``, within 8x of a magnitude drawn
  over its dtype's range."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  specs = []
  for i, (dtype, shape) in enumerate(structure):
    info = jnp.finfo(dtype)
    lo, hi = float(np.log2(float(info.tiny))), float(np.log2(float(info.max)))
    top = draw(st.floats(lo + 3, hi - headroom))
    logs = top - rng.uniform(0, 3, shape)  # within 8x of the leaf's magnitude
    signs = rng.choice([-1.0, 1.0], shape)
    values = np.clip(signs * np.exp2(logs), -float(info.max), float(info.max))
    specs.append((f"p{i}", values, dtype))
  return specs
