"""Every public transform, as used by the shared test suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

import optax_gradctl as gc


class Case(NamedTuple):
  factory: Callable[..., Any]
  kwargs: dict[str, Any]
  static: tuple[str, ...] = ()  # hyperparameters that inject_hyperparams must not trace

  def make(self):
    return self.factory(**self.kwargs)


CASES: dict[str, Case] = {
  "clip_by_value": Case(gc.clip_by_value, {"max_value": 0.5}),
  "clip_by_value_band": Case(gc.clip_by_value, {"max_value": -0.1, "min_value": -0.4}),
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
}
