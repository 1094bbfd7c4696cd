"""A smoke test of the benchmark suite's quick pass (timings are never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_pass_writes_every_table(tmp_path):
  env = dict(os.environ, GRADCTL_BENCH_RESULTS=str(tmp_path), PYTHONPATH=str(ROOT))
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.run", "--quick"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("throughput", "compile_time", "train_step", "memory"):
    text = (tmp_path / f"{name}.md").read_text()
    assert text.startswith(f"# {name}") and "Machine: " in text and "|---|" in text
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["machine"]["jax"]
  rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
  assert {r["transform"] for r in rows} == {
    "clip_by_value",
    "clip_by_global_norm",
    "unit_rescale",
    "zscore",
  }
  for r in rows:
    assert r["gradctl"]["donated"] > 0 and r["ratio_other"] > 0
  assert (tmp_path / "throughput.png").stat().st_size > 10_000
  memory = json.loads((tmp_path / "memory.json").read_text())["rows"]
  assert {r["name"] for r in memory} >= {"gc.clip_by_global_norm", "optax.clip_by_global_norm"}
