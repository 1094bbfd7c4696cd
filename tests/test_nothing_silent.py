"""What a new user tries either works as documented or raises, naming the
argument and the value: no misuse is silently ignored or silently wrong, and
every statistic says what it measured."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gradctl as gc

from . import reference as ref

SGD = optax.sgd(1.0)


def bits(x):
  return np.atleast_1d(np.asarray(x)).view(np.uint8)


# ----------------------------------------------------------------------------- None thresholds


@pytest.mark.parametrize(
  "make,name",
  [
    (lambda: gc.clip_by_global_norm(None), "max_norm"),
    (lambda: gc.clip_by_norm(None), "max_norm"),
    (lambda: gc.per_example_clip(None), "l2_norm_clip"),
    (lambda: gc.zclip(None), "z_threshold"),
    (lambda: gc.zclip(decay=None), "decay"),
    (lambda: gc.autoclip(None), "percentile"),
    (lambda: gc.adaptive_grad_clip(None), "clipping"),
    (lambda: gc.adagc(lambda_abs=None), "lambda_abs"),
    (lambda: gc.skip_on_spike(SGD, z_threshold=None), "z_threshold"),
    (lambda: gc.skip_on_spike(SGD, warmup_steps=None), "warmup_steps"),
    (lambda: gc.clip_by_value(None), "max_value"),
  ],
)
def test_a_none_threshold_raises_naming_it(make, name):
  with pytest.raises(ValueError, match=rf"{name} must be .*got None"):
    make()


# ----------------------------------------------------------------------------- the loss, as optax passes it


def test_the_loss_passed_as_value_serves_reduce_on_plateau_in_the_same_chain():
  tx = optax.chain(
    gc.skip_on_spike(optax.adam(1e-2), warmup_steps=5), optax.contrib.reduce_on_plateau()
  )
  g = jnp.ones(3)
  state, step = tx.init(g), jax.jit(tx.update)
  for _ in range(19):
    out, state = step(g, state, g, value=jnp.float32(1.0))
  out, state = step(g, state, g, value=jnp.float32(1e6))
  skip_state = state[0]
  assert float(skip_state.loss) == 1e6 and float(skip_state.loss_spike) == 1.0
  assert float(skip_state.skipped) == 1.0 and np.all(np.asarray(out) == 0)
  assert np.isfinite(float(skip_state.loss_threshold))
  # reduce_on_plateau saw the plateau of ones, and cut the learning rate
  assert float(state[1].best_value) == 1.0 and float(state[1].scale) < 1.0


def test_the_value_reaches_inner():
  seen = []

  def update(updates, state, params=None, *, value=None, **extra):
    seen.append(value)
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = gc.skip_on_spike(inner)
  tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=jnp.float32(3.0))
  assert len(seen) == 1 and float(seen[0]) == 3.0


def test_loss_as_a_keyword_raises_pointing_to_value():
  tx = gc.skip_on_spike(SGD)
  with pytest.raises(TypeError, match=r"value=loss"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), loss=jnp.float32(1.0))


@pytest.mark.parametrize("shape", [(1,), (2,), (8,)])
def test_a_loss_that_is_not_a_scalar_raises(shape):
  tx = gc.skip_on_spike(SGD)
  with pytest.raises(ValueError, match=rf"value .* must be a scalar, got shape \({shape[0]},\)"):
    jax.jit(tx.update)(jnp.ones(2), tx.init(jnp.ones(2)), value=jnp.ones(shape))


def test_an_optimizer_factory_as_inner_raises_saying_to_call_it():
  with pytest.raises(TypeError, match=r"adamw is a function that makes one: call it"):
    gc.skip_on_spike(optax.adamw)
  with pytest.raises(TypeError, match="GradientTransformation"):
    gc.skip_on_spike("adam")


# ----------------------------------------------------------------------------- traced hyperparameters


def _two_steps(factory, name, good, bad, g, params=None, **kwargs):
  """Two jitted steps under inject_hyperparams, the hyperparameter ``name``
  scheduled to ``good`` at the first and ``bad`` at the second."""
  schedule = lambda count: jnp.where(count == 0, good, bad)  # noqa: E731
  tx = optax.inject_hyperparams(factory)(**{name: schedule}, **kwargs)
  state, step = tx.init(g), jax.jit(tx.update)
  first, state = step(g, state, params)
  second, new = step(g, state, params)
  return first, second, state, new


@pytest.mark.parametrize(
  "factory,name,good,bad",
  [
    (gc.clip_by_global_norm, "max_norm", 1.0, -3.0),
    (lambda max_norm: gc.clip_by_norm(max_norm, norm="l1", scope="leaf"), "max_norm", 1.0, -3.0),
    (gc.clip_by_value, "max_value", 1.0, -3.0),
    (lambda min_value: gc.clip_by_value(1.0, min_value), "min_value", -1.0, 2.0),
    (gc.adaptive_grad_clip, "clipping", 0.1, -1.0),
    (lambda ddof: gc.zscore(ddof=ddof), "ddof", 0.0, -1.0),
    (lambda z_threshold: gc.zclip(z_threshold, warmup_steps=1), "z_threshold", 2.0, -1.0),
    (lambda decay: gc.zclip(decay=decay, warmup_steps=1), "decay", 0.9, 1.5),
    (lambda percentile: gc.autoclip(percentile, history=4), "percentile", 50.0, 150.0),
    (lambda lambda_abs: gc.adagc(lambda_abs=lambda_abs), "lambda_abs", 1.0, -1.0),
    (lambda z: gc.skip_on_spike(SGD, z_threshold=z, warmup_steps=1), "z", 6.0, -1.0),
  ],
)
def test_a_schedule_out_of_range_gives_a_nan_update_not_a_wrong_one(factory, name, good, bad):
  """A schedule that reaches max_norm=-3 reversed the gradient: [3, 4]
  became [-1.8, -2.4]. Now the step is NaN, which apply_if_finite skips."""
  g = {"w": jnp.array([[3.0, 4.0], [0.5, -1.0]])}
  first, second, _, _ = _two_steps(factory, name, good, bad, g, params=g)
  assert np.all(np.isfinite(np.asarray(first["w"])))
  assert np.all(np.isnan(np.asarray(second["w"])))


def test_an_out_of_range_schedule_leaves_the_estimators_unchanged():
  g = jnp.array([3.0, 4.0])
  for factory, field in [
    (lambda z: gc.zclip(z, warmup_steps=1), "ema"),
    (lambda z: gc.skip_on_spike(optax.adam(0.1), z_threshold=z, warmup_steps=1), "ema"),
  ]:
    _, _, before, after = _two_steps(factory, "z", 2.0, -1.0, g)
    old, new = getattr(before.inner_state, field), getattr(after.inner_state, field)
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
      np.testing.assert_array_equal(bits(a), bits(b))


def test_an_out_of_range_schedule_is_skipped_by_apply_if_finite_downstream():
  tx = optax.chain(
    optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=lambda c: 1.0 - 4.0 * c),
    optax.apply_if_finite(optax.sgd(1.0), 3),
  )
  g = jnp.array([3.0, 4.0])
  state, step = tx.init(g), jax.jit(tx.update)
  _, state = step(g, state)
  out, state = step(g, state)
  np.testing.assert_array_equal(out, [0.0, 0.0])
  assert int(state[1].total_notfinite) == 1


# ----------------------------------------------------------------------------- gc.stats of every container


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(2, 3, rngs=rngs)

  def __call__(self, x):
    return self.dense(x)


def _optimizer(control):
  model = _Model(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.chain(control, optax.adam(1e-3)), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2))) ** 2))(model)
  opt.update(model, grads)
  return opt


@pytest.mark.parametrize("control", [gc.zscore(), gc.zclip(), gc.monitor(), gc.autoclip()])
def test_stats_read_an_nnx_state_and_a_split_as_the_optimizer(control):
  opt = _optimizer(control)
  want = gc.stats(opt)
  assert want
  for got in (gc.stats(nnx.state(opt)), gc.stats(nnx.split(opt)[1])):
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


@pytest.mark.parametrize("control", [gc.zscore(), gc.zclip(), gc.skip_on_spike(optax.adam(1e-3))])
def test_stats_read_a_checkpoint_restored_without_a_target(control):
  g = {"w": jnp.array([3.0, 4.0])}
  _, state = jax.jit(control.update)(g, control.init(g), g)
  restored = flax.serialization.msgpack_restore(flax.serialization.to_bytes(state))
  want, got = gc.stats(state), gc.stats(restored)
  assert want and sorted(got) == sorted(want)


def test_stats_of_plain_mappings_that_could_be_two_transforms_raise():
  opt = _optimizer(gc.clip_by_global_norm(1.0))
  with pytest.raises(
    ValueError, match=r"clip_by_norm or clip_by_global_norm.*gc.stats\(optimizer\)"
  ):
    gc.stats(nnx.state(opt))


def test_stats_of_what_is_not_a_state_raise_and_of_a_state_without_statistics_is_empty():
  tx = gc.clip_by_global_norm(1.0)
  with pytest.raises(TypeError, match=r"got GradientTransformation \(pass its state"):
    gc.stats(tx)
  with pytest.raises(TypeError, match="a tree of arrays; got str"):
    gc.stats("0/clip_by_global_norm/norm")
  assert gc.stats(optax.adam(1e-3).init({"w": jnp.ones(2)})) == {}
  assert gc.stats({"w": jnp.ones(2)}) == {}


# ----------------------------------------------------------------------------- statistics say what they measured


@pytest.mark.parametrize("ord", ["l1", "l2", "linf"])
@pytest.mark.parametrize("scope", ["global", "leaf"])
def test_clips_record_the_norm_they_compared_and_the_threshold(ord, scope):
  g = {"a": jnp.array([3.0, -4.0, 0.5]), "b": jnp.array([[1.5, -2.0]])}
  tx = gc.clip_by_norm(2.0, norm=ord, scope=scope)
  _, state = jax.jit(tx.update)(g, tx.init(g))
  leaves = [ref.f64(x) for x in jax.tree.leaves(g)]
  if scope == "global":
    want = ref.vector_norm(np.concatenate([x.ravel() for x in leaves]), ord)
  else:
    want = max(ref.vector_norm(x.ravel(), ord) for x in leaves)
  np.testing.assert_allclose(float(state.compared_norm), want, rtol=1e-6)
  assert float(state.threshold) == 2.0
  np.testing.assert_allclose(float(state.norm), ref.global_l2(leaves), rtol=1e-6)


def test_a_scheduled_threshold_is_recorded():
  tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=lambda c: 3.0 - c)
  g = jnp.array([3.0, 4.0])
  state, step = tx.init(g), jax.jit(tx.update)
  for want in (3.0, 2.0, 1.0):
    _, state = step(g, state)
    assert float(state.inner_state.threshold) == want


def test_every_statistic_is_float32_but_the_skip_counts():
  tx = optax.chain(
    gc.clip_by_value(1.0, stats=True),
    gc.zclip(),
    gc.autoclip(),
    gc.adagc(),
    gc.per_example_clip(1.0),
    gc.skip_on_spike(optax.adam(1e-3)),
  )
  tx = optax.chain(gc.monitor(), tx)
  g = {"w": jnp.ones((2, 3))}
  state = tx.init(g)
  for key, value in gc.stats(state).items():
    want = jnp.int32 if key.endswith(("skip_count", "consecutive_skips")) else jnp.float32
    assert value.dtype == want, key


def test_multisteps_micro_steps_repeat_the_last_inner_statistics():
  """As gc.stats documents: the inner transform runs once every k calls."""
  tx = optax.MultiSteps(gc.clip_by_global_norm(1.0), every_k_schedule=2)
  state, step = tx.init(jnp.zeros(2)), jax.jit(tx.update)
  norms = []
  for x in [1.0, 3.0, 5.0, 7.0, 9.0]:
    _, state = step(jnp.array([x, 0.0]), state)
    norms.append(float(gc.stats(state)["inner_opt_state/clip_by_global_norm/norm"]))
  assert norms == [0.0, 2.0, 2.0, 6.0, 6.0]  # the mean of each pair, once it is applied


# ----------------------------------------------------------------------------- a loss spike after a steep descent


def test_a_loss_spike_right_after_a_steep_descent_is_caught():
  """The loss falls from ln 64 to 0.059 in 50 steps, then a batch of random
  labels sends it to 6.85. Judged by its level, the spread of the descent
  hid it (z = 4.2 against 6); judged by its change, it is a spike."""
  losses = np.geomspace(np.log(64.0), 0.059, 50)
  tx = gc.skip_on_spike(optax.adamw(1e-2), loss_z_threshold=6.0, warmup_steps=20)
  g = jnp.full((4,), 0.1)
  state, step = tx.init(g), jax.jit(tx.update)
  for loss in losses:
    _, state = step(g, state, g, value=jnp.float32(loss))
    assert float(state.loss_spike) == 0.0
  _, state = step(g, state, g, value=jnp.float32(6.85))
  assert float(state.loss_spike) == 1.0 and float(state.skipped) == 1.0
  assert float(state.loss_threshold) < 1.0 < float(state.loss_z) / 6.0


# ----------------------------------------------------------------------------- mutations that survived


@pytest.mark.parametrize("spike", ["norm", "loss"])
def test_a_finite_spike_under_adam_leaves_its_state_bitwise_unchanged(spike):
  tx = gc.skip_on_spike(optax.adam(0.1), warmup_steps=3)
  state, step = tx.init(jnp.zeros(1)), jax.jit(tx.update)
  for x in [1.0, 1.1, 0.9, 1.0]:
    _, state = step(jnp.array([x]), state, value=jnp.float32(x))
  g, loss = (100.0, 1.0) if spike == "norm" else (1.0, 100.0)
  out, new = step(jnp.array([g]), state, value=jnp.float32(loss))
  assert float(new.skipped) == 1.0 and float(getattr(new, f"{spike}_spike")) == 1.0
  assert float(out[0]) == 0.0
  for a, b in zip(
    jax.tree.leaves(state.inner_state), jax.tree.leaves(new.inner_state), strict=True
  ):
    np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("bound", [1.0, -2.0, 0.0])
def test_equal_bounds_are_accepted(bound):
  tx = gc.clip_by_value(bound, bound, stats=True)
  g = jnp.array([-5.0, bound, 3.0])
  out, state = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_array_equal(out, [bound] * 3)
  np.testing.assert_allclose(float(state.clipped_fraction), 2 / 3, rtol=1e-6)
  out, _ = jax.jit(tx.update)(jnp.array([np.nan, bound]), tx.init(g))
  assert np.isnan(out[0]) and out[1] == bound


G = {"a": jnp.array([3.0, -4.0])}  # L2 norm 5, L1 norm 7, L-inf norm 4
AT_THE_THRESHOLD = [
  ("clip_by_global_norm", lambda: gc.clip_by_global_norm(5.0), G, None),
  ("clip_by_norm_l1", lambda: gc.clip_by_norm(7.0, norm="l1"), G, None),
  ("clip_by_norm_linf_leaf", lambda: gc.clip_by_norm(4.0, norm="linf", scope="leaf"), G, None),
  ("per_example_clip", lambda: gc.per_example_clip(5.0), {"a": jnp.array([[3.0, -4.0]])}, None),
  ("adaptive_grad_clip", lambda: gc.adaptive_grad_clip(0.5), G, {"a": jnp.array([6.0, 8.0])}),
  ("zclip", lambda: gc.zclip(max_norm=5.0), G, None),
  ("adagc", lambda: gc.adagc(lambda_abs=5.0), G, None),
]


@pytest.mark.parametrize(
  "name,make,g,params", AT_THE_THRESHOLD, ids=[c[0] for c in AT_THE_THRESHOLD]
)
def test_a_norm_equal_to_the_threshold_is_not_clipped(name, make, g, params):
  tx = make()
  out, state = jax.jit(tx.update)(g, tx.init(g), params)
  if name == "per_example_clip":
    np.testing.assert_array_equal(bits(out["a"]), bits(g["a"][0]))
  else:
    np.testing.assert_array_equal(bits(out["a"]), bits(g["a"]))
  assert float(state.clipped_fraction) == 0.0
