"""Hypothesis strategies: random gradient pytrees over dtypes and magnitudes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)

# log10 of the magnitudes drawn for each dtype: from its smallest normal
# numbers (1e-30 where the dtype reaches it) to near its maximum.
_LOG10_RANGE = {
  jnp.dtype(jnp.float16): (-4.0, 4.3),
  jnp.dtype(jnp.bfloat16): (-30.0, 37.5),
  jnp.dtype(jnp.float32): (-30.0, 37.5),
  jnp.dtype(jnp.float64): (-300.0, 300.0),
}


def leaf_values(rng: np.random.Generator, shape, dtype, log10_mag: float) -> jnp.ndarray:
  """Normal values of typical size 10**log10_mag, kept inside the dtype's range."""
  dtype = jnp.dtype(dtype)
  big = float(jnp.finfo(dtype).max) / 4
  vals = rng.standard_normal(shape) * 10.0**log10_mag
  return jnp.asarray(np.clip(vals, -big, big), dtype=dtype)


@st.composite
def gradient_trees(draw, dtypes=FLOAT_DTYPES, max_leaves=4, same_magnitude=False):
  """A dict pytree of 1..max_leaves float leaves of random shape, dtype and magnitude."""
  n = draw(st.integers(1, max_leaves))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  dtype0 = draw(st.sampled_from(dtypes))
  mag0 = draw(st.floats(*_LOG10_RANGE[jnp.dtype(dtype0)]))
  tree = {}
  for i in range(n):
    dtype = dtype0 if same_magnitude else draw(st.sampled_from(dtypes))
    lo, hi = _LOG10_RANGE[jnp.dtype(dtype)]
    mag = float(np.clip(mag0, lo, hi)) if same_magnitude else draw(st.floats(lo, hi))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=6))
    tree[f"p{i}"] = leaf_values(rng, shape, dtype, mag)
  return tree
