"""A small transformer's learning-rate sensitivity under each gradient control.

Wortsman et al. (2023, "Small-scale proxies for large-scale Transformer
training instabilities", arXiv 2309.14322) showed that small transformers
trained at high learning rates show the instabilities of large ones: the
attention logits grow until the attention collapses, and the loss falls back
to that of a uniform guess. Their measure of robustness is the final loss as a
function of the learning rate, and its *LR sensitivity*: over the sweep, the
mean of ``min(final loss, initial loss) - best final loss``.

This script measures it for a pre-LayerNorm decoder-only transformer in Flax
NNX trained with AdamW (linear warm-up, cosine decay), with each gradient
control chained in front, and for the paper's architectural mitigation,
qk-layernorm, with no control. Every control sees the same initial weights
(one per seed) and the same batches, and all learning rates and seeds of one
control train at once (``vmap``).

The data is an order-2 Markov source over a small vocabulary, generated here
from a seed: each pair of previous tokens has its own next-token distribution,
drawn from a sparse Dirichlet. Its entropy rate is known, so each loss is also
reported above it. It is a fair proxy for the instability studied: the model
must learn token statistics through attention to the previous two positions,
so the attention logits carry the learning, and they are what grows at high
learning rates; and a stable learning rate learns it far below ``ln V``.

It writes, to ``--out``:

- ``lr_sensitivity.png``: final held-out loss against learning rate, one line
  per control, the mean over seeds with a min-max band;
- ``instability.png``: at the first learning rate above the uncontrolled
  run's best where it loses more than 0.1 nats, each control's loss and
  largest attention logit over training, and the uncontrolled run's gradient
  norm per layer group (``gc.monitor``);
- ``summary.md``: per control, the best loss, the LR sensitivity, the loss
  spikes, the diverged runs and the learning rates within 0.1 nats of the
  best;
- ``metrics.json``: one record per run (``control``, ``lr``, ``seed``,
  ``final_loss``, ``spikes``, ``first_nonfinite``, and more).

A *loss spike* is a step whose training loss exceeds 1.5 times the median of
the 20 steps before it. A run *diverged* if a step was not finite or its
final loss is above its initial loss.

Run ``python examples/transformer_lr_sweep.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optax_gradctl as gc

CONTROLS = (
  "none",
  "clip_by_global_norm",
  "zclip",
  "adagc",
  "adaptive_grad_clip",
  "skip_on_spike",
  "qk_layernorm",
)
SPIKE_RATIO, SPIKE_WINDOW = 1.5, 20
NEAR_BEST = 0.1  # nats

# --------------------------------------------------------------------------- data


def markov_source(vocab: int, alpha: float, seed: int) -> np.ndarray:
  """Next-token distributions [V, V, V] of an order-2 Markov source."""
  rng = np.random.default_rng(seed)
  return rng.dirichlet(np.full(vocab, alpha), size=(vocab, vocab))


def entropy_rate(probs: np.ndarray) -> float:
  """The source's entropy rate in nats: the next-token entropy of each pair
  of previous tokens, weighted by the pair's stationary probability."""
  vocab = probs.shape[0]
  pairs = np.full((vocab, vocab), 1.0 / vocab**2)
  for _ in range(500):  # power iteration: P(b, c) = sum_a P(a, b) p(c | a, b)
    pairs = np.einsum("ab,abc->bc", pairs, probs)
  with np.errstate(divide="ignore", invalid="ignore"):
    logs = np.where(probs > 0, np.log(probs), 0.0)
  return float(-np.sum(pairs[..., None] * probs * logs))


def sample(probs: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
  """``count`` sequences of ``length`` tokens from the source, int32."""
  vocab = probs.shape[0]
  cdf = np.cumsum(probs, axis=-1)
  out = np.empty((count, length), np.int32)
  out[:, :2] = rng.integers(0, vocab, (count, 2))
  for t in range(2, length):
    u = rng.random(count)[:, None]
    nxt = (cdf[out[:, t - 2], out[:, t - 1]] < u).sum(-1)
    out[:, t] = np.minimum(nxt, vocab - 1)
  return out


# --------------------------------------------------------------------------- model


class Attention(nnx.Module):
  """Causal multi-head self-attention; with ``qk_norm``, LayerNorm on queries
  and keys (the paper's mitigation of attention-logit growth)."""

  def __init__(self, d: int, heads: int, qk_norm: bool, rngs: nnx.Rngs):
    self.heads, self.dh = heads, d // heads
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.q_norm = nnx.LayerNorm(self.dh, rngs=rngs) if qk_norm else None
    self.k_norm = nnx.LayerNorm(self.dh, rngs=rngs) if qk_norm else None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, self.dh), 3, axis=2)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.dh)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    largest = jnp.max(jnp.where(causal, jnp.abs(logits), 0.0))
    return self.out(y), jax.lax.stop_gradient(largest)


class Block(nnx.Module):
  """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, d: int, heads: int, qk_norm: bool, rngs: nnx.Rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
    self.attn = Attention(d, heads, qk_norm, rngs)
    self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, largest = self.attn(self.ln1(x))
    x = x + a
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x)))), largest


class Decoder(nnx.Module):
  """Token and position embeddings, pre-LN blocks, a final LayerNorm and an
  output head."""

  def __init__(self, cfg: argparse.Namespace, qk_norm: bool, rngs: nnx.Rngs):
    d = cfg.d_model
    self.embed = nnx.Embed(cfg.vocab, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.context, d)))
    self.layers = cfg.layers
    for i in range(cfg.layers):  # attributes, not a list: one layout for every Flax
      setattr(self, f"block{i}", Block(d, cfg.heads, qk_norm, rngs))
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, cfg.vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    largest = jnp.zeros(())
    for i in range(self.layers):
      x, block_largest = getattr(self, f"block{i}")(x)
      largest = jnp.maximum(largest, block_largest)
    return self.head(self.ln_f(x)), largest


def layer_group(path: tuple) -> str:
  """A parameter's layer group, for gc.monitor: embeddings, each block's
  attention and MLP, and the head (with the final LayerNorm)."""
  names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  if names[0].startswith("block"):
    return f"{names[0]}/{'attn' if names[1] in ('attn', 'ln1') else 'mlp'}"
  return "embed" if names[0] in ("embed", "pos") else "head"


def cross_entropy(model: Decoder, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits, largest = model(tokens[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return jnp.mean(nll), largest


# --------------------------------------------------------------------------- controls


def make_tx(control: str, peak_lr: jax.Array, cfg: argparse.Namespace):
  """gc.monitor, then the control, in front of AdamW with linear warm-up and
  cosine decay; skip_on_spike wraps AdamW instead."""
  warmup = max(1, int(cfg.warmup_frac * cfg.steps))
  unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, cfg.steps, 0.0)
  adamw = optax.adamw(lambda count: peak_lr * unit(count), b2=0.95, weight_decay=cfg.weight_decay)
  controls = {
    "clip_by_global_norm": lambda: gc.clip_by_global_norm(1.0),
    "zclip": gc.zclip,
    "adagc": lambda: gc.adagc(warmup_steps=warmup),
    "adaptive_grad_clip": lambda: gc.adaptive_grad_clip(cfg.agc_clipping),
  }
  monitor = gc.monitor(layer_group)
  if control == "skip_on_spike":
    return optax.chain(monitor, gc.skip_on_spike(adamw, warmup_steps=warmup))
  if control in controls:
    return optax.chain(monitor, controls[control](), adamw)
  return optax.chain(monitor, adamw)  # "none" and the qk-layernorm reference


# --------------------------------------------------------------------------- training


def make_runner(control: str, cfg: argparse.Namespace, lrs: np.ndarray):
  """(initial states [R], the jitted block, the layer groups): R = learning
  rates x seeds, all vmapped; run r has learning rate ``lrs[r // seeds]``
  and seed ``r % seeds``. Each run builds its optimizer in the step, from its
  own (traced) peak learning rate."""
  qk_norm = control == "qk_layernorm"
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, qk_norm, nnx.Rngs(0))), nnx.Param)
  tx0 = make_tx(control, 1e-3, cfg)  # for the state's shapes: they do not depend on the rate
  per_seed = []
  for seed in range(cfg.seeds):
    params = nnx.split(Decoder(cfg, qk_norm, nnx.Rngs(seed)), nnx.Param)[1]
    per_seed.append((params, tx0.init(params)))
  runs = [per_seed[r % cfg.seeds] for r in range(len(lrs) * cfg.seeds)]
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *runs)
  groups: list[str] = []  # the monitor's group names, in the order of the curves

  def train_step(carry, tokens):
    (params, opt_state), peak_lr = carry
    tx = make_tx(control, peak_lr, cfg)
    loss_of = lambda p: cross_entropy(nnx.merge(graphdef, p), tokens)  # noqa: E731
    (loss, largest), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    extra = {"value": loss} if control == "skip_on_spike" else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    stats = gc.stats(opt_state)
    names = sorted(k for k in stats if "/group_norms/" in k)
    groups[:] = [k.split("/group_norms/", 1)[1] for k in names]
    acted = [v for k, v in stats.items() if k.endswith(("/clipped_fraction", "/skipped"))]
    acted = (jnp.max(acted[0]) > 0) if acted else jnp.zeros((), bool)
    norms = jnp.stack([stats[k] for k in names])
    curves = (loss, stats["0/monitor/norm"], norms, largest, acted)
    return ((params, opt_state), peak_lr), curves

  @jax.jit
  @jax.vmap
  def run_block(state, peak_lr, tokens, held_out):
    (state, _), curves = jax.lax.scan(train_step, (state, peak_lr), tokens)
    return state, curves, cross_entropy(nnx.merge(graphdef, state[0]), held_out)[0]

  return state, run_block, groups


def train(control: str, cfg: argparse.Namespace, data: dict, lrs: np.ndarray, bar: tqdm) -> dict:
  """Every learning rate and seed under one control: per-step curves [R, steps]."""
  state, run_block, groups = make_runner(control, cfg, lrs)
  runs = len(lrs) * cfg.seeds
  peak = jnp.asarray(np.repeat(lrs, cfg.seeds), jnp.float32)
  held_out = jnp.broadcast_to(data["held_out"], (runs, *data["held_out"].shape))
  curves, finals = [], None
  for lo in range(0, cfg.steps, cfg.block):
    tokens = data["train"][np.arange(runs) % cfg.seeds, lo : lo + cfg.block]
    state, block, finals = run_block(state, peak, jnp.asarray(tokens), held_out)
    curves.append([np.asarray(c) for c in block])
    bar.update(min(cfg.block, cfg.steps - lo))
  loss, norm, group_curves, largest, acted = (
    np.concatenate(c, axis=1) for c in zip(*curves, strict=True)
  )
  return {"loss": loss, "grad_norm": norm, "group_norms": group_curves, "groups": list(groups),
          "attention_logit": largest, "acted": acted, "final_loss": np.asarray(finals)}  # fmt: skip


# --------------------------------------------------------------------------- reporting


def spikes(loss: np.ndarray) -> int:
  """Steps whose loss exceeds SPIKE_RATIO times the median of the
  SPIKE_WINDOW steps before it."""
  count = 0
  for t in range(SPIKE_WINDOW, len(loss)):
    before = loss[t - SPIKE_WINDOW : t]
    if np.all(np.isfinite(before)) and np.isfinite(loss[t]):
      count += int(loss[t] > SPIKE_RATIO * np.median(before))
  return count


def records(control: str, run: dict, lrs: np.ndarray, cfg: argparse.Namespace) -> list[dict]:
  out = []
  for r in range(len(lrs) * cfg.seeds):
    loss = run["loss"][r]
    bad = np.flatnonzero(~np.isfinite(loss) | ~np.isfinite(run["grad_norm"][r]))
    final = float(run["final_loss"][r])
    out.append(
      {
        "control": control,
        "lr": float(lrs[r // cfg.seeds]),
        "seed": r % cfg.seeds,
        "final_loss": final if math.isfinite(final) else None,
        "initial_loss": float(loss[0]),
        "spikes": spikes(loss),
        "first_nonfinite": int(bad[0]) if bad.size else None,
        "max_attention_logit": float(np.nanmax(run["attention_logit"][r])),
        "max_grad_norm": float(np.nanmax(run["grad_norm"][r])),
        "steps_acted": int(np.sum(run["acted"][r])),  # clipped, or skipped
      }
    )
  return out


def summarize(rows: list[dict], entropy: float) -> dict[str, Any]:
  """Per control: the best mean final loss over learning rates, the LR
  sensitivity, spikes, diverged runs, and the learning rates near the best."""
  lrs = sorted({r["lr"] for r in rows})
  initial = np.mean([r["initial_loss"] for r in rows])

  def mean_final(lr):
    vals = [r["final_loss"] for r in rows if r["lr"] == lr]
    return float(np.mean([v if v is not None else np.nan for v in vals]))

  finals = {lr: mean_final(lr) for lr in lrs}
  capped = {lr: min(v, initial) if math.isfinite(v) else initial for lr, v in finals.items()}
  best = min(capped.values())
  near = [lr for lr in lrs if capped[lr] <= best + NEAR_BEST]
  diverged = sum(
    r["first_nonfinite"] is not None or (r["final_loss"] or math.inf) > r["initial_loss"]
    for r in rows
  )
  return {
    "best_loss": best,
    "best_above_entropy": best - entropy,
    "lr_sensitivity": float(np.mean([v - best for v in capped.values()])),
    "spikes": sum(r["spikes"] for r in rows),
    "acted": float(np.mean([r["steps_acted"] for r in rows])),
    "diverged": diverged,
    "runs": len(rows),
    "near_best": (min(near), max(near)),
    "mean_final_by_lr": finals,
  }


def write_summary(path: Path, table: dict, cfg: argparse.Namespace, info: dict) -> None:
  lines = [
    "# transformer_lr_sweep",
    "",
    f"Command: `{info['command']}`",
    "",
    f"Model: {cfg.layers} layers, width {cfg.d_model}, {cfg.heads} heads, context {cfg.context};"
    f" batch {cfg.batch}, {cfg.steps} steps of AdamW (warm-up {cfg.warmup_frac:.0%}, cosine decay);"
    f" {cfg.seeds} seeds. Data: order-2 Markov source over {cfg.vocab} tokens, entropy rate"
    f" {info['entropy']:.4f} nats (uniform: ln {cfg.vocab} = {math.log(cfg.vocab):.4f}). Wall time"
    f" {info['seconds']:.0f} s.",
    "",
    "| control | best loss | above entropy | LR sensitivity | loss spikes | diverged runs"
    " | LRs within 0.1 nats of best | steps clipped or skipped, per run |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, s in table.items():
    lo, hi = s["near_best"]
    lines.append(
      f"| {name} | {s['best_loss']:.4f} | {s['best_above_entropy']:.4f} | {s['lr_sensitivity']:.4f}"
      f" | {s['spikes']} | {s['diverged']}/{s['runs']} | {lo:.2g} to {hi:.2g} | {s['acted']:.1f} |"
    )
  lrs = list(next(iter(table.values()))["mean_final_by_lr"])
  lines += ["", "Mean final held-out loss over seeds, per learning rate:", ""]
  lines.append("| control | " + " | ".join(f"{lr:.2g}" for lr in lrs) + " |")
  lines.append("|---|" + "---|" * len(lrs))
  for name, s in table.items():
    cells = [f"{v:.3f}" if math.isfinite(v) else "NaN" for v in s["mean_final_by_lr"].values()]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  path.write_text("\n".join(lines) + "\n")


def plot(out: Path, runs: dict, rows: list[dict], lrs: np.ndarray, cfg) -> float:
  """Writes the two figures; returns the learning rate shown in the second."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in runs:
    finals = np.array(
      [[r["final_loss"] if r["final_loss"] is not None else np.nan for r in rows
        if r["control"] == name and r["lr"] == lr] for lr in lrs]
    )  # fmt: skip
    line = ax.plot(lrs, np.nanmean(finals, axis=1), marker="o", label=name)[0]
    ax.fill_between(lrs, np.nanmin(finals, axis=1), np.nanmax(finals, axis=1), alpha=0.15,
                    color=line.get_color())  # fmt: skip
  ax.axhline(math.log(cfg.vocab), color="gray", ls=":", lw=1, label=f"ln {cfg.vocab}")
  ax.set(xscale="log", xlabel="peak learning rate", ylabel="final held-out loss (nats)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "lr_sensitivity.png", dpi=120)
  plt.close(fig)

  none = {r["lr"]: [] for r in rows if r["control"] == "none"}
  for r in rows:
    if r["control"] == "none":
      none[r["lr"]].append(r["final_loss"] if r["final_loss"] is not None else np.inf)
  means = {lr: np.mean(v) for lr, v in none.items()}
  best_lr = min(means, key=means.get)
  above = [lr for lr in lrs if lr > best_lr and means[lr] > means[best_lr] + NEAR_BEST]
  unstable = above[0] if above else lrs[-1]
  r = int(np.flatnonzero(lrs == unstable)[0]) * cfg.seeds  # seed 0
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for name, run in runs.items():
    axes[0].plot(run["loss"][r], lw=1, label=name)
    axes[1].plot(run["attention_logit"][r], lw=1, label=name)
  for g, gname in enumerate(runs["none"]["groups"]):
    axes[2].plot(runs["none"]["group_norms"][r][:, g], lw=1, label=gname)
  axes[0].set(title=f"training loss, lr {unstable:.2g}, seed 0", xlabel="step", ylabel="nats")
  axes[1].set(title="largest |attention logit|", xlabel="step", yscale="log")
  axes[2].set(title="gradient norm per layer group, no control", xlabel="step", yscale="log")
  for a in axes:
    a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "instability.png", dpi=120)
  plt.close(fig)
  return float(unstable)


# --------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", type=Path, default=Path("examples/out/transformer"))
  p.add_argument("--controls", nargs="+", default=list(CONTROLS), choices=CONTROLS)
  p.add_argument("--lrs", nargs="+", type=float, default=list(np.geomspace(3e-4, 3e-1, 7)))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--block", type=int, default=50, help="steps per compiled scan")
  p.add_argument("--batch", type=int, default=12)
  p.add_argument("--context", type=int, default=24, help="tokens the model sees")
  p.add_argument("--vocab", type=int, default=8)
  p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the source")
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--warmup-frac", type=float, default=0.1)
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--agc-clipping", type=float, default=0.05)
  p.add_argument("--data-seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  cfg = parse(argv)
  cfg.out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  probs = markov_source(cfg.vocab, cfg.alpha, cfg.data_seed)
  rng = np.random.default_rng(cfg.data_seed + 1)
  train_tokens = sample(probs, cfg.seeds * cfg.steps * cfg.batch, cfg.context + 1, rng)
  data = {
    "train": train_tokens.reshape(cfg.seeds, cfg.steps, cfg.batch, cfg.context + 1),
    "held_out": jnp.asarray(sample(probs, 256, cfg.context + 1, rng)),
  }
  entropy = entropy_rate(probs)
  lrs = np.asarray(sorted(cfg.lrs))
  runs, rows = {}, []
  bar = tqdm(total=len(cfg.controls) * cfg.steps, desc="controls x steps", unit="step")
  for control in cfg.controls:
    bar.set_postfix(control=control)
    runs[control] = train(control, cfg, data, lrs, bar)
    rows += records(control, runs[control], lrs, cfg)
  bar.close()
  table = {c: summarize([r for r in rows if r["control"] == c], entropy) for c in cfg.controls}
  unstable = plot(cfg.out, runs, rows, lrs, cfg) if "none" in runs else None
  info = {
    "command": "python examples/transformer_lr_sweep.py " + " ".join(argv or []),
    "entropy": entropy,
    "seconds": time.perf_counter() - started,
  }
  write_summary(cfg.out / "summary.md", table, cfg, info)
  meta = {**info, "unstable_lr": unstable, "config": {k: str(v) for k, v in vars(cfg).items()}}
  (cfg.out / "metrics.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
  print((cfg.out / "summary.md").read_text())


if __name__ == "__main__":
  main()
