"""The reduction's settings, in one validated place: how a rescue runs, and how leaves are batched.

They are read when a transform's ``update`` is traced, so a function that is
already compiled keeps the path it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Literal

from optax_gradctl._validation import COUNT, COUNT_OR_ZERO, check_choice, check_number

Rescue = Literal["auto", "branch", "select"]
RESCUES: tuple[str, ...] = ("auto", "branch", "select")


@dataclasses.dataclass(frozen=True)
class ReductionSettings:
  """How the reductions run. Every setting changes speed and compile time,
  never a result: both rescues give the same numbers, on every platform.

  Change them for a block with :func:`reduction_settings`.
  """

  #: str: how sums that left the float range are taken again, ``"branch"`` (a
  #: ``lax.cond``, taken only when needed), ``"select"`` (every leaf reduced
  #: into three candidate sums in the same read, then a select), or
  #: ``"auto"``: ``"branch"`` on CPU and TPU, ``"select"`` on other
  #: platforms (a GPU pays for a branch even when it is not taken). Moments
  #: (:func:`~optax_gradctl.zscore`) always branch.
  rescue: Rescue = "auto"
  #: int: leaves of at most this many elements are reduced stacked with the other
  #: leaves of their shape and dtype: one kernel for the group instead of one
  #: per leaf. At this size the copy costs less than a kernel launch.
  stack_limit: int = 4096
  #: int: at most this many leaves go into one stacked kernel, since XLA's CPU compile
  #: time grows with the square of the operands of one fused concatenation,
  #: and linearly in groups of this size.
  stack_group: int = 100

  def __post_init__(self):
    owner = "reduction_settings"
    check_choice(owner, "rescue", self.rescue, RESCUES)
    check_number(owner, "stack_limit", self.stack_limit, COUNT_OR_ZERO)
    check_number(owner, "stack_group", self.stack_group, COUNT)


_DEFAULT = ReductionSettings()
_ACTIVE: contextvars.ContextVar[ReductionSettings | None] = contextvars.ContextVar(
  "optax_gradctl_reduction", default=None
)


def active() -> ReductionSettings:
  """The settings in force."""
  return _ACTIVE.get() or _DEFAULT


@contextlib.contextmanager
def reduction_settings(**changes) -> Iterator[ReductionSettings]:
  """Changes the :class:`ReductionSettings` for the block it opens.

  Whatever is traced inside the block takes the new settings; a function
  jitted before it and called inside keeps its compiled program. Tests use it
  to run the GPU's rescue on a CPU.

  Args:
    **changes: fields of :class:`ReductionSettings` and their new values.

  Yields:
    The settings in force inside the block.

  Raises:
    TypeError: for a name that is not a setting.
    ValueError: for a value out of range.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gradctl as gc
    >>> with gc.reduction_settings(rescue="select") as settings:
    ...   norm = gc.global_norm(jnp.array([3.0, 4.0]))
    >>> settings.rescue, float(norm)
    ('select', 5.0)
  """
  fields = [f.name for f in dataclasses.fields(ReductionSettings)]
  unknown = sorted(set(changes) - set(fields))
  if unknown:
    raise TypeError(
      f"reduction_settings: unknown setting(s) {', '.join(unknown)}; the settings are"
      f" {', '.join(fields)}"
    )
  token = _ACTIVE.set(dataclasses.replace(active(), **changes))
  try:
    yield active()
  finally:
    _ACTIVE.reset(token)
