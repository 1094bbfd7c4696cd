"""What the multi-process checks run, shared by the worker processes and the test.

Nothing here starts JAX's distributed runtime: the worker does that first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import optax_gradctl as gc

# The gradient: FSDP leaves split over the process axis ("data"), leaves split
# over both axes of the 2 x 4 mesh, and replicated ones.
SPECS = {
  "fsdp": P("data"),
  "both": P(("data", "model")),
  "cols": P(None, "model"),
  "bias": P(),
  "scale": P(),
}
AXES = {"fsdp": "data", "both": ("data", "model"), "cols": "model", "bias": None, "scale": None}
SHAPES = {"fsdp": (16, 6), "both": (32,), "cols": (3, 8), "bias": (5,), "scale": ()}


def global_gradient(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
  """The same numbers in every process (and in the test): a seeded draw."""
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def transforms() -> dict[str, optax.GradientTransformation]:
  """One configuration of each public transform; the shard_map runs add axis_name."""
  return {
    "clip_by_value": lambda **k: gc.clip_by_value(0.5, stats=True, **k),
    "clip_by_norm_linf_leaf": lambda **k: gc.clip_by_norm(0.5, norm="linf", scope="leaf", **k),
    "clip_by_global_norm": lambda **k: gc.clip_by_global_norm(1.0, **k),
    "unit_rescale_l1": lambda **k: gc.unit_rescale(norm="l1", **k),
    "zscore": lambda **k: gc.zscore(**k),
    "zclip": lambda **k: gc.zclip(warmup_steps=1, max_norm=3.0, **k),
    "autoclip": lambda **k: gc.autoclip(50.0, history=8, **k),
    "skip_on_spike": lambda **k: gc.skip_on_spike(optax.sgd(0.1), warmup_steps=1, **k),
    "adagc": lambda **k: gc.adagc(lambda_abs=0.5, warmup_steps=2, **k),
    "monitor": lambda **k: gc.monitor(**k),
    # no axis_name: under jit only
    "adaptive_grad_clip": lambda: gc.adaptive_grad_clip(0.05),
  }


SHARD_MAP = ("clip_by_value", "clip_by_norm_linf_leaf", "clip_by_global_norm", "unit_rescale_l1",
             "zscore", "zclip", "autoclip", "skip_on_spike", "adagc", "monitor")  # fmt: skip
ADAPTIVE = ("zclip", "autoclip", "skip_on_spike", "adagc")


# 60 steps of noise around the gradient of seed 1: spikes at 20, 21 and 35, and
# a NaN in one leaf at step 28.
SCALES = np.exp(np.random.default_rng(2).normal(0, 0.1, 60)) * np.where(
  np.isin(np.arange(60), (20, 21, 35)), 40.0, 1.0
)
NAN_STEP = 28


def spiky(base: dict, t: jax.Array) -> dict:
  """The gradient of step ``t``, made in the program from the shared base."""
  g = {k: v * jnp.asarray(SCALES, jnp.float32)[t] for k, v in base.items()}
  g["bias"] = jnp.where(t == NAN_STEP, jnp.nan, g["bias"])
  return g
