"""The four transforms on the vector [0.7, 1.1, 3.4], as in the README.

Run: ``python examples/seed_example.py``
"""

import jax.numpy as jnp
import numpy as np

import optax_gradctl as gc

G = jnp.array([0.7, 1.1, 3.4])


def show(name: str, tx) -> None:
  updates, state = tx.update(G, tx.init(G))
  print(
    f"{name:<28} {np.round(np.asarray(updates), 3)}   stats: "
    + ", ".join(f"{k}={float(v):.4g}" for k, v in gc.stats(state).items())
  )


def main() -> None:
  print(f"g = {np.asarray(G)}")
  show("clip_by_value(1.0)", gc.clip_by_value(1.0))
  show("clip_by_global_norm(1.0)", gc.clip_by_global_norm(1.0))
  show("unit_rescale()", gc.unit_rescale())
  show("zscore()", gc.zscore())
  g = np.asarray(G, np.float64)
  print(f"mean {g.mean():.4f}, std {g.std():.4f}, variance {g.var():.4f}")
  print(
    f"(g - mean) / variance = {np.round((g - g.mean()) / g.var(), 2)}  <- the often-quoted numbers"
  )


if __name__ == "__main__":
  main()
