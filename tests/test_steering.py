"""The compiler steering of optax_gradctl/_reduction/steering.py, each helper
kept to its purpose: what XLA would do to the program without it. (Its
other helpers are guarded where their effect shows: full-size buffers and
copies in tests/test_common.py, exact single-element sums in
tests/test_whole_range.py.)"""

import re

import jax
import jax.numpy as jnp
import pytest

import optax_gradctl as gc

pytestmark = pytest.mark.program


def _output_kernels(tx, leaves):
  """Per leaf, the instruction count of the fused kernel that writes it."""
  text = jax.jit(lambda g, s: tx.update(g, s)).lower(leaves, tx.init(leaves)).compile().as_text()
  sizes = {x.shape[0]: [] for x in leaves}
  for block in re.split(r"\n(?=%|ENTRY)", text):
    root = re.search(r"ROOT \S+ = f32\[(\d+)\]", block)
    if block.startswith("%fused") and root and int(root.group(1)) in sizes:
      body = [line for line in block.splitlines() if " = " in line and "parameter(" not in line]
      sizes[int(root.group(1))].append(len(body))
  return sizes


def test_factors_are_computed_once_for_all_leaves():
  """zscore's power-of-two factors reach each leaf's output kernel as
  values: a dozen instructions a kernel. Multiplied in as ``2**-k``, the bit
  arithmetic of ``exp2`` is copied into every one (46 instructions), and a
  thousand leaves compile 40% slower."""
  leaves = [jnp.linspace(-1.0, 3.0, 100 + i) for i in range(6)]
  for shape, sizes in _output_kernels(gc.zscore(), leaves).items():
    assert sizes and max(sizes) <= 20, (shape, sizes)


def test_the_factors_reach_each_output_kernel_as_one_operand():
  """A clip's output kernel reads its leaf and the two factors, stacked: two
  operands. Unstacked, XLA moves the selects that make the factors into
  every output kernel, which then reads their four inputs."""
  leaves = [jnp.linspace(-1.0, 3.0, 100 + i) for i in range(6)]
  tx = gc.clip_by_global_norm(1.0)
  text = jax.jit(lambda g, s: tx.update(g, s)).lower(leaves, tx.init(leaves)).compile().as_text()
  entry = text[text.index("ENTRY") :]
  writers = re.findall(r"= f32\[10\d\]\{0\} fusion\(([^)]*)\)", entry)
  assert len(writers) == len(leaves)
  assert all(len(operands.split(",")) == 2 for operands in writers), writers


def test_the_ordering_zero_is_computed_once():
  """clip_by_value's clamp waits for its statistics through an exact zero
  made from them: its output kernels take that zero as a value (15
  instructions). Without the divide that makes it, its arithmetic is copied
  into each (33)."""
  leaves = [jnp.linspace(-1.0, 3.0, 100 + i) for i in range(6)]
  for shape, sizes in _output_kernels(gc.clip_by_value(1.0, stats=True), leaves).items():
    assert sizes and max(sizes) <= 22, (shape, sizes)


def _program_lines(groups: int) -> int:
  tx = gc.monitor(lambda path: str(path[0].key))
  g = {f"l{i}": jnp.full((10,), i + 1.0) for i in range(groups)}
  step = jax.jit(lambda g, s: tx.update(g, s))
  return step.lower(g, tx.init(g)).compile().as_text().count("\n")


def test_many_group_norms_compile_in_one_total():
  """Each further group of leaves adds a few lines to the program (about 15);
  with the arithmetic that makes the norms copied into each group's output,
  about 90, and compile time grows with it."""
  per_group = (_program_lines(60) - _program_lines(20)) / 40
  assert per_group < 40, per_group
