"""Which leaves of a gradient take part, and the dtype their sums accumulate in.

``None`` leaves vanish in flattening; integer and ``float0`` leaves are kept
aside and returned unchanged; complex leaves are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


def float_positions(leaves: Sequence[Any]) -> list[int]:
  """The positions of the float leaves among ``leaves``: the order every
  per-leaf value here follows."""
  return [i for i, x in enumerate(leaves) if is_float(x)]


def split_floats(tree: Any) -> tuple[list[jax.Array], Callable[[Sequence[Any]], Any]]:
  """Returns the float leaves of ``tree`` and a function that puts new ones back.

  The rebuild function returns the other leaves unchanged.
  """
  leaves, treedef = jax.tree.flatten(tree)
  index = float_positions(leaves)
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
