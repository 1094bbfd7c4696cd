"""Hypothesis strategies: gradient pytrees over every float dtype and its whole range."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from . import reference

# Leaf shapes of the whole-range suite: 0-d, size-1, empty, small, and one
# large enough to be read in place rather than stacked with the others. A
# short menu keeps the number of distinct compiled programs small.
RANGE_SHAPES = ((), (1,), (0,), (3,), (2, 3), (5000,))
RANGE_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


class RangeCase:
  """Leaves drawn over a dtype's whole normal range, built as jax arrays in
  the caller's context (so that float64 needs only ``jax.enable_x64`` there)."""

  def __init__(self, specs):
    self.specs = specs  # [(name, float64 values, dtype)]

  def build(self):
    tree = {name: jnp.asarray(values, dtype) for name, values, dtype in self.specs}
    return tree, [reference.f64(x) for x in jax.tree.leaves(tree)]

  def __repr__(self):
    parts = [
      f"{n}: {jnp.dtype(d).name}{list(np.shape(v))} ~2**{np.log2(np.abs(v).max()):.0f}"
      if np.size(v)
      else f"{n}: {jnp.dtype(d).name}{list(np.shape(v))}"
      for n, v, d in self.specs
    ]
    return "RangeCase(" + ", ".join(parts) + ")"


@st.composite
def tree_and_magnitudes(draw, dtypes=RANGE_DTYPES, max_leaves=4, headroom=0):
  """A :class:`RangeCase`: 1..max_leaves leaves of shapes from RANGE_SHAPES, each
  of its own dtype and magnitude, from the dtype's smallest normal number to
  its largest finite one (squares that overflow float32 included), less
  ``headroom`` binades at the top."""
  n = draw(st.integers(1, max_leaves))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  specs = []
  for i in range(n):
    dtype = jnp.dtype(draw(st.sampled_from(dtypes)))
    info = jnp.finfo(dtype)
    lo, hi = float(np.log2(float(info.tiny))), float(np.log2(float(info.max)))
    top = draw(st.floats(lo + 3, hi - headroom))
    shape = draw(st.sampled_from(RANGE_SHAPES))
    logs = top - rng.uniform(0, 3, shape)  # within 8x of the leaf's magnitude
    signs = rng.choice([-1.0, 1.0], shape)
    values = np.clip(signs * np.exp2(logs), -float(info.max), float(info.max))
    specs.append((f"p{i}", values, dtype))
  return RangeCase(specs)
