"""Two JAX processes, 4 CPU devices each, on 127.0.0.1: the statistics stay exact
and identical when the devices belong to different processes.

Once per test run, tests/multiprocess_launch.py starts
tests/multiprocess_worker.py twice (JAX's multi-controller runtime, gloo
collectives, the code path of a GPU cluster or a TPU pod) as soon as these
tests are collected, waits for both within a time limit, and ends them and
their process groups whatever happens. Each check here compares what the
processes saw with each other and with one process computing on the whole
gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gradctl as gc

from . import multiprocess_cases as cases
from . import multiprocess_launch as launch
from . import reference as ref
from .trees import close, identical


@pytest.fixture
def results(multiprocess_results) -> list[dict]:
  return multiprocess_results


@functools.cache
def one_process(name: str, seed: int):
  """The transform on the whole gradient of ``seed``, on one device."""
  tx = cases.transforms()[name]()
  g = jax.tree.map(jnp.asarray, cases.global_gradient(seed))
  updates, state = jax.jit(tx.update)(g, tx.init(g), g)
  return updates, {k: np.asarray(v) for k, v in gc.stats(state).items()}


def test_the_workers_ran_on_eight_devices_in_two_processes(results):
  assert [r["process_index"] for r in results] == list(range(launch.PROCESSES))
  assert all(r["devices"] == 4 * launch.PROCESSES for r in results)


def test_every_process_saw_the_same_bits(results):
  first = {k: v for k, v in results[0].items() if k != "process_index"}
  for other in results[1:]:
    identical(first, {k: v for k, v in other.items() if k != "process_index"})


@pytest.mark.parametrize("name", sorted(cases.transforms()))
def test_jit_over_global_arrays_matches_one_process(results, name):
  got = results[0][f"jit/{name}"]
  want_updates, want_stats = one_process(name, 0)
  close(got["updates"], want_updates)
  assert set(got["stats"]) == set(want_stats)
  close(got["stats"], want_stats)


@pytest.mark.parametrize("name", cases.SHARD_MAP)
def test_shard_map_with_axis_name_matches_one_process(results, name):
  got = results[0][f"shard_map/{name}"]
  want_updates, want_stats = one_process(name, 0)
  close(got["updates"], want_updates)
  close(got["stats"], want_stats)


def test_global_statistics_match_float64(results):
  leaves = [ref.f64(x) for x in jax.tree.leaves(cases.global_gradient(0))]
  for mode in ("jit", "shard_map"):
    got = results[0][f"{mode}/clip_by_global_norm"]
    for g, w in zip(jax.tree.leaves(got["updates"]), ref.clip_by_norm(leaves, 1.0), strict=True):
      np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-6, atol=1e-8)
    np.testing.assert_allclose(
      got["stats"]["clip_by_global_norm/norm"], ref.global_l2(leaves), rtol=2e-6
    )
    z = results[0][f"{mode}/zscore"]
    mean, std = ref.zscore_moments(leaves)
    np.testing.assert_allclose(
      [z["stats"]["zscore/mean"], z["stats"]["zscore/std"]], [mean, std], rtol=2e-6
    )
    value = results[0][f"{mode}/clip_by_value"]["stats"]["clip_by_value/clipped_fraction"]
    flat = np.concatenate([x.ravel() for x in leaves])
    np.testing.assert_allclose(value, np.mean(np.abs(flat) > 0.5), rtol=1e-6)


@pytest.mark.parametrize("value", ["1e-30", "1e+37"])
@pytest.mark.parametrize("name", ["clip_by_global_norm", "unit_rescale_l1", "zscore"])
def test_whole_range_stays_exact_across_processes(results, value, name):
  leaves = [ref.f64(x) for x in jax.tree.leaves(cases.global_gradient(3, float(value)))]
  want = {
    "clip_by_global_norm": lambda: ref.clip_by_norm(leaves, 1.0),
    "unit_rescale_l1": lambda: ref.unit_rescale(leaves, "l1"),
    "zscore": lambda: ref.zscore(leaves),
  }[name]()
  got = results[0][f"range/{value}/{name}"]["updates"]
  for g, w in zip(jax.tree.leaves(got), want, strict=True):
    np.testing.assert_allclose(
      np.asarray(g, np.float64), w, rtol=1e-5, atol=1e-6 * np.max(np.abs(w))
    )


def _single_process_run(name: str, states, steps: range):
  tx = cases.transforms()[name]()
  base = jax.tree.map(jnp.asarray, cases.global_gradient(1))

  def body(state, t):
    g = cases.spiky(base, t)
    return tx.update(g, state, g)[1], None

  state = tx.init(base) if states is None else jax.tree.map(jnp.asarray, states)
  return jax.jit(lambda s: jax.lax.scan(body, s, jnp.asarray(list(steps)))[0])(state)


@pytest.mark.parametrize("name", cases.ADAPTIVE)
def test_adaptive_states_after_50_steps_match_one_process(results, name):
  """Spikes and a non-finite step included: every process holds the same
  state bit for bit, and one process computing alone gets it too (to float32
  rounding of the sums)."""
  for r in results[1:]:
    identical(results[0][f"adaptive/{name}/50"], r[f"adaptive/{name}/50"])
  close(results[0][f"adaptive/{name}/50"], _single_process_run(name, None, range(50)), rtol=1e-5)


@pytest.mark.parametrize("name", cases.ADAPTIVE)
def test_a_state_saved_on_two_processes_resumes_on_one(results, name):
  saved = results[0][f"adaptive/{name}/50"]  # replicated: what any process would checkpoint
  resumed = _single_process_run(name, saved, range(50, 60))
  close(resumed, results[0][f"adaptive/{name}/60"], rtol=1e-5)


def test_cross_process_collectives_do_not_grow_with_the_leaf_count(results):
  counts = [results[0]["collectives/10"], results[0]["collectives/100"]]
  assert counts[0] == counts[1] and 1 <= counts[0] <= 4, counts


# ----------------------------------------------------------------------------- bad setups


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize(
  "axis_name,match",
  [
    ("model", r"axis_name: 'model' is not an axis of the mesh"),
    ({"b": "fsdp"}, r"axis_name: not a prefix"),
  ],
)
def test_a_bad_axis_name_is_a_clear_error(axis_name, match):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  g = jax.device_put({"a": jnp.ones(16)}, NamedSharding(mesh, P("fsdp")))
  tx = gc.clip_by_global_norm(1.0, axis_name=axis_name)
  fn = jax.jit(
    jax.shard_map(
      lambda t: tx.update(t, tx.init(t))[0], mesh=mesh, in_specs=(P("fsdp"),), out_specs=P("fsdp")
    )
  )
  with pytest.raises(ValueError, match=match):
    fn(g)
