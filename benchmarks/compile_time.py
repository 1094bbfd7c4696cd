"""Compile time against the number of leaves, against optax and the floor.

Each point compiles ``jax.jit(tx.update)`` for L float32 leaves of 1000
elements in a fresh subprocess (no cache), and counts the kernels (fusions)
in the compiled program. A point that takes longer than the timeout is
reported as "> timeout". Next to each gradctl transform is its peer (optax,
or the obvious jnp z-score) and, for the global-norm clip, the plain clip of
``benchmarks/train_step.py``: one sum of squares per leaf and one factor,
the obvious way to write it. Two more global-norm clips bound what a clip can
compile to (:func:`stacked_clip`): the leaves read in stacked groups, as
gradctl's common read, and then one multiply per leaf ("stacked read, one
multiply"), or gradctl's exact output per leaf ("stacked read, exact
output"). "exact output alone" (:func:`exact_output`) is that output with
nothing before it: no read and no norm, only a factor XLA cannot fold. The
floor is ``jax.tree.map(lambda a: a * 0.5, g)``: one output kernel per leaf,
which any transform that returns a new gradient compiles.

On a shared machine a point's slowest run took up to 1.6 times its fastest
(``runs_s`` in the results), so each point is the median of three runs
(``--repeats``).

Run: ``python -m benchmarks.compile_time [--quick] [--repeats R]``
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import common

CASES = {
  "clip_by_global_norm": {
    "gradctl": "gc.clip_by_global_norm(1.0)",
    "optax": "optax.clip_by_global_norm(1.0)",
    "plain clip": "plain_clip(1.0)",
    "stacked read, one multiply": "stacked_clip(1.0, exact=False)",
    "stacked read, exact output": "stacked_clip(1.0, exact=True)",
    "exact output alone": "exact_output(0.5)",
  },
  "clip_by_value": {"gradctl": "gc.clip_by_value(1.0)", "optax": "optax.clip(1.0)"},
  "clip_by_value(stats=True)": {
    "gradctl": "gc.clip_by_value(1.0, stats=True)",
    "optax": "optax.clip(1.0)",
  },
  "zscore": {"gradctl": "gc.zscore()", "jnp": "JNP_ZSCORE"},
}

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, optax
import optax_gradctl as gc
from benchmarks.throughput import _jnp_zscore
from benchmarks.train_step import plain_clip
from benchmarks.compile_time import stacked_clip, exact_output
L = int(sys.argv[1]); expr = sys.argv[2]
tree = [jax.ShapeDtypeStruct((1000,), jnp.float32) for _ in range(L)]
if expr == "JNP_ZSCORE":
  fn = lambda t: _jnp_zscore(t)
elif expr == "FLOOR":
  fn = lambda t: jax.tree.map(lambda a: a * 0.5, t)
else:
  tx = eval(expr)
  fn = lambda t: tx.update(t, tx.init(t))
t0 = time.perf_counter()
lowered = jax.jit(fn).lower(tree)
t1 = time.perf_counter()
compiled = lowered.compile()
t2 = time.perf_counter()
text = compiled.as_text()
print(json.dumps({"trace_s": t1 - t0, "compile_s": t2 - t1, "fusions": text.count("fusion("), "hlo_lines": text.count("\n")}))
"""


def stacked_clip(max_norm: float, exact: bool):
  """A global-norm clip cut down to what any such clip compiles: each
  shape's leaves read in stacked groups of ``gc.ReductionSettings().stack_group``, one reduction
  kernel per group as in gradctl's common read, then one output kernel per
  leaf. That kernel is ``x * scale`` alone, or, with ``exact``, gradctl's:
  the leaf itself where nothing is rescaled (subnormals included), else
  ``x`` times two factors. No rescue and no statistics, so not exact over
  the whole float range: a bound on compile time, not a clip to use."""
  import jax.numpy as jnp

  import optax_gradctl as gc

  group = gc.ReductionSettings().stack_group

  def clip(leaves):
    same: dict[tuple, list] = {}
    for x in leaves:
      same.setdefault(x.shape, []).append(x)
    groups = [g[k : k + group] for g in same.values() for k in range(0, len(g), group)]
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(jnp.stack(g))) for g in groups))
    # Factors out of a divide and a square root, which XLA computes once
    # rather than copying them into every output kernel, as gradctl's are.
    scale = max_norm / jnp.maximum(norm, max_norm)
    return common.clip_output(leaves, scale, exact)

  return common.leafwise_transform(clip)


def exact_output(scale: float):
  """gradctl's exact output per leaf (:func:`common.clip_output`) with the
  factor ``scale``, held behind a barrier so that XLA cannot fold it: what
  that output compiles to alone, with nothing read or reduced before it. A
  bound on compile time, not a transform to use."""
  import jax.numpy as jnp
  from jax import lax

  def output(leaves):
    factor = lax.optimization_barrier(jnp.float32(scale))
    return common.clip_output(leaves, factor, exact=True)

  return common.leafwise_transform(output)


def measure(leaves: int, expr: str, timeout: float, repeats: int = 1) -> dict:
  """The run with the median trace plus compile time of ``repeats`` runs,
  each in a fresh process, with every run's time in ``runs_s``; a run past
  the timeout ends the point there."""
  runs = []
  for _ in range(repeats):
    point = _measure_once(leaves, expr, timeout)
    if "timeout" in point:
      return point
    runs.append(point)
  runs.sort(key=_seconds)
  return {**runs[(len(runs) - 1) // 2], "runs_s": [_seconds(p) for p in runs]}


def _measure_once(leaves: int, expr: str, timeout: float) -> dict:
  try:
    proc = subprocess.run(
      [sys.executable, "-c", _CHILD, str(leaves), expr],
      capture_output=True,
      text=True,
      timeout=timeout,
    )
  except subprocess.TimeoutExpired:
    return {"timeout": timeout}
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-2000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(point: dict) -> str:
  if "timeout" in point:
    return f"> {point['timeout']:.0f} s"
  return f"{point['trace_s'] + point['compile_s']:.2f} s ({point['fusions']} kernels)"


def run(quick: bool, repeats: int | None = None) -> dict:
  leaf_counts = (10,) if quick else (1, 10, 100, 1000, 5000)
  timeout = 60.0 if quick else 120.0
  repeats = repeats or (1 if quick else 3)
  floors = {leaves: measure(leaves, "FLOOR", timeout, repeats) for leaves in leaf_counts}
  rows = []
  for transform, versions in CASES.items():
    if quick and transform != "clip_by_global_norm":
      continue
    for leaves in leaf_counts:
      row = {"transform": transform, "L": leaves, "floor": floors[leaves]}
      for name, expr in versions.items():
        row[name] = measure(leaves, expr, timeout, repeats)
      rows.append(row)
      print(
        transform, leaves, {k: fmt(v) for k, v in row.items() if isinstance(v, dict)}, flush=True
      )
  return {"rows": rows, "timeout_s": timeout, "repeats": repeats}


def _seconds(point: dict) -> float | None:
  return None if "timeout" in point else point["trace_s"] + point["compile_s"]


def _over_floor(point: dict, floor: dict) -> str:
  a, b = _seconds(point), _seconds(floor)
  return "-" if a is None or b is None else f"{a / b:.2f}×"


def report(data: dict) -> str:
  text = (
    "Trace plus compile time of `jax.jit(tx.update)` over L float32 leaves of 1000 elements,"
    " each in a fresh process; kernels = fusions in the compiled program. Floor:"
    " `jax.tree.map(lambda a: a * 0.5, g)`."
    f" Each time is the median of {data.get('repeats', 1)} runs (ratios: of the medians);"
    " a point past the timeout is run once.\n\n"
  )
  rows = []
  for r in data["rows"]:
    others = [k for k in r if k not in ("transform", "L", "gradctl", "floor")]
    rows.append(
      [
        r["transform"],
        r["L"],
        fmt(r["gradctl"]),
        "; ".join(f"{k}: {fmt(r[k])}" for k in others),
        fmt(r["floor"]),
        _over_floor(r["gradctl"], r["floor"]),
        "; ".join(f"{k}: {_over_floor(r[k], r['floor'])}" for k in others),
      ]
    )
  header = ["transform", "L", "gradctl", "other", "floor", "gradctl / floor", "other / floor"]
  return text + common.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
  repeats = common.repeats_option("per point; default 3, --quick 1")
  common.run_script("compile_time", __doc__, run, report, argv, options=(repeats,))


if __name__ == "__main__":
  main()
