"""gc.monitor: per-group norms against float64, and no second read of the gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

import optax_gradctl as gc

from . import reference as ref
from .strategies import VARIANTS, tree_and_magnitudes, variant_settings
from .trees import same_bits


def model_grads(big=False):
  """A float32, a float16 and a bfloat16 leaf; with ``big``, each with squares
  beyond its dtype (float32 and bfloat16 beyond float32, too)."""
  rng = np.random.default_rng(0)
  scale, half = (1e20, 300.0) if big else (1.0, 1.0)
  return {
    "encoder": {
      "w": jnp.asarray(rng.standard_normal((300, 200)) * scale, jnp.float32),
      "b": jnp.asarray(rng.standard_normal(200) * half, jnp.float16),
    },
    "head": {"w": jnp.asarray(rng.standard_normal((200, 5)) * scale, jnp.bfloat16)},
    "step": jnp.array(3),
  }


def test_group_norms_match_float64():
  g = model_grads(big=True)  # the norms must still be exact
  tx = gc.monitor()
  out, state = jax.jit(tx.update)(g, tx.init(g))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the gradient, unchanged
  stats = gc.stats(state)
  for group in ("encoder", "head"):
    leaves = [ref.f64(x) for x in jax.tree.leaves(g[group])]
    np.testing.assert_allclose(
      float(stats[f"monitor/group_norms/{group}"]), ref.global_l2(leaves), rtol=2e-6
    )
  every = [ref.f64(x) for k in ("encoder", "head") for x in jax.tree.leaves(g[k])]
  np.testing.assert_allclose(float(stats["monitor/norm"]), ref.global_l2(every), rtol=2e-6)
  assert set(stats) == {"monitor/norm", "monitor/group_norms/encoder", "monitor/group_norms/head"}


def test_groups_by_any_function_of_the_path():
  g = model_grads()
  by_kind = lambda path: jax.tree_util.keystr(path[-1:], simple=True)  # noqa: E731  "w" or "b"
  tx = optax.chain(gc.monitor(by_kind), optax.sgd(0.1))
  _, state = jax.jit(tx.update)(g, tx.init(g))
  stats = gc.stats(state)
  ws = [ref.f64(g["encoder"]["w"]), ref.f64(g["head"]["w"])]
  np.testing.assert_allclose(float(stats["0/monitor/group_norms/w"]), ref.global_l2(ws), rtol=2e-6)
  np.testing.assert_allclose(
    float(stats["0/monitor/group_norms/b"]), ref.global_l2([ref.f64(g["encoder"]["b"])]), rtol=2e-6
  )


def _kernels_reading_each_leaf(tx, g) -> list[int]:
  """How many kernels (fusions) of the compiled step's entry read each
  gradient leaf, directly or through a bitcast. A tuple that only passes a
  leaf to a branch not taken reads nothing."""
  text = jax.jit(lambda g, s: tx.update(g, s)).lower(g, tx.init(g)).compile().as_text()
  entry = text[text.index("ENTRY") :].splitlines()
  params = re.findall(r"%(\S+) = \S+ parameter\(\d+\), metadata=\{op_name=\"g", "\n".join(entry))
  views = {p: {p} for p in params}
  for line in entry:
    m = re.match(r"\s*%(\S+) = \S+ bitcast\(%([^)]+)\)", line)
    for names in views.values():
      if m and m.group(2) in names:
        names.add(m.group(1))
  fusions = [line for line in entry if " fusion(" in line]
  return [
    sum(1 for line in fusions if any(re.search(rf"%{re.escape(v)}[,)]", line) for v in names))
    for names in views.values()
  ]


@pytest.mark.program
def test_monitor_next_to_a_clip_reads_nothing_more():
  """XLA computes the monitor's sums and the clip's once: the step with the
  monitor has exactly the readers of every leaf the clip alone has."""
  g = {k: v for k, v in model_grads().items() if k != "step"}
  alone = _kernels_reading_each_leaf(gc.clip_by_global_norm(1.0), g)
  watched = _kernels_reading_each_leaf(optax.chain(gc.monitor(), gc.clip_by_global_norm(1.0)), g)
  assert alone and watched == alone, (alone, watched)


_each_leaf = gc.monitor(lambda path: str(path[0].key))
_monitor_each_leaf = jax.jit(lambda g: _each_leaf.update(g, _each_leaf.init(g)))


@variant_settings()
@given(case=tree_and_magnitudes(variants=VARIANTS))
def test_group_norms_over_the_whole_range(case):
  """Each leaf its own group: the global norm against float64 (inf beyond
  float32), each group norm between the float64 norm of its elements of at
  least 2**-62 and its true norm, and the gradient returned bitwise."""
  for g, leaves in case.builds():
    _check_group_norms(g, leaves, *_monitor_each_leaf(g))


def _check_group_norms(g, leaves, out, state):
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g), strict=True):
    same_bits(a, b)
  f32_max, tiny = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)
  capped = lambda v: np.inf if v > f32_max else v  # noqa: E731
  floor = 2.0**-62
  for name, x in zip(sorted(g), leaves, strict=True):
    got = float(state.group_norms[name])
    high = capped(ref.global_l2([x]))
    low = capped(ref.global_l2([np.where(np.abs(x) >= floor, x, 0.0)]))
    assert low * (1 - 2e-6) - 2 * tiny <= got <= high * (1 + 2e-6) + 2 * tiny, (
      name,
      got,
      low,
      high,
    )
  np.testing.assert_allclose(
    float(state.norm), capped(ref.global_l2(leaves)), rtol=2e-6, atol=2 * tiny
  )
