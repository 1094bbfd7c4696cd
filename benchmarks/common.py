"""Shared benchmark helpers: the machine, timing, bandwidth, and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(os.environ.get("GRADCTL_BENCH_RESULTS", Path(__file__).parent / "results"))


def pin_to_one_core() -> str:
  """Runs this process on one core, as the timings in the README were taken.

  On a shared 2-core machine, timings pinned to one core repeat within about
  10-20%; with both cores busy they lose 30-50% to pauses.
  """
  if hasattr(os, "sched_setaffinity") and os.environ.get("GRADCTL_BENCH_ALL_CORES") != "1":
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"
  return "all cores"


def machine() -> dict[str, Any]:
  import jax
  import optax

  cpu = platform.processor() or ""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  info = {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
    "device": str(jax.devices()[0].device_kind),
    "platform": jax.devices()[0].platform,
  }
  torch = try_torch()
  info["torch"] = torch.__version__ if torch else None
  return info


def try_torch():
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
  return torch


def median_time(
  fn: Callable[[], Any], *, min_repeats: int = 5, budget: float = 1.0, warmup: int = 2
) -> float:
  """Median wall time of ``fn()`` in seconds; ``fn`` must block until done."""
  for _ in range(warmup):
    fn()
  times = []
  start = time.perf_counter()
  while len(times) < min_repeats or (time.perf_counter() - start < budget and len(times) < 200):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def interleaved_times(
  fns: dict[str, Callable[[], Any]], *, budget: float = 1.0, min_rounds: int = 7, warmup: int = 2
) -> dict[str, float]:
  """Median wall time of each ``fn()``, calling them in turn round after round.

  Interleaving makes the ratios fair on a noisy shared machine: a pause hits
  every implementation alike. The order is shuffled every round (seeded):
  a call right after a slow one (which evicts the caches and leaves pages to
  reclaim) runs measurably slower, and a fixed order would charge that to
  the same implementation every time. Each ``fn`` must block until done.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  order = list(fns)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  rounds = 0
  while rounds < min_rounds or (time.perf_counter() - start < budget and rounds < 200):
    rng.shuffle(order)
    for name in order:
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
    rounds += 1
  return {name: statistics.median(ts) for name, ts in times.items()}


def bandwidth(n: int = 50_000_000, budget: float = 2.0) -> dict[str, float]:
  """Streaming bandwidth of plain kernels on this machine, in GB/s.

  ``read``: a sum of squares (bytes read); ``inplace``: ``x *= a`` (bytes
  read plus written). Each is the best of a NumPy and a jitted XLA kernel,
  the latter with a donated buffer.
  """
  import jax
  import jax.numpy as jnp

  a = np.float32(1.0000001)
  on_cpu = jax.devices()[0].platform == "cpu"
  if on_cpu:
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    read_np = 4 * n / median_time(lambda: np.dot(x, x), budget=budget)
    inplace_np = 8 * n / median_time(lambda: np.multiply(x, a, out=x), budget=budget)
    xj = jnp.asarray(x)
  else:  # an accelerator: its own kernels only
    read_np = inplace_np = 0.0
    xj = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
  sumsq = jax.jit(lambda v: jnp.sum(v * v))
  read_xla = 4 * n / median_time(lambda: sumsq(xj).block_until_ready(), budget=budget)
  scale = jax.jit(lambda v: v * a, donate_argnums=0)
  box = [xj.copy()]

  def step():
    box[0] = scale(box[0])
    box[0].block_until_ready()

  inplace_xla = 8 * n / median_time(step, budget=budget)
  return {
    "read_GBps": max(read_np, read_xla) / 1e9,
    "inplace_GBps": max(inplace_np, inplace_xla) / 1e9,
    "read_numpy_GBps": read_np / 1e9,
    "read_xla_GBps": read_xla / 1e9,
    "inplace_numpy_GBps": inplace_np / 1e9,
    "inplace_xla_GBps": inplace_xla / 1e9,
  }


def clip_output(leaves: list, scale, exact: bool) -> list:
  """The output of a global-norm clip with factor ``scale``: ``x * scale``
  per leaf, or, with ``exact``, gradctl's form: the leaf itself where nothing
  is rescaled (subnormals included), else ``x`` times two factors (which
  reach norms beyond the float range)."""
  import jax.numpy as jnp
  from jax import lax

  if not exact:
    return [lax.mul(x, scale.astype(x.dtype)) for x in leaves]
  s = jnp.sqrt(scale)
  return [lax.select_n(s == 1, lax.mul(lax.mul(x, s), s), x) for x in leaves]


def leafwise_transform(fn):
  """A stateless ``optax.GradientTransformation`` that maps the list of the
  gradient's leaves through ``fn``: the benchmarks' hand-written clips."""
  import jax
  import optax

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    return jax.tree.unflatten(treedef, fn(leaves)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def repeats_option(default: str) -> tuple[str, dict[str, Any]]:
  """The ``--repeats`` option of :func:`run_script`; ``default`` says what
  the script does without it."""
  return ("--repeats", {"type": int, "default": None, "help": f"runs ({default})"})


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(name: str, text: str, data: dict[str, Any], command: str) -> None:
  """Prints ``text`` and writes it, with the machine, to results/<name>.md and .json."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  info = data.get("machine") or machine()
  head = (
    f"# {name}\n\nCommand: `{command}`\n\n"
    + "Machine: "
    + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None)
    + "\n\n"
  )
  (RESULTS / f"{name}.md").write_text(head + text + "\n")
  (RESULTS / f"{name}.json").write_text(
    json.dumps({**data, "machine": info}, indent=1, default=float)
  )
  print(head + text)


def fmt_time(seconds: float) -> str:
  if seconds < 1e-3:
    return f"{seconds * 1e6:.0f} µs"
  if seconds < 1:
    return f"{seconds * 1e3:.2f} ms"
  return f"{seconds:.2f} s"


def run_script(
  name: str, doc: str, run, report, argv: list[str] | None, options: tuple = ()
) -> None:
  """The command line of a benchmark with ``--quick``, ``--name`` and the
  script's own ``options`` (``(flag, add_argument keywords)`` pairs, passed
  to ``run`` by name): pins one core, runs, and writes results/<name>.md and
  .json with the command that made them."""
  import argparse
  import sys

  p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
  p.add_argument("--name", default=name, help=f"results file name (default {name})")
  for flag, kwargs in options:
    p.add_argument(flag, **kwargs)
  args = p.parse_args(argv)
  pinned = pin_to_one_core()
  extra = {flag.lstrip("-").replace("-", "_") for flag, _ in options}
  data = run(args.quick, **{k: getattr(args, k) for k in extra})
  data["pinning"] = pinned
  flags = " ".join(argv if argv is not None else sys.argv[1:])
  write_results(args.name, report(data), data, f"python -m benchmarks.{name} {flags}".strip())
