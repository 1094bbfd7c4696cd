"""clip_by_value, clip_by_norm and clip_by_global_norm against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradctl as gc

from . import reference as ref

RTOL = {jnp.dtype(jnp.float16): 2e-3, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float32): 1e-5}


def run(tx, tree):
  return jax.jit(tx.update)(tree, tx.init(tree))


def assert_matches(out_tree, want_leaves):
  """Each output leaf keeps its dtype and matches the float64 reference, and is never
  flushed to zero where the reference is a normal number of its dtype."""
  for got, want in zip(jax.tree.leaves(out_tree), want_leaves, strict=True):
    tiny = float(jnp.finfo(got.dtype).tiny)
    g = ref.f64(got)
    assert g.shape == want.shape
    np.testing.assert_array_less(np.abs(g - want), RTOL[got.dtype] * np.abs(want) + 2 * tiny)
    assert np.all(g[np.abs(want) > 2 * tiny] != 0), "an element was flushed to zero"


@pytest.mark.parametrize(
  "dtype,value",
  [
    (jnp.float16, 300.0),
    (jnp.float16, 6e4),
    (jnp.float32, 1e20),
    (jnp.float32, 3e38),
    (jnp.bfloat16, 3e38),
    (jnp.float32, 1e-30),
  ],
)
def test_where_optax_zeroes_we_clip(dtype, value):
  g = {"a": jnp.full((1000,), value, dtype), "b": jnp.full((10,), -value, dtype)}
  out, _ = run(gc.clip_by_global_norm(1.0), g)
  leaves = [ref.f64(x) for x in jax.tree.leaves(g)]
  assert_matches(out, ref.clip_by_norm(leaves, 1.0))
  np.testing.assert_allclose(
    ref.global_l2([ref.f64(x) for x in jax.tree.leaves(out)]),
    min(1.0, ref.global_l2(leaves)),
    rtol=RTOL[jnp.dtype(dtype)],
  )


def test_optax_fails_where_we_do_not():
  """The failures this package exists to fix, as a user meets them in optax."""
  g16 = jnp.full((4,), 300.0, jnp.float16)
  zeroed, _ = optax.clip_by_global_norm(1.0).update(g16, optax.EmptyState())
  assert not np.any(np.asarray(zeroed))
  ours, _ = gc.clip_by_global_norm(1.0).update(g16, gc.clip_by_global_norm(1.0).init(g16))
  np.testing.assert_allclose(np.asarray(ours, np.float64), 0.5, rtol=1e-3)


def test_max_norm_zero_zeroes_without_nan():
  g = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([1e30], jnp.float32)}
  out, state = run(gc.clip_by_global_norm(0.0), g)
  for x in jax.tree.leaves(out):
    assert np.all(np.asarray(x) == 0)
  assert float(state.clipped_fraction) == 1.0


def test_max_norm_inf_never_clips():
  g = jnp.array([1e30, -1e30])
  out, state = run(gc.clip_by_global_norm(np.inf), g)
  np.testing.assert_array_equal(out, g)
  assert float(state.clipped_fraction) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
  "make",
  [
    lambda: gc.clip_by_global_norm(1.0),
    lambda: gc.clip_by_norm(1.0, norm="l1", scope="leaf"),
    lambda: gc.clip_by_norm(1.0, norm="linf"),
  ],
)
def test_non_finite_input_is_not_finite_output(make, bad):
  tx = make()
  g = {"a": jnp.array([1.0, bad]), "b": jnp.array([2.0, 3.0])}
  out, state = run(tx, g)
  assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  assert not np.isfinite(state.norm)
  # so apply_if_finite skips the step
  safe = optax.apply_if_finite(optax.chain(make(), optax.sgd(1.0)), max_consecutive_errors=5)
  updates, s = jax.jit(safe.update)(g, safe.init(g))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(updates))
  assert int(s.notfinite_count) == 1


def test_leaf_scope_clips_each_leaf():
  g = {
    "a": jnp.array([3.0, 4.0]),
    "b": jnp.array([0.3, 0.4]),
    "c": jnp.array([30.0, 40.0], jnp.float16),
  }
  out, state = run(gc.clip_by_norm(1.0, scope="leaf"), g)
  np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_array_equal(out["b"], g["b"])
  np.testing.assert_allclose(np.asarray(out["c"], np.float32), [0.6, 0.8], rtol=1e-3)
  assert out["c"].dtype == jnp.float16
  np.testing.assert_allclose(float(state.clipped_fraction), 2 / 3)


# ----------------------------------------------------------------------------- clip_by_value


def test_clip_by_value_seed_example():
  out, state = run(gc.clip_by_value(1.0, stats=True), jnp.array([0.7, 1.1, 3.4]))
  np.testing.assert_allclose(out, [0.7, 1.0, 1.0])
  np.testing.assert_allclose(float(state.clipped_fraction), 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(state.norm), np.linalg.norm([0.7, 1.1, 3.4]), rtol=1e-6)


def test_clip_by_value_negative_band_and_specials():
  g = jnp.array([-5.0, -2.5, 0.0, np.inf, -np.inf, -2.0, -3.0])
  out, state = run(gc.clip_by_value(-2.0, -3.0, stats=True), g)
  np.testing.assert_array_equal(out, [-3.0, -2.5, -2.0, -2.0, -3.0, -2.0, -3.0])
  # the bounds themselves are not clipped
  np.testing.assert_allclose(float(state.clipped_fraction), 4 / 7, rtol=1e-6)
  out, state = run(gc.clip_by_value(-2.0, -3.0, stats=True), jnp.array([np.nan, -5.0]))
  assert np.isnan(out[0]) and out[1] == -3.0
  assert np.isnan(state.clipped_fraction) and np.isnan(state.norm)


@pytest.mark.parametrize("bound", [1e-30, 1e-3, 1.0, 3e38])
def test_clipped_fraction_counts_elements_one_ulp_outside(bound):
  b = np.float32(bound)
  just_out = np.nextafter(b, np.float32(np.inf))
  just_in = np.nextafter(b, np.float32(0))
  g = jnp.asarray([just_out, -just_out, just_in, -just_in, b, -b, 0.0], jnp.float32)
  _, state = run(gc.clip_by_value(b, stats=True), g)
  np.testing.assert_allclose(float(state.clipped_fraction), 2 / 7, rtol=1e-6)


def test_clip_by_value_default_is_symmetric():
  out, _ = run(gc.clip_by_value(2.0), jnp.array([-5.0, 5.0, 1.0], jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), [-2.0, 2.0, 1.0])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: gc.clip_by_value(-1.0), r"max_value.*-1\.0"),
    (lambda: gc.clip_by_value(np.nan), r"max_value.*nan"),
    (lambda: gc.clip_by_value(1.0, np.nan), r"min_value.*nan"),
    (lambda: gc.clip_by_value(1.0, 2.0), r"min_value.*2\.0.*max_value.*1\.0"),
    (lambda: gc.clip_by_norm(-1.0), r"max_norm.*-1\.0"),
    (lambda: gc.clip_by_norm(float("nan")), r"max_norm.*nan"),
    (lambda: gc.clip_by_norm(jnp.array(-2.0)), r"max_norm.*-2"),
    (lambda: gc.clip_by_norm(1.0, norm="l3"), r"norm.*'l3'"),
    (lambda: gc.clip_by_norm(1.0, scope="layer"), r"scope.*'layer'"),
    (lambda: gc.clip_by_global_norm(-0.5), r"clip_by_global_norm: max_norm.*-0\.5"),
    (lambda: gc.clip_by_global_norm(np.ones(3)), r"max_norm.*shape"),
    (lambda: gc.clip_by_global_norm("1.0"), r"max_norm expected a real number, got '1\.0'"),
    (lambda: gc.clip_by_global_norm(1j), r"max_norm expected a real number, got 1j"),
  ],
)
def test_bad_hyperparameters_raise_naming_argument_and_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_traced_max_norm_follows_a_schedule_under_jit():
  schedule = optax.linear_schedule(4.0, 1.0, transition_steps=3)
  tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=schedule)
  g = {"w": jnp.array([3.0, 4.0])}
  state = tx.init(g)
  step = jax.jit(tx.update)
  for want in [4.0, 3.0, 2.0, 1.0]:
    out, state = step(g, state)
    np.testing.assert_allclose(ref.global_l2([np.asarray(out["w"], np.float64)]), want, rtol=1e-6)


def test_traced_clip_value_bounds():
  tx = optax.inject_hyperparams(gc.clip_by_value)(max_value=optax.linear_schedule(3.0, 1.0, 2))
  g = jnp.array([-5.0, 5.0])
  state = tx.init(g)
  out, state = jax.jit(tx.update)(g, state)
  np.testing.assert_array_equal(out, [-3.0, 3.0])


@pytest.mark.parametrize(
  "make",
  [
    lambda: gc.clip_by_global_norm(1.0),
    lambda: gc.clip_by_norm(1.0, scope="leaf", norm="l1"),
    lambda: gc.clip_by_value(1.0),
  ],
)
def test_gradient_through_update_is_finite_at_zero(make):
  tx = make()
  g = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  state = tx.init(g)
  out, _ = jax.jit(tx.update)(g, state)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
  loss = lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(tx.update(t, state)[0]))  # noqa: E731
  grad = jax.jit(jax.grad(loss))(g)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(grad))


def test_clipping_the_update_after_the_optimizer():
  """Levanter's clip_update_norm, StableAdamW's update clipping: a gradctl
  transform chained after the optimizer clips what it returns."""
  tx = optax.chain(optax.adam(1.0), gc.clip_by_global_norm(0.1))
  params = {"w": jnp.ones(4), "b": jnp.ones(2)}
  state = tx.init(params)
  g = {"w": jnp.array([1.0, -2.0, 3.0, -4.0]), "b": jnp.array([10.0, 0.0])}
  updates, state = jax.jit(tx.update)(g, state, params)
  adam_only, _ = jax.jit(optax.adam(1.0).update)(g, optax.adam(1.0).init(params), params)
  want = ref.clip_by_norm([ref.f64(x) for x in jax.tree.leaves(adam_only)], 0.1)
  for got, w in zip(jax.tree.leaves(updates), want, strict=True):
    np.testing.assert_allclose(ref.f64(got), w, rtol=1e-6)
  stats = gc.stats(state)
  np.testing.assert_allclose(
    float(stats["1/clip_by_global_norm/norm"]),
    ref.global_l2([ref.f64(x) for x in jax.tree.leaves(adam_only)]),
    rtol=1e-6,
  )
  assert float(stats["1/clip_by_global_norm/clipped_fraction"]) == 1.0


@pytest.mark.usefixtures("strategy")
@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("min_value", [None, -2.0])
def test_clip_by_value_keeps_within_bound_elements_bitwise(stats, dtype, min_value):
  """Subnormal elements within the bounds included, which a clamp flushes on a CPU."""
  tiny = 7e-45 if dtype == jnp.float32 else 2e-40  # subnormal in each dtype
  g = jnp.asarray(np.array([0.5, tiny, -2.9e-39, 1e-39, 3.0], np.float32)).astype(dtype)
  assert np.count_nonzero(np.asarray(g, np.float32)) == 5  # the subnormals survived the cast
  tx = gc.clip_by_value(1.0, min_value, stats=stats)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_array_equal(
    np.asarray(out[:4]).view(np.uint8), np.asarray(g[:4]).view(np.uint8)
  )
  assert float(out[4]) == 1.0
