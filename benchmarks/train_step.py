"""The cost of each transform inside a jitted Adam training step.

Two steps, each jitted with its parameters and optimizer state donated:

- ``optimizer``: the optimizer update and ``apply_updates`` over N = 1e7
  parameters in 100 leaves, given the gradient;
- ``mlp``: a whole step of a 100-layer tanh MLP (316 x 316 per layer, about
  1e7 parameters, batch 16), forward, backward and update.

Each is timed with Adam alone and with each transform chained in front; the
overhead is the extra time over Adam alone, next to optax's built-ins.

Run: ``python -m benchmarks.train_step [--quick]``
"""

from __future__ import annotations

import numpy as np

from benchmarks import common


def controls():
  import optax

  import optax_gradctl as gc

  return {
    "adam alone": None,
    "gc.clip_by_global_norm": gc.clip_by_global_norm(1.0),
    "optax.clip_by_global_norm": optax.clip_by_global_norm(1.0),
    "gc.clip_by_value": gc.clip_by_value(1e-3),
    "optax.clip": optax.clip(1e-3),
    "gc.unit_rescale": gc.unit_rescale(),
    "optax.normalize_by_update_norm": optax.normalize_by_update_norm(scale_factor=1.0),
    "gc.zscore": gc.zscore(),
  }


def optimizer_step(n: int, leaves: int):
  import jax
  import jax.numpy as jnp
  import optax

  rng = np.random.default_rng(0)
  params = [jnp.asarray(rng.standard_normal(n // leaves, dtype=np.float32)) for _ in range(leaves)]
  grads = [jnp.asarray(rng.standard_normal(n // leaves, dtype=np.float32)) for _ in range(leaves)]

  def make(ctrl):
    tx = optax.adam(1e-3) if ctrl is None else optax.chain(ctrl, optax.adam(1e-3))

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    fn = jax.jit(step, donate_argnums=(0, 1))
    box = [[p.copy() for p in params], tx.init(params)]

    def call():
      box[0], box[1] = jax.block_until_ready(fn(box[0], box[1], grads))

    return call

  return make


def mlp_step(layers: int, width: int, batch: int):
  import jax
  import jax.numpy as jnp
  import optax

  rng = np.random.default_rng(0)
  params = [
    jnp.asarray(rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width))
    for _ in range(layers)
  ]
  x = jnp.asarray(rng.standard_normal((batch, width), dtype=np.float32))
  y = jnp.asarray(rng.standard_normal((batch, width), dtype=np.float32))

  def loss(params):
    h = x
    for w in params:
      h = jnp.tanh(h @ w)
    return jnp.mean((h - y) ** 2)

  def make(ctrl):
    tx = optax.adam(1e-3) if ctrl is None else optax.chain(ctrl, optax.adam(1e-3))

    def step(params, state):
      g = jax.grad(loss)(params)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    fn = jax.jit(step, donate_argnums=(0, 1))
    box = [[p.copy() for p in params], tx.init(params)]

    def call():
      box[0], box[1] = jax.block_until_ready(fn(box[0], box[1]))

    return call

  return make


def run(quick: bool) -> dict:
  budget = 0.5 if quick else 4.0
  n, leaves = (1_000_000, 10) if quick else (10_000_000, 100)
  layers, width, batch = (10, 100, 16) if quick else (100, 316, 16)
  out = {}
  for kind, make in (
    ("optimizer", optimizer_step(n, leaves)),
    ("mlp", mlp_step(layers, width, batch)),
  ):
    calls = {name: make(ctrl) for name, ctrl in controls().items()}
    times = common.interleaved_times(calls, budget=budget * len(calls), min_rounds=5)
    base = times["adam alone"]
    out[kind] = {
      name: {"seconds": t, "overhead_pct": 100 * (t / base - 1)} for name, t in times.items()
    }
    print(kind, {k: f"{v['overhead_pct']:+.1f}%" for k, v in out[kind].items()}, flush=True)
  out["config"] = {
    "optimizer": {"N": n, "L": leaves},
    "mlp": {"layers": layers, "width": width, "batch": batch},
  }
  return out


def report(data: dict) -> str:
  cfg = data["config"]
  rows = []
  for name in data["optimizer"]:
    o, m = data["optimizer"][name], data["mlp"][name]
    rows.append(
      [
        name,
        common.fmt_time(o["seconds"]),
        f"{o['overhead_pct']:+.1f}%",
        common.fmt_time(m["seconds"]),
        f"{m['overhead_pct']:+.1f}%",
      ]
    )
  head = (
    f"optimizer step: Adam update + apply_updates over N={cfg['optimizer']['N']:.0e} in L={cfg['optimizer']['L']} leaves;"
    f" MLP step: {cfg['mlp']['layers']} tanh layers of {cfg['mlp']['width']}x{cfg['mlp']['width']}, batch {cfg['mlp']['batch']},"
    " forward + backward + update. Parameters and optimizer state donated; overhead is over Adam alone,"
    " timed interleaved in one run.\n\n"
  )
  return head + common.markdown_table(
    ["chain", "optimizer step", "overhead", "MLP step", "overhead"], rows
  )


def main(argv: list[str] | None = None) -> None:
  common.run_script("train_step", __doc__, run, report, argv)


if __name__ == "__main__":
  main()
