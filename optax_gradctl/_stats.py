"""Reading statistics back: the registry of state types, and :func:`stats`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr

# state type -> (name in stats keys, the fields that are statistics)
_REGISTRY: dict[type, tuple[str, tuple[str, ...]]] = {}
# all fields of a state type -> the (name, statistic fields) of each type with them
_BY_FIELDS: dict[frozenset[str], list[tuple[str, tuple[str, ...]]]] = {}


def register(name: str, fields: tuple[str, ...] | None = None):
  """Class decorator: makes a state type visible to :func:`stats` as ``name``.

  ``fields`` are its statistics (default: all of them). Its other fields are
  internal, or hold an inner optimizer's state, which :func:`stats` searches
  in turn.
  """

  def wrap(cls: type) -> type:
    entry = (name, tuple(cls._fields) if fields is None else fields)
    _REGISTRY[cls] = entry
    if len(cls._fields) > 1:  # one field ("norm") could be anything's in a plain dict
      known = _BY_FIELDS.setdefault(frozenset(cls._fields), [])
      if entry not in known:
        known.append(entry)
    return cls

  return wrap


def zeros() -> jax.Array:
  """The initial value of every statistic: a float32 zero scalar."""
  return jnp.zeros((), jnp.float32)


def as_statistic(value: Any) -> jax.Array:
  """A hyperparameter's value as a float32 statistic."""
  return jnp.asarray(value, jnp.float32)


def _is_state(x: Any) -> bool:
  return type(x) in _REGISTRY or _plain_state(x)


def _plain_state(x: Any) -> bool:
  """A state read back as a mapping of its field names: an ``nnx.State``, or
  the nested dicts of a checkpoint restored without a target."""
  return isinstance(x, Mapping) and frozenset(map(str, x.keys())) in _BY_FIELDS


def _entry(node: Any, where: str) -> tuple[str, tuple[str, ...]]:
  if type(node) in _REGISTRY:
    return _REGISTRY[type(node)]
  entries = _BY_FIELDS[frozenset(map(str, node.keys()))]
  if len(entries) > 1:
    names = " or ".join(name for name, _ in entries)
    raise ValueError(
      f"gc.stats: {where or 'the state'} holds the statistics of {names}, read back as plain"
      " mappings (nnx.state or nnx.split, or a checkpoint restored without a target), which"
      " no longer say which. Read them from the typed state: gc.stats(optimizer), or"
      " nnx.merge(graphdef, state), or a checkpoint restored with target=tx.init(params)."
    )
  return entries[0]


def _field(node: Any, field: str) -> Any:
  if isinstance(node, Mapping):
    return next(v for k, v in node.items() if str(k) == field)
  return getattr(node, field)


def _array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float)) or hasattr(x, "value")


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
  ``optax.apply_if_finite``, ``optax.masked``, a ``flax.nnx.Optimizer`` or
  its ``opt_state``, or a linen ``TrainState``.

  Read back as mappings of field names, a state has lost its type: an
  ``nnx.State`` (``nnx.state(optimizer)``, ``nnx.split``) or the nested
  dicts of a checkpoint restored without a target. Where its fields name one
  transform's state, its statistics are read as from the typed state. Where
  they could be several transforms' (``clip_by_norm`` and
  ``clip_by_global_norm``; ``clip_by_value`` and ``adaptive_grad_clip``),
  ``ValueError`` says so; ``unit_rescale`` and ``zscore(scope="leaf")``,
  whose state is ``norm`` alone, are not recognised in that form.

  Under ``optax.MultiSteps`` the inner transform runs once every
  ``every_k_schedule`` calls, on the accumulated gradient: the statistics of
  the calls between are those of the last step it ran.

  Args:
    opt_state: an optimizer state.

  Returns:
    A flat ``dict``. Each key is the path of a transform's state in
    ``opt_state``, the transform's name and the statistic, joined by ``/``
    (for instance ``"0/clip_by_global_norm/norm"`` in a chain); each value is
    an array (a scalar unless the state was batched, e.g. by ``vmap``):
    float32, but for the int32 counts ``skip_count`` and
    ``consecutive_skips`` of :func:`skip_on_spike`. A state that holds no
    gradctl transform's gives ``{}``.

  Raises:
    TypeError: for an object that is not a state, a tree of arrays (the
      transformation itself, say, rather than its state).
    ValueError: for a state read back as mappings that could be several
      transforms', as above.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import optax_gradctl as gc
    >>> tx = optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(g, tx.init(g))
    >>> {k: float(v) for k, v in gc.stats(state).items() if k.endswith("norm")}
    {'0/clip_by_global_norm/norm': 5.0, '0/clip_by_global_norm/compared_norm': 5.0}
  """
  leaves = jax.tree.leaves(opt_state)
  if leaves and not any(_array_like(x) for x in leaves):
    hint = " (pass its state, tx.init(params))" if hasattr(opt_state, "update") else ""
    raise TypeError(
      f"gc.stats reads an optimizer state, a tree of arrays; got {type(opt_state).__name__}{hint}"
    )
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
    name, fields = _entry(node, where)
    base = f"{where}/{name}" if where else name
    for field in fields:
      value = _field(node, field)
      if isinstance(value, Mapping):  # one statistic per name, e.g. per layer group
        for key, v in value.items():
          out[f"{base}/{field}/{key}"] = _value(v)
      else:
        out[f"{base}/{field}"] = _value(value)
    for field in _all_fields(node):
      if field not in fields:
        _collect(_field(node, field), (*path, jax.tree_util.GetAttrKey(field)), out)


def _all_fields(node: Any) -> tuple[str, ...]:
  return tuple(map(str, node.keys())) if isinstance(node, Mapping) else node._fields
