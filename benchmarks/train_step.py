"""What each gradient control adds to a jitted Adam training step.

Two steps, each jitted with its parameters and optimizer state donated:

- ``optimizer``: the Adam update and ``apply_updates`` over N parameters in
  L leaves, given the gradient (N = 1e7 in 100 leaves on a CPU, 1e8 on a
  GPU);
- ``mlp``: a whole step of a tanh MLP (50 layers of 448 x 448, about 1e7
  parameters, batch 16 on a CPU; 12 layers of 4096 x 4096 on a GPU),
  forward, backward and update.

Each is timed with Adam alone and with each control chained in front,
interleaved round by round in one run; the overhead is the extra time over
Adam alone. Next to optax's built-ins is the *plain clip*: one sum of squares
per leaf and one scalar factor multiplied in, the least any global-norm clip
can do, written here.

For each step it also counts the kernels of the compiled program (fusions
and custom calls, conditional branches included) and, lowered for a GPU
(which works on any machine), the reductions that read gradient data.

Run: ``python -m benchmarks.train_step [--quick]``
"""

from __future__ import annotations

import re

import numpy as np

from benchmarks import common


def plain_clip(max_norm: float):
  """The naive global-norm clip: one sum of squares per leaf, one factor."""
  import jax
  import jax.numpy as jnp
  import optax

  def update(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
    scale = jnp.where(norm > max_norm, max_norm / norm, 1.0)
    return jax.tree.map(lambda x: (x * scale).astype(x.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# The smoke pass's controls: each kind of step, fewer programs to compile.
QUICK = (
  "adam alone",
  "plain clip",
  "optax.clip_by_global_norm",
  "gc.clip_by_global_norm",
  "gc.clip_by_value(stats=False)",
)


def controls(quick: bool = False) -> dict:
  import optax

  import optax_gradctl as gc

  every = {
    "adam alone": None,
    "plain clip": plain_clip(1.0),
    "optax.clip_by_global_norm": optax.clip_by_global_norm(1.0),
    "gc.clip_by_global_norm": gc.clip_by_global_norm(1.0),
    # per-layer norms next to the clip: the same reads, shared
    "gc.monitor + gc.clip_by_global_norm": optax.chain(gc.monitor(), gc.clip_by_global_norm(1.0)),
    "gc.clip_by_norm(scope=leaf)": gc.clip_by_norm(1.0, scope="leaf"),
    "gc.unit_rescale": gc.unit_rescale(),
    "optax.normalize_by_update_norm": optax.normalize_by_update_norm(scale_factor=1.0),
    "gc.zscore": gc.zscore(),
    "gc.zclip": gc.zclip(),
    "gc.autoclip": gc.autoclip(),
    "optax.clip": optax.clip(1e-3),
    "gc.clip_by_value(stats=False)": gc.clip_by_value(1e-3, stats=False),
    "gc.clip_by_value": gc.clip_by_value(1e-3),
  }
  return {k: v for k, v in every.items() if not quick or k in QUICK}


def kernels(compiled_text: str) -> int:
  """Kernels of a compiled XLA program: fusions and custom calls."""
  return len(re.findall(r" fusion\(|custom-call\(", compiled_text))


def gpu_reductions(step, args, min_size: int) -> int | None:
  """Reductions over at least ``min_size`` elements in the program lowered
  for a GPU (None where this jax cannot lower for one)."""
  import jax

  try:
    text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except Exception:  # a jaxlib without CUDA lowering rules
    return None
  count = 0
  for line in text.splitlines():
    if "stablehlo.reduce" not in line:
      continue
    m = re.search(r"\(tensor<([0-9x]+)x[a-z]+[0-9]+>", line)
    if m and np.prod([int(d) for d in m.group(1).split("x")]) >= min_size:
      count += 1
  return count


def _timed(step, params, state, extra):
  """A call that runs one donated step and keeps its outputs for the next."""
  import jax

  box = [params, state]

  def call():
    box[0], box[1] = jax.block_until_ready(step(box[0], box[1], *extra))

  return call


def optimizer_step(n: int, leaves: int):
  import jax
  import jax.numpy as jnp
  import optax

  keys = jax.random.split(jax.random.key(0), leaves)
  grads = [jax.random.normal(k, (n // leaves,)) for k in keys]
  params = [jnp.zeros_like(g) for g in grads]

  def make(ctrl):
    tx = optax.adam(1e-3) if ctrl is None else optax.chain(ctrl, optax.adam(1e-3))

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    fn = jax.jit(step, donate_argnums=(0, 1))
    text = fn.lower(params, state, grads).compile().as_text()
    copy = lambda t: jax.tree.map(lambda a: jnp.array(a, copy=True), t)  # noqa: E731
    info = {
      "kernels": kernels(text),
      "gpu_reductions": gpu_reductions(step, (params, state, grads), n // leaves),
    }
    return _timed(fn, copy(params), copy(state), (grads,)), info

  return make


def mlp_step(layers: int, width: int, batch: int):
  import jax
  import jax.numpy as jnp
  import optax

  keys = jax.random.split(jax.random.key(0), layers + 2)
  params = [jax.random.normal(k, (width, width)) / np.sqrt(width) for k in keys[:layers]]
  x = jax.random.normal(keys[-2], (batch, width))
  y = jax.random.normal(keys[-1], (batch, width))

  def loss(params):
    h = x
    for w in params:
      h = jnp.tanh(h @ w)
    return jnp.mean((h - y) ** 2)

  def make(ctrl):
    tx = optax.adam(1e-3) if ctrl is None else optax.chain(ctrl, optax.adam(1e-3))

    def step(params, state):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    fn = jax.jit(step, donate_argnums=(0, 1))
    text = fn.lower(params, state).compile().as_text()
    copy = lambda t: jax.tree.map(lambda a: jnp.array(a, copy=True), t)  # noqa: E731
    info = {
      "kernels": kernels(text),
      "gpu_reductions": gpu_reductions(step, (params, state), width * width),
    }
    return _timed(fn, copy(params), copy(state), ()), info

  return make


def sizes(quick: bool, gpu: bool) -> dict:
  if quick:
    return {"optimizer": (1_000_000, 10), "mlp": (6, 128, 16)}
  if gpu:
    return {"optimizer": (100_000_000, 100), "mlp": (12, 4096, 64)}
  return {"optimizer": (10_000_000, 100), "mlp": (50, 448, 16)}


def run(quick: bool) -> dict:
  import jax

  gpu = jax.devices()[0].platform != "cpu"
  cfg = sizes(quick, gpu)
  budget = 0.3 if quick else 4.0
  out = {"config": cfg}
  for kind, make in (
    ("optimizer", optimizer_step(*cfg["optimizer"])),
    ("mlp", mlp_step(*cfg["mlp"])),
  ):
    calls, info = {}, {}
    for name, ctrl in controls(quick).items():
      calls[name], info[name] = make(ctrl)
    times = common.interleaved_times(
      calls, budget=budget * len(calls), min_rounds=3 if quick else 7
    )
    base = times["adam alone"]
    out[kind] = {
      name: {"seconds": t, "overhead_pct": 100 * (t / base - 1), **info[name]}
      for name, t in times.items()
    }
    print(kind, {k: f"{v['overhead_pct']:+.1f}%" for k, v in out[kind].items()}, flush=True)
  return out


def _ratio(name: str, row: dict, plain: dict) -> str:
  """The overhead as a multiple of the plain clip's."""
  if name in ("adam alone", "plain clip") or plain["overhead_pct"] <= 0:
    return "-"
  return f"{row['overhead_pct'] / plain['overhead_pct']:.2f}×"


def report(data: dict) -> str:
  cfg = data["config"]
  n, leaves = cfg["optimizer"]
  layers, width, batch = cfg["mlp"]
  head = (
    f"Optimizer step: Adam update + apply_updates over N={n:.0e} in L={leaves} leaves."
    f" MLP step: {layers} tanh layers of {width}x{width}, batch {batch}, forward + backward +"
    " update. Parameters and optimizer state donated; overhead over Adam alone, timed"
    " interleaved in one run; x plain: overhead over the plain clip's. Kernels: fusions and"
    " custom calls of the compiled step; GPU reductions: reductions over gradient data in the"
    " step lowered for CUDA.\n\n"
  )
  rows = []
  for name in data["optimizer"]:
    o, m = data["optimizer"][name], data["mlp"][name]
    po, pm = data["optimizer"]["plain clip"], data["mlp"]["plain clip"]
    rows.append(
      [
        name,
        common.fmt_time(o["seconds"]),
        f"{o['overhead_pct']:+.1f}%",
        _ratio(name, o, po),
        o["kernels"],
        "-" if o["gpu_reductions"] is None else o["gpu_reductions"],
        common.fmt_time(m["seconds"]),
        f"{m['overhead_pct']:+.1f}%",
        _ratio(name, m, pm),
        m["kernels"],
      ]
    )
  header = [
    "chain",
    "optimizer step",
    "overhead",
    "x plain",
    "kernels",
    "GPU reductions",
    "MLP step",
    "overhead",
    "x plain",
    "kernels",
  ]
  return head + common.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
  common.run_script("train_step", __doc__, run, report, argv)


if __name__ == "__main__":
  main()
