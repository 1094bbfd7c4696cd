"""adaptive_grad_clip and per_example_clip: against optax and float64 references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_gradctl as gc

from . import reference as ref
from .compat import needs_optax_0_2_8
from .strategies import VARIANTS, per_variant, tree_and_magnitudes, variant_settings

RTOL = {
  jnp.dtype(jnp.float16): 2e-3,
  jnp.dtype(jnp.bfloat16): 1e-2,
  jnp.dtype(jnp.float32): 2e-5,
}


def unit_axes(shape):
  """The unit axes of optax.adaptive_grad_clip, written out."""
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(len(shape)))
  return (0,) if len(shape) in (2, 3) else tuple(range(len(shape) - 1))


def unit_norm(x, axes):
  """The float64 norm over ``axes`` (kept), scaled by the largest magnitude."""
  top = np.maximum(np.max(np.abs(x), axis=axes, keepdims=True, initial=0), 1e-300)
  return top * np.sqrt(np.sum((x / top) ** 2, axis=axes, keepdims=True))


def ref_agc(grads, weights, clipping, eps):
  """Float64 AGC: per unit, g * min(1, clipping * max(|w|, eps) / |g|)."""
  out, clipped, units = [], 0, 0
  for g, w in zip(grads, weights, strict=True):
    axes = unit_axes(g.shape)
    gn, wn = unit_norm(g, axes), unit_norm(w, axes)
    limit = clipping * np.maximum(wn, eps)
    hit = gn > limit
    with np.errstate(invalid="ignore", divide="ignore"):
      out.append(np.where(hit, ref.times_ratio(g, limit, np.where(hit, gn, 1.0)), g))
    clipped, units = clipped + int(np.sum(hit)), units + hit.size
  return out, clipped / max(units, 1)


def leaves64(tree):
  return [ref.f64(x) for x in jax.tree.leaves(tree)]


def dense_tree(seed=0, dtype=jnp.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  shapes = {"bias": (5,), "kernel": (4, 5), "heads": (3, 4, 2), "conv": (3, 3, 2, 4), "s": ()}
  return {k: jnp.asarray(rng.standard_normal(s) * scale, dtype) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- adaptive_grad_clip


def test_agc_agrees_with_optax_on_ordinary_inputs():
  g, w = dense_tree(0, scale=0.3), dense_tree(1)
  ours, state = jax.jit(gc.adaptive_grad_clip(0.1).update)(g, gc.adaptive_grad_clip(0.1).init(w), w)
  theirs, _ = jax.jit(optax.adaptive_grad_clip(0.1).update)(g, optax.EmptyState(), w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  want, fraction = ref_agc(leaves64(g), leaves64(w), 0.1, 1e-3)
  for a, b in zip(jax.tree.leaves(ours), want, strict=True):
    np.testing.assert_allclose(ref.f64(a), b, rtol=1e-5, atol=1e-7)
  assert 0 < fraction < 1
  np.testing.assert_allclose(float(state.clipped_fraction), fraction, rtol=1e-6)
  np.testing.assert_allclose(float(state.norm), ref.global_l2(leaves64(g)), rtol=1e-6)


@needs_optax_0_2_8
def test_agc_axis_matches_optax():
  g, w = {"k": dense_tree(2)["kernel"]}, {"k": dense_tree(3)["kernel"]}
  ours, _ = jax.jit(gc.adaptive_grad_clip(0.2, axis=1).update)(g, None, w)
  theirs, _ = jax.jit(optax.adaptive_grad_clip(0.2, axis=1).update)(g, optax.EmptyState(), w)
  np.testing.assert_allclose(np.asarray(ours["k"]), np.asarray(theirs["k"]), rtol=1e-5)


def test_agc_float16_where_optax_returns_zeros():
  g = {"k": jnp.full((4, 3), 300.0, jnp.float16)}  # unit norm 600: its square overflows float16
  w = {"k": jnp.full((4, 3), 100.0, jnp.float16)}  # unit norm 200, so the cap is 0.1 * 200 = 20
  theirs, _ = optax.adaptive_grad_clip(0.1).update(g, optax.EmptyState(), w)
  assert not np.any(np.asarray(theirs["k"], np.float32))  # optax: all zeros
  ours, _ = jax.jit(gc.adaptive_grad_clip(0.1).update)(g, None, w)
  np.testing.assert_allclose(np.asarray(ours["k"], np.float32), 10.0, rtol=2e-3)  # 20 / 2 rows


def test_agc_needs_params_and_a_unit():
  tx = gc.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update({"a": jnp.ones(3)}, tx.init(None))
  x = {"a": jnp.ones((2,) * 6)}
  with pytest.raises(ValueError, match=r"shape \(2, 2, 2, 2, 2, 2\).*axis"):
    tx.update(x, tx.init(x), x)
  for bad, match in [
    (lambda: gc.adaptive_grad_clip(-1.0), "clipping"),
    (lambda: gc.adaptive_grad_clip(0.1, eps=np.nan), "eps"),
  ]:
    with pytest.raises(ValueError, match=match):
      bad()


def _scaled_like(tree, rng):
  """The same shapes and dtypes, each leaf times its own power of two, kept in range."""
  out = {}
  for k, x in tree.items():
    info = jnp.finfo(x.dtype)
    v = ref.f64(x) * 2.0 ** rng.integers(-20, 20)
    out[k] = jnp.asarray(np.clip(v, -float(info.max), float(info.max)), x.dtype)
  return out


@jax.jit
def _agc_step(g, w, clipping):
  tx = gc.adaptive_grad_clip(clipping)
  return tx.update(g, tx.init(w), w)


@variant_settings()
@given(
  case=tree_and_magnitudes(variants=VARIANTS),
  log2_clip=per_variant(st.floats(-20, 10)),
  seed=st.integers(0, 2**16),
)
def test_agc_over_the_whole_range(case, log2_clip, seed):
  rng = np.random.default_rng(seed)
  for (g, _), log2 in zip(case.builds(), log2_clip, strict=True):
    w = _scaled_like(g, rng)
    clipping = 2.0**log2
    out, state = _agc_step(g, w, clipping)
    want, fraction = ref_agc(leaves64(g), leaves64(w), clipping, 1e-3)
    for got, x in zip(jax.tree.leaves(out), want, strict=True):
      tiny = float(jnp.finfo(got.dtype).tiny)
      np.testing.assert_array_less(np.abs(ref.f64(got) - x), RTOL[got.dtype] * np.abs(x) + 2 * tiny)
    np.testing.assert_allclose(float(state.clipped_fraction), fraction, rtol=1e-6)


# ----------------------------------------------------------------------------- per_example_clip


def batch(seed=0, n=6, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.standard_normal((n, 4, 3)) * scale, jnp.float32),
    "b": jnp.asarray(rng.standard_normal((n, 3)) * scale, jnp.float32),
  }


def test_per_example_global_agrees_with_optax():
  g = batch(scale=0.5)
  tx = gc.per_example_clip(2.0)
  ours, state = jax.jit(tx.update)(g, tx.init(g))
  leaves = jax.tree.leaves(g)
  theirs, clipped = optax.per_example_global_norm_clip(leaves, 2.0)
  for a, b in zip(jax.tree.leaves(ours), theirs, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert 0 < int(clipped) < 6
  np.testing.assert_allclose(float(state.clipped_fraction), int(clipped) / 6, rtol=1e-6)
  norms = np.sqrt(sum(np.sum(ref.f64(x).reshape(6, -1) ** 2, axis=1) for x in leaves))
  np.testing.assert_allclose(float(state.max_example_norm), norms.max(), rtol=1e-6)
  np.testing.assert_allclose(
    float(state.norm), ref.global_l2([ref.f64(x) for x in leaves]), rtol=1e-6
  )


def test_per_example_leaf_scope_agrees_with_optax_per_layer():
  g = batch(1, scale=0.5)
  leaves = jax.tree.leaves(g)
  c = 1.0
  ours, state = jax.jit(gc.per_example_clip(c / np.sqrt(len(leaves)), scope="leaf").update)(g, None)
  theirs, clipped = optax.per_example_layer_norm_clip(leaves, c, uniform=True)
  for a, b in zip(jax.tree.leaves(ours), theirs, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(state.clipped_fraction), sum(int(k) for k in clipped) / 12)


@pytest.mark.parametrize(
  "dtype,value", [(jnp.float16, 300.0), (jnp.bfloat16, 1e30), (jnp.float32, 1e-30)]
)
def test_per_example_exact_at_the_ends_of_the_range(dtype, value):
  g = {"w": jnp.stack([jnp.full((4,), value), jnp.full((4,), value / 10)]).astype(dtype)}
  c = value / 100
  out, state = jax.jit(gc.per_example_clip(c).update)(g, None)
  # each example clipped to norm c along (1, 1, 1, 1) / 2: their sum is c per element
  np.testing.assert_allclose(np.asarray(out["w"], np.float64), c, rtol=RTOL[jnp.dtype(dtype)])
  assert float(state.clipped_fraction) == 1.0


def test_per_example_needs_one_batch_axis():
  tx = gc.per_example_clip(1.0)
  with pytest.raises(ValueError, match="batch on axis 0"):
    tx.update({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, None)
  with pytest.raises(ValueError, match="batch on axis 0"):
    tx.update({"a": jnp.ones(())}, None)
  with pytest.raises(ValueError, match="scope"):
    gc.per_example_clip(1.0, scope="layer")


@functools.partial(jax.jit, static_argnums=2)
def _per_example_step(g, c, scope):
  """``g`` and its half as a batch of two examples, clipped."""
  batched = jax.tree.map(lambda x: jnp.stack([x, x / 2]), g)
  tx = gc.per_example_clip(c, scope=scope)
  return batched, *tx.update(batched, tx.init(batched))


@variant_settings()
@given(
  case=tree_and_magnitudes(headroom=2, variants=VARIANTS),
  log2_clip=per_variant(st.floats(-30, 30)),
  scope=st.sampled_from(["global", "leaf"]),
)
def test_per_example_clip_over_the_whole_range(case, log2_clip, scope):
  """Two examples, the drawn gradient and its half, each clipped to its own
  norm and summed, against float64; the headroom keeps the sum in range."""
  for (g, _), log2 in zip(case.builds(), log2_clip, strict=True):
    c = 2.0**log2
    _check_two_examples(*_per_example_step(g, c, scope), c, scope)


def _check_two_examples(batched, out, state, c, scope):
  examples = [[ref.f64(x[e]) for x in jax.tree.leaves(batched)] for e in (0, 1)]
  want = [np.zeros_like(x) for x in examples[0]]
  clipped = []
  for leaves in examples:
    for n, idx in ref.norms(leaves, "l2", scope):
      clipped.append(n > c)
      for i in idx:
        want[i] = want[i] + (ref.times_ratio(leaves[i], c, n) if n > c else leaves[i])
  for got, x in zip(jax.tree.leaves(out), want, strict=True):
    tiny = float(jnp.finfo(got.dtype).tiny)
    np.testing.assert_array_less(np.abs(ref.f64(got) - x), RTOL[got.dtype] * np.abs(x) + 4 * tiny)
  if scope == "global":
    np.testing.assert_allclose(float(state.clipped_fraction), np.mean(clipped))
  everything = examples[0] + examples[1]
  norm = ref.global_l2(everything)
  want_norm = np.inf if norm > float(np.finfo(np.float32).max) else norm
  np.testing.assert_allclose(float(state.norm), want_norm, rtol=2e-6, atol=2 * 1.2e-38)
