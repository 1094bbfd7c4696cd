"""gc.stats: statistics read back from any composed optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradctl as gc


def _grads():
  return {"w": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}


def test_keys_in_a_chain_name_position_transform_and_statistic():
  tx = optax.chain(
    gc.clip_by_value(1.0, stats=True), gc.clip_by_global_norm(1.0), gc.zscore(), optax.adam(1e-3)
  )
  _, state = jax.jit(tx.update)(_grads(), tx.init(_grads()))
  stats = gc.stats(state)
  assert sorted(stats) == sorted(
    [
      "0/clip_by_value/norm",
      "0/clip_by_value/clipped_fraction",
      "1/clip_by_global_norm/norm",
      "1/clip_by_global_norm/clipped_fraction",
      "1/clip_by_global_norm/threshold",
      "1/clip_by_global_norm/compared_norm",
      "2/zscore/norm",
      "2/zscore/mean",
      "2/zscore/std",
    ]
  )
  np.testing.assert_allclose(float(stats["0/clip_by_value/norm"]), 13.0)
  np.testing.assert_allclose(float(stats["0/clip_by_value/clipped_fraction"]), 1.0)
  np.testing.assert_allclose(float(stats["1/clip_by_global_norm/norm"]), np.sqrt(3))
  for value in stats.values():
    assert value.dtype == jnp.float32 and value.shape == ()


def test_two_instances_never_share_a_key():
  tx = optax.chain(
    gc.clip_by_global_norm(1.0),
    optax.chain(gc.clip_by_global_norm(2.0)),
    gc.clip_by_global_norm(3.0),
  )
  _, state = jax.jit(tx.update)(_grads(), tx.init(_grads()))
  norms = [k for k in gc.stats(state) if k.endswith("/norm")]
  assert len(norms) == len(set(norms)) == 3


def test_bare_state_has_no_prefix():
  tx = gc.unit_rescale()
  _, state = jax.jit(tx.update)(_grads(), tx.init(_grads()))
  assert list(gc.stats(state)) == ["unit_rescale/norm"]


def test_found_through_wrappers():
  inner = optax.chain(gc.clip_by_norm(1.0, scope="leaf"), optax.sgd(0.1))
  tx = optax.MultiSteps(
    optax.apply_if_finite(
      optax.inject_hyperparams(
        lambda learning_rate: optax.chain(
          optax.masked(inner, {"w": True, "b": False}), optax.scale(learning_rate)
        )
      )(learning_rate=1.0),
      3,
    ),
    every_k_schedule=1,
  )
  _, state = jax.jit(tx.update)(_grads(), tx.init(_grads()))
  stats = gc.stats(state)
  (key,) = [k for k in stats if k.endswith("clip_by_norm/norm")]
  assert key.startswith("inner_opt_state/inner_state/inner_state/0/inner_state/0/")
  np.testing.assert_allclose(float(stats[key]), 5.0)  # only the unmasked leaf counts
  frac = key.replace("/norm", "/clipped_fraction")
  np.testing.assert_allclose(float(stats[frac]), 1.0)


def test_batched_states_keep_their_batch_axis():
  tx = gc.clip_by_global_norm(1.0)
  g = jnp.stack([jnp.array([3.0, 4.0]), jnp.array([0.3, 0.4])])
  _, state = jax.jit(jax.vmap(lambda x: tx.update(x, tx.init(x))))(g)
  np.testing.assert_allclose(gc.stats(state)["clip_by_global_norm/norm"], [5.0, 0.5])


def test_no_gradctl_state_gives_empty_dict():
  tx = optax.adam(1e-3)
  assert gc.stats(tx.init(_grads())) == {}


def test_a_state_inside_another_is_found_under_its_path():
  """skip_on_spike holds its inner chain's states: each keeps its own key."""
  tx = gc.skip_on_spike(optax.chain(gc.clip_by_global_norm(1.0), optax.adam(1e-3)))
  _, state = jax.jit(tx.update)(_grads(), tx.init(_grads()))
  stats = gc.stats(state)
  assert float(stats["skip_on_spike/norm"]) == 13.0
  assert float(stats["inner_state/0/clip_by_global_norm/norm"]) == 13.0
  assert float(stats["inner_state/0/clip_by_global_norm/clipped_fraction"]) == 1.0
  assert not any(k.startswith("inner_state/1/") for k in stats)  # adam records nothing
