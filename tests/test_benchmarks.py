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
      "clip_by_value(stats=False)",
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
  if name == "compile_time":
    assert all(r["gradctl"]["compile_s"] > 0 for r in data["rows"])
    assert all(r["floor"]["compile_s"] > 0 for r in data["rows"])
    assert all(r["plain clip"]["compile_s"] > 0 for r in data["rows"])  # quick: only the clip
