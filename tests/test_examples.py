"""The main example: its data generator, and a --quick run end to end."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gradctl as gc

from .examples_run import run_example

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import lstm_adding  # noqa: E402
import sharded_training  # noqa: E402


@pytest.mark.parametrize("seq_len", [2, 7, 50])
def test_adding_batch_has_two_markers_and_their_sum(seq_len):
  inputs, targets = lstm_adding.adding_batch(jax.random.key(seq_len), 256, seq_len)
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  assert inputs.shape == (256, seq_len, 2) and targets.shape == (256,)
  values, markers = inputs[..., 0], inputs[..., 1]
  assert set(np.unique(markers)) <= {0.0, 1.0}
  np.testing.assert_array_equal(markers.sum(axis=1), 2)
  half = seq_len // 2
  np.testing.assert_array_equal(markers[:, :half].sum(axis=1), 1)
  np.testing.assert_array_equal(markers[:, half:].sum(axis=1), 1)
  np.testing.assert_allclose(targets, (values * markers).sum(axis=1), rtol=1e-6)
  assert np.all((values >= 0) & (values < 1))


def test_predicting_one_gives_the_baseline_mse():
  _, targets = lstm_adding.adding_batch(jax.random.key(0), 200_000, 10)
  np.testing.assert_allclose(
    np.mean((np.asarray(targets) - 1.0) ** 2), lstm_adding.BASELINE_MSE, rtol=0.02
  )


def test_layer_groups_cover_both_cells():
  from flax import nnx

  for cell in ("lstm", "rnn"):
    cfg = lstm_adding.parse_args(["--cell", cell, "--hidden", "4"])
    params = nnx.state(lstm_adding.Regressor(cfg, nnx.Rngs(0)), nnx.Param)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    groups = {lstm_adding.layer_group(p) for p, _ in flat}
    assert groups == set(lstm_adding.GROUPS)


@pytest.mark.parametrize("control", lstm_adding.ALL_CONTROLS)
def test_every_control_builds_and_steps(control):
  cfg = lstm_adding.parse_args(["--optimizer", "adam", "--lr", "0.01"])
  tx = lstm_adding.make_tx(control, cfg)
  g = {"w": jnp.ones((3,))}
  updates, state = jax.jit(tx.update)(g, tx.init(g), g)
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  assert any(k.endswith("/norm") for k in gc.stats(state))


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    lstm_adding.parse_args(["--steps", "0"])
  with pytest.raises(SystemExit):
    lstm_adding.parse_args(["--controls", "magic"])


# Two controls: the run, its figures and its tables, for half the compiling.
QUICK_CONTROLS = ("clip_by_value", "clip_by_global_norm")


@pytest.mark.scripts
def test_quick_run_writes_its_artefacts(tmp_path):
  proc = run_example("lstm_adding.py", "--quick", "--controls", *QUICK_CONTROLS, out=tmp_path)
  assert "| control |" in proc.stdout and "wall time" in proc.stdout
  for name in ("lstm_adding.png", "lstm_adding_groups.png"):
    png = tmp_path / name
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert set(metrics) >= {"config", "groups", "runs", "wall_seconds"}
  assert set(metrics["runs"]) == set(QUICK_CONTROLS)
  for name in QUICK_CONTROLS:
    run = metrics["runs"][name]
    assert set(run) >= {"loss", "grad_norm", "group_norms", "eval_mse", "summary"}
    loss = np.asarray(run["loss"], float)
    assert loss.shape == (2, 200) and np.all(np.isfinite(loss))
    assert np.all(np.isfinite(np.asarray(run["grad_norm"], float)))
    assert np.all(np.isfinite(np.asarray(run["group_norms"], float)))
    assert run["summary"]["first_nonfinite_step"] is None
  summary = (tmp_path / "summary.md").read_text()
  for name in QUICK_CONTROLS:
    assert f"| {name} |" in summary


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("processes", ["1", "2"])
def test_sharded_example_matches_one_device(processes, capsys):
  """The example's main in this process (its 8 simulated devices); with
  --processes 2 it starts two workers of its own for the sharded runs."""
  argv = ["--steps", "8", "--log-every", "4", "--processes", processes, "--timeout", "300"]
  worst = sharded_training.main(argv)
  out = capsys.readouterr().out
  assert worst < 1e-5
  assert (
    f"largest relative difference of the recorded gradient norms from one device: {worst:.2e}"
    in out
  )
  assert "\n| 4 |" in out  # the table reached the last logged step
  if processes == "2":
    assert "norm, shard_map, 2 processes" in out
