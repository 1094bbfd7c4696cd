"""Every public transform, as used by the shared test suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

import optax_gradctl as gc
from optax_gradctl._reduction.leaves import is_float


class Case(NamedTuple):
  factory: Callable[..., Any]
  kwargs: dict[str, Any]
  static: tuple[str, ...] = ()  # hyperparameters that inject_hyperparams must not trace
  # False where the output cannot reuse the input's buffer (it loses the batch axis)
  in_place: bool = True
  # False where the transform has no axis_name: it runs sharded under jit (GSPMD) only
  shard_map: bool = True
  # False where the state records no statistics (gc.stats gives {})
  stats: bool = True

  def make(self):
    return self.factory(**self.kwargs)


def one_example(l2_norm_clip, scope="global") -> optax.GradientTransformation:
  """per_example_clip on a batch of one: every float leaf gains a batch axis
  and loses it in the sum, so the suite sees its shapes unchanged."""
  inner = gc.per_example_clip(l2_norm_clip, scope=scope)

  def update(updates, state, params=None):
    batched = jax.tree.map(lambda x: x[None] if is_float(x) else x, updates)
    return inner.update(batched, state, params)

  return optax.GradientTransformation(inner.init, update)


CASES: dict[str, Case] = {
  # inject_hyperparams traces a bool as a number: stats must be static
  "clip_by_value": Case(gc.clip_by_value, {"max_value": 0.5, "stats": True}, static=("stats",)),
  "clip_by_value_band": Case(
    gc.clip_by_value, {"max_value": -0.1, "min_value": -0.4, "stats": True}, static=("stats",)
  ),
  "clip_by_value_no_stats": Case(gc.clip_by_value, {"max_value": 0.5}, stats=False),
  "clip_by_norm_l2_leaf": Case(gc.clip_by_norm, {"max_norm": 0.5, "scope": "leaf"}),
  "clip_by_norm_l1": Case(gc.clip_by_norm, {"max_norm": 0.5, "norm": "l1"}),
  "clip_by_norm_linf_leaf": Case(
    gc.clip_by_norm, {"max_norm": 0.5, "norm": "linf", "scope": "leaf"}
  ),
  "clip_by_global_norm": Case(gc.clip_by_global_norm, {"max_norm": 0.5}),
  "unit_rescale": Case(gc.unit_rescale, {}),
  "unit_rescale_l1_leaf": Case(gc.unit_rescale, {"norm": "l1", "scope": "leaf"}),
  "zscore": Case(gc.zscore, {}),
  "zscore_leaf_ddof1": Case(gc.zscore, {"scope": "leaf", "ddof": 1}),
  "zclip": Case(gc.zclip, {"z_threshold": 2.0, "warmup_steps": 1, "max_norm": 3.0}),
  "autoclip": Case(gc.autoclip, {"percentile": 50.0, "history": 8}, static=("history",)),
  "skip_on_spike": Case(gc.skip_on_spike, {"inner": optax.identity(), "warmup_steps": 1}),
  "adagc": Case(gc.adagc, {"lambda_abs": 0.5, "warmup_steps": 2}),
  "adaptive_grad_clip": Case(gc.adaptive_grad_clip, {"clipping": 0.05}, shard_map=False),
  "per_example_clip_leaf": Case(
    one_example, {"l2_norm_clip": 0.5, "scope": "leaf"}, in_place=False, shard_map=False
  ),
  # inject_hyperparams takes any callable for a schedule: groups must be static
  "monitor": Case(gc.monitor, {}, static=("groups",)),
}
