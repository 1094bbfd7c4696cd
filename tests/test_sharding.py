"""Exact global statistics on sharded gradients: GSPMD under jit, and shard_map with axis_name."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gradctl as gc

from . import reference as ref
from .transforms import CASES
from .trees import close

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

FORBIDDEN = ("all-gather", "all-to-all", "collective-permute")


def grads(scale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w1": jnp.asarray(rng.standard_normal((16, 8)) * scale, jnp.float32),
    "w2": jnp.asarray(rng.standard_normal((8, 24)) * scale, jnp.float32),
    "small": [jnp.asarray(rng.standard_normal((8, 4)) * scale, jnp.float32) for _ in range(3)],
    "v": jnp.asarray(rng.standard_normal((32,)) * scale, jnp.float32),
  }


def mesh_1d(kind=AxisType.Auto):
  return jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))


def mesh_2d(kind=AxisType.Explicit):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))


def collectives(text: str) -> dict[str, int]:
  return {k: len(re.findall(rf"\b{k}(?:-start)?\(", text)) for k in (*FORBIDDEN, "all-reduce")}


# ----------------------------------------------------------------------------- GSPMD under jit


# Every transform on the 2-D mesh; the 1-D FSDP layouts, with auto and
# explicit axes, for one transform of each kind of reduction.
LAYOUTS = [(name, "data_model") for name in sorted(CASES)] + [
  ("clip_by_global_norm", "fsdp_auto"),
  ("clip_by_value", "fsdp_explicit"),
  ("zscore", "fsdp_auto"),
  ("zclip", "fsdp_explicit"),
]


@pytest.mark.parametrize("name,layout", LAYOUTS)
def test_jit_on_sharded_gradients_matches_one_device(name, layout):
  tx = CASES[name].make()
  g = grads()
  if layout == "data_model":
    mesh = mesh_2d()
    specs = {"w1": P("data", "model"), "w2": P(None, "model"), "small": [P("model")] * 3, "v": P()}
  else:
    mesh = mesh_1d(AxisType.Auto if layout == "fsdp_auto" else AxisType.Explicit)
    specs = {"w1": P("fsdp"), "w2": P(None, "fsdp"), "small": [P("fsdp")] * 3, "v": P("fsdp")}
  shardings = jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
  )
  sharded = jax.device_put(g, shardings)
  state = tx.init(g)
  step = jax.jit(tx.update)
  out, new = step(sharded, state, sharded)
  want, want_state = jax.jit(tx.update)(g, state, g)  # on one device
  close(out, want)
  close(gc.stats(new), gc.stats(want_state))
  for o, s in zip(jax.tree.leaves(out), jax.tree.leaves(shardings), strict=True):
    assert o.sharding.is_equivalent_to(s, o.ndim), (o.sharding, s)
  counts = collectives(step.lower(sharded, state, sharded).compile().as_text())
  assert all(counts[k] == 0 for k in FORBIDDEN), counts


# ----------------------------------------------------------------------------- shard_map with axis_name


def _with_axis(name, axis_name):
  case = CASES[name]
  return case.factory(**case.kwargs, axis_name=axis_name)


def _shard_mapped(tx, g, mesh, spec, in_specs=None):
  """The jitted, shard_mapped update and its input placed on the mesh."""

  def step(g):
    out, state = tx.update(g, tx.init(g))
    return out, gc.stats(state)

  in_specs = jax.tree.map(lambda _: spec, g) if in_specs is None else in_specs
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(in_specs,), out_specs=(in_specs, P())))
  placed = jax.device_put(
    g, jax.tree.map(lambda s: NamedSharding(mesh, s), in_specs, is_leaf=lambda x: isinstance(x, P))
  )
  return fn, placed


def _run_shard_map(tx, g, mesh, spec, in_specs=None):
  fn, placed = _shard_mapped(tx, g, mesh, spec, in_specs)
  return fn(placed), fn.lower(placed)


@pytest.mark.parametrize(
  "name,axes",
  [(name, ("data", "model")) for name in sorted(CASES) if CASES[name].shard_map]
  + [
    (name, "fsdp")
    for name in ("clip_by_global_norm", "clip_by_norm_linf_leaf", "zscore", "skip_on_spike")
  ],
)
def test_shard_map_with_axis_name_matches_one_device(name, axes):
  mesh = mesh_1d(AxisType.Explicit) if axes == "fsdp" else mesh_2d()
  g = grads(seed=3)
  tx = _with_axis(name, axes)
  (out, stats), _ = _run_shard_map(tx, g, mesh, P(axes))
  one = CASES[name].make()
  want, want_state = jax.jit(one.update)(g, one.init(g))
  close(out, want)
  close(stats, gc.stats(want_state))


@pytest.mark.parametrize("ord", ["l2", "l1", "linf"])
@pytest.mark.parametrize("scope", ["global", "leaf"])
def test_shard_map_norms_match_float64_reference(ord, scope):
  mesh = mesh_2d()
  g = grads(scale=2.0, seed=5)
  tx = gc.clip_by_norm(1.0, norm=ord, scope=scope, axis_name=("data", "model"))
  (out, stats), _ = _run_shard_map(tx, g, mesh, P(("data", "model")))
  leaves = [ref.f64(x) for x in jax.tree.leaves(g)]
  for got, want in zip(
    jax.tree.leaves(out), ref.clip_by_norm(leaves, 1.0, ord, scope), strict=True
  ):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6, atol=1e-8)
  np.testing.assert_allclose(float(stats["clip_by_norm/norm"]), ref.global_l2(leaves), rtol=2e-6)
  want_norm = ref.vector_norm(np.concatenate([x.ravel() for x in leaves]), ord)
  got_norm = jax.jit(
    jax.shard_map(
      lambda t: gc.global_norm(t, ord, axis_name=("data", "model")),
      mesh=mesh,
      in_specs=(P(("data", "model")),),
      out_specs=P(),
    )
  )(jax.device_put(g, NamedSharding(mesh, P(("data", "model")))))
  np.testing.assert_allclose(float(got_norm), want_norm, rtol=2e-6)


@pytest.mark.parametrize("value", [1e-30, 1e37])
def test_shard_map_is_exact_at_the_ends_of_the_range(value):
  mesh = mesh_1d(AxisType.Explicit)
  g = {"a": jnp.full((64,), value, jnp.float32), "b": jnp.full((16, 8), -value, jnp.float32)}
  for tx in (
    gc.clip_by_global_norm(1.0, axis_name="fsdp"),
    gc.unit_rescale(axis_name="fsdp"),
    gc.zscore(axis_name="fsdp"),
  ):
    (out, _), _ = _run_shard_map(tx, g, mesh, P("fsdp"))
    one = type(tx)  # noqa: F841
    leaves = [ref.f64(x) for x in jax.tree.leaves(g)]
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(out)])
    assert np.all(np.isfinite(flat)) and np.any(flat != 0)
  (out, _), _ = _run_shard_map(gc.clip_by_global_norm(1.0, axis_name="fsdp"), g, mesh, P("fsdp"))
  for got, want in zip(jax.tree.leaves(out), ref.clip_by_norm(leaves, 1.0), strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6)


def test_replicated_leaves_counted_once_with_a_per_leaf_spec():
  mesh = mesh_1d(AxisType.Explicit)
  g = {"kernel": grads()["w1"], "bias": jnp.arange(5.0)}
  specs = {"kernel": P("fsdp"), "bias": P()}  # the bias is replicated on every device
  leaves = [ref.f64(x) for x in jax.tree.leaves(g)]
  for tx, want in (
    (
      gc.clip_by_global_norm(1.0, axis_name={"kernel": "fsdp", "bias": None}),
      ref.clip_by_norm(leaves, 1.0),
    ),
    (gc.zscore(axis_name={"kernel": "fsdp", "bias": None}), ref.zscore(leaves)),
  ):
    (out, stats), _ = _run_shard_map(tx, g, mesh, None, in_specs=specs)
    for got, w in zip(jax.tree.leaves(out), want, strict=True):
      np.testing.assert_allclose(np.asarray(got, np.float64), w, rtol=2e-6, atol=1e-7)
    norm = next(v for k, v in stats.items() if k.endswith("/norm"))
    np.testing.assert_allclose(float(norm), ref.global_l2(leaves), rtol=2e-6)
  # naming the replicated bias as partitioned counts it 8 times
  (_, stats), _ = _run_shard_map(
    gc.clip_by_global_norm(1.0, axis_name="fsdp"), g, mesh, None, in_specs=specs
  )
  assert float(stats["clip_by_global_norm/norm"]) > ref.global_l2(leaves) * 1.01


def test_optax_uses_the_local_norm_inside_shard_map():
  """The failure this fixes: optax's clip sees only its shard."""
  mesh = mesh_1d(AxisType.Explicit)
  g = {"a": jnp.ones((64,))}  # norm 8, so each of 8 shards has norm 8 / sqrt(8)
  (out, _), _ = _run_shard_map(gc.clip_by_global_norm(1.0, axis_name="fsdp"), g, mesh, P("fsdp"))
  np.testing.assert_allclose(ref.global_l2([ref.f64(out["a"])]), 1.0, rtol=1e-6)
  fn = jax.jit(
    jax.shard_map(
      lambda t: optax.clip_by_global_norm(1.0).update(t, optax.EmptyState())[0],
      mesh=mesh,
      in_specs=(P("fsdp"),),
      out_specs=P("fsdp"),
    )
  )
  wrong = fn(jax.device_put(g, NamedSharding(mesh, P("fsdp"))))
  np.testing.assert_allclose(ref.global_l2([ref.f64(wrong["a"])]), np.sqrt(8), rtol=1e-6)


@pytest.mark.parametrize(
  "make",
  [
    lambda a: gc.clip_by_global_norm(1.0, axis_name=a),
    lambda a: gc.clip_by_norm(1.0, norm="linf", scope="leaf", axis_name=a),
    lambda a: gc.clip_by_value(0.5, stats=True, axis_name=a),
    lambda a: gc.unit_rescale(norm="l1", axis_name=a),
    lambda a: gc.zscore(axis_name=a),
    lambda a: gc.zclip(axis_name=a),
    lambda a: gc.autoclip(axis_name=a),
    lambda a: gc.skip_on_spike(optax.sgd(0.1), axis_name=a),
  ],
)
def test_a_fixed_number_of_collectives_whatever_the_leaf_count(make):
  """Counted in the lowered program, before XLA's optimizer merges anything."""
  mesh = mesh_1d(AxisType.Explicit)
  counts = []
  for leaves in (10, 200):
    g = [jnp.ones((8, 2)) * (i + 1) for i in range(leaves)]
    fn, placed = _shard_mapped(make("fsdp"), g, mesh, P("fsdp"))
    counts.append(fn.lower(placed).as_text().count("all_reduce"))
  assert counts[0] == counts[1] <= 4, counts
  assert counts[0] >= 1
