"""Transform throughput against optax, PyTorch and the machine's memory bandwidth.

For float32 pytrees of N elements in L equal leaves (and bfloat16 at N = 1e7),
times one jitted call of each transform (median after warm-up), with the
input buffer donated and with a fresh output, and reports:

- the ratio to optax's counterpart and to PyTorch's in-place ``clip_grad_*_``;
- the effective GB/s at the minimum traffic (a value clip reads and writes
  each element once; a norm clip or z-score must also read it once before);
- that floor's share: the time the same traffic takes at the bandwidth of
  plain copy/reduce kernels measured in the same run.

PyTorch rows need ``pip install torch --index-url https://download.pytorch.org/whl/cpu``
and are skipped without it.

Run: ``python -m benchmarks.throughput [--quick]``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from benchmarks import common


def _tree(n: int, leaves: int, dtype) -> list:
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  size = n // leaves
  return [
    jnp.asarray(rng.standard_normal(size, dtype=np.float32) * 0.01, dtype) for _ in range(leaves)
  ]


def _jnp_zscore(tree):
  """A plain global z-score in jnp: statistics of the concatenated gradient.

  (Summing per-leaf partials in Python instead makes XLA copy the chain of
  partial sums into every leaf's kernel: at 1000 leaves that compiles for
  over ten minutes.)
  """
  import jax.numpy as jnp

  flat = jnp.concatenate([x.astype(jnp.float32).ravel() for x in tree])
  mean = jnp.mean(flat)
  inv = 1 / jnp.std(flat)
  return [((x.astype(jnp.float32) - mean) * inv).astype(x.dtype) for x in tree]


# The plain jnp z-score compiles one fused concatenation of every leaf, which
# XLA's CPU compiler handles in time quadratic in the leaf count: 441 s at
# 1000 leaves of 100 elements, twice per point. Above this many leaves it is
# left out (benchmarks/compile_time.py still measures it, with a timeout).
JNP_ZSCORE_MAX_LEAVES = 100


def implementations() -> dict[str, dict[str, Callable]]:
  """transform -> {implementation: factory of a pure function tree -> tree}."""
  import optax

  import optax_gradctl as gc

  def tx_fn(make):
    def fn(tree):
      tx = make()
      updates, state = tx.update(tree, tx.init(tree))
      return updates, state

    return fn

  return {
    "clip_by_value": {
      "gradctl": tx_fn(lambda: gc.clip_by_value(1e-3)),
      "optax": tx_fn(lambda: optax.clip(1e-3)),
    },
    "clip_by_value(stats=True)": {
      "gradctl": tx_fn(lambda: gc.clip_by_value(1e-3, stats=True)),
      "optax": tx_fn(lambda: optax.clip(1e-3)),
    },
    "clip_by_global_norm": {
      "gradctl": tx_fn(lambda: gc.clip_by_global_norm(1.0)),
      "optax": tx_fn(lambda: optax.clip_by_global_norm(1.0)),
    },
    "unit_rescale": {
      "gradctl": tx_fn(gc.unit_rescale),
      "optax": tx_fn(lambda: optax.normalize_by_update_norm(scale_factor=1.0)),
    },
    "zscore": {
      "gradctl": tx_fn(gc.zscore),
      "jnp": lambda tree: (_jnp_zscore(tree), None),
    },
  }


# bytes moved per element at the minimum: (read-only passes, read-write passes)
PASSES = {
  "clip_by_value": (0, 1),
  "clip_by_value(stats=True)": (0, 1),
  "clip_by_global_norm": (1, 1),
  "unit_rescale": (1, 1),
  "zscore": (1, 1),
}
TORCH = {
  "clip_by_value": "clip_grad_value_",
  "clip_by_value(stats=True)": "clip_grad_value_",
  "clip_by_global_norm": "clip_grad_norm_",
  "unit_rescale": "clip_grad_norm_",
  "zscore": "clip_grad_norm_",
}


def jax_calls(name: str, fn, tree) -> tuple[dict[str, Callable[[], None]], float]:
  """Blocking callables for ``fn`` with a fresh output and with a donated input,
  and the compile time of the former."""
  import jax

  t0 = time.perf_counter()
  fresh = jax.jit(fn).lower(tree).compile()
  compile_s = time.perf_counter() - t0
  donated = jax.jit(fn, donate_argnums=0).lower(tree).compile()
  box = [[x.copy() for x in tree]]

  def run_donated():
    out, _ = donated(box[0])
    box[0] = jax.block_until_ready(out)

  def run_fresh():
    jax.block_until_ready(fresh(tree))

  return {f"{name}/donated": run_donated, f"{name}/fresh": run_fresh}, compile_s


def torch_call(torch, op: str, tree, device: str = "cpu") -> Callable[[], None]:
  """PyTorch's in-place clip of the same gradient, on ``device``."""
  import jax.numpy as jnp

  dtypes = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16}
  dtype = dtypes[tree[0].dtype]
  params = []
  for x in tree:
    p = torch.zeros(x.size, dtype=dtype, device=device, requires_grad=True)
    p.grad = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(dtype).to(device)
    params.append(p)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def call():
    if op == "clip_grad_value_":
      torch.nn.utils.clip_grad_value_(params, 1e-3)
    else:
      torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    sync()

  return call


def grid(quick: bool, sizes=None, leaves=None, bf16_sizes=None) -> list[tuple[int, int, str]]:
  if sizes:
    points = [(int(float(n)), int(L), "float32") for n in sizes for L in leaves or (1,)]
    return points + [
      (int(float(n)), int(L), "bfloat16") for n in bf16_sizes or () for L in leaves or (1,)
    ]
  if quick:  # a smoke pass: one float32 and one bfloat16 point
    return [(100_000, 10, "float32"), (100_000, 1, "bfloat16")]
  points = [
    (n, L, "float32")
    for n in (100_000, 1_000_000, 10_000_000, 50_000_000)
    for L in (1, 10, 100, 1000)
  ]
  return points + [(10_000_000, L, "bfloat16") for L in (1, 100, 1000)]


def run(quick: bool = False, transforms: list[str] | None = None, points=None, budget=None) -> dict:
  import jax
  import jax.numpy as jnp

  budget = budget or (0.05 if quick else 1.0)
  info = common.machine()
  on_cpu = jax.devices()[0].platform == "cpu"
  bw_n = (
    1_000_000
    if quick
    else 50_000_000
    if on_cpu
    else max(n for n, _, _ in points or [(0, 0, 0)]) or 10**8
  )
  bw = common.bandwidth(n=bw_n, budget=budget)
  print(
    f"bandwidth: read {bw['read_GBps']:.1f} GB/s, in-place read+write {bw['inplace_GBps']:.1f} GB/s",
    flush=True,
  )
  torch = common.try_torch()
  impls = implementations()
  rows = []
  for n, leaves, dtype_name in points or grid(quick):
    dtype = getattr(jnp, dtype_name)
    tree = _tree(n, leaves, dtype)
    item = jnp.dtype(dtype).itemsize
    for transform, versions in impls.items():
      if transforms and transform not in transforms:
        continue
      reads, rws = PASSES[transform]
      floor = n * item * (reads / (bw["read_GBps"] * 1e9) + 2 * rws / (bw["inplace_GBps"] * 1e9))
      min_bytes = n * item * (reads + 2 * rws)
      row = {"transform": transform, "N": n, "L": leaves, "dtype": dtype_name, "floor_s": floor}
      calls, compiles = {}, {}
      versions = {
        k: f for k, f in versions.items() if not (k == "jnp" and leaves > JNP_ZSCORE_MAX_LEAVES)
      }
      for name, fn in versions.items():
        c, compiles[name] = jax_calls(name, fn, tree)
        calls.update(c)
      if torch and (on_cpu or torch.cuda.is_available()):
        calls["torch"] = torch_call(torch, TORCH[transform], tree, "cpu" if on_cpu else "cuda")
      times = common.interleaved_times(calls, budget=budget)
      for name in versions:
        row[name] = {
          "donated": times[f"{name}/donated"],
          "fresh": times[f"{name}/fresh"],
          "compile": compiles[name],
        }
      row["torch"] = times.get("torch")
      ours = row["gradctl"]["donated"]
      other = next((v for k, v in row.items() if k in ("optax", "jnp")), None)
      row["ratio_other"] = ours / other["donated"] if other else None
      row["ratio_other_fresh"] = row["gradctl"]["fresh"] / other["fresh"] if other else None
      row["ratio_torch"] = ours / row["torch"] if row["torch"] else None
      row["GBps"] = min_bytes / ours / 1e9
      row["pct_bandwidth"] = 100 * floor / ours
      rows.append(row)
      print(_row_text(row), flush=True)
  data = {"machine": info, "bandwidth": bw, "rows": rows}
  return data


HEADER = [
  "transform",
  "dtype",
  "N",
  "L",
  "gradctl (donated)",
  "vs optax/jnp",
  "vs torch",
  "GB/s",
  "% of bandwidth",
  "gradctl (fresh output)",
  "vs optax/jnp (fresh)",
  "compile gradctl / other",
]


def _ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def _cells(row: dict) -> list:
  other = row.get("optax") or row.get("jnp")
  return [
    row["transform"],
    row["dtype"],
    f"{row['N']:.0e}",
    row["L"],
    common.fmt_time(row["gradctl"]["donated"]),
    _ratio(row["ratio_other"]),
    _ratio(row["ratio_torch"]),
    f"{row['GBps']:.1f}",
    f"{row['pct_bandwidth']:.0f}%",
    common.fmt_time(row["gradctl"]["fresh"]),
    _ratio(row["ratio_other_fresh"]),
    f"{row['gradctl']['compile']:.2f} s / " + (f"{other['compile']:.2f} s" if other else "-"),
  ]


def _row_text(row: dict) -> str:
  return " | ".join(str(c) for c in _cells(row))


def report(data: dict) -> str:
  bw = data["bandwidth"]
  text = (
    f"Bandwidth measured in this run: read {bw['read_GBps']:.1f} GB/s, in-place read+write"
    f" {bw['inplace_GBps']:.1f} GB/s (best of NumPy and XLA kernels).\n\n"
    "Ratios are time(gradctl) / time(other), below 1 is faster. GB/s counts the minimum traffic;"
    " % of bandwidth is the time that traffic takes at the measured bandwidth over gradctl's time."
    f" The plain jnp z-score is not run above {JNP_ZSCORE_MAX_LEAVES} leaves: it compiles for"
    " minutes there (see compile_time.md).\n\n"
  )
  text += common.markdown_table(HEADER, [_cells(r) for r in data["rows"]])
  zs = {
    (r["N"], r["L"], r["dtype"]): r["gradctl"]["donated"]
    for r in data["rows"]
    if r["transform"] == "zscore"
  }
  cl = {
    (r["N"], r["L"], r["dtype"]): r["gradctl"]["donated"]
    for r in data["rows"]
    if r["transform"] == "clip_by_global_norm"
  }
  both = sorted(set(zs) & set(cl))
  if both:
    text += "\n\nzscore / clip_by_global_norm (gradctl, donated): " + ", ".join(
      f"N={k[0]:.0e} L={k[1]} {k[2]}: {zs[k] / cl[k]:.2f}x" for k in both
    )
  return text


def plot(data: dict, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  transforms = list(dict.fromkeys(r["transform"] for r in data["rows"]))
  fig, axes = plt.subplots(1, len(transforms), figsize=(4 * len(transforms), 3.6), squeeze=False)
  for ax, t in zip(axes[0], transforms, strict=True):
    rows = [
      r for r in data["rows"] if r["transform"] == t and r["dtype"] == "float32" and r["L"] == 1
    ]
    if not rows:
      continue
    n = np.array([r["N"] for r in rows], float)
    reads, rws = PASSES[t]
    per = 4 * (reads + 2 * rws)
    ax.plot(
      n,
      [per * r["N"] / r["gradctl"]["donated"] / 1e9 for r in rows],
      "o-",
      label="gradctl (donated)",
    )
    other = "optax" if "optax" in rows[0] else "jnp"
    ax.plot(
      n, [per * r["N"] / r[other]["donated"] / 1e9 for r in rows], "s-", label=f"{other} (donated)"
    )
    ax.plot(
      n,
      [per * r["N"] / r["gradctl"]["fresh"] / 1e9 for r in rows],
      "o:",
      label="gradctl (fresh output)",
    )
    if rows[0].get("torch"):
      ax.plot(n, [per * r["N"] / r["torch"] / 1e9 for r in rows], "^-", label="torch (in place)")
    ax.plot(n, [per * r["N"] / r["floor_s"] / 1e9 for r in rows], "k--", label="bandwidth floor")
    ax.set(
      xscale="log", xlabel="elements N (1 leaf, float32)", ylabel="GB/s at minimum traffic", title=t
    )
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="a small grid, for a smoke test")
  p.add_argument("--transforms", nargs="*", help="only these transforms")
  p.add_argument("--name", default="throughput", help="results file name")
  p.add_argument(
    "--sizes", nargs="*", help="total elements N (float32), e.g. 1e7 1e8; replaces the grid"
  )
  p.add_argument("--leaves", nargs="*", help="leaf counts L for --sizes")
  p.add_argument("--bf16-sizes", nargs="*", help="N for bfloat16 points with --sizes")
  p.add_argument("--budget", type=float, help="seconds of timing per point")
  args = p.parse_args(argv)
  pinned = common.pin_to_one_core()
  points = grid(args.quick, args.sizes, args.leaves, args.bf16_sizes) if args.sizes else None
  data = run(args.quick, args.transforms, points, args.budget)
  data["pinning"] = pinned
  command = "python -m benchmarks.throughput " + " ".join(
    argv if argv is not None else sys.argv[1:]
  )
  common.write_results(args.name, report(data), data, command.strip())
  plot(data, common.RESULTS / f"{args.name}.png")


if __name__ == "__main__":
  main()
