"""Float64 NumPy references, written from the definitions and independent of the package."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def f64(x) -> np.ndarray:
  """Any float array (bfloat16 included) as a float64 NumPy array."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bfloat16:
    x = x.astype(jnp.float32)
  return np.asarray(x, dtype=np.float64)


def vector_norm(v: np.ndarray, ord: str) -> float:
  """The norm of a float64 vector, scaled by its largest element (no overflow)."""
  v = np.asarray(v, np.float64).ravel()
  if v.size == 0:
    return 0.0
  a = np.max(np.abs(v))
  if a == 0 or not np.isfinite(a):
    return float(a)
  if ord == "linf":
    return float(a)
  if ord == "l1":
    return float(a * np.sum(np.abs(v / a)))
  return float(a * np.sqrt(np.sum((v / a) ** 2)))


def scopes(leaves: list[np.ndarray], scope: str) -> list[list[int]]:
  return [list(range(len(leaves)))] if scope == "global" else [[i] for i in range(len(leaves))]


def norms(leaves, ord, scope):
  """Norm of each scope, and the leaves of each scope."""
  out = []
  for idx in scopes(leaves, scope):
    vec = np.concatenate([leaves[i].ravel() for i in idx]) if idx else np.zeros(0)
    out.append((vector_norm(vec, ord), idx))
  return out


def times_ratio(x, num, den):
  """``x * num / den`` with one rounding of each mantissa and no intermediate
  over- or underflow: in float64, ``num / den`` alone can be subnormal."""
  xm, xe = np.frexp(np.asarray(x, np.float64))
  nm, ne = np.frexp(num)
  dm, de = np.frexp(den)
  return np.ldexp(xm * nm / dm, xe + ne - de)


def clip_by_norm(leaves, max_norm, ord="l2", scope="global"):
  out = [None] * len(leaves)
  for n, idx in norms(leaves, ord, scope):
    for i in idx:
      out[i] = times_ratio(leaves[i], max_norm, n) if n > max_norm else leaves[i]
  return out


def unit_rescale(leaves, ord="l2", scope="global"):
  out = [None] * len(leaves)
  for n, idx in norms(leaves, ord, scope):
    for i in idx:
      out[i] = times_ratio(leaves[i], 1.0, n) if n > 0 else leaves[i] * 0.0
  return out


def zscore(leaves, scope="global", ddof=0):
  """(x - mean) / std per scope, two-pass in float64 on values scaled by their maximum."""
  out = [None] * len(leaves)
  for idx in scopes(leaves, scope):
    vec = np.concatenate([leaves[i].ravel() for i in idx] + [np.zeros(0)])
    if vec.size <= ddof:  # no elements: nothing to standardize
      for i in idx:
        out[i] = leaves[i] * 0.0
      continue
    a = np.max(np.abs(vec)) if vec.size else 0.0
    a = a if a > 0 else 1.0
    mean = np.mean(vec / a)
    std = np.sqrt(np.sum((vec / a - mean) ** 2) / (vec.size - ddof))
    for i in idx:
      out[i] = (leaves[i] / a - mean) / std if std > 0 else leaves[i] * 0.0
  return out


def zscore_moments(leaves, ddof=0):
  """Mean and std of all elements; 0 and 0 for no elements."""
  vec = np.concatenate([x.ravel() for x in leaves] + [np.zeros(0)])
  if vec.size == 0:
    return 0.0, 0.0
  a = np.max(np.abs(vec))
  a = a if a > 0 else 1.0
  return float(np.mean(vec / a) * a), float(np.std(vec / a, ddof=ddof) * a)


def clip_by_value(leaves, lo, hi):
  return [np.clip(x, lo, hi) for x in leaves]


def global_l2(leaves) -> float:
  return vector_norm(np.concatenate([x.ravel() for x in leaves]) if leaves else np.zeros(0), "l2")
