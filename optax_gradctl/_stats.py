"""Reading statistics back: the registry of state types, and :func:`stats`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr

# state type -> (name in stats keys, the fields that are statistics)
_REGISTRY: dict[type, tuple[str, tuple[str, ...]]] = {}


def register(name: str, fields: tuple[str, ...] | None = None):
  """Class decorator: makes a state type visible to :func:`stats` as ``name``.

  ``fields`` are its statistics (default: all of them). Its other fields are
  internal, or hold an inner optimizer's state, which :func:`stats` searches
  in turn.
  """

  def wrap(cls: type) -> type:
    _REGISTRY[cls] = (name, tuple(cls._fields) if fields is None else fields)
    return cls

  return wrap


def zeros() -> jax.Array:
  """The initial value of every statistic: a float32 zero scalar."""
  return jnp.zeros((), jnp.float32)


def _is_state(x: Any) -> bool:
  return type(x) in _REGISTRY


def _value(x: Any) -> jax.Array:
  # flax.nnx.Optimizer wraps every state array in a Variable.
  if not isinstance(x, (jax.Array, np.ndarray)):
    get = getattr(x, "get_value", None)
    x = get() if callable(get) else getattr(x, "value", x)
  return jnp.asarray(x)


def stats(opt_state: Any) -> dict[str, jax.Array]:
  """The statistics every gradctl transform records, read from any optimizer state.

  The state may be a single transform's state or any tree that holds one:
  ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``optax.apply_if_finite``, ``optax.masked``, a ``flax.nnx.Optimizer``'s
  ``opt_state`` or a linen ``TrainState``.

  Args:
    opt_state: an optimizer state.

  Returns:
    A flat ``dict``. Each key is the path of a transform's state in
    ``opt_state``, the transform's name and the statistic, joined by ``/``
    (for instance ``"0/clip_by_global_norm/norm"`` in a chain); each value is
    a float32 array (a scalar unless the state was batched, e.g. by ``vmap``).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optax_gradctl as gc
    >>> tx = optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(g, tx.init(g))
    >>> {k: float(v) for k, v in gc.stats(state).items()}
    {'0/clip_by_global_norm/norm': 5.0, '0/clip_by_global_norm/clipped_fraction': 1.0}
  """
  out: dict[str, jax.Array] = {}
  _collect(opt_state, (), out)
  return out


def _collect(tree: Any, prefix: tuple, out: dict[str, jax.Array]) -> None:
  found, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_state)
  for path, node in found:
    if not _is_state(node):
      continue
    path = prefix + tuple(path)
    where = keystr(path, simple=True, separator="/")
    name, fields = _REGISTRY[type(node)]
    base = f"{where}/{name}" if where else name
    for field in fields:
      value = getattr(node, field)
      if isinstance(value, dict):  # one statistic per name, e.g. per layer group
        for name, v in value.items():
          out[f"{base}/{field}/{name}"] = _value(v)
      else:
        out[f"{base}/{field}"] = _value(value)
    for field in node._fields:
      if field not in fields:
        _collect(getattr(node, field), (*path, jax.tree_util.GetAttrKey(field)), out)
