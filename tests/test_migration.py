"""Each difference that docs/migration.rst states, against a transcription of
the other library's formula (PyTorch, Keras) or against optax itself. The
transcriptions were checked against torch 2.13 and Keras 3.15 themselves with
examples/against_peers.py, which needs both installed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradctl as gc

from . import reference as ref

G = {"a": jnp.array([3.0, -4.0, 0.5]), "b": jnp.array([[1.5, -2.0]])}


def leaves64(tree):
  return [ref.f64(x) for x in jax.tree.leaves(tree)]


def run(tx, g, params=None):
  return jax.jit(tx.update)(g, tx.init(g), params)


def torch_clip_grad_norm(leaves, max_norm, eps=1e-6, dtype=np.float64):
  """torch.nn.utils.clip_grad_norm_: grads * min(max_norm / (total + 1e-6), 1),
  the norm taken in the gradient's dtype (float32 squares overflow beyond
  about 1e19)."""
  with np.errstate(over="ignore", invalid="ignore"):
    total = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, dtype))) for x in leaves)))
    coef = min(max_norm / (total + eps), 1.0)
    return [np.asarray(x, dtype) * dtype(coef) for x in leaves], total


def keras_clip_by_norm(x, clip_norm):
  """Keras' clipnorm, per variable: x * clip_norm / max(||x||, clip_norm);
  a bound of 0 (or None) clips nothing."""
  if not clip_norm:
    return x
  with np.errstate(invalid="ignore"):
    return x * clip_norm / max(np.sqrt(np.sum(x * x)), clip_norm)


def keras_clip_by_global_norm(leaves, clip_norm):
  """Keras' global_clipnorm (tf.clip_by_global_norm): NaN everywhere when the
  global norm is not finite."""
  norm = ref.global_l2(leaves)
  scale = clip_norm * min(1.0 / norm, 1.0 / clip_norm) + (norm - norm)
  return [x * scale for x in leaves]


# ----------------------------------------------------------------------------- PyTorch


def test_clip_grad_norm_agrees_up_to_torch_epsilon():
  out, state = run(gc.clip_by_global_norm(1.0), G)
  want, total = torch_clip_grad_norm(leaves64(G), 1.0)
  for a, b in zip(leaves64(out), want, strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-6)
  np.testing.assert_allclose(float(state.norm), total, rtol=1e-6)  # the value torch returns


def test_clip_grad_norm_epsilon_gap_is_one_millionth_over_the_norm():
  """torch's result falls short of max_norm by 1e-6 / (||g|| + 1e-6),
  whatever max_norm: 1e-3 relative at a norm of 1e-3."""
  g = {"a": jnp.array([6e-4, 8e-4])}  # norm 1e-3
  out, _ = run(gc.clip_by_global_norm(1e-4), g)
  torch_out, _ = torch_clip_grad_norm(leaves64(g), 1e-4)
  np.testing.assert_allclose(ref.global_l2(leaves64(out)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(ref.global_l2(torch_out), 1e-4 * (1 - 1e-6 / (1e-3 + 1e-6)), rtol=1e-9)


def test_an_inf_element_torch_makes_it_nan_gc_makes_the_scope_nan():
  g = {"a": jnp.array([jnp.inf, 1.0, -2.0]), "b": jnp.array([3.0])}
  with np.errstate(invalid="ignore"):
    torch_out, total = torch_clip_grad_norm(leaves64(g), 1.0)
  assert total == np.inf
  flat = np.concatenate(torch_out)
  assert np.isnan(flat[0]) and np.all(flat[1:] == 0)  # only the inf element is NaN
  out, _ = run(gc.clip_by_global_norm(1.0), g)
  assert all(np.all(np.isnan(x)) for x in leaves64(out))


def test_finite_gradients_whose_squares_overflow_float32():
  """torch zeroes them (and error_if_nonfinite raises on them); gc clips exactly."""
  g = {"a": jnp.full((12,), 1e20, jnp.float32), "b": jnp.full((12,), -1e20, jnp.float32)}
  torch_out, total = torch_clip_grad_norm(jax.tree.leaves(g), 1.0, dtype=np.float32)
  assert total == np.inf and all(np.all(x == 0) for x in torch_out)
  out, state = run(gc.clip_by_global_norm(1.0), g)
  np.testing.assert_allclose(ref.global_l2(leaves64(out)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(state.norm), 1e20 * np.sqrt(24), rtol=1e-6)


def test_clip_grad_norm_epsilon_matters_at_small_norms():
  """torch's 1e-6 leaves a clipped gradient short of max_norm; gradctl's is exact."""
  g = {"a": jnp.array([3e-6, 4e-6])}
  out, _ = run(gc.clip_by_global_norm(1e-6), g)
  torch_out, _ = torch_clip_grad_norm(leaves64(g), 1e-6)
  np.testing.assert_allclose(ref.global_l2(leaves64(out)), 1e-6, rtol=1e-6)
  np.testing.assert_allclose(ref.global_l2(torch_out), 1e-6 * 5 / 6, rtol=1e-6)


def test_error_if_nonfinite_becomes_a_skipped_step():
  """torch raises on a non-finite norm; a jitted step cannot, so it is skipped."""
  bad = {"a": jnp.array([jnp.nan, 1.0]), "b": jnp.array([jnp.inf])}
  tx = gc.skip_on_spike(optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(1.0)))
  params = jax.tree.map(jnp.zeros_like, bad)
  out, state = jax.jit(tx.update)(bad, tx.init(params), params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
  assert float(state.skipped) == 1.0 and float(state.nonfinite) == 1.0
  assert not np.isfinite(float(state.norm))


def test_clip_grad_value_is_clip_by_value():
  g = jnp.array([-3.0, -0.5, 0.0, 0.5, 3.0, jnp.nan, jnp.inf])
  out, _ = run(gc.clip_by_value(1.0), g)
  np.testing.assert_array_equal(out, np.clip(np.asarray(g), -1.0, 1.0))  # NaN stays NaN


# ----------------------------------------------------------------------------- Keras


def test_clipnorm_is_clip_by_norm_per_leaf():
  out, _ = run(gc.clip_by_norm(2.0, scope="leaf"), G)
  for a, x in zip(leaves64(out), leaves64(G), strict=True):
    np.testing.assert_allclose(a, keras_clip_by_norm(x, 2.0), rtol=2e-6)


def test_a_bound_of_zero_keras_clips_nothing_gc_zeroes():
  out, _ = run(gc.clip_by_norm(0.0, scope="leaf"), G)
  assert all(np.all(x == 0) for x in leaves64(out))
  for x in leaves64(G):
    np.testing.assert_array_equal(keras_clip_by_norm(x, 0.0), x)


def test_clipnorm_with_an_inf_nans_that_element_gc_that_leaf():
  bad = {"a": jnp.array([jnp.inf, 1.0, -2.0]), "b": jnp.array([3.0, 4.0])}
  keras_a, keras_b = (keras_clip_by_norm(x, 1.0) for x in leaves64(bad))
  assert np.isnan(keras_a[0]) and np.all(keras_a[1:] == 0)
  out, _ = run(gc.clip_by_norm(1.0, scope="leaf"), bad)
  assert np.all(np.isnan(ref.f64(out["a"])))
  np.testing.assert_allclose(ref.f64(out["b"]), keras_b, rtol=1e-6)  # the other leaf as Keras


def test_global_clipnorm_is_clip_by_global_norm_including_non_finite():
  out, _ = run(gc.clip_by_global_norm(2.0), G)
  for a, b in zip(leaves64(out), keras_clip_by_global_norm(leaves64(G), 2.0), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-6)
  bad = {"a": jnp.array([jnp.inf, 1.0]), "b": jnp.array([2.0])}
  out, _ = run(gc.clip_by_global_norm(2.0), bad)
  with np.errstate(invalid="ignore"):
    want = keras_clip_by_global_norm(leaves64(bad), 2.0)
  assert all(np.all(np.isnan(x)) for x in want)
  assert all(np.all(np.isnan(x)) for x in leaves64(out))


# ----------------------------------------------------------------------------- optax


def test_clip_is_clip_by_value_and_stats_can_be_dropped():
  g = jnp.array([-3.0, 0.2, 3.0])
  want = optax.clip(1.0).update(g, optax.EmptyState())[0]
  out, state = run(gc.clip_by_value(1.0), g)  # by default, as optax.clip: no statistics
  np.testing.assert_array_equal(out, want)
  assert gc.stats(state) == {}
  out, state = run(gc.clip_by_value(1.0, stats=True), g)
  np.testing.assert_array_equal(out, want)
  np.testing.assert_allclose(float(state.clipped_fraction), 2 / 3)


@pytest.mark.parametrize(
  "dtype,value,agree", [(jnp.float32, 1.0, True), (jnp.float16, 300.0, False)]
)
def test_clip_by_global_norm_agrees_until_optax_overflows(dtype, value, agree):
  g = {"a": jnp.full((4,), value, dtype)}
  theirs = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0]
  ours, _ = run(gc.clip_by_global_norm(1.0), g)
  np.testing.assert_allclose(ref.global_l2(leaves64(ours)), 1.0, rtol=1e-3)
  if agree:
    np.testing.assert_allclose(ref.f64(ours["a"]), ref.f64(theirs["a"]), rtol=1e-6)
  else:
    assert np.all(ref.f64(theirs["a"]) == 0)  # optax: inf norm, zero update


def test_normalize_by_update_norm_is_unit_rescale_without_epsilon():
  theirs = optax.normalize_by_update_norm(scale_factor=1.0).update(G, optax.EmptyState())[0]
  ours, _ = run(gc.unit_rescale(), G)
  for a, b in zip(leaves64(ours), leaves64(theirs), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  tiny = {"a": jnp.full((4,), 1e-30)}
  theirs = optax.normalize_by_update_norm(scale_factor=1.0).update(tiny, optax.EmptyState())[0]
  ours, _ = run(gc.unit_rescale(), tiny)
  np.testing.assert_allclose(ref.global_l2(leaves64(ours)), 1.0, rtol=1e-6)
  assert ref.global_l2(leaves64(theirs)) < 1e-20  # optax's eps=1e-6 dominates


def test_apply_if_finite_lets_a_non_finite_step_through_skip_on_spike_never_does():
  bad = {"a": jnp.array([jnp.nan, 1.0])}
  params = {"a": jnp.zeros(2)}
  theirs = optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=2)
  ours = gc.skip_on_spike(optax.sgd(1.0), max_consecutive=2)
  ts, os_ = theirs.init(params), ours.init(params)
  their_step, our_step = jax.jit(theirs.update), jax.jit(ours.update)
  for _ in range(3):
    tu, ts = their_step(bad, ts, params)
    ou, os_ = our_step(bad, os_, params)
  assert np.isnan(np.asarray(tu["a"])).any()  # the third NaN step is applied
  np.testing.assert_array_equal(ou["a"], [0.0, 0.0])
  assert int(os_.skip_count) == 3
