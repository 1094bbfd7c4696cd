"""Comparisons of two pytrees of arrays, leaf by leaf."""

from __future__ import annotations

import jax
import numpy as np


def close(a, b, rtol=2e-6, atol=1e-7):
  """Every leaf of ``a`` within ``rtol`` and ``atol`` of ``b``'s, in float64."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
    )


def same_bits(x, y):
  """The same bytes, element for element."""
  np.testing.assert_array_equal(
    np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
  )


def identical(a, b):
  """The same structure, shapes, dtypes and bits."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    same_bits(x, y)
