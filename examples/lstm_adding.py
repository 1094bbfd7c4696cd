"""An LSTM on the adding problem: exploding gradients, and what each control does about them.

The adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013): each
input is a sequence of T steps of (value ~ U[0, 1], marker). Exactly two steps
are marked, one in each half; the target is the sum of the two marked values.
Predicting the constant 1.0 gives a mean squared error of about 0.167; a run
counts as solved when its held-out MSE falls below 0.01.

One run trains the same Flax NNX model, from the same initial weights and on
the same batches, under each gradient control chained in front of the same
optimizer, over several seeds at once (vmapped), and writes:

- ``lstm_adding.png``: loss and global gradient norm against step, median
  over seeds with a min-max band, per control;
- ``lstm_adding_groups.png``: the gradient norm of each layer group
  (recurrent kernels, input kernels, cell biases, output head), which shows
  where the norm grows;
- ``metrics.json``: every run's curves; ``summary.md``: the summary table.

The global gradient norm is read from the gradctl transform's state with
``gc.stats``; the uncontrolled run chains ``gc.clip_by_global_norm(inf)``,
which returns the gradient bitwise unchanged and only records its norm.

Run ``python examples/lstm_adding.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optax_gradctl as gc

BASELINE_MSE = 1 / 6  # predicting the constant 1.0
SOLVED_MSE = 0.01
GROUPS = ("recurrent", "input", "cell_bias", "head")

# --------------------------------------------------------------------------- data


def adding_batch(key: jax.Array, batch: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
  """A batch of the adding problem: inputs [batch, seq_len, 2] and targets [batch]."""
  k_val, k_first, k_second = jax.random.split(key, 3)
  values = jax.random.uniform(k_val, (batch, seq_len))
  half = seq_len // 2
  first = jax.random.randint(k_first, (batch,), 0, half)
  second = jax.random.randint(k_second, (batch,), half, seq_len)
  steps = jnp.arange(seq_len)
  markers = (steps == first[:, None]) | (steps == second[:, None])
  inputs = jnp.stack([values, markers.astype(values.dtype)], axis=-1)
  targets = jnp.sum(jnp.where(markers, values, 0.0), axis=1)
  return inputs, targets


# --------------------------------------------------------------------------- model


class Regressor(nnx.Module):
  """A recurrent cell over the sequence, and a linear head on its last output."""

  def __init__(self, cfg: argparse.Namespace, rngs: nnx.Rngs):
    scale = cfg.recurrent_scale

    def scaled(init: Callable) -> Callable:
      return init if scale == 1.0 else lambda *a, **k: scale * init(*a, **k)

    if cfg.cell == "lstm":
      cell = nnx.LSTMCell(
        2, cfg.hidden, rngs=rngs, recurrent_kernel_init=scaled(nnx.initializers.orthogonal())
      )
    else:
      cell = nnx.SimpleCell(
        2, cfg.hidden, rngs=rngs, recurrent_kernel_init=scaled(nnx.initializers.orthogonal())
      )
    self.rnn = nnx.RNN(cell)
    self.head = nnx.Linear(
      cfg.hidden, 1, rngs=rngs, bias_init=nnx.initializers.constant(cfg.head_bias)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.rnn(x)[:, -1])[:, 0]


def layer_group(path: tuple) -> str:
  """Which of GROUPS a parameter belongs to, from its path in the model."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  names = [n for n in names if n != "value"]  # nnx Variables end paths in .value
  if "head" in names:
    return "head"
  if names[-1] == "bias":
    return "cell_bias"
  layer = names[-2]
  return "recurrent" if layer.startswith("h") or layer == "dense_h" else "input"


def group_norms(grads: Any) -> jax.Array:
  """The global L2 norm of each layer group of the gradient, [len(GROUPS)]."""
  flat, _ = jax.tree_util.tree_flatten_with_path(grads)
  members = {g: [] for g in GROUPS}
  for path, leaf in flat:
    members[layer_group(path)].append(leaf)
  return jnp.stack([gc.global_norm(members[g]) for g in GROUPS])


# --------------------------------------------------------------------------- controls


def make_tx(name: str, cfg: argparse.Namespace) -> optax.GradientTransformation:
  """The gradient control ``name`` in front of the optimizer."""
  opt = make_optimizer(cfg)
  if name in ("skip_on_spike", "skip_on_loss_spike"):
    # wraps the optimizer: a spike skips the whole step. The training step
    # gives skip_on_loss_spike the loss too (LOSS_AWARE).
    return gc.skip_on_spike(opt)
  if name == "none":
    control = gc.clip_by_global_norm(jnp.inf)  # changes nothing; records the norm
  elif name == "clip_by_value":
    control = gc.clip_by_value(cfg.clip_value, stats=True)
  elif name == "clip_by_global_norm":
    control = gc.clip_by_global_norm(cfg.max_norm)
  elif name == "unit_rescale":
    control = gc.unit_rescale()
  elif name == "zscore":
    control = gc.zscore()
  elif name == "zclip":
    control = gc.zclip()
  elif name == "autoclip":
    control = gc.autoclip()
  elif name == "adagc":
    control = gc.adagc()
  elif name == "adaptive_grad_clip":
    control = gc.adaptive_grad_clip(cfg.agc_clipping)
  else:
    raise ValueError(f"--controls: unknown control {name!r}; choose from {', '.join(ALL_CONTROLS)}")
  return optax.chain(control, opt)


CONTROLS = ("none", "clip_by_value", "clip_by_global_norm", "unit_rescale", "zscore")
ADAPTIVE = (
  "zclip",
  "autoclip",
  "skip_on_spike",
  "skip_on_loss_spike",
  "adagc",
  "adaptive_grad_clip",
)
ALL_CONTROLS = CONTROLS + ADAPTIVE
LOSS_AWARE = ("skip_on_loss_spike",)  # given the loss: tx.update(grads, state, params, value=loss)


def make_optimizer(cfg: argparse.Namespace) -> optax.GradientTransformation:
  if cfg.optimizer == "sgd":
    return optax.sgd(cfg.lr, momentum=cfg.momentum or None)
  if cfg.optimizer == "adam":
    return optax.adam(cfg.lr)
  if cfg.optimizer == "rmsprop":
    return optax.rmsprop(cfg.lr)
  raise ValueError(f"--optimizer: unknown optimizer {cfg.optimizer!r}")


# --------------------------------------------------------------------------- training


def make_runner(control: str, cfg: argparse.Namespace):
  """Returns (init, run_block), vmapped over seeds and jitted.

  ``run_block`` scans ``cfg.block`` training steps and then measures the MSE
  on a held-out batch.
  """
  tx = make_tx(control, cfg)

  def create(seed):
    model = Regressor(cfg, nnx.Rngs(jax.random.key(seed)))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: create(0)))

  def init(seeds):
    # eagerly, seed by seed: cheaper than compiling the construction
    states = [nnx.split(create(int(seed)))[1] for seed in seeds]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def loss_fn(model, inputs, targets):
    return jnp.mean((model(inputs) - targets) ** 2)

  def train_step(state, step_and_key):
    step, data_key = step_and_key
    model, opt = nnx.merge(graphdef, state)
    inputs, targets = adding_batch(jax.random.fold_in(data_key, step), cfg.batch, cfg.seq_len)
    if cfg.spike_every:
      # the spike scenario: from spike_start on, every spike_every-th batch has its
      # targets multiplied by spike_scale
      spike = (step % cfg.spike_every == 0) & (step >= cfg.spike_start)
      targets = jnp.where(spike, targets * cfg.spike_scale, targets)
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
    groups = group_norms(grads)
    opt.update(model, grads, **({"value": loss} if control in LOSS_AWARE else {}))
    norm = next(v for k, v in gc.stats(opt.opt_state).items() if k.endswith("/norm"))
    return nnx.state((model, opt)), (loss, norm, groups)

  @jax.jit
  @jax.vmap
  def run_block(state, data_key, eval_key, start):
    steps = start + jnp.arange(cfg.block)
    keys = jnp.broadcast_to(data_key, (cfg.block, *data_key.shape))
    state, curves = jax.lax.scan(train_step, state, (steps, keys))
    model, _ = nnx.merge(graphdef, state)
    inputs, targets = adding_batch(eval_key, cfg.eval_batch, cfg.seq_len)
    return state, curves, loss_fn(model, inputs, targets)

  return init, run_block


def _keys(cfg: argparse.Namespace, stream: int) -> jax.Array:
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(stream), s))(jnp.arange(cfg.seeds))


def prepare(control: str, cfg: argparse.Namespace) -> tuple[Any, Any]:
  """The initial states of all seeds, and the compiled training block."""
  init, run_block = make_runner(control, cfg)
  state = init(range(cfg.seeds))
  start = jnp.zeros((cfg.seeds,), jnp.int32)
  return state, run_block.lower(state, _keys(cfg, 1), _keys(cfg, 2), start).compile()


def train(control: str, cfg: argparse.Namespace, prepared: tuple[Any, Any]) -> dict[str, Any]:
  """Trains all seeds under one control; stops each seed at its first non-finite block."""
  state, run_block = prepared
  data_keys, eval_keys = _keys(cfg, 1), _keys(cfg, 2)
  n_blocks = math.ceil(cfg.steps / cfg.block)
  loss = np.full((cfg.seeds, n_blocks * cfg.block), np.nan)
  norm = np.full_like(loss, np.nan)
  groups = np.full((cfg.seeds, n_blocks * cfg.block, len(GROUPS)), np.nan)
  eval_steps, eval_mse = [], []
  first_nonfinite = [None] * cfg.seeds
  bar = tqdm(total=n_blocks * cfg.block, desc=f"{control:>20}", unit="step", leave=True)
  start_time = time.perf_counter()
  for b in range(n_blocks):
    lo, hi = b * cfg.block, (b + 1) * cfg.block
    start = jnp.full((cfg.seeds,), lo, jnp.int32)
    state, curves, mse = run_block(state, data_keys, eval_keys, start)
    b_loss, b_norm, b_groups = (np.asarray(c) for c in curves)
    mse = np.asarray(mse)
    for s in range(cfg.seeds):
      if first_nonfinite[s] is not None:
        continue
      bad = ~(np.isfinite(b_loss[s]) & np.isfinite(b_norm[s]))
      stop = int(np.argmax(bad)) if bad.any() else cfg.block
      loss[s, lo : lo + stop] = b_loss[s, :stop]
      norm[s, lo : lo + stop] = b_norm[s, :stop]
      groups[s, lo : lo + stop] = b_groups[s, :stop]
      if bad.any() or not np.isfinite(mse[s]):
        first_nonfinite[s] = lo + stop
    eval_steps.append(hi)
    eval_mse.append([m if first_nonfinite[s] is None else np.nan for s, m in enumerate(mse)])
    live = [s for s in range(cfg.seeds) if first_nonfinite[s] is None]
    bar.update(cfg.block)
    bar.set_postfix(
      loss=f"{np.median(b_loss[live, -1]):.4f}" if live else "diverged",
      grad_norm=f"{np.median(b_norm[live, -1]):.3g}" if live else "nan",
      live=f"{len(live)}/{cfg.seeds}",
    )
    if not live:
      break
  bar.close()
  seconds = time.perf_counter() - start_time
  steps_run = len(eval_steps) * cfg.block
  return {
    "loss": loss[:, :steps_run],
    "grad_norm": norm[:, :steps_run],
    "group_norms": groups[:, :steps_run],
    "eval_steps": np.asarray(eval_steps),
    "eval_mse": np.asarray(eval_mse).T,  # [seeds, evals]
    "first_nonfinite_step": first_nonfinite,
    "seconds": seconds,
    "steps_run": steps_run,
  }


# --------------------------------------------------------------------------- reporting


def summarize(run: dict[str, Any], cfg: argparse.Namespace) -> dict[str, Any]:
  finals, solved_at, spike_ratio = [], [], []
  for s in range(cfg.seeds):
    mse = run["eval_mse"][s]
    final = mse[-1] if run["first_nonfinite_step"][s] is None else np.nan
    finals.append(final)
    hit = np.flatnonzero(mse < SOLVED_MSE)
    solved_at.append(
      int(run["eval_steps"][hit[0]])
      if hit.size and np.isfinite(final) and final < SOLVED_MSE
      else None
    )
    norms = run["grad_norm"][s]
    finite = norms[np.isfinite(norms)]
    after = norms[100:][np.isfinite(norms[100:])]
    spike_ratio.append(
      float(after.max() / np.median(finite)) if after.size and finite.size else np.nan
    )
  solved = [x for x in solved_at if x is not None]
  nonfinite = [x for x in run["first_nonfinite_step"] if x is not None]
  finals_arr = np.asarray(finals, float)
  return {
    "median_final_mse": float(np.median(finals_arr))
    if np.all(np.isfinite(finals_arr))
    else (
      float(np.nanmedian(finals_arr))
      if np.isfinite(finals_arr).sum() * 2 > cfg.seeds
      else float("nan")
    ),
    "final_mse": [None if not np.isfinite(f) else float(f) for f in finals],
    "solved": len(solved),
    "seeds": cfg.seeds,
    "median_steps_to_solve": float(np.median(solved)) if solved else None,
    "max_norm_after_100_over_median": float(np.nanmedian(spike_ratio))
    if np.isfinite(spike_ratio).any()
    else None,
    "first_nonfinite_step": min(nonfinite) if nonfinite else None,
    "diverged_seeds": len(nonfinite),
  }


def summary_table(summaries: dict[str, dict[str, Any]]) -> str:
  rows = [
    "| control | median final MSE | solved | median steps to solve | max grad norm after step 100 / median | first non-finite step |",
    "|---|---|---|---|---|---|",
  ]
  for name, s in summaries.items():
    mse = "diverged" if not np.isfinite(s["median_final_mse"]) else f"{s['median_final_mse']:.4f}"
    steps = "-" if s["median_steps_to_solve"] is None else f"{s['median_steps_to_solve']:.0f}"
    ratio = (
      "-"
      if s["max_norm_after_100_over_median"] is None
      else f"{s['max_norm_after_100_over_median']:.3g}"
    )
    nonfinite = (
      "-"
      if s["first_nonfinite_step"] is None
      else f"{s['first_nonfinite_step']} ({s['diverged_seeds']}/{s['seeds']} seeds)"
    )
    rows.append(
      f"| {name} | {mse} | {s['solved']}/{s['seeds']} | {steps} | {ratio} | {nonfinite} |"
    )
  return "\n".join(rows)


def _band(ax, x, curves, color, label):
  with np.errstate(all="ignore"):
    live = np.isfinite(curves).any(axis=0)
    med = (
      np.nanmedian(np.where(np.isfinite(curves), curves, np.nan)[:, live], axis=0)
      if live.any()
      else None
    )
    if med is None:
      return
    lo = np.nanmin(curves[:, live], axis=0)
    hi = np.nanmax(curves[:, live], axis=0)
  ax.plot(x[live], med, color=color, label=label, lw=1.2)
  ax.fill_between(x[live], lo, hi, color=color, alpha=0.2, lw=0)


def plot(runs: dict[str, dict[str, Any]], cfg: argparse.Namespace, out: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = plt.get_cmap("tab10").colors
  fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, (name, run) in enumerate(runs.items()):
    x = np.arange(1, run["loss"].shape[1] + 1)
    _band(ax_loss, x, run["loss"], colors[i], name)
    _band(ax_norm, x, run["grad_norm"], colors[i], name)
  ax_loss.axhline(BASELINE_MSE, color="k", ls="--", lw=1, label="predict 1.0 (MSE 0.167)")
  ax_loss.axhline(SOLVED_MSE, color="gray", ls=":", lw=1, label="solved (MSE 0.01)")
  ax_loss.set(
    yscale="log",
    xlabel="step",
    ylabel="training MSE",
    title="Loss (median over seeds, min-max band)",
  )
  ax_norm.set(
    yscale="log",
    xlabel="step",
    ylabel="global gradient norm (before control)",
    title="Gradient norm",
  )
  ax_loss.legend(fontsize=8)
  title = (
    f"{cfg.cell.upper()} on the adding problem: T={cfg.seq_len}, H={cfg.hidden}, batch {cfg.batch}, "
    f"{cfg.optimizer} lr={cfg.lr}"
    + (f" momentum {cfg.momentum}" if cfg.optimizer == "sgd" else "")
    + f", {cfg.seeds} seeds"
  )
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out / "lstm_adding.png", dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), sharey=True, squeeze=False)
  for ax, (name, run) in zip(axes[0], runs.items(), strict=True):
    x = np.arange(1, run["loss"].shape[1] + 1)
    for j, group in enumerate(GROUPS):
      _band(ax, x, run["group_norms"][..., j], colors[j], group)
    ax.set(yscale="log", xlabel="step", title=name)
  axes[0, 0].set_ylabel("gradient norm of the group")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Where the gradient norm grows: per layer group (median over seeds, min-max band)")
  fig.tight_layout()
  fig.savefig(out / "lstm_adding_groups.png", dpi=110)
  plt.close(fig)


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, (np.floating, np.integer)):
    return _jsonable(x.item())
  return x


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument("--steps", type=int, default=1000, help="training steps per run")
  p.add_argument("--seq-len", type=int, default=50, help="sequence length T")
  p.add_argument("--hidden", type=int, default=64, help="hidden units H")
  p.add_argument("--batch", type=int, default=64, help="batch size")
  p.add_argument("--lr", type=float, default=1.0, help="learning rate")
  p.add_argument(
    "--optimizer",
    choices=("sgd", "adam", "rmsprop"),
    default="sgd",
    help="optimizer after the control",
  )
  p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0 for none)")
  p.add_argument(
    "--controls",
    nargs="+",
    choices=ALL_CONTROLS,
    default=list(CONTROLS),
    help="gradient controls to compare (the adaptive ones with their defaults; skip_on_spike"
    " wraps the optimizer, skip_on_loss_spike is skip_on_spike given the loss as well)",
  )
  p.add_argument(
    "--seeds", type=int, default=3, help="seeds per control (initial weights and data)"
  )
  p.add_argument(
    "--cell",
    choices=("lstm", "rnn"),
    default="lstm",
    help="LSTM, or a vanilla tanh RNN (nnx.SimpleCell)",
  )
  p.add_argument("--max-norm", type=float, default=1.0, help="threshold of clip_by_global_norm")
  p.add_argument("--clip-value", type=float, default=1.0, help="threshold of clip_by_value")
  p.add_argument(
    "--agc-clipping",
    type=float,
    default=0.05,
    help="adaptive_grad_clip's largest ratio of a unit's gradient norm to its parameter norm",
  )
  p.add_argument(
    "--recurrent-scale",
    type=float,
    default=1.0,
    help="scale of the orthogonal recurrent kernel init",
  )
  p.add_argument(
    "--head-bias", type=float, default=0.0, help="initial output bias (1.0 is the target mean)"
  )
  p.add_argument("--spike-every", type=int, default=0, help="corrupt every N-th batch (0: never)")
  p.add_argument(
    "--spike-scale", type=float, default=1000.0, help="factor on the targets of corrupted batches"
  )
  p.add_argument(
    "--spike-start", type=int, default=0, help="first step at which batches may be corrupted"
  )
  p.add_argument("--block", type=int, default=50, help="steps per jitted scan block")
  p.add_argument("--eval-batch", type=int, default=512, help="held-out batch for the MSE")
  p.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="output directory")
  p.add_argument(
    "--quick", action="store_true", help="a smoke run of under a minute (small model, few steps)"
  )
  cfg = p.parse_args(argv)
  if cfg.quick:
    cfg.steps, cfg.seq_len, cfg.hidden, cfg.seeds, cfg.block, cfg.eval_batch = (
      200,
      20,
      16,
      2,
      25,
      128,
    )
  for name in ("steps", "seq_len", "hidden", "batch", "seeds", "block", "eval_batch"):
    if getattr(cfg, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
  if cfg.seq_len < 2:
    p.error(f"--seq-len must be >= 2, got {cfg.seq_len}")
  return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_args(argv)
  cfg.out.mkdir(parents=True, exist_ok=True)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
  print("config:", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()})
  wall = time.perf_counter()
  # Compiling dominates short runs: compile every control's program at once.
  with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    prepared = list(pool.map(lambda name: prepare(name, cfg), cfg.controls))
  compile_seconds = time.perf_counter() - wall
  runs = {name: train(name, cfg, p) for name, p in zip(cfg.controls, prepared, strict=True)}
  wall = time.perf_counter() - wall
  summaries = {name: summarize(run, cfg) for name, run in runs.items()}
  table = summary_table(summaries)
  total_steps = sum(run["steps_run"] for run in runs.values()) * cfg.seeds
  train_seconds = wall - compile_seconds
  timing = (
    f"wall time {wall:.1f} s ({compile_seconds:.1f} s compiling, {train_seconds:.1f} s training at"
    f" {total_steps / train_seconds:.0f} seed-steps/s; {total_steps} steps over {len(runs)} controls x {cfg.seeds} seeds)"
  )
  plot(runs, cfg, cfg.out)
  command = (
    "python examples/lstm_adding.py " + " ".join(sys.argv[1:])
    if argv is None
    else "main(" + repr(argv) + ")"
  )
  (cfg.out / "summary.md").write_text(f"Command: `{command.strip()}`\n\n{table}\n\n{timing}\n")
  metrics = {
    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
    "groups": list(GROUPS),
    "runs": {name: {**runs[name], "summary": summaries[name]} for name in runs},
    "wall_seconds": wall,
  }
  (cfg.out / "metrics.json").write_text(json.dumps(_jsonable(metrics)))
  print()
  print(table)
  print()
  print(timing)
  print(
    f"wrote {cfg.out / 'lstm_adding.png'}, {cfg.out / 'lstm_adding_groups.png'}, metrics.json, summary.md"
  )
  return metrics


if __name__ == "__main__":
  main()
