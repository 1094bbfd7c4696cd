"""The shared reduction: leaf filtering, overflow-safe norms, float32 accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradctl as gc
from optax_gradctl._reduction import plan as _plan
from optax_gradctl._reduction import pow2 as _pow2
from optax_gradctl._reduction import reduce as _red
from optax_gradctl._reduction.plan import SCOPES
from optax_gradctl._reduction.reduce import NORMS

from . import reference as ref
from .compat import enable_x64


def _ref_norm(tree, ord):
  leaves = [ref.f64(x) for x in jax.tree.leaves(tree)]
  return ref.vector_norm(np.concatenate([x.ravel() for x in leaves]), ord)


def _assert_norm(got, want):
  assert got.dtype == jnp.float32 and got.shape == ()
  if want > float(np.finfo(np.float32).max):
    assert got == np.inf
  else:
    np.testing.assert_allclose(float(got), want, rtol=2e-6)


@pytest.mark.parametrize("ord", NORMS)
@pytest.mark.parametrize(
  "dtype,value",
  [
    (jnp.float16, 300.0),  # squares overflow float16
    (jnp.float16, 6e4),
    (jnp.float16, 1e-4),
    (jnp.bfloat16, 1e30),  # squares overflow float32
    (jnp.bfloat16, 1e-30),  # squares underflow float32
    (jnp.float32, 1e20),
    (jnp.float32, 3e38),
    (jnp.float32, 1e-30),
  ],
)
def test_global_norm_at_the_ends_of_the_range(dtype, value, ord):
  tree = {"a": jnp.full((3, 5), value, dtype), "b": jnp.full((7,), -value, dtype)}
  _assert_norm(gc.global_norm(tree, ord), _ref_norm(tree, ord))


def test_many_bfloat16_leaves_accumulate_in_float32():
  tree = [jnp.ones((1,), jnp.bfloat16) for _ in range(1000)]
  np.testing.assert_allclose(float(gc.global_norm(tree)), np.sqrt(1000), rtol=1e-6)
  # optax accumulates in bfloat16 and stalls at 16
  assert float(optax.tree.norm(tree)) < 20


def test_large_sum_is_accurate():
  x = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32) + 3
  np.testing.assert_allclose(
    float(gc.global_norm(jnp.asarray(x))), ref.vector_norm(x, "l2"), rtol=1e-6
  )


def test_norm_beyond_float32_is_inf():
  assert gc.global_norm(jnp.full((100,), 1e38, jnp.float32)) == np.inf


def test_float64_leaves_accumulate_in_float64():
  with enable_x64(True):
    x = jnp.full((4,), 1e200, jnp.float64)
    assert gc.global_norm(x).dtype == jnp.float32
    assert gc.global_norm(x) == np.inf
    y = jnp.asarray([1.0, 1e-9, 1e-9], jnp.float64)
    # 1 + 2e-18 is 1 in float32 and float64 alike; the point is the float64 path runs
    np.testing.assert_allclose(float(gc.global_norm(y)), 1.0)
    z = jnp.full((4,), 1e-160, jnp.float64)  # squares underflow float64
    red = _red.reduce([z], norms=("l2",))
    np.testing.assert_allclose(float(red.l2.m[0]) * 2.0 ** int(red.l2.e[0]), 2e-160, rtol=1e-12)


def test_non_float_leaves_do_not_count():
  tree = {
    "w": jnp.array([3.0, 4.0]),
    "none": None,
    "step": jnp.array([100, 100]),
    "tangent": np.zeros((2,), jax.dtypes.float0),
    "py": 7,
    "tag": "w",
  }
  assert float(gc.global_norm(tree)) == 5.0
  # a Python float is a float leaf
  assert float(gc.global_norm({**tree, "scale": 12.0})) == 13.0


@pytest.mark.parametrize(
  "changes,error,match",
  [
    ({"rescue": "fast"}, ValueError, r"reduction_settings: rescue must be one of .*got 'fast'"),
    ({"stack_group": 0}, ValueError, r"stack_group must be an integer.*got 0"),
    ({"stack_limit": 2.5}, ValueError, r"stack_limit must be an integer.*got 2.5"),
    ({"rescues": "branch"}, TypeError, r"unknown setting\(s\) rescues; the settings are rescue"),
  ],
)
def test_bad_reduction_settings_raise(changes, error, match):
  with pytest.raises(error, match=match), gc.reduction_settings(**changes):
    pass
  assert gc.ReductionSettings() == gc.ReductionSettings(rescue="auto")


def test_reduction_settings_hold_for_their_block_only():
  """Read when a function is traced: each trace here is of a new function (a
  function jitted before keeps its program, jax caches it by its arguments)."""
  with gc.reduction_settings(rescue="select", stack_group=7) as inner:
    assert (inner.rescue, inner.stack_group, inner.stack_limit) == ("select", 7, 4096)
    jaxpr = jax.make_jaxpr(lambda t: gc.global_norm(t))(jnp.ones(5)).jaxpr
    assert "cond" not in [e.primitive.name for e in jaxpr.eqns]
  jaxpr = jax.make_jaxpr(lambda t: gc.global_norm(t))(jnp.ones(5))
  assert "platform_index" in str(jaxpr)  # "auto": chosen when lowered for a platform


def test_empty_tree_has_norm_zero():
  assert float(gc.global_norm({})) == 0.0
  assert float(gc.global_norm({"step": jnp.array(3)})) == 0.0


def test_nan_and_inf_propagate():
  assert np.isnan(gc.global_norm(jnp.array([1.0, np.nan])))
  assert gc.global_norm(jnp.array([1.0, np.inf])) == np.inf
  assert gc.global_norm(jnp.array([1.0, -np.inf]), "linf") == np.inf


def test_unknown_norm_raises():
  with pytest.raises(ValueError, match=r"norm.*'l3'"):
    gc.global_norm(jnp.ones(3), "l3")


def test_complex_leaves_are_refused():
  with pytest.raises(TypeError, match="complex"):
    gc.global_norm(jnp.ones(3, jnp.complex64))


@pytest.mark.parametrize(
  "shapes,kernels",
  [
    ([(40,), (5, 10), (60,)], 3),  # one kernel per leaf
    ([(30,)] * 5 + [(20_000,)], 2),  # small leaves of one shape: one kernel for the group
    ([(30,)] * 250, 3),  # at most STACK_GROUP leaves per kernel
  ],
)
def test_common_case_reads_each_element_once(shapes, kernels, reduction):
  """Outside the rarely taken rescaling branches, every element is read by
  one reduction; each batch of leaves has its own branch, which holds that
  batch alone (no leaf waits for the rest of the tree to be read)."""
  reduction(rescue="branch")
  tree = [jnp.ones(s) for s in shapes]
  jaxpr = jax.make_jaxpr(lambda t: gc.global_norm(t))(tree).jaxpr
  # reductions over gradient data, not over the handful of per-leaf partial sums
  data = lambda v: v.aval.size > max(16, len(tree))  # noqa: E731
  reads = [
    e.invars[0].aval.size
    for e in jaxpr.eqns
    if e.primitive.name.startswith("reduce") and data(e.invars[0])
  ]
  assert sum(reads) == sum(x.size for x in tree)
  assert len(reads) == kernels
  held = [
    sum(v.aval.size for v in e.invars if data(v)) for e in jaxpr.eqns if e.primitive.name == "cond"
  ]
  assert len(held) == kernels and sum(held) == sum(x.size for x in tree), held


def test_select_strategy_has_no_branch_and_reads_alongside(reduction):
  """On accelerators the rescaled sums are sibling reductions of the same pass."""
  reduction(rescue="select")
  tree = [jnp.ones((40,)), jnp.ones((5, 10))]
  jaxpr = jax.make_jaxpr(lambda t: gc.global_norm(t))(tree).jaxpr
  assert "cond" not in [e.primitive.name for e in jaxpr.eqns]
  reads = [e for e in jaxpr.eqns if e.primitive.name == "reduce_sum" and e.invars[0].aval.size > 16]
  assert sum(e.invars[0].aval.size for e in reads) == 3 * sum(x.size for x in tree)


@pytest.mark.parametrize("strategy", ["branch", "select"])
@pytest.mark.parametrize("value", [300.0, 1e20, 3e38, 1e-30, 0.0])
def test_both_rescaling_strategies_agree(strategy, value, reduction):
  reduction(rescue=strategy)
  dtype = jnp.float16 if value == 300.0 else jnp.float32
  tree = {"a": jnp.full((3, 5), value, dtype), "b": jnp.full((7,), -value / 2, dtype)}
  for ord in NORMS:
    _assert_norm(gc.global_norm(tree, ord), _ref_norm(tree, ord))
  out, _ = jax.jit(gc.clip_by_norm(1.0, scope="leaf").update)(tree, None)
  leaves = [ref.f64(x) for x in jax.tree.leaves(tree)]
  for got, want in zip(
    jax.tree.leaves(out), ref.clip_by_norm(leaves, 1.0, "l2", "leaf"), strict=True
  ):
    np.testing.assert_allclose(ref.f64(got), want, rtol=2e-3)


@pytest.mark.parametrize("strategy", ["branch", "select"])
@pytest.mark.parametrize("scope", SCOPES)
def test_many_small_leaves_of_every_magnitude(strategy, scope, reduction):
  """Hundreds of same-shape leaves are reduced in stacked groups; with leaf
  magnitudes from 1e-30 to 1e30 the rescaled branch scales each leaf of a
  group by its own power of two."""
  reduction(rescue=strategy, stack_group=8)  # the same grouping, in a smaller program
  n = 8 + 7  # two stacked groups, the second a short one
  rng = np.random.default_rng(0)
  exps = rng.uniform(-30, 30, n)
  leaves = [(rng.standard_normal(7) * 10.0**k).astype(np.float32) for k in exps]
  tree = [jnp.asarray(x) for x in leaves]
  want64 = [ref.f64(x) for x in leaves]
  tiny = np.finfo(np.float32).tiny  # results below it are subnormal in float32
  for ord in NORMS:
    out, _ = jax.jit(gc.clip_by_norm(1.0, norm=ord, scope=scope).update)(tree, None)
    for got, want in zip(out, ref.clip_by_norm(want64, 1.0, ord, scope), strict=True):
      np.testing.assert_allclose(ref.f64(got), want, rtol=2e-5, atol=tiny)
  out, _ = jax.jit(gc.unit_rescale(scope=scope).update)(tree, None)
  for got, want in zip(out, ref.unit_rescale(want64, "l2", scope), strict=True):
    np.testing.assert_allclose(ref.f64(got), want, rtol=2e-5, atol=tiny)
  out, _ = jax.jit(gc.zscore(scope=scope).update)(tree, None)
  for got, want in zip(out, ref.zscore(want64, scope), strict=True):
    np.testing.assert_allclose(ref.f64(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scope", SCOPES)
def test_rescue_rereads_stacked_batches_and_stacks_larger_leaves(scope, reduction):
  """A rescue reads the common read's stacked batches of small leaves again,
  and stacks the larger leaves that the common read reads one by one."""
  reduction(rescue="branch", stack_limit=5, stack_group=4)  # leaves of 7 elements are "larger"
  rng = np.random.default_rng(1)
  shapes = [(7,) if i % 2 else (3,) for i in range(19)]
  leaves = [
    (rng.standard_normal(s) * 10.0 ** rng.uniform(-30, 30)).astype(np.float32) for s in shapes
  ]
  tree = [jnp.asarray(x) for x in leaves]
  plan = _plan.make_plan(tree, scope)
  larger = tuple(i for i, s in enumerate(shapes) if s == (7,))
  assert {b for b in plan.batches if b[0] in larger} == {(i,) for i in larger}
  assert [g for g in plan.groups if g[0] in larger] == [larger[k : k + 4] for k in (0, 4, 8)]
  assert [g for g in plan.groups if g[0] not in larger] == [
    b for b in plan.batches if b[0] not in larger
  ]
  want64 = [ref.f64(x) for x in leaves]
  tiny = np.finfo(np.float32).tiny
  for ord in NORMS:
    out, _ = jax.jit(gc.clip_by_norm(1.0, norm=ord, scope=scope).update)(tree, None)
    for got, want in zip(out, ref.clip_by_norm(want64, 1.0, ord, scope), strict=True):
      np.testing.assert_allclose(ref.f64(got), want, rtol=2e-5, atol=tiny)
  out, _ = jax.jit(gc.zscore(scope=scope).update)(tree, None)
  for got, want in zip(out, ref.zscore(want64, scope), strict=True):
    np.testing.assert_allclose(ref.f64(got), want, rtol=1e-4, atol=1e-4)


def test_pow2_helpers_are_exact():
  k = jnp.arange(-126, 128)
  np.testing.assert_array_equal(
    np.asarray(_pow2.exp2(k, np.dtype(np.float32))), 2.0 ** np.arange(-126, 128)
  )
  a, b = _pow2.split_exp2(jnp.array([-250, 250]), np.dtype(np.float32))
  np.testing.assert_array_equal(
    np.log2(np.asarray(a, np.float64)) + np.log2(np.asarray(b, np.float64)), [-250, 250]
  )
