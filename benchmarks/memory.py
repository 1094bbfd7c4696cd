"""Peak memory of a jitted transform over one large gradient, against optax.

Each implementation runs in a fresh process: it creates a float32 gradient of
N = 5e7 elements (200 MB), then calls the jitted update three times, with the
input donated or not. Reported: the peak resident memory above the process's
level just after creating the input, in units of the gradient's size. A
transform with no full-size temporaries needs about 0 copies donated, and 1
(its output) without donation.

Run: ``python -m benchmarks.memory [--quick]``
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import common

CASES = {
  "gc.clip_by_global_norm": "gc.clip_by_global_norm(1.0)",
  "optax.clip_by_global_norm": "optax.clip_by_global_norm(1.0)",
  "gc.clip_by_value": "gc.clip_by_value(1e-3)",
  "optax.clip": "optax.clip(1e-3)",
  "gc.unit_rescale": "gc.unit_rescale()",
  "gc.zscore": "gc.zscore()",
}

_CHILD = r"""
import json, resource, sys
import jax, jax.numpy as jnp, optax
import optax_gradctl as gc
n = int(sys.argv[1]); expr = sys.argv[2]; donate = sys.argv[3] == "1"
tx = eval(expr)
fn = jax.jit(lambda g: tx.update(g, tx.init(g))[0], donate_argnums=0 if donate else ())
spec = jax.ShapeDtypeStruct((n,), jnp.float32)
compiled = fn.lower(spec).compile()
def rss_peak():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# made on the device in one allocation, so that the peak so far is one copy
g = jax.jit(lambda: jnp.full((n,), 1e-3, jnp.float32) * jnp.arange(n, dtype=jnp.float32) / n)()
g.block_until_ready()
base = rss_peak()
import gc as pygc
for _ in range(3):
  out = compiled(g)
  out.block_until_ready()
  g = out if donate else g
  del out
  pygc.collect()
print(json.dumps({"peak_over_input_bytes": rss_peak() - base, "input_bytes": 4 * n}))
"""


def measure(n: int, expr: str, donate: bool) -> dict:
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD, str(n), expr, "1" if donate else "0"],
    capture_output=True,
    text=True,
    timeout=600,
  )
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-2000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict:
  n = 2_000_000 if quick else 50_000_000
  rows = []
  # the smoke pass: gradctl's global clip and optax's
  cases = {k: v for k, v in CASES.items() if not quick or "clip_by_global_norm" in k}
  for name, expr in cases.items():
    row = {"name": name, "N": n}
    for donate in (True, False):
      r = measure(n, expr, donate)
      row["donated" if donate else "fresh"] = r["peak_over_input_bytes"] / r["input_bytes"]
    rows.append(row)
    print(name, row, flush=True)
  return {"rows": rows}


def report(data: dict) -> str:
  n = data["rows"][0]["N"]
  text = (
    f"Peak resident memory above the level after creating a float32 gradient of N={n:.0e}"
    f" ({4 * n / 2**20:.0f} MiB), over three jitted calls, in copies of the gradient.\n\n"
  )
  rows = [[r["name"], f"{r['donated']:.2f}", f"{r['fresh']:.2f}"] for r in data["rows"]]
  return text + common.markdown_table(["transform", "donated input", "fresh output"], rows)


def main(argv: list[str] | None = None) -> None:
  common.run_script("memory", __doc__, run, report, argv)


if __name__ == "__main__":
  main()
