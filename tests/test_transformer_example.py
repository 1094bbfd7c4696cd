"""examples/transformer_lr_sweep.py: its data source, its measures, and a tiny run end to end."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from .examples_run import run_example

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import transformer_lr_sweep as sweep  # noqa: E402


def test_entropy_rate_of_known_sources():
  vocab = 5
  uniform = np.full((vocab, vocab, vocab), 1.0 / vocab)
  np.testing.assert_allclose(sweep.entropy_rate(uniform), math.log(vocab), rtol=1e-12)
  deterministic = np.zeros((vocab, vocab, vocab))
  for a in range(vocab):
    for b in range(vocab):
      deterministic[a, b, (a + b) % vocab] = 1.0
  assert sweep.entropy_rate(deterministic) == 0.0


def test_samples_follow_the_source():
  """The empirical next-token entropy of a long sample matches the rate."""
  probs = sweep.markov_source(4, 0.5, seed=3)
  tokens = sweep.sample(probs, 400, 200, np.random.default_rng(0))
  assert tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 4
  counts = np.zeros((4, 4, 4))
  np.add.at(counts, (tokens[:, :-2], tokens[:, 1:-1], tokens[:, 2:]), 1)
  pairs = counts.sum(-1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    cond = np.where(counts > 0, counts / pairs, 1.0)
  empirical = -np.sum(counts * np.log(cond)) / counts.sum()
  np.testing.assert_allclose(empirical, sweep.entropy_rate(probs), rtol=0.02)


def test_spikes_and_sensitivity_as_defined():
  loss = np.full(40, 2.0)
  loss[30] = 3.5  # above 1.5 times the median of the 20 steps before
  loss[35] = 2.9  # not
  assert sweep.spikes(loss) == 1
  rows = [
    {"lr": lr, "final_loss": f, "initial_loss": 2.0, "first_nonfinite": None, "spikes": 0,
     "steps_acted": 0}
    for lr, f in [(1e-3, 1.5), (1e-2, 1.0), (1e-1, 3.0), (1.0, None)]
  ]  # fmt: skip
  s = sweep.summarize(rows, entropy=0.5)
  assert s["best_loss"] == 1.0 and s["best_above_entropy"] == 0.5
  # min(final, initial) - best: 0.5, 0, 1 (capped at 2), 1 (diverged: the initial loss)
  assert s["lr_sensitivity"] == pytest.approx(2.5 / 4)
  assert s["near_best"] == (1e-2, 1e-2) and s["diverged"] == 2


@pytest.mark.scripts
def test_a_tiny_sweep_writes_its_artefacts(tmp_path):
  args = ["--steps", "12", "--block", "6", "--seeds", "1", "--lrs", "1e-3", "3e-1",
          "--d-model", "16", "--heads", "2", "--layers", "1", "--batch", "4", "--context", "8"]  # fmt: skip
  run_example("transformer_lr_sweep.py", *args, out=tmp_path)
  for name in ("lr_sensitivity.png", "instability.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  rows = json.loads((tmp_path / "metrics.json").read_text())["runs"]
  assert len(rows) == len(sweep.CONTROLS) * 2
  assert {r["control"] for r in rows} == set(sweep.CONTROLS)
  for r in rows:
    assert set(r) >= {"control", "lr", "seed", "final_loss", "spikes", "first_nonfinite"}
  summary = (tmp_path / "summary.md").read_text()
  assert all(f"| {c} |" in summary for c in sweep.CONTROLS)
