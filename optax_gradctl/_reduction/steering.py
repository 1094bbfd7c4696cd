"""Compiler steering: what is written only to shape the program XLA compiles.

Nothing here changes a value. Each helper returns its input, or an exact
rewriting of it, in a form that keeps XLA from a transformation that is
correct but costly: merging a read with an identical one elsewhere in the
step, copying scalar arithmetic into every leaf's kernel, folding constants
into an overflow, copying a donated gradient, or broadcasting scalars to
full size. Each docstring says what XLA does without it and names the test
that then fails.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_gradctl._reduction.pow2 import exp2


def kept_apart(x: jax.Array) -> jax.Array:
  """``x``, kept apart from an identical computation elsewhere in the step.

  A transform that returns the gradient unchanged (``monitor``) squares it
  for its norm as Adam squares it for its second moment; XLA merges the two
  squares and writes the square out in full for both to read. Guarded by
  ``tests/test_common.py::test_in_front_of_adam_writes_nothing_full_size``
  (``monitor``) and ``test_norm_recorded_next_to_adam_writes_nothing_full_size``.
  """
  return lax.optimization_barrier(x)


def not_folded(x: jax.Array) -> jax.Array:
  """``x``, a constant that XLA may not fold into the arithmetic around it.

  The candidate scales of a rescue are powers of two whose product with a
  square is exact only in the order written: folded, ``square(y * 2**75)``
  of a one-element leaf becomes ``y**2 * 2**150``, which overflows. Guarded
  by ``tests/test_whole_range.py::test_single_element_leaves_clip_exactly``
  (the ``select`` rescue).
  """
  return lax.optimization_barrier(x)


def scaled_once(x: jax.Array, k: jax.Array, dtype: np.dtype) -> jax.Array:
  """``x * 2**-k``, exactly, computed once for all leaves.

  XLA copies cheap scalar arithmetic into every kernel that consumes it (a
  multiply by ``2**-k`` brings the bit arithmetic of ``exp2`` into each
  leaf's output kernel), which at thousands of leaves multiplies compile
  time; a divide it computes once. Dividing by a power of two is exact.
  Guarded by ``tests/test_steering.py::test_factors_are_computed_once_for_all_leaves``.
  """
  return x / exp2(k, dtype)


def exact_zero_after(stats: Sequence[jax.Array]) -> jax.Array:
  """An exact float32 zero that XLA computes after every one of ``stats``,
  once for all leaves.

  It is ``w * 0 / (w + 1)`` for a finite ``w`` made from all of them: XLA
  copies cheap scalar arithmetic into each kernel that consumes it, but not a
  divide. Guarded by
  ``tests/test_steering.py::test_the_ordering_zero_is_computed_once``.
  """
  if not stats:
    return jnp.zeros((), jnp.float32)
  total = sum(jnp.sum(s.astype(jnp.float32)) for s in stats)
  w = jnp.where(jnp.isfinite(total), jnp.abs(total), 0)
  return w * 0 / (w + 1)


def ordered_after(x: jax.Array, *stats: jax.Array) -> jax.Array:
  """``x``, unchanged, as a value computed after ``stats``.

  Unless the update of a leaf depends on every reduction that reads it, XLA
  copies a donated gradient so that the reductions can still read it while
  it is overwritten in place. Subtracting an exact zero made from the
  reductions orders the update after them. Guarded by
  ``tests/test_common.py::test_donated_gradient_is_updated_in_place``
  (``clip_by_value``).
  """
  return x - exact_zero_after(stats).astype(x.dtype)


def computed_once(values: jax.Array) -> jax.Array:
  """``values``, unchanged, computed once rather than copied into each consumer.

  Divided by an exact one made from themselves: else XLA copies the
  arithmetic that makes each value into every output that reads it, and a
  program with G outputs grows with G**2. Guarded by
  ``tests/test_steering.py::test_many_group_norms_compile_in_one_total``.
  """
  return values / (1 + exact_zero_after([values]))


def packed(*values: jax.Array) -> tuple[jax.Array, ...]:
  """``values`` (of one shape), made by one kernel and read as one operand.

  Stacked, behind a barrier that keeps XLA from taking the stack apart
  again: else it moves the selects that make each value into every kernel
  that reads them, which then takes their inputs as separate operands, and
  5000 leaves compile about 5% slower. Guarded by
  ``tests/test_steering.py::test_the_factors_reach_each_output_kernel_as_one_operand``.
  """
  stacked = lax.optimization_barrier(jnp.stack(values))
  return tuple(stacked[i] for i in range(len(values)))


def own_copies(scalars, batch: jax.Array):
  """``(scalars, batch)``, with copies of ``scalars`` that belong to this batch's kernel.

  Else XLA writes out a full-size broadcast of each scalar (a constant, for
  concrete bounds) and shares it among the batches' kernels. Guarded by
  ``tests/test_common.py::test_in_front_of_adam_writes_nothing_full_size``
  (``clip_by_value``).
  """
  return lax.optimization_barrier((scalars, batch))
