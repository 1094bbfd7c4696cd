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
can do, written here; and the same clip with gradctl's exact output (the
leaf itself where nothing is rescaled, else two factors), which shows what
that output form costs on its own.

For each step it also counts the kernels of the compiled program (fusions
and custom calls, conditional branches included) and, lowered for a GPU
(which works on any machine), the reductions that read gradient data.

The ratio to the plain clip moves by 10-20% from one compiled program to the
next on a CPU (buffers land differently), so on a CPU every step is compiled
and timed three times, and the table gives the median and the range.

Run: ``python -m benchmarks.train_step [--quick] [--repeats R]``
"""

from __future__ import annotations

import re

import numpy as np

from benchmarks import common


def plain_clip(max_norm: float, exact_output: bool = False):
  """The naive global-norm clip: one sum of squares per leaf, one factor.

  With ``exact_output``, the same sums with gradctl's output form instead of
  the one multiply (see :func:`common.clip_output`): what that form costs in
  a step, apart from everything else gradctl does."""
  import jax.numpy as jnp

  def clip(leaves):
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
    scale = jnp.where(norm > max_norm, max_norm / norm, 1.0)
    return common.clip_output(leaves, scale, exact_output)

  return common.leafwise_transform(clip)


def recorded(norm_fn):
  """A transform that records ``norm_fn`` of the gradient in its state and
  returns the gradient unchanged: how a user logs a peer's norm."""
  import jax.numpy as jnp
  import optax

  return optax.GradientTransformation(
    lambda params: jnp.zeros(()), lambda updates, state, params=None: (updates, norm_fn(updates))
  )


# The smoke pass's controls: each kind of step, fewer programs to compile.
QUICK = (
  "adam alone",
  "plain clip",
  "optax.clip_by_global_norm",
  "gc.clip_by_global_norm",
  "gc.clip_by_value",
)


def controls(quick: bool = False) -> dict:
  import optax

  import optax_gradctl as gc

  every = {
    "adam alone": None,
    "plain clip": plain_clip(1.0),
    "plain clip, exact output": plain_clip(1.0, exact_output=True),
    "optax.clip_by_global_norm": optax.clip_by_global_norm(1.0),
    "gc.clip_by_global_norm": gc.clip_by_global_norm(1.0),
    # per-layer norms next to the clip: the same reads, shared
    "gc.monitor + gc.clip_by_global_norm": optax.chain(gc.monitor(), gc.clip_by_global_norm(1.0)),
    # norms recorded alone: a statistic the update does not wait for
    "gc.monitor": gc.monitor(),
    "optax.global_norm, recorded": recorded(optax.global_norm),
    "gc.clip_by_norm(scope=leaf)": gc.clip_by_norm(1.0, scope="leaf"),
    "gc.unit_rescale": gc.unit_rescale(),
    "optax.normalize_by_update_norm": optax.normalize_by_update_norm(scale_factor=1.0),
    "gc.zscore": gc.zscore(),
    "gc.zclip": gc.zclip(),
    "gc.autoclip": gc.autoclip(),
    "optax.clip": optax.clip(1e-3),
    "gc.clip_by_value": gc.clip_by_value(1e-3),
    "gc.clip_by_value(stats=True)": gc.clip_by_value(1e-3, stats=True),
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


def _one_run(make, quick: bool) -> tuple[dict, dict]:
  """Each control's step compiled afresh (new buffers), timed interleaved:
  the median times, and each step's kernel counts."""
  calls, info = {}, {}
  for name, ctrl in controls(quick).items():
    calls[name], info[name] = make(ctrl)
  budget = 0.3 if quick else 4.0
  times = common.interleaved_times(calls, budget=budget * len(calls), min_rounds=3 if quick else 7)
  return times, info


def _over_plain(overhead: float, plain: float) -> float | None:
  """An overhead as a multiple of the plain clip's (None where that is not
  positive)."""
  return overhead / plain if plain > 0 else None


def _summary(runs: list[dict]) -> dict:
  """Per control, over the runs: the median time, the median overhead over
  Adam alone, and the overhead over the plain clip's in each run."""
  out = {}
  for name in runs[0]:
    pct = [100 * (t[name] / t["adam alone"] - 1) for t in runs]
    plain = [100 * (t["plain clip"] / t["adam alone"] - 1) for t in runs]
    out[name] = {
      "seconds": float(np.median([t[name] for t in runs])),
      "overhead_pct": float(np.median(pct)),
      "x_plain": [_over_plain(o, p) for o, p in zip(pct, plain, strict=True)],
    }
  return out


def run(quick: bool, repeats: int | None = None) -> dict:
  import jax

  gpu = jax.devices()[0].platform != "cpu"
  cfg = sizes(quick, gpu)
  repeats = repeats or (1 if quick or gpu else 3)
  out = {"config": cfg, "repeats": repeats}
  for kind, make in (
    ("optimizer", optimizer_step(*cfg["optimizer"])),
    ("mlp", mlp_step(*cfg["mlp"])),
  ):
    runs = []
    for _ in range(repeats):
      times, info = _one_run(make, quick)
      runs.append(times)
      pct = {k: f"{100 * (t / times['adam alone'] - 1):+.1f}%" for k, t in times.items()}
      print(kind, pct, flush=True)
    out[kind] = {name: {**row, **info[name]} for name, row in _summary(runs).items()}
  return out


def _ratio(name: str, row: dict) -> str:
  """The overhead as a multiple of the plain clip's: the median over the
  runs, and their range where there are several."""
  ratios = [r for r in row.get("x_plain", []) if r is not None]
  if name in ("adam alone", "plain clip") or not ratios:
    return "-"
  text = f"{np.median(ratios):.2f}×"
  if len(ratios) > 1:
    text += f" ({min(ratios):.2f} to {max(ratios):.2f})"
  return text


def report(data: dict) -> str:
  cfg = data["config"]
  n, leaves = cfg["optimizer"]
  layers, width, batch = cfg["mlp"]
  repeats = data.get("repeats", 1)
  runs = (
    f" Each step compiled and timed {repeats} times (runs); times and overheads are"
    " medians over the runs, x plain the median and range of the runs' ratios."
    if repeats > 1
    else ""
  )
  head = (
    f"Optimizer step: Adam update + apply_updates over N={n:.0e} in L={leaves} leaves."
    f" MLP step: {layers} tanh layers of {width}x{width}, batch {batch}, forward + backward +"
    " update. Parameters and optimizer state donated; overhead over Adam alone, each"
    " control's step timed interleaved with the others; x plain: overhead over the plain"
    f" clip's in the same run.{runs} Kernels: fusions and custom calls of the compiled step;"
    " GPU reductions: reductions over gradient data in the step lowered for CUDA.\n\n"
  )
  rows = []
  for name in data["optimizer"]:
    o, m = data["optimizer"][name], data["mlp"][name]
    rows.append(
      [
        name,
        common.fmt_time(o["seconds"]),
        f"{o['overhead_pct']:+.1f}%",
        _ratio(name, o),
        o["kernels"],
        "-" if o["gpu_reductions"] is None else o["gpu_reductions"],
        common.fmt_time(m["seconds"]),
        f"{m['overhead_pct']:+.1f}%",
        _ratio(name, m),
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
  repeats = common.repeats_option("each compiled afresh; default 3 on a CPU, else 1")
  common.run_script("train_step", __doc__, run, report, argv, options=(repeats,))


if __name__ == "__main__":
  main()
