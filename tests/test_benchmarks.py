"""A smoke test of each benchmark's quick pass (timings are never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("throughput", "compile_time", "train_step", "memory")


@pytest.mark.scripts
@pytest.mark.parametrize("name", BENCHMARKS)
def test_quick_pass_writes_its_table(name, tmp_path):
  env = dict(os.environ, GRADCTL_BENCH_RESULTS=str(tmp_path), PYTHONPATH=str(ROOT))
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.run", "--quick", "--only", name],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = (tmp_path / f"{name}.md").read_text()
  assert text.startswith(f"# {name}") and "Machine: " in text and "|---|" in text
  data = json.loads((tmp_path / f"{name}.json").read_text())
  assert data["machine"]["jax"]
  if name == "throughput":
    rows = data["rows"]
    assert {r["transform"] for r in rows} == {
      "clip_by_value",
      "clip_by_value(stats=True)",
      "clip_by_global_norm",
      "unit_rescale",
      "zscore",
    }
    for r in rows:
      assert r["gradctl"]["donated"] > 0 and r["ratio_other"] > 0
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
  if name == "memory":
    assert {r["name"] for r in data["rows"]} >= {
      "gc.clip_by_global_norm",
      "optax.clip_by_global_norm",
    }
  if name == "train_step":
    for kind in ("optimizer", "mlp"):
      rows = data[kind]
      assert {"adam alone", "plain clip", "gc.clip_by_global_norm"} <= set(rows)
      assert all(r["seconds"] > 0 and r["kernels"] > 0 for r in rows.values())
      assert all(len(r["x_plain"]) == data["repeats"] for r in rows.values())
  if name == "compile_time":
    assert all(r["gradctl"]["compile_s"] > 0 for r in data["rows"])
    assert all(r["floor"]["compile_s"] > 0 for r in data["rows"])
    assert all(len(r["gradctl"]["runs_s"]) == data["repeats"] for r in data["rows"])
    bounds = ("plain clip", "stacked read, one multiply", "stacked read, exact output")
    for bound in (*bounds, "exact output alone"):
      assert all(r[bound]["compile_s"] > 0 for r in data["rows"])  # quick: only the clip


@pytest.mark.parametrize("exact", [False, True])
def test_compile_time_bounds_clip_as_optax_does(exact):
  """The clips that bound compile time are global-norm clips (over the
  ordinary range), so that what they compile is what a clip must."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from benchmarks.compile_time import stacked_clip

  rng = np.random.default_rng(0)
  shapes = [(3, 4)] * 5 + [(7,), (2, 2, 2)] * 3
  tree = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
  for max_norm in (0.5, 100.0):
    tx, peer = stacked_clip(max_norm, exact=exact), optax.clip_by_global_norm(max_norm)
    got, _ = jax.jit(tx.update)(tree, tx.init(tree))
    want, _ = peer.update(tree, peer.init(tree))
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_compile_time_exact_output_bound_scales_every_leaf():
  """The output-alone bound multiplies each leaf by its factor, within a
  rounding of each of the two factors."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks.compile_time import exact_output

  rng = np.random.default_rng(1)
  tree = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.ones((5,))}
  tx = exact_output(0.25)
  got, _ = jax.jit(tx.update)(tree, tx.init(tree))
  for k in tree:
    np.testing.assert_allclose(np.asarray(got[k]), 0.25 * np.asarray(tree[k]), rtol=3e-7)
