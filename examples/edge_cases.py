"""Where gradients explode: optax's built-ins next to optax_gradctl, case by case.

Prints the Markdown table quoted in the README. Run:
``python examples/edge_cases.py``
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradctl as gc


def describe(tree) -> str:
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  flat = np.concatenate([x.ravel() for x in leaves])
  if not np.all(np.isfinite(flat)):
    return (
      "NaN" if np.all(np.isnan(flat)) else f"non-finite ({np.sum(~np.isfinite(flat))}/{flat.size})"
    )
  if not np.any(flat):
    return "all zeros"
  norm = float(np.sqrt(np.sum((flat / np.abs(flat).max()) ** 2)) * np.abs(flat).max())
  return f"norm {norm:.4g}"


def run(tx, g):
  return tx.update(g, tx.init(g))[0]


CASES = [
  ("float16 gradient of 300s", lambda: jnp.full((4,), 300.0, jnp.float16)),
  ("float32 gradient of 1e20s", lambda: jnp.full((4,), 1e20, jnp.float32)),
  ("bfloat16, 1000 leaves of norm 1", lambda: [jnp.ones((1,), jnp.bfloat16) for _ in range(1000)]),
  ("float32 gradient of 1e-30s", lambda: jnp.full((4,), 1e-30, jnp.float32)),
  ("zero gradient", lambda: jnp.zeros((4,))),
  ("one NaN element", lambda: jnp.array([1.0, np.nan, 1.0, 1.0])),
  ("one inf element", lambda: jnp.array([1.0, np.inf, 1.0, 1.0])),
]

# Unit-wise clipping needs parameters: a 4 x 3 kernel, its 3 units of norm
# 0.1 * 2 * 100 = 20 at most.
AGC_CASES = [
  (
    "float16 4x3 kernel gradient of 300s, params of 100s",
    jnp.full((4, 3), 300.0, jnp.float16),
    jnp.full((4, 3), 100.0, jnp.float16),
  ),
  (
    "float32 4x3 kernel gradient of 1e20s, params of 1e19s",
    jnp.full((4, 3), 1e20, jnp.float32),
    jnp.full((4, 3), 1e19, jnp.float32),
  ),
]

PAIRS = [
  ("clip to norm 1", optax.clip_by_global_norm(1.0), gc.clip_by_global_norm(1.0)),
  ("rescale to norm 1", optax.normalize_by_update_norm(scale_factor=1.0), gc.unit_rescale()),
]


def main() -> None:
  print("| gradient | transform | optax | optax_gradctl |")
  print("|---|---|---|---|")
  for case, make in CASES:
    g = make()
    for what, theirs_tx, ours_tx in PAIRS:
      theirs, ours = run(theirs_tx, g), run(ours_tx, g)
      print(f"| {case} | {what} | {describe(theirs)} | {describe(ours)} |")
    print(
      f"| {case} | global norm | {float(optax.tree.norm(g)):.4g} | {float(gc.global_norm(g)):.4g} |"
    )
  for case, g, w in AGC_CASES:
    theirs = optax.adaptive_grad_clip(0.1).update(g, optax.EmptyState(), w)[0]
    ours = gc.adaptive_grad_clip(0.1).update(g, None, w)[0]
    print(f"| {case} | AGC, clipping 0.1 | {describe(theirs)} | {describe(ours)} |")


if __name__ == "__main__":
  main()
