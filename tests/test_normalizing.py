"""unit_rescale and zscore against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradctl as gc
from optax_gradctl._reduction.plan import SCOPES

from .test_clipping import run


def test_unit_rescale_seed_example():
  out, _ = run(gc.unit_rescale(), jnp.array([0.7, 1.1, 3.4]))
  np.testing.assert_allclose(
    out, np.array([0.7, 1.1, 3.4]) / np.linalg.norm([0.7, 1.1, 3.4]), rtol=1e-6
  )
  np.testing.assert_allclose(np.round(np.asarray(out), 3), [0.192, 0.302, 0.934])


def test_unit_rescale_zero_stays_zero_with_finite_gradient():
  g = {"a": jnp.zeros((3,)), "b": jnp.zeros((2,), jnp.float16)}
  tx = gc.unit_rescale()
  out, _ = run(tx, g)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
  grad = jax.jit(
    jax.grad(
      lambda t: sum(
        jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tx.update(t, tx.init(t))[0])
      )
    )
  )(g)
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(grad))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_unit_rescale_non_finite_is_nan(bad):
  out, _ = run(gc.unit_rescale(), {"a": jnp.array([1.0, bad]), "b": jnp.ones(2)})
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(out))


# ----------------------------------------------------------------------------- zscore


def test_zscore_seed_example_and_the_variance_mistake():
  g = np.array([0.7, 1.1, 3.4])
  out, state = run(gc.zscore(), jnp.asarray(g))
  np.testing.assert_allclose(out, (g - g.mean()) / g.std(), rtol=1e-6)
  np.testing.assert_allclose(np.round(np.asarray(out), 3), [-0.869, -0.532, 1.401])
  # the often-quoted numbers divide by the variance, not the standard deviation
  np.testing.assert_allclose(np.round((g - g.mean()) / g.var(), 2), [-0.73, -0.45, 1.18])
  np.testing.assert_allclose(g.var(), 1.4156, atol=1e-4)
  np.testing.assert_allclose(float(state.std), g.std(), rtol=1e-6)


def test_zscore_is_stable_when_the_mean_dwarfs_the_spread():
  rng = np.random.default_rng(0)
  x = (1000.0 + rng.standard_normal(100_000)).astype(np.float32)
  out, state = run(gc.zscore(), jnp.asarray(x))
  x64 = x.astype(np.float64)
  want = (x64 - x64.mean()) / x64.std()
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=1e-3)
  np.testing.assert_allclose(float(state.std), x64.std(), rtol=1e-4)
  # the one-pass E[x^2] - E[x]^2 in float32 is noise here
  naive = np.sqrt(
    np.float32(np.mean(x * x, dtype=np.float32)) - np.float32(np.mean(x, dtype=np.float32)) ** 2
  )
  assert abs(naive - x64.std()) / x64.std() > 1e-2


@pytest.mark.parametrize(
  "dtype,value",
  [
    (dtype, value)
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32)
    for value in (0.0, 1.0, -3.5, 1e30, 1e-30, 6e4)
    if value == 0 or float(jnp.finfo(dtype).tiny) <= abs(value) <= float(jnp.finfo(dtype).max)
  ],
)
def test_zscore_constant_gives_zeros(dtype, value):
  g = {"a": jnp.full((7,), value, dtype), "b": jnp.full((3, 2), value, dtype)}
  for scope in SCOPES:
    out, _ = run(gc.zscore(scope=scope), g)
    for x in jax.tree.leaves(out):
      assert x.dtype == dtype
      np.testing.assert_array_equal(np.asarray(x, np.float32), 0.0)


def test_zscore_zero_gradient_has_finite_gradient():
  tx = gc.zscore()
  g = jnp.zeros((4,))
  grad = jax.jit(jax.grad(lambda t: jnp.sum(tx.update(t, tx.init(t))[0])))(g)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_zscore_non_finite_is_not_finite(bad):
  out, _ = run(gc.zscore(), {"a": jnp.array([1.0, bad, 2.0]), "b": jnp.ones(2)})
  assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


def test_zscore_ddof_like_numpy():
  g = np.array([1.0, 2.0, 4.0, 8.0])
  for ddof in [0, 1, 2]:
    out, state = run(gc.zscore(ddof=ddof), jnp.asarray(g))
    np.testing.assert_allclose(out, (g - g.mean()) / g.std(ddof=ddof), rtol=1e-6)
    np.testing.assert_allclose(float(state.std), g.std(ddof=ddof), rtol=1e-6)


def test_zscore_leaf_scope_records_norm_only():
  g = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([10.0, 30.0])}
  out, state = run(gc.zscore(scope="leaf"), g)
  assert isinstance(state, gc.ZScoreLeafState)
  np.testing.assert_allclose(out["a"], [-1.2247449, 0, 1.2247449], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [-1, 1], rtol=1e-6)


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: gc.zscore(ddof=-1), r"ddof.*-1"),
    (lambda: gc.zscore(ddof=np.nan), r"ddof.*nan"),
    (lambda: gc.zscore(scope="all"), r"scope.*'all'"),
    (lambda: gc.unit_rescale(norm="l0"), r"norm.*'l0'"),
    (lambda: gc.unit_rescale(scope=None), r"scope.*None"),
  ],
)
def test_bad_hyperparameters_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_ddof_too_large_for_the_tree_raises_in_update():
  tx = gc.zscore(ddof=3)
  g = jnp.ones(3)
  with pytest.raises(ValueError, match=r"ddof=3.*3 element"):
    tx.update(g, tx.init(g))


def test_traced_ddof_under_inject_hyperparams():
  tx = optax.inject_hyperparams(gc.zscore)(ddof=1.0)
  g = jnp.array([1.0, 2.0, 4.0])
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  x = np.array([1.0, 2.0, 4.0])
  np.testing.assert_allclose(out, (x - x.mean()) / x.std(ddof=1), rtol=1e-6)
