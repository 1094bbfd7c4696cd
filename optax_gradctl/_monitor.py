"""Watching the gradient: its norm per layer, recorded without changing it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import keystr

from optax_gradctl import _reduce, _stats

GroupFn = Callable[[tuple], Hashable]


def top_level(path: tuple) -> str:
  """The group of a leaf: the first key of its path, e.g. ``"encoder"`` for
  ``grads["encoder"]["layer_0"]["kernel"]`` (``"root"`` for a bare array)."""
  return keystr(path[:1], simple=True, separator="/") if path else "root"


@_stats.register("monitor")
class MonitorState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.monitor`."""

  norm: jax.Array  # float32 (): global L2 norm of the gradient
  group_norms: dict[str, jax.Array]  # float32 (): L2 norm of each group of leaves


def _group_names(tree: Any, groups: GroupFn) -> list[str]:
  """The group of each float leaf, in the order of :func:`_reduce.split_floats`."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [str(groups(path)) for path, x in flat if _reduce.is_float(x)]


def monitor(
  groups: GroupFn = top_level, *, axis_name: _reduce.AxisName = None
) -> optax.GradientTransformation:
  """Records the gradient's global norm and the norm of each group of leaves;
  returns the gradient unchanged.

  The groups are chosen by ``groups``, a function of each leaf's path (as
  ``jax.tree_util.tree_flatten_with_path`` gives it): by default the
  top-level key, so that a model's gradient shows one norm per top-level
  module. The norms come from the same overflow-safe reduction every
  transform here uses, and, chained next to one (``optax.chain(gc.monitor(),
  gc.clip_by_global_norm(1.0), ...)``), from the very same reads: XLA
  computes the identical sums once, so watching the layers costs no extra
  pass over the gradient. Alone, it reads the gradient once, and the update
  does not wait for that read.

  The global norm is exact over the whole float range. A group's norm counts
  its elements exactly down to ``2**-62``; smaller ones may count as zero
  (their squares are below float32's normal range), unless the whole
  gradient's norm is that small, which rescales every leaf. A group norm never
  exceeds the true one.

  Args:
    groups: maps a leaf's path to its group's name. (``inject_hyperparams``
      takes any callable for a schedule: list ``"groups"`` in its
      ``static_args``.)
    axis_name: mesh axes over which every leaf is partitioned, inside
      ``shard_map``.

  Returns:
    An :class:`optax.GradientTransformation` whose state,
    :class:`MonitorState`, records ``norm`` and ``group_norms``, a dict from
    group name to norm; :func:`stats` shows each as
    ``".../monitor/group_norms/<name>"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> g = {"encoder": {"w": jnp.array([3.0, 4.0])}, "head": {"w": jnp.array([12.0])}}
    >>> tx = gc.monitor()
    >>> updates, state = tx.update(g, tx.init(g))
    >>> {k: float(v) for k, v in gc.stats(state).items()}
    {'monitor/norm': 13.0, 'monitor/group_norms/encoder': 5.0, 'monitor/group_norms/head': 12.0}
  """

  def init_fn(params: Any) -> MonitorState:
    names = dict.fromkeys(_group_names(params, groups))
    return MonitorState(_stats.zeros(), {name: _stats.zeros() for name in names})

  def update_fn(updates, state, params=None):
    del state, params
    floats, _ = _reduce.split_floats(updates)
    names = _group_names(updates, groups)
    axes = _reduce.float_axes(axis_name, updates)
    red = _reduce.reduce(floats, axes=axes, watch=True)
    norms = _group_norms(red, names)
    return updates, MonitorState(red.norm, norms)

  return optax.GradientTransformation(init_fn, update_fn)


def _group_norms(red: _reduce.Reduction, names: Sequence[str]) -> dict[str, jax.Array]:
  if not names:
    return {}
  norms = _reduce.group_norms(red.leaf_sumsq, names)
  return {name: norms[name].astype(jnp.float32) for name in dict.fromkeys(names)}
