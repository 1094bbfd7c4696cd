"""zclip, autoclip and skip_on_spike, step by step against float64 NumPy transcriptions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_gradctl as gc
from optax_gradctl._zclip import ZCLIP_MODES

from . import reference
from .strategies import VARIANTS, per_variant, tree_and_magnitudes, variant_settings
from .test_whole_range import assert_leaves, assert_norm_statistic

DIRECTION = {"a": np.array([0.6, 0.0]), "b": np.array([[0.8]])}  # a unit vector over two leaves


def gradient(norm: float) -> dict:
  with np.errstate(invalid="ignore"):  # inf * 0 is NaN: a non-finite gradient either way
    return {k: jnp.asarray(v * norm, jnp.float32) for k, v in DIRECTION.items()}


def norm_of(tree) -> float:
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
  return float(np.sqrt(np.sum(flat**2)))


def planted_norms(steps=300, seed=0):
  """Noisy norms around 1 with planted spikes, a drift, a NaN and an inf step."""
  rng = np.random.default_rng(seed)
  norms = np.exp(rng.normal(0, 0.1, steps)) * np.linspace(1.0, 0.5, steps)
  spikes = [60, 61, 62, *range(150, 163), 240]
  norms[[t for t in spikes if t < steps]] *= 30
  norms[100] = np.nan
  norms[min(200, steps - 7)] = np.inf
  return norms


# ----------------------------------------------------------------------------- references


class RefEma:
  """The EMA estimator as specified: warm-up mean and population variance, then an EMA."""

  def __init__(self, warmup, decay):
    self.warmup, self.decay, self.buffer, self.mean, self.var = warmup, decay, [], None, None

  @property
  def warm(self):
    return self.mean is not None

  def z(self, x):
    return (x - self.mean) / (math.sqrt(self.var) + 1e-6)

  def enter(self, x):
    if not self.warm:
      self.buffer.append(x)
      if len(self.buffer) >= self.warmup:
        self.mean, self.var = float(np.mean(self.buffer)), float(np.var(self.buffer))
    else:
      self.mean = self.decay * self.mean + (1 - self.decay) * x
      self.var = self.decay * self.var + (1 - self.decay) * (x - self.mean) ** 2

  def report(self):
    if self.warm:
      return self.mean, math.sqrt(self.var)
    return float(np.mean(self.buffer)) if self.buffer else 0.0, float(
      np.std(self.buffer)
    ) if self.buffer else 0.0


def ref_zclip(norms, z_t, decay, warmup, mode, max_norm):
  ema, rows = RefEma(warmup, decay), []
  for x in norms:
    if not np.isfinite(x):
      mean, std = ema.report()
      rows.append({"out": np.nan, "z": None, "ema_mean": mean, "ema_std": std})
      continue
    cap, z, boundary = None, 0.0, np.inf
    fixed = max_norm if max_norm is not None else np.inf
    if ema.warm:
      z = ema.z(x)
      std = math.sqrt(ema.var)
      boundary = ema.mean + z_t * (std + 1e-6)  # where z reaches z_t
      if z > z_t:
        cap = {
          "adaptive": ema.mean + z_t * std / (z / z_t),
          "mean": ema.mean,
          "percentile": ema.mean + z_t * std,
        }[mode]
    limit = min(cap if cap is not None else np.inf, fixed)
    out = min(x, limit)
    mean, std = ema.report()  # the estimator the norm was judged against
    ema.enter(cap if cap is not None else x)
    rows.append(
      {
        "out": out,
        "z": z,
        "clipped": x > limit,
        # the largest norm let through: the cap on a spike, else where clipping starts
        "threshold": min(cap if cap is not None else boundary, fixed),
        "ema_mean": mean,
        "ema_std": std,
      }
    )
  return rows


def ref_autoclip(norms, q, history):
  hist, rows = [], []
  for x in norms:
    if np.isfinite(x):
      hist = [*hist, x][-history:]
    threshold = float(np.percentile(hist, q)) if hist else np.inf
    out = np.nan if not np.isfinite(x) else min(x, threshold)
    rows.append({"out": out, "threshold": threshold})
  return rows


def ref_skip(norms, z_t, decay, warmup, max_consecutive):
  ema, rows, skips, run = RefEma(warmup, decay), [], 0, 0
  for x in norms:
    finite = np.isfinite(x)
    z = ema.z(x) if ema.warm and finite else 0.0
    spike = ema.warm and finite and z > z_t
    skip = (not finite) or (spike and run < max_consecutive)
    mean, std = ema.report()  # the estimator the norm was judged against
    threshold = ema.mean + z_t * (math.sqrt(ema.var) + 1e-6) if ema.warm else np.inf
    if skip:
      skips, run = skips + 1, run + 1
    else:
      run = 0
      ema.enter(x)
    rows.append(
      {
        "skip": skip,
        "threshold": threshold,
        "z": z,
        "skip_count": skips,
        "consecutive": run,
        "ema_mean": mean,
        "ema_std": std,
      }
    )
  return rows


def run_steps(tx, norms):
  state = tx.init(gradient(1.0))
  step = jax.jit(tx.update)
  outs, states = [], []
  for x in norms:
    out, state = step(gradient(x), state)
    outs.append(out)
    states.append(state)
  return outs, states


# ----------------------------------------------------------------------------- zclip


@pytest.mark.parametrize("mode", ZCLIP_MODES)
@pytest.mark.parametrize("max_norm", [None, 0.9])
def test_zclip_matches_reference_step_by_step(mode, max_norm):
  norms = planted_norms()
  want = ref_zclip(norms, 2.5, 0.97, 25, mode, max_norm)
  outs, states = run_steps(
    gc.zclip(2.5, decay=0.97, warmup_steps=25, mode=mode, max_norm=max_norm), norms
  )
  for t, (out, state, ref) in enumerate(zip(outs, states, want, strict=True)):
    if ref["z"] is None:  # the non-finite steps
      assert not np.isfinite(norm_of(out)), t
      continue
    assert abs(ref["z"] - 2.5) > 1e-3, "test data too close to the threshold"
    np.testing.assert_allclose(norm_of(out), ref["out"], rtol=1e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(float(state.z), ref["z"], rtol=1e-4, atol=1e-4, err_msg=f"step {t}")
    np.testing.assert_allclose(
      float(state.threshold), ref["threshold"], rtol=1e-5, err_msg=f"step {t}"
    )
    np.testing.assert_allclose(
      float(state.ema_mean), ref["ema_mean"], rtol=1e-5, err_msg=f"step {t}"
    )
    np.testing.assert_allclose(
      float(state.ema_std), ref["ema_std"], rtol=1e-4, atol=1e-7, err_msg=f"step {t}"
    )
    assert float(state.clipped_fraction) == float(ref["clipped"])
  assert sum(float(s.clipped_fraction) for s in states) >= 10  # the spikes were clipped


def test_zclip_non_finite_step_leaves_statistics_bitwise_unchanged():
  tx = gc.zclip(warmup_steps=3)
  state, step = tx.init(gradient(1.0)), jax.jit(tx.update)
  for x in [1.0, 1.1, 0.9, 1.0]:
    _, state = step(gradient(x), state)
  for bad in (np.nan, np.inf):
    out, new = step(gradient(bad), state)
    assert np.all(np.isnan(np.asarray(out["a"])))
    for a, b in zip(jax.tree.leaves(new.ema), jax.tree.leaves(state.ema), strict=True):
      np.testing.assert_array_equal(a, b)
    assert not np.isfinite(new.norm)
    # the next step is judged as if the non-finite one had not happened
    after_bad, after_good = step(gradient(1.0), new)[1], step(gradient(1.0), state)[1]
    assert after_bad.ema_mean == after_good.ema_mean and after_bad.ema_std == after_good.ema_std


def test_zclip_overflowing_finite_gradient_counts_as_infinite_z():
  tx = gc.zclip(warmup_steps=2)
  state, step = tx.init(jnp.zeros(4)), jax.jit(tx.update)
  for x in [1.0, 1.2]:
    _, state = step(jnp.full((4,), x / 2), state)
  huge = jnp.full((4,), 3e38, jnp.float32)  # its norm overflows float32
  out, new = step(huge, state)
  assert float(new.z) == np.inf and not np.isfinite(new.norm)
  # the adaptive cap at z=inf is the mean the norm was judged against
  np.testing.assert_allclose(norm_of(out), float(new.ema_mean), rtol=1e-5)
  np.testing.assert_allclose(float(new.threshold), float(new.ema_mean), rtol=1e-6)
  # the cap, not the overflowing norm, fed the EMA
  assert np.isfinite(new.ema.mean) and float(new.ema.mean) == pytest.approx(
    float(state.ema.mean), rel=1e-6
  )


def test_zclip_warmup_clips_to_max_norm_only():
  tx = gc.zclip(warmup_steps=5, max_norm=2.0)
  state, step = tx.init(gradient(1.0)), jax.jit(tx.update)
  out, state = step(gradient(10.0), state)
  np.testing.assert_allclose(norm_of(out), 2.0, rtol=1e-6)
  assert float(state.threshold) == 2.0 and float(state.z) == 0.0
  out, state = step(gradient(1.5), state)
  np.testing.assert_allclose(norm_of(out), 1.5, rtol=1e-6)
  assert float(state.threshold) == 2.0 and float(state.clipped_fraction) == 0.0


# ----------------------------------------------------------------------------- autoclip


@pytest.mark.parametrize("q,history", [(10.0, 50), (50.0, 7), (0.0, 20), (100.0, 1000)])
def test_autoclip_matches_reference_step_by_step(q, history):
  norms = planted_norms(steps=200)
  want = ref_autoclip(norms, q, history)
  outs, states = run_steps(gc.autoclip(q, history=history), norms)
  for t, (out, state, ref) in enumerate(zip(outs, states, want, strict=True)):
    np.testing.assert_allclose(
      float(state.threshold), ref["threshold"], rtol=1e-6, err_msg=f"step {t}"
    )
    if np.isnan(ref["out"]):
      assert not np.isfinite(norm_of(out))
    else:
      np.testing.assert_allclose(norm_of(out), ref["out"], rtol=1e-5, err_msg=f"step {t}")


def test_autoclip_history_survives_non_finite_steps_bitwise():
  tx = gc.autoclip(history=4)
  state, step = tx.init(gradient(1.0)), jax.jit(tx.update)
  for x in [1.0, 2.0]:
    _, state = step(gradient(x), state)
  for bad in (np.nan, np.inf):
    _, new = step(gradient(bad), state)
    np.testing.assert_array_equal(new.history, state.history)
    assert int(new.count) == int(state.count)


def test_autoclip_history_must_be_static():
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(lambda h: gc.autoclip(history=h).init(jnp.zeros(1)))(4)
  tx = optax.inject_hyperparams(gc.autoclip, static_args=("history",))(percentile=20.0, history=8)
  state = tx.init(gradient(1.0))
  _, state = jax.jit(tx.update)(gradient(2.0), state)
  assert state.inner_state.history.shape == (8,)


# ----------------------------------------------------------------------------- skip_on_spike


@pytest.mark.parametrize("max_consecutive", [10, 3, 0])
def test_skip_on_spike_matches_reference_step_by_step(max_consecutive):
  norms = planted_norms()
  want = ref_skip(norms, 6.0, 0.99, 20, max_consecutive)
  tx = gc.skip_on_spike(
    optax.sgd(1.0), z_threshold=6.0, decay=0.99, warmup_steps=20, max_consecutive=max_consecutive
  )
  outs, states = run_steps(tx, norms)
  for t, (out, state, ref) in enumerate(zip(outs, states, want, strict=True)):
    if ref["skip"]:
      assert norm_of(out) == 0.0, t
    else:
      np.testing.assert_allclose(norm_of(out), norms[t], rtol=1e-5, err_msg=f"step {t}")
    assert int(state.skip_count) == ref["skip_count"], t
    assert int(state.consecutive_skips) == ref["consecutive"], t
    assert (float(state.norm) > float(state.threshold)) == (ref["z"] > 6.0), t
    np.testing.assert_allclose(
      float(state.threshold), ref["threshold"], rtol=1e-5, err_msg=f"step {t}"
    )
    np.testing.assert_allclose(
      float(state.ema_mean), ref["ema_mean"], rtol=1e-5, err_msg=f"step {t}"
    )
    np.testing.assert_allclose(
      float(state.ema_std), ref["ema_std"], rtol=1e-4, atol=1e-7, err_msg=f"step {t}"
    )
  assert want[-1]["skip_count"] >= 2


def test_skip_on_spike_lets_the_ninth_spike_through():
  tx = gc.skip_on_spike(optax.sgd(1.0), warmup_steps=3, max_consecutive=10)
  state, step = tx.init(gradient(1.0)), jax.jit(tx.update)
  for x in [1.0, 1.1, 0.9]:
    _, state = step(gradient(x), state)
  passed = []
  for _ in range(11):  # 2 skips, then 8 more, then the 9th passes
    out, state = step(gradient(1000.0), state)
    passed.append(norm_of(out) > 0)
  assert passed == [False] * 10 + [True]
  assert int(state.consecutive_skips) == 0 and int(state.skip_count) == 10


def test_skip_on_spike_never_lets_non_finite_through_and_keeps_adam_moments():
  tx = gc.skip_on_spike(optax.adam(1e-3), warmup_steps=2, max_consecutive=1)
  g = gradient(1.0)
  state, step = tx.init(g), jax.jit(tx.update)
  for x in [1.0, 1.1]:
    _, state = step(gradient(x), state)
  for _ in range(3):
    out, new = step(gradient(np.nan), state)
    assert norm_of(out) == 0.0
    for a, b in zip(
      jax.tree.leaves(new.inner_state), jax.tree.leaves(state.inner_state), strict=True
    ):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new.ema), jax.tree.leaves(state.ema), strict=True):
      np.testing.assert_array_equal(a, b)
    state = new
  assert int(state.consecutive_skips) == 3 and int(state.skip_count) == 3


def test_skip_on_spike_stats_include_inner_gradctl_states():
  tx = gc.skip_on_spike(optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1)), warmup_steps=2)
  _, state = jax.jit(tx.update)(gradient(3.0), tx.init(gradient(1.0)))
  stats = gc.stats(state)
  assert {
    "skip_on_spike/norm",
    "skip_on_spike/skip_count",
    "inner_state/0/clip_by_global_norm/norm",
  } <= set(stats)


# ----------------------------------------------------------------------------- shared


ADAPTIVE = {
  "zclip": lambda: gc.zclip(warmup_steps=3),
  "autoclip": lambda: gc.autoclip(history=5),
  "skip_on_spike": lambda: gc.skip_on_spike(optax.adam(1e-2), warmup_steps=3),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_state_keeps_structure_shapes_and_dtypes(name):
  tx = ADAPTIVE[name]()
  state0 = tx.init(gradient(1.0))

  def body(state, x):
    return tx.update(gradient(1.0) | {"a": gradient(1.0)["a"] * x}, state)[1], None

  state, _ = jax.lax.scan(body, state0, jnp.array([1.0, 2.0, np.nan, 50.0, 1.0]))
  assert jax.tree.structure(state) == jax.tree.structure(state0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: gc.zclip(0.0), "z_threshold"),
    (lambda: gc.zclip(np.nan), "z_threshold"),
    (lambda: gc.zclip(decay=1.0), "decay"),
    (lambda: gc.zclip(decay=0.0), "decay"),
    (lambda: gc.zclip(warmup_steps=0), "warmup_steps"),
    (lambda: gc.zclip(warmup_steps=2.5), "warmup_steps"),
    (lambda: gc.zclip(mode="median"), "mode"),
    (lambda: gc.zclip(max_norm=-1.0), "max_norm"),
    (lambda: gc.autoclip(-1.0), "percentile"),
    (lambda: gc.autoclip(101.0), "percentile"),
    (lambda: gc.autoclip(np.nan), "percentile"),
    (lambda: gc.autoclip(history=0), "history"),
    (lambda: gc.skip_on_spike(optax.sgd(1.0), max_consecutive=-1), "max_consecutive"),
    (lambda: gc.skip_on_spike(optax.sgd(1.0), decay=np.nan), "decay"),
    (lambda: gc.skip_on_spike(optax.sgd(1.0), z_threshold=-2.0), "z_threshold"),
  ],
)
def test_bad_hyperparameters_raise_naming_the_argument(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_traced_hyperparameters_under_inject_hyperparams():
  tx = optax.inject_hyperparams(gc.zclip)(z_threshold=2.0, decay=0.9, warmup_steps=3, max_norm=5.0)
  state = tx.init(gradient(1.0))
  step = jax.jit(tx.update)
  for x in [1.0, 1.1, 0.9, 100.0]:
    out, state = step(gradient(x), state)
  assert norm_of(out) < 5.0
  tx = optax.inject_hyperparams(
    lambda z_threshold: gc.skip_on_spike(optax.sgd(1.0), z_threshold=z_threshold, warmup_steps=3)
  )(z_threshold=3.0)
  state, step = tx.init(gradient(1.0)), jax.jit(tx.update)
  for x in [1.0, 1.1, 0.9, 100.0]:
    out, state = step(gradient(x), state)
  assert norm_of(out) == 0.0


# ----------------------------------------------------------------------------- adagc


def ref_adagc(steps, beta, lambda_abs, lambda_rel, warmup):
  """Float64 AdaGC from the paper's algorithm and reference code (step t warms
  up while t < warmup; the first step sets gamma), with this package's
  choices: a non-finite step enters nothing, a zero norm leaves its gamma
  alone, and an unset gamma is set by the first nonzero norm."""
  gamma, t, rows = None, 0, []
  for norms in steps:  # per-tensor norms of one step
    norms = np.asarray(norms, np.float64)
    if gamma is None:
      gamma = np.full(norms.shape, np.inf)
    if not np.all(np.isfinite(norms)):
      rows.append(None)
      continue
    t += 1
    if t < warmup:
      total = np.sqrt(np.sum(norms**2))
      h = min(lambda_abs / total, 1.0) if total > 0 else 1.0
      clipped = norms * h
      hit = np.full(norms.shape, total > lambda_abs)
      new = np.minimum(gamma, clipped)
      caps = np.full(norms.shape, np.inf)
    else:
      caps = lambda_rel * gamma
      clipped = np.minimum(norms, caps)
      hit = norms > caps
      new = np.where(np.isinf(gamma), clipped, beta * gamma + (1 - beta) * clipped)
    gamma = np.where(clipped > 0, new, gamma)
    rows.append({"clipped": clipped, "fraction": np.mean(hit), "caps": caps, "gamma": gamma.copy()})
  return rows


def tensor_steps(steps=80, seed=0):
  """Per-tensor norms of three tensors: noise, a spike in tensor 1, a zero
  tensor 2 until step 10, a NaN step and an inf step."""
  rng = np.random.default_rng(seed)
  norms = np.exp(rng.normal(0, 0.1, (steps, 3))) * [1.0, 2.0, 0.5]
  norms[:10, 2] = 0.0
  norms[[40, 41, 60], 1] *= 50
  norms[30, 0] = np.nan
  norms[50, 2] = np.inf
  return norms


@pytest.mark.parametrize("warmup,lambda_abs", [(12, 1.5), (1, 1.0), (5, 100.0)])
def test_adagc_matches_reference_step_by_step(warmup, lambda_abs):
  steps = tensor_steps()
  want = ref_adagc(steps, 0.98, lambda_abs, 1.05, warmup)
  tx = gc.adagc(beta=0.98, lambda_abs=lambda_abs, lambda_rel=1.05, warmup_steps=warmup)
  directions = [np.array([0.6, 0.8]), np.array([[1.0]]), np.array([0.0, 0.0, 1.0])]
  g0 = {f"t{i}": jnp.asarray(d, jnp.float32) for i, d in enumerate(directions)}
  state, step = tx.init(g0), jax.jit(tx.update)
  for t, (norms, ref) in enumerate(zip(steps, want, strict=True)):
    with np.errstate(invalid="ignore"):
      g = {
        f"t{i}": jnp.asarray(d * n, jnp.float32)
        for i, (d, n) in enumerate(zip(directions, norms, strict=True))
      }
    out, new = step(g, state)
    if ref is None:  # non-finite: NaN out, state unchanged
      assert not np.all(np.isfinite(np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])))
      np.testing.assert_array_equal(new.gamma, state.gamma)
      assert int(new.count) == int(state.count)
    else:
      got = [norm_of({"x": out[f"t{i}"]}) for i in range(3)]
      np.testing.assert_allclose(got, ref["clipped"], rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
      np.testing.assert_allclose(
        np.asarray(new.gamma), ref["gamma"], rtol=1e-5, err_msg=f"step {t}"
      )
      np.testing.assert_allclose(
        np.asarray(new.thresholds), ref["caps"], rtol=1e-5, err_msg=f"step {t}"
      )
      np.testing.assert_allclose(float(new.clipped_fraction), ref["fraction"], err_msg=f"step {t}")
    state = new
  assert float(jnp.max(state.gamma)) < np.inf  # the zero tensor got a gamma


def test_adagc_clips_only_the_tensor_that_spikes():
  tx = gc.adagc(lambda_abs=10.0, warmup_steps=3)
  g = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.6, 0.8])}
  state, step = tx.init(g), jax.jit(tx.update)
  for _ in range(4):
    _, state = step(g, state)
  out, state = step({"a": g["a"], "b": g["b"] * 100}, state)
  np.testing.assert_array_equal(out["a"], g["a"])  # untouched, where a global clip would shrink it
  np.testing.assert_allclose(norm_of({"b": out["b"]}), 1.05, rtol=1e-6)
  assert gc.stats(state)["adagc/thresholds"].shape == (2,)


def test_adagc_bad_arguments_and_structure():
  for bad, match in [
    (lambda: gc.adagc(beta=1.0), "beta"),
    (lambda: gc.adagc(lambda_abs=0.0), "lambda_abs"),
    (lambda: gc.adagc(lambda_rel=-1.0), "lambda_rel"),
    (lambda: gc.adagc(warmup_steps=0), "warmup_steps"),
  ]:
    with pytest.raises(ValueError, match=match):
      bad()
  tx = gc.adagc()
  with pytest.raises(ValueError, match="2 float leaves, the state 1"):
    tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}))


# ----------------------------------------------------------------------------- loss-aware skipping


def ref_skip_with_loss(norms, losses, z_t, decay, warmup, max_consecutive):
  """skip_on_spike's reference with a loss: a step is skipped if either value
  is non-finite, if the norm is an outlier of its estimator, or if the loss's
  change from the last accepted loss is an outlier of the changes before."""
  ema_n, ema_l, rows, skips, run = RefEma(warmup, decay), RefEma(warmup, decay), [], 0, 0
  last = None
  for x, loss in zip(norms, losses, strict=True):
    finite = np.isfinite(x) and np.isfinite(loss)
    change = loss - last if last is not None and np.isfinite(loss) else None
    n_spike = ema_n.warm and np.isfinite(x) and finite and ema_n.z(x) > z_t
    l_spike = ema_l.warm and change is not None and ema_l.z(change) > z_t
    skip = (not finite) or ((n_spike or l_spike) and run < max_consecutive)
    if skip:
      skips, run = skips + 1, run + 1
    else:
      run = 0
      ema_n.enter(x)
      if change is not None:
        ema_l.enter(change)
      last = loss
    rows.append(
      {"skip": skip, "count": skips, "loss_spike": l_spike, "norm_spike": n_spike, "finite": finite}
    )
  return rows


def test_skip_on_spike_with_a_loss_matches_reference():
  rng = np.random.default_rng(3)
  steps = 150
  norms = np.exp(rng.normal(0, 0.1, steps))
  losses = 2.0 + rng.normal(0, 0.05, steps)
  losses[[50, 51, 90]] *= 20  # loss spikes with ordinary norms
  norms[[70, 120]] *= 40  # norm spikes with ordinary losses
  losses[100] = np.nan
  want = ref_skip_with_loss(norms, losses, 6.0, 0.99, 20, 10)
  tx = gc.skip_on_spike(optax.sgd(1.0), z_threshold=6.0, decay=0.99, warmup_steps=20)
  state, step = tx.init(gradient(1.0)), jax.jit(tx.update)
  for t, (x, loss, ref) in enumerate(zip(norms, losses, want, strict=True)):
    out, state = step(gradient(x), state, value=jnp.float32(loss))
    assert (norm_of(out) == 0.0) == ref["skip"], t
    assert int(state.skip_count) == ref["count"], t
    assert float(state.skipped) == ref["skip"]
    assert (
      float(state.loss_spike) == ref["loss_spike"] and float(state.norm_spike) == ref["norm_spike"]
    ), t
    assert float(state.nonfinite) == (not ref["finite"]), t
  assert want[-1]["count"] == 6


def test_skip_on_spike_counts_right_under_multisteps_and_inject_hyperparams():
  inner = optax.inject_hyperparams(
    lambda z_threshold: gc.skip_on_spike(optax.sgd(1.0), z_threshold=z_threshold, warmup_steps=3)
  )(z_threshold=6.0)
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  state, step = tx.init(gradient(1.0)), jax.jit(tx.update)
  for loss in [2.0, 2.0, 2.1, 2.1, 1.9, 1.9, 2.0, 2.0, 50.0, 50.0, 2.0, 2.0]:
    _, state = step(gradient(1.0), state, value=jnp.float32(loss))
  stats = gc.stats(state)
  # six inner steps; the fifth (losses of 50) was skipped, counted once
  assert int(stats["inner_opt_state/inner_state/skip_on_spike/skip_count"]) == 1
  assert float(stats["inner_opt_state/inner_state/skip_on_spike/loss_spike"]) == 0.0


@jax.jit
def _adagc_warm_step(g, lambda_abs):
  tx = gc.adagc(lambda_abs=lambda_abs, warmup_steps=3)
  return tx.update(g, tx.init(g))


_adagc_warm_after_one = gc.adagc(warmup_steps=1)


@jax.jit
def _adagc_two_steps(g):
  """The first step on ``g`` and the second on ``2 * g``."""
  tx = _adagc_warm_after_one
  first, state = tx.update(g, tx.init(g))
  second, _ = tx.update(jax.tree.map(lambda x: x * 2, g), state)
  return first, second


@variant_settings()
@given(
  case=tree_and_magnitudes(headroom=24, variants=VARIANTS),
  log2_abs=per_variant(st.floats(-20, 20)),
)
def test_adagc_over_the_whole_range(case, log2_abs):
  """The warm-up step is a global clip to lambda_abs; with warmup_steps=1 the
  first step sets each tensor's gamma to its norm, and a second step of twice
  the gradient is clipped back to lambda_rel times it. The headroom keeps the
  norms within float32."""
  for (g, leaves), log2 in zip(case.builds(), log2_abs, strict=True):
    lam = 2.0**log2
    out, state = _adagc_warm_step(g, lam)
    assert_leaves(out, reference.clip_by_norm(leaves, lam, "l2", "global"))
    assert_norm_statistic(state.norm, leaves)

    first, second = _adagc_two_steps(g)
    assert_leaves(first, leaves)  # unclipped: no gamma yet
    assert_leaves(second, [1.05 * x for x in leaves], atol_in_tiny=4.0)
