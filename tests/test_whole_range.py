"""The edges of the float range: named regressions, and a property suite that sweeps them.

Every test here runs with both reduction strategies (the ``strategy`` fixture):
"branch", the CPU's and TPU's, and "select", the GPU's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import optax_gradctl as gc
from optax_gradctl._reduction.plan import SCOPES
from optax_gradctl._reduction.reduce import NORMS

from . import reference as ref
from .compat import enable_x64
from .strategies import VARIANTS, per_variant, tree_and_magnitudes, variant_settings

pytestmark = pytest.mark.usefixtures("strategy")


def upd(tx, g):
  return jax.jit(tx.update)(g, tx.init(g))


def bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.itemsize])


# ----------------------------------------------------------------------------- named regressions


@pytest.mark.parametrize("dtype,value", [(jnp.float32, 2e38), (jnp.bfloat16, 2e38)])
def test_linf_clip_near_the_top_of_the_range(dtype, value):
  out, state = upd(gc.clip_by_norm(0.5, norm="linf"), {"a": jnp.full((4,), value, dtype)})
  np.testing.assert_array_equal(ref.f64(out["a"]), 0.5)
  assert float(state.clipped_fraction) == 1.0


def test_linf_clip_near_the_top_of_float64():
  with enable_x64(True):
    out, _ = upd(gc.clip_by_norm(0.5, norm="linf"), {"a": jnp.full((4,), 1e308, jnp.float64)})
    np.testing.assert_array_equal(np.asarray(out["a"]), 0.5)


@pytest.mark.parametrize("value", [1e-30, 1e30])
def test_single_element_leaves_clip_exactly(value):
  g = {"a": jnp.array([1.0, 2.0]) * value, "b": jnp.array(3.0) * value}
  out, state = upd(gc.clip_by_global_norm(1.0), g)
  leaves = [ref.f64(x) for x in jax.tree.leaves(g)]
  for got, want in zip(jax.tree.leaves(out), ref.clip_by_norm(leaves, 1.0), strict=True):
    np.testing.assert_allclose(ref.f64(got), want, rtol=1e-6)
  np.testing.assert_allclose(float(state.norm), ref.global_l2(leaves), rtol=1e-6)


def test_single_element_leaf_unit_rescale_per_leaf():
  g = {"a": jnp.array([1e-30, 2e-30]), "b": jnp.array([3e-30])}
  out, _ = upd(gc.unit_rescale(scope="leaf"), g)
  np.testing.assert_allclose(out["a"], np.array([1, 2]) / np.sqrt(5), rtol=1e-6)
  np.testing.assert_allclose(out["b"], [1.0], rtol=1e-6)


@pytest.mark.parametrize(
  "make",
  [
    gc.clip_by_global_norm,
    lambda c: gc.clip_by_norm(c, scope="leaf"),
    lambda _: gc.unit_rescale(),
    lambda _: gc.zscore(),
    lambda _: gc.zclip(),
  ],
)
def test_gradient_through_update_at_zero_with_a_scalar_leaf(make):
  tx = make(1.0)
  g = {"a": jnp.zeros((3,)), "b": jnp.zeros(())}
  state = tx.init(g)
  grad = jax.jit(
    jax.grad(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(tx.update(t, state)[0])))
  )(g)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(grad))


def test_small_max_norm_against_a_large_gradient():
  out, _ = upd(gc.clip_by_norm(1e-20), jnp.full((4,), 1e38))
  np.testing.assert_allclose(np.asarray(out), 5e-21, rtol=1e-6)


def test_max_norm_near_the_bottom_against_a_norm_beyond_float32():
  """max_norm / norm = 1.2 * 2**-252, as small as two normal float32 factors
  reach: the second factor once came out of a subnormal numerator, flushed
  to zero, and every element with it."""
  out, _ = upd(gc.clip_by_norm(0.9 * 2.0**-123), jnp.full((4,), 1.5 * 2.0**127, jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float64), 0.9 * 2.0**-124, rtol=1e-6)


def test_small_max_norm_against_a_large_float64_gradient():
  with enable_x64(True):
    out, _ = upd(gc.clip_by_norm(1e-170), jnp.full((4,), 1e300, jnp.float64))
    np.testing.assert_allclose(np.asarray(out), 5e-171, rtol=1e-12)


def test_leaf_scope_norm_statistic_does_not_overflow():
  _, state = upd(
    gc.clip_by_norm(1.0, scope="leaf"), {"a": jnp.array([1.4e19]), "b": jnp.array([1.4e19])}
  )
  np.testing.assert_allclose(float(state.norm), 1.4e19 * np.sqrt(2), rtol=1e-6)


@pytest.mark.parametrize("other", [jnp.zeros(3), jnp.zeros(0)])
def test_leaf_scope_norm_statistic_does_not_underflow(other):
  _, state = upd(gc.zscore(scope="leaf"), {"a": jnp.array([1e-30, 2e-30]), "b": other})
  np.testing.assert_allclose(float(state.norm), np.sqrt(5) * 1e-30, rtol=1e-6)


def test_empty_leaves_have_zero_statistics():
  z = {"z": jnp.zeros((0,))}
  for ord in NORMS:
    assert float(gc.global_norm(z, ord)) == 0.0
  _, state = upd(gc.clip_by_value(1.0, stats=True), z)
  assert float(state.clipped_fraction) == 0.0 and float(state.norm) == 0.0
  _, state = upd(gc.zscore(), z)
  assert float(state.mean) == 0.0 and float(state.std) == 0.0
  out, _ = upd(
    gc.clip_by_norm(1.0, norm="linf", scope="leaf"), {"a": jnp.zeros((0, 3)), "b": jnp.full(2, 4.0)}
  )
  np.testing.assert_array_equal(out["b"], [1.0, 1.0])


@pytest.mark.parametrize(
  "bounds,g",
  [
    ((np.inf, None), [np.inf, 1.0]),
    ((1.0, -np.inf), [-np.inf, 1.0]),
    ((np.inf, -np.inf), [np.inf, -np.inf]),
  ],
)
def test_an_element_at_an_infinite_bound_is_not_clipped(bounds, g):
  out, state = upd(gc.clip_by_value(*bounds, stats=True), jnp.asarray(g, jnp.float32))
  np.testing.assert_array_equal(out, g)
  assert float(state.clipped_fraction) == 0.0


def test_within_bound_subnormals_are_bitwise_unchanged():
  g = jnp.array([0.5, 1e-40, -3e-42], jnp.float32)
  for tx in (gc.clip_by_global_norm(1.0), gc.clip_by_norm(1.0, scope="leaf", norm="l1")):
    out, state = upd(tx, g)
    np.testing.assert_array_equal(bits(out), bits(g))
    assert float(state.clipped_fraction) == 0.0


@pytest.mark.parametrize(
  "make, target, g",
  [
    # ratio 0.9: halving first made 1.5 * 2**-126 subnormal, and the CPU flushed it
    (lambda: gc.clip_by_global_norm(0.9), 0.9, [1.0, 1.5 * 2.0**-126, -1.2 * 2.0**-126]),
    # ratio 1 / 0.6, the case a property test found: the result is larger still
    (gc.unit_rescale, 1.0, [0.6, 1.5 * 2.0**-126, -1.2 * 2.0**-126]),
  ],
)
@pytest.mark.usefixtures("strategy")
def test_a_rescaled_element_near_the_smallest_normal_is_kept(make, target, g):
  """A rescaling by a factor near 1 takes a normal element to a normal
  result, with no intermediate below the normal range on the way."""
  x = np.asarray(g, np.float64)
  out, _ = upd(make(), jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float64), x * target / np.linalg.norm(x), rtol=2e-6)


def test_autoclip_under_inject_hyperparams_needs_no_static_args():
  tx = optax.inject_hyperparams(gc.autoclip)(percentile=5.0)
  g = jnp.array([3.0, 4.0])
  state = tx.init(g)
  out, state = jax.jit(tx.update)(g, state)
  np.testing.assert_allclose(out, [3.0, 4.0], rtol=1e-6)  # the only norm in the history
  assert state.inner_state.history.shape == (1000,)


def test_clip_by_value_none_fails_at_construction():
  with pytest.raises(ValueError, match=r"max_value.*None"):
    gc.clip_by_value(None)


@pytest.mark.parametrize(
  "mode,want_mean,want_std",
  [("percentile", 1.0584, 0.1197), ("mean", 1.05, 0.1101), ("adaptive", 1.05, 0.1101)],
)
def test_zclip_enters_the_cap_of_an_overflowing_finite_norm(mode, want_mean, want_std):
  tx = gc.zclip(2.5, warmup_steps=4, mode=mode)
  state, step = tx.init(jnp.zeros(2)), jax.jit(tx.update)
  for norm in [1.0, 1.2, 0.9, 1.1]:
    _, state = step(jnp.array([norm, 0.0]), state)
  out, state = step(jnp.array([3e38, 3e38]), state)
  # judged against the estimator of the four norms
  np.testing.assert_allclose(
    [float(state.ema_mean), float(state.ema_std)], [1.05, 0.1118], atol=1e-4
  )
  assert float(state.clipped_fraction) == 1.0 and float(state.z) == np.inf
  # the EMA takes the cap: mean 0.97 * 1.05 + 0.03 * cap, and the variance likewise
  mean, std = 1.05, np.sqrt(0.0125)
  cap = {"percentile": mean + 2.5 * std, "mean": mean, "adaptive": mean}[mode]
  new_mean = 0.97 * mean + 0.03 * cap
  new_std = np.sqrt(0.97 * std**2 + 0.03 * (cap - new_mean) ** 2)
  np.testing.assert_allclose(
    [float(state.ema.mean), np.sqrt(float(state.ema.var))], [new_mean, new_std], rtol=1e-5
  )
  np.testing.assert_allclose([new_mean, new_std], [want_mean, want_std], atol=1e-4)
  np.testing.assert_allclose(ref.global_l2([ref.f64(out)]), cap, rtol=1e-5)


def test_autoclip_at_the_100th_percentile_never_clips():
  tx = gc.autoclip(100.0, history=8)
  state, step = tx.init(jnp.zeros(2)), jax.jit(tx.update)
  for norm in [1.0, 1.2]:
    _, state = step(jnp.array([norm, 0.0]), state)
  g = jnp.array([3e38, 3e38])
  out, state = step(g, state)
  np.testing.assert_array_equal(out, g)
  assert float(state.clipped_fraction) == 0.0 and float(state.threshold) == np.inf
  out, state = step(jnp.array([2.0, 0.0]), state)  # the overflowing norm stays in the history
  assert float(state.threshold) == np.inf and float(out[0]) == 2.0


def test_zclip_threshold_is_finite_at_every_step_once_warm():
  tx = gc.zclip(2.0, warmup_steps=3)
  state = tx.init(jnp.zeros(1))
  thresholds, clipped = [], []
  for norm in [1.0, 1.1, 0.9, 1.0, 1.05, 5.0, 0.95]:
    _, state = tx.update(jnp.array([norm]), state)
    thresholds.append(float(state.threshold))
    clipped.append(float(state.clipped_fraction))
  assert thresholds[:2] == [np.inf, np.inf]
  assert np.all(np.isfinite(thresholds[3:])) and clipped == [0, 0, 0, 0, 0, 1, 0]
  # an ordinary step reports where clipping would start: above every norm let through
  assert thresholds[3] > 1.0 and thresholds[4] > 1.05 and thresholds[5] < 5.0


# ----------------------------------------------------------------------------- the property suite

# Each example compiles a program (about 0.3 s) and checks VARIANTS sets of
# values with it: half the default profile's count of value sets, the
# thorough profile's full count.
_VALUE_SETS = settings().max_examples
property_settings = variant_settings(_VALUE_SETS // 2 if _VALUE_SETS <= 30 else _VALUE_SETS)


RTOL = {
  jnp.dtype(jnp.float16): 2e-3,
  jnp.dtype(jnp.bfloat16): 1e-2,
  jnp.dtype(jnp.float32): 2e-5,
  jnp.dtype(jnp.float64): 1e-12,
}
F32_MAX = float(np.finfo(np.float32).max)
# a float32 statistic below the normal range may read 0: the CPU flushes it
F32_TINY = float(np.finfo(np.float32).tiny)


def assert_leaves(got_tree, want_leaves, atol_in_tiny=2.0):
  """Each leaf keeps its dtype and matches the float64 reference; results
  below the smallest normal number of the dtype may be flushed to zero, and
  no others are."""
  for got, want in zip(jax.tree.leaves(got_tree), want_leaves, strict=True):
    tiny = float(jnp.finfo(got.dtype).tiny)
    g = ref.f64(got)
    assert g.shape == want.shape
    err = np.abs(g - want)
    np.testing.assert_array_less(err, RTOL[got.dtype] * np.abs(want) + atol_in_tiny * tiny)
    assert np.all(g[np.abs(want) > atol_in_tiny * tiny] != 0), "an element was flushed to zero"


def assert_norm_statistic(got, leaves):
  want = ref.global_l2(leaves)
  if want > F32_MAX:
    assert float(got) == np.inf
  else:
    np.testing.assert_allclose(float(got), want, rtol=2e-6, atol=F32_TINY)


_clip = jax.jit(
  lambda tree, max_norm, ord, scope, strategy: (lambda tx: tx.update(tree, tx.init(tree)))(
    gc.clip_by_norm(max_norm, norm=ord, scope=scope)
  ),
  static_argnums=(2, 3, 4),
)
_unit = jax.jit(
  lambda tree, ord, scope, strategy: (lambda tx: tx.update(tree, tx.init(tree)))(
    gc.unit_rescale(norm=ord, scope=scope)
  ),
  static_argnums=(1, 2, 3),
)
_zscore = jax.jit(
  lambda tree, scope, ddof, strategy: (lambda tx: tx.update(tree, tx.init(tree)))(
    gc.zscore(scope=scope, ddof=ddof)
  ),
  static_argnums=(1, 2, 3),
)
_value = jax.jit(
  lambda tree, lo, hi, strategy: (lambda tx: tx.update(tree, tx.init(tree)))(
    gc.clip_by_value(hi, lo, stats=True)
  ),
  static_argnums=(3,),
)


# The scope is a test parameter and the norm a drawn one: each example checks
# VARIANTS sets of values with one compiled program.
@property_settings
@given(
  case=tree_and_magnitudes(variants=VARIANTS),
  ord=st.sampled_from(NORMS),
  log2_max=per_variant(st.floats(-126, 127.9)),
)
@pytest.mark.parametrize("scope", SCOPES)
def test_clip_by_norm_over_the_whole_range(case, ord, scope, log2_max, strategy):
  for (tree, leaves), log2 in zip(case.builds(), log2_max, strict=True):
    max_norm = float(np.float32(2.0**log2))
    out, state = _clip(tree, max_norm, ord, scope, strategy)
    norms = ref.norms(leaves, ord, scope)
    # Below 2**-252, max_norm / norm is no product of two normal float32
    # factors: the results, all below 2**-124 (4 * tiny), may then be flushed.
    far = any(max_norm < n * 2.0**-252 for n, _ in norms)
    assert_leaves(out, ref.clip_by_norm(leaves, max_norm, ord, scope), 4.0 if far else 2.0)
    assert_norm_statistic(state.norm, leaves)
    want_fraction = np.mean([n > max_norm for n, _ in norms] or [0])
    np.testing.assert_allclose(float(state.clipped_fraction), want_fraction)
    # a scope within the bound comes back bitwise unchanged
    got, given_ = jax.tree.leaves(out), jax.tree.leaves(tree)
    for i in (i for n, idx in norms if n <= max_norm for i in idx):
      np.testing.assert_array_equal(bits(got[i]), bits(given_[i]))


@property_settings
@given(case=tree_and_magnitudes(variants=VARIANTS), ord=st.sampled_from(NORMS))
@pytest.mark.parametrize("scope", SCOPES)
def test_unit_rescale_over_the_whole_range(case, ord, scope, strategy):
  for tree, leaves in case.builds():
    out, state = _unit(tree, ord, scope, strategy)
    assert_leaves(out, ref.unit_rescale(leaves, ord, scope))
    assert_norm_statistic(state.norm, leaves)
    got = jax.tree.leaves(out)
    for n, idx in ref.norms([ref.f64(x) for x in got], ord, scope):
      if any(leaves[i].size and np.any(leaves[i]) for i in idx):  # a zero scope stays zero
        np.testing.assert_allclose(n, 1.0, rtol=4 * max(RTOL[got[i].dtype] for i in idx))


@property_settings
@given(case=tree_and_magnitudes(variants=VARIANTS), ddof=st.sampled_from([0, 1]))
@pytest.mark.parametrize("scope", SCOPES)
def test_zscore_over_the_whole_range(case, scope, ddof, strategy):
  sizes = [np.size(values) for _, values, _ in case.specs]
  if any(0 < n <= ddof for n in ([sum(sizes)] if scope == "global" else sizes)):
    with pytest.raises(ValueError, match="ddof"):
      _zscore(case.build()[0], scope, ddof, strategy)
    return
  for tree, leaves in case.builds():
    out, state = _zscore(tree, scope, ddof, strategy)
    want = ref.zscore(leaves, scope, ddof)
    for got, w in zip(jax.tree.leaves(out), want, strict=True):
      # in units of the std: the output's own rounding, and float32 rounding of the moments
      np.testing.assert_array_less(np.abs(ref.f64(got) - w), RTOL[got.dtype] * np.abs(w) + 1e-3)
    assert_norm_statistic(state.norm, leaves)
    if scope == "global":
      mean, std = ref.zscore_moments(leaves, ddof)
      if abs(mean) < F32_MAX and std < F32_MAX:
        np.testing.assert_allclose(float(state.mean), mean, rtol=1e-5, atol=1e-5 * std + F32_TINY)
        np.testing.assert_allclose(float(state.std), std, rtol=1e-5, atol=F32_TINY)


def _bound(log2_mag, sign):
  # normal bounds only: the CPU flushes subnormal ones to zero
  return sign * np.float32(2.0**log2_mag) if log2_mag >= -126 else np.float32(0)


_ENDS = st.lists(
  st.tuples(st.floats(-130, 127.9), st.sampled_from([-1, 1])), min_size=2, max_size=2
)


@property_settings
@given(
  case=tree_and_magnitudes(variants=VARIANTS),
  ends=per_variant(_ENDS),
)
def test_clip_by_value_over_the_whole_range(case, ends, strategy):
  for (tree, leaves), variant_ends in zip(case.builds(), ends, strict=True):
    lo, hi = sorted(_bound(*e) for e in variant_ends)
    out, state = _value(tree, lo, hi, strategy)
    for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
      bounds = [ref.f64(jnp.asarray(b, jnp.float32).astype(x.dtype)) for b in (lo, hi)]
      np.testing.assert_array_equal(ref.f64(got), np.clip(ref.f64(x), *bounds))
    flat = np.concatenate([x.ravel() for x in leaves]) if leaves else np.zeros(0)
    want = np.mean((flat > hi) | (flat < lo)) if flat.size else 0.0
    np.testing.assert_allclose(float(state.clipped_fraction), want, rtol=1e-6)
    assert_norm_statistic(state.norm, leaves)


@property_settings
@given(case=tree_and_magnitudes(variants=VARIANTS), ord=st.sampled_from(NORMS))
def test_global_norm_over_the_whole_range(case, ord, strategy):
  for tree, leaves in case.builds():
    got = gc.global_norm(tree, ord)
    flat = np.concatenate([x.ravel() for x in leaves]) if leaves else np.zeros(0)
    want = ref.vector_norm(flat, ord)
    if want > F32_MAX:
      assert float(got) == np.inf
    else:
      np.testing.assert_allclose(float(got), want, rtol=2e-6, atol=F32_TINY)


# 8 binades of headroom: the float64 reference norms themselves must not overflow
@property_settings
@given(
  case=tree_and_magnitudes(dtypes=(jnp.float64, jnp.float32), headroom=8, variants=VARIANTS),
  log2_max=per_variant(st.floats(-1000, 1000)),
)
def test_float64_trees_over_the_whole_range(case, log2_max, strategy):
  with enable_x64(True):
    assume(any(dtype == jnp.float64 for _, _, dtype in case.specs))  # accumulates in float64
    for (tree, leaves), log2 in zip(case.builds(), log2_max, strict=True):
      max_norm = 2.0**log2
      out, state = _clip(tree, max_norm, "l2", "global", strategy)
      assert_leaves(out, ref.clip_by_norm(leaves, max_norm), atol_in_tiny=2 / 2**-1022 * 2**-1022)
      assert_norm_statistic(state.norm, leaves)
