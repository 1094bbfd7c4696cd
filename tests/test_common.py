"""One invariant suite over every public transform: jit, dtypes, state, composition.

Every update gets the gradient itself as ``params`` (shapes match), for the
transforms that need parameters.

The tests whose compiled program depends on the reduction strategy (dtypes,
donation, scan, empty trees) run with both (the ``strategy`` fixture); those
that compare two ways of running the same reduction (eager and jit,
inject_hyperparams, masked, MultiSteps, apply_if_finite, chains, Flax) with
the platform's own. tests/test_whole_range.py runs both strategies over the
whole range.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_gradctl as gc

from .transforms import CASES

NAMES = sorted(CASES)
OPTIMIZERS = {
  "sgd": lambda: optax.sgd(0.1, momentum=0.9),
  "adam": lambda: optax.adam(1e-2),
  "adamw": lambda: optax.adamw(1e-2),
  "lion": lambda: optax.lion(1e-3),
  "lamb": lambda: optax.lamb(1e-2),
  "adafactor": lambda: optax.adafactor(1e-2),
  "rmsprop": lambda: optax.rmsprop(1e-2),
  "adagrad": lambda: optax.adagrad(1e-2),
  "nadam": lambda: optax.nadam(1e-2),
}


def grads(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.standard_normal((4, 3)) * scale, jnp.float32),
    "b": jnp.asarray(rng.standard_normal((3,)) * scale, jnp.float32),
    "h": {"k": jnp.asarray(rng.standard_normal((2, 5)) * scale, jnp.float32)},
  }


def mixed_tree():
  rng = np.random.default_rng(1)
  return {
    "f32": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
    "f16": jnp.asarray(rng.standard_normal((5,)), jnp.float16),
    "bf16": jnp.asarray(rng.standard_normal((2, 2)), jnp.bfloat16),
    "int": jnp.arange(3),
    "none": None,
    "float0": np.zeros((2,), jax.dtypes.float0),
  }


def close(a, b, rtol=1e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol
    )


def updated(tx, g, params):
  """One jitted step from a fresh state: the reference of the composition
  tests, one compiled program where eager dispatch would compile each op."""
  return jax.jit(tx.update)(g, tx.init(g), params)


def same_structure(a, b):
  """The same tree of the same shapes and dtypes (arrays or ShapeDtypeStructs)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert jnp.shape(x) == jnp.shape(y) and x.dtype == y.dtype


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
  """Eager dispatch compiles each operation for each new shape, so this tree's
  leaves share one shape: a third of the compiles of grads()."""
  tx = CASES[name].make()
  rng = np.random.default_rng(3)
  g = {k: jnp.asarray(rng.standard_normal((4, 3)), jnp.float32) for k in ("w", "u", "v")}
  eager = tx.update(g, tx.init(g), g)
  jitted = jax.jit(tx.update)(g, tx.init(g), g)
  close(eager, jitted)


@pytest.mark.program
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("strategy")
def test_donated_gradient_is_updated_in_place(name):
  """Every reduction that reads a donated gradient runs before the update that
  overwrites it, so the compiled program holds no full-size copy of it."""
  if not CASES[name].in_place:
    pytest.skip("per-example input has a batch axis its output lacks: no buffer to reuse")
  tx = CASES[name].make()
  g = {"a": jnp.zeros((300, 200)), "b": jnp.zeros((50_000,))}
  step = jax.jit(lambda g, s: tx.update(g, s, g), donate_argnums=0)
  hlo = step.lower(g, tx.init(g)).compile().as_text()
  copies = [
    line
    for line in hlo.splitlines()
    if " copy(" in line and ("[300,200]" in line or "[50000]" in line)
  ]
  assert not copies, copies


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("strategy")
def test_dtypes_shapes_and_non_float_leaves_preserved(name):
  tx = CASES[name].make()
  g = mixed_tree()
  out, _ = jax.jit(tx.update)(g, tx.init(g), g)
  assert out["none"] is None
  assert out["float0"].dtype == jax.dtypes.float0
  np.testing.assert_array_equal(out["int"], g["int"])
  for key in ("f32", "f16", "bf16"):
    assert out[key].dtype == g[key].dtype and out[key].shape == g[key].shape
    assert np.all(np.isfinite(np.asarray(out[key], np.float32)))


# float16 alone takes the reduction's float16 path; "mixed" holds a float32,
# a bfloat16 and a float16 leaf.
STATE_DTYPES = {
  "float16": lambda: jax.tree.map(lambda x: x.astype(jnp.float16), grads()),
  "mixed": lambda: {
    "w": grads()["w"],
    "b": grads()["b"].astype(jnp.bfloat16),
    "h": {"k": grads()["h"]["k"].astype(jnp.float16)},
  },
}


# Each dtype with one strategy: float16 with the accelerators' "select", the
# mixed tree with the CPU's "branch".
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
  "dtype,strategy", [("float16", "select"), ("mixed", "branch")], indirect=["strategy"]
)
def test_state_is_fixed_and_scannable(name, dtype, strategy):
  tx = CASES[name].make()
  g = STATE_DTYPES[dtype]()
  state0 = tx.init(g)
  stats0 = gc.stats(state0)
  assert bool(stats0) == CASES[name].stats
  assert all(v.dtype in (jnp.float32, jnp.int32) for v in stats0.values())
  assert all(float(v) == 0 for k, v in stats0.items() if k.endswith("/norm"))
  same_structure(state0, jax.eval_shape(tx.update, g, state0, g)[1])

  def body(state, i):
    u, state = tx.update(jax.tree.map(lambda x: x * (i + 1).astype(x.dtype), g), state, g)
    return state, gc.global_norm(u)

  state, norms = jax.lax.scan(body, state0, jnp.arange(3))
  same_structure(state0, state)
  assert norms.shape == (3,)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
  case = CASES[name]
  tx = optax.inject_hyperparams(case.factory, static_args=case.static)(**case.kwargs)
  g = grads()
  out, state = jax.jit(tx.update)(g, tx.init(g), g)
  close(out, updated(case.make(), g, g)[0])
  assert any(k.startswith("inner_state/") for k in gc.stats(state)) == case.stats


@pytest.mark.parametrize("name", NAMES)
def test_masked(name):
  case = CASES[name]
  g = grads()
  mask = {"w": True, "b": False, "h": {"k": True}}
  tx = optax.masked(case.make(), mask)
  out, state = jax.jit(tx.update)(g, tx.init(g), g)
  np.testing.assert_array_equal(out["b"], g["b"])
  sub = {"w": g["w"], "h": g["h"]}
  want, _ = updated(case.make(), sub, sub)
  close({"w": out["w"], "h": out["h"]}, want)
  assert bool(gc.stats(state)) == case.stats


@pytest.mark.parametrize("name", NAMES)
def test_multisteps(name):
  tx = optax.MultiSteps(optax.chain(CASES[name].make(), optax.sgd(0.1)), every_k_schedule=2)
  g = grads()
  state = tx.init(g)
  step = jax.jit(tx.update)
  u1, state = step(g, state, g)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u1))
  u2, state = step(grads(seed=2), state, g)
  # the inner step sees the mean of the two gradients
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g, grads(seed=2))
  inner = optax.chain(CASES[name].make(), optax.sgd(0.1))
  want, _ = updated(inner, mean, g)
  close(u2, want, rtol=1e-5, atol=1e-6)
  assert any(k.startswith("inner_opt_state/") for k in gc.stats(state)) == CASES[name].stats


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite(name):
  tx = optax.apply_if_finite(
    optax.chain(CASES[name].make(), optax.sgd(0.1)), max_consecutive_errors=3
  )
  g = grads()
  state = tx.init(g)
  u, state = jax.jit(tx.update)(g, state, g)
  assert int(state.notfinite_count) == 0
  assert not all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g)
  u, state = jax.jit(tx.update)(bad, state, g)
  assert int(state.notfinite_count) == 1
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


@functools.cache
def _jitted(make, key):
  """A transform and its jitted update, made once for all the tests that
  apply it on its own: only the chains differ from test to test."""
  del key  # part of the cache key only
  tx = make()
  return tx, jax.jit(tx.update)


# One configuration of each public transform in front of every optimizer.
PUBLIC = [
  "clip_by_value",
  "clip_by_norm_l1",
  "clip_by_global_norm",
  "unit_rescale",
  "zscore",
  "zclip",
  "autoclip",
  "skip_on_spike",
  "adagc",
  "adaptive_grad_clip",
]


# Each transform in front of two optimizers, and each optimizer behind two or
# three transforms: a chain keeps its members' states apart, so a member that
# breaks chaining breaks it in any pairing.
_OPTS = sorted(OPTIMIZERS)
PAIRS = [(name, _OPTS[(i + k) % len(_OPTS)]) for i, name in enumerate(PUBLIC) for k in (0, 4)]


@pytest.mark.parametrize("name,opt", PAIRS)
def test_chain_equals_sequential(name, opt):
  params = grads(seed=5)
  chained = optax.chain(CASES[name].make(), OPTIMIZERS[opt]())
  (first, one), (second, two) = _jitted(CASES[name].make, name), _jitted(OPTIMIZERS[opt], opt)
  cs = chained.init(params)
  s1, s2 = first.init(params), second.init(params)
  step = jax.jit(chained.update)
  for seed in range(2):
    g = grads(seed=seed, scale=3.0)
    u, cs = step(g, cs, params)
    v, s1 = one(g, s1, params)
    v, s2 = two(v, s2, params)
    close(u, v, rtol=2e-5, atol=1e-6)
    params = optax.apply_updates(params, u)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("strategy")
def test_empty_tree_is_a_no_op(name):
  tx = CASES[name].make()
  out, state = jax.jit(tx.update)({}, tx.init({}), {})
  assert out == {}
  assert all(float(v) == 0 for k, v in gc.stats(state).items() if k.endswith("/norm"))
  step = {"step": jnp.array(1)}
  out, _ = tx.update(step, tx.init(step), step)
  assert int(out["step"]) == 1


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("name", NAMES)
def test_flax_nnx_optimizer(name):
  model = _MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.chain(CASES[name].make(), optax.adam(1e-2)), wrt=nnx.Param)
  x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))

  @nnx.jit
  def step(model, opt):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, g)
    return loss

  before = model.l1.kernel[...].copy()
  step(model, opt)
  assert not np.allclose(before, model.l1.kernel[...])
  stats = gc.stats(opt.opt_state)
  norms = [v for k, v in stats.items() if k.endswith("/norm")]
  assert len(norms) == CASES[name].stats and all(float(n) > 0 for n in norms)


@pytest.mark.parametrize("name", NAMES)
def test_linen_train_state(name):
  model = nn.Dense(2)
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=optax.chain(CASES[name].make(), optax.sgd(0.1))
  )
  g = jax.grad(lambda p: jnp.sum(model.apply(p, jnp.ones((2, 3))) ** 2))(params)
  state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, g)
  stats = gc.stats(state.opt_state)
  if not CASES[name].stats:
    assert stats == {}
    return
  key = next(k for k in stats if k.endswith("/norm"))
  np.testing.assert_allclose(float(stats[key]), float(optax.tree.norm(g)), rtol=1e-6)


def full_size_buffers(step, *args, shape="300,200") -> int:
  """How many operations of the compiled ``step`` write a float32 array of
  the gradient leaf's shape."""
  text = jax.jit(step).lower(*args).compile().as_text()
  entry = text[text.index("ENTRY") :]
  return len(re.findall(rf"= f32\[{shape}\]\{{[0-9,]*\}} (?!parameter|bitcast)", entry))


@pytest.mark.program
@pytest.mark.parametrize("name", NAMES)
def test_in_front_of_adam_writes_nothing_full_size(name):
  """Chained in front of Adam, a transform adds no full-size buffer to the
  step: its reads keep their arithmetic inside the reduction kernels and its
  output fuses into Adam's. XLA wrote one per leaf where a reduction's
  square matched Adam's (a monitor) or a clamp left its kernel (the
  clipped fraction): each made a CPU Adam step about three times slower."""
  if not CASES[name].in_place:
    pytest.skip("per-example input has a batch axis its output lacks")
  g = {
    k: jnp.ones((300, 200), jnp.float32) for k in ("a", "b", "c")
  }  # one leaf alone did not show it
  adam = optax.adam(1e-3)
  chained = optax.chain(CASES[name].make(), adam)
  step = lambda tx: lambda g, s: tx.update(g, s, g)  # noqa: E731
  expected = full_size_buffers(step(adam), g, adam.init(g))
  assert expected > 0
  assert full_size_buffers(step(chained), g, chained.init(g)) == expected


@pytest.mark.program
def test_norm_recorded_next_to_adam_writes_nothing_full_size():
  """gc.global_norm squares the gradient Adam squares: recorded next to
  Adam's update, it must not make XLA share that square and write it out."""
  g = {k: jnp.ones((300, 200), jnp.float32) for k in ("a", "b", "c")}
  adam = optax.adam(1e-3)
  alone = full_size_buffers(lambda g, s: adam.update(g, s, g), g, adam.init(g))
  recorded = full_size_buffers(
    lambda g, s: (adam.update(g, s, g), gc.global_norm(g)), g, adam.init(g)
  )
  assert alone > 0 and recorded == alone
