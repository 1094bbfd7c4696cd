"""Watching the gradient: its norm per layer, recorded without changing it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import keystr

from optax_gradctl import _stats
from optax_gradctl._reduction.finer import group_norms
from optax_gradctl._reduction.leaves import float_positions
from optax_gradctl._reduction.mesh import AxisName
from optax_gradctl._reduction.reduce import NORMS, NormOrd, Reduction, reduce_tree
from optax_gradctl._validation import check_choice

GroupFn = Callable[[tuple], Hashable]


def top_level(path: tuple) -> str:
  """The group of a leaf: the first key of its path, e.g. ``"encoder"`` for
  ``grads["encoder"]["layer_0"]["kernel"]`` (``"root"`` for a bare array)."""
  return keystr(path[:1], simple=True, separator="/") if path else "root"


@_stats.register("monitor")
class MonitorState(NamedTuple):
  """Statistics of the last step of :func:`~optax_gradctl.monitor`."""

  norm: jax.Array  #: float32 scalar: the global L2 norm of the gradient.
  group_norms: dict[str, jax.Array]  #: float32 scalars: each group's L2 norm, by name.


def _group_names(tree: Any, groups: GroupFn) -> list[str]:
  """The group of each float leaf, in the order of the reduction's leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [str(groups(flat[i][0])) for i in float_positions([x for _, x in flat])]


def monitor(
  groups: GroupFn = top_level, *, axis_name: AxisName = None
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
    names = _group_names(updates, groups)
    _, _, red = reduce_tree(updates, axis_name, watch=True)
    norms = _group_norms(red, names)
    return updates, MonitorState(red.norm, norms)

  return optax.GradientTransformation(init_fn, update_fn)


def _group_norms(red: Reduction, names: Sequence[str]) -> dict[str, jax.Array]:
  if not names:
    return {}
  norms = group_norms(red.leaf_sumsq, names)
  return {name: norms[name].astype(jnp.float32) for name in dict.fromkeys(names)}


def global_norm(tree: Any, norm: NormOrd = "l2", *, axis_name: AxisName = None) -> jax.Array:
  """The norm of a whole pytree, as a float32 scalar.

  This is the same overflow-safe reduction the transforms use: it accumulates
  in at least float32 and scales by a power of two when squares would
  overflow or underflow, so 1000 bfloat16 leaves of norm 1 give 31.62 and
  float16 leaves of 300 give the right norm. Where the true norm exceeds the
  float32 range the result is inf. ``None``, integer and ``float0`` leaves do
  not count; empty leaves count as zeros.

  Args:
    tree: a pytree of arrays.
    norm: ``"l2"``, ``"l1"`` or ``"linf"``.
    axis_name: inside ``shard_map``, the mesh axes over which the leaves are
      partitioned (a name, a tuple of names, or a pytree prefix of ``tree``
      with ``None`` for replicated leaves): the norm then covers the whole
      sharded tree.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: if ``norm`` is unknown.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> g = {"w": jnp.full((2,), 300.0, jnp.float16), "step": jnp.array(3)}
    >>> gc.global_norm(g)
    Array(424.26407, dtype=float32)
    >>> gc.global_norm(g, "linf")
    Array(300., dtype=float32)
  """
  check_choice("global_norm", "norm", norm, NORMS)
  floats, _, red = reduce_tree(tree, axis_name, scope="global", norms=(norm,), watch=True)
  if not floats:
    return jnp.zeros((), jnp.float32)
  return getattr(red, norm).to_float32()[0]
