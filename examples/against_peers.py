"""What PyTorch's and Keras' gradient clipping actually do, next to optax_gradctl.

Runs the real libraries, not transcriptions of their formulas:
``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``, and the Keras 3
optimizer arguments ``clipnorm``, ``global_clipnorm`` and ``clipvalue`` (on
the JAX backend, through an SGD step at learning rate -1, which returns the
processed gradient). Neither library is a dependency of optax_gradctl:
install them to run it (``pip install torch keras``). ``docs/migration.rst``
quotes its output.

Run: ``python examples/against_peers.py``
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax.numpy as jnp
import numpy as np

import optax_gradctl as gc


def torch_clip_norm(leaves, max_norm, norm_type=2.0, **kwargs):
  """The gradients after clip_grad_norm_, and the total norm it returns."""
  import torch

  params = [torch.nn.Parameter(torch.zeros(x.shape, dtype=torch.float32)) for x in leaves]
  for p, x in zip(params, leaves, strict=True):
    p.grad = torch.tensor(np.asarray(x, np.float32))
  total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, **kwargs)
  return [p.grad.numpy() for p in params], float(total)


def torch_clip_value(leaves, clip_value):
  import torch

  params = [torch.nn.Parameter(torch.zeros(x.shape, dtype=torch.float32)) for x in leaves]
  for p, x in zip(params, leaves, strict=True):
    p.grad = torch.tensor(np.asarray(x, np.float32))
  torch.nn.utils.clip_grad_value_(params, clip_value)
  return [p.grad.numpy() for p in params]


def keras_processed(leaves, **clip):
  """The gradient Keras' SGD applies, with a clipping argument: one step at
  learning rate -1 from zero weights."""
  import keras

  opt = keras.optimizers.SGD(learning_rate=-1.0, **clip)
  variables = [keras.Variable(np.zeros(x.shape, np.float32)) for x in leaves]
  opt.apply_gradients(zip([keras.ops.convert_to_tensor(x) for x in leaves], variables, strict=True))
  return [np.asarray(v.value) for v in variables]


def gc_apply(tx, leaves):
  out, state = tx.update([jnp.asarray(x) for x in leaves], tx.init(leaves))
  return [np.asarray(x) for x in out], state


def describe(leaves) -> str:
  flat = np.concatenate([np.ravel(x) for x in leaves])
  nan, zero = int(np.isnan(flat).sum()), int((flat == 0).sum())
  if nan == flat.size:
    return "all NaN"
  if zero == flat.size:
    return "all zeros"
  parts = [f"{nan} of {flat.size} NaN"] if nan else []
  parts += [f"{zero} of {flat.size} zero"] if zero else []
  norm = float(np.sqrt(np.nansum(flat.astype(np.float64) ** 2)))
  return ", ".join([*parts, f"norm {norm:.6g}"])


def rows():
  rng = np.random.default_rng(0)
  g = [
    rng.standard_normal((4, 3)).astype(np.float32) * 100,
    rng.standard_normal(12).astype(np.float32) * 100,
  ]
  out = []
  # the total norm each returns or records, per norm type
  for p, name in ((2.0, "l2"), (1.0, "l1"), (np.inf, "linf")):
    _, total = torch_clip_norm(g, 1.0, norm_type=p)
    _, st = gc_apply(gc.clip_by_global_norm(1.0, norm=name), g)
    out.append(
      (
        f"norm returned, norm_type={p}",
        f"{total:.6g}",
        "",
        f"norm {float(st.norm):.6g}, compared_norm {float(st.compared_norm):.6g}",
      )
    )
  # the epsilon: relative gap at ||g|| = 1e-3, max_norm 1e-4
  small = [x * (1e-3 / np.sqrt(sum(np.sum(y.astype(np.float64) ** 2) for y in g))) for x in g]
  t, _ = torch_clip_norm(small, 1e-4)
  ours, _ = gc_apply(gc.clip_by_global_norm(1e-4), small)
  out.append(("clip to 1e-4 at norm 1e-3", describe(t), "", describe(ours)))
  # an inf element
  bad = [g[0].copy(), g[1].copy()]
  bad[0][0, 0] = np.inf
  t, _ = torch_clip_norm(bad, 1.0)
  k_leaf = keras_processed(bad, clipnorm=1.0)
  k_glob = keras_processed(bad, global_clipnorm=1.0)
  ours, _ = gc_apply(gc.clip_by_global_norm(1.0), bad)
  out.append(
    (
      "one inf element, max_norm 1",
      describe(t),
      f"clipnorm: {describe(k_leaf)}; global_clipnorm: {describe(k_glob)}",
      describe(ours),
    )
  )
  # finite gradients whose squares overflow float32
  for scale in (1e14, 1e20):
    big = [np.full(12, scale, np.float32), np.full(12, -scale, np.float32)]
    t, total = torch_clip_norm(big, 1.0)
    try:
      torch_clip_norm(big, 1.0, error_if_nonfinite=True)
      raised = "no error"
    except RuntimeError:
      raised = "error_if_nonfinite raises"
    k_leaf = keras_processed(big, clipnorm=1.0)
    k_glob = keras_processed(big, global_clipnorm=1.0)
    ours, _ = gc_apply(gc.clip_by_global_norm(1.0), big)
    out.append(
      (
        f"24 elements of +-{scale:g}, max_norm 1",
        f"{describe(t)} (total {total:g}; {raised})",
        f"clipnorm: {describe(k_leaf)}; global_clipnorm: {describe(k_glob)}",
        describe(ours),
      )
    )
  # a bound of 0
  k0 = [
    describe(keras_processed(g, **{arg: 0.0}))
    for arg in ("clipnorm", "global_clipnorm", "clipvalue")
  ]
  t0, _ = torch_clip_norm(g, 0.0)
  ours, _ = gc_apply(gc.clip_by_global_norm(0.0), g)
  out.append(
    (
      "a bound of 0",
      describe(t0),
      f"clipnorm, global_clipnorm, clipvalue: {'; '.join(k0)}",
      describe(ours),
    )
  )
  # foreach
  a, _ = torch_clip_norm(g, 1.0, foreach=True)
  b, _ = torch_clip_norm(g, 1.0, foreach=False)
  same = all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  out.append(("foreach=True against False", "bitwise equal" if same else "differ", "", ""))
  # value clipping
  t = torch_clip_value(g, 50.0)
  k = keras_processed(g, clipvalue=50.0)
  ours, _ = gc_apply(gc.clip_by_value(50.0), g)
  eq = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
  out.append(
    (
      "clip values to 50",
      "equal to gc" if eq(t, ours) else "differs",
      "clipvalue: " + ("equal to gc" if eq(k, ours) else "differs"),
      describe(ours),
    )
  )
  return out


def main() -> None:
  import keras
  import torch

  print(
    f"torch {torch.__version__}, keras {keras.__version__} ({keras.backend.backend()} backend)\n"
  )
  print("| case | PyTorch | Keras | optax_gradctl |")
  print("|---|---|---|---|")
  for case, t, k, ours in rows():
    print(f"| {case} | {t} | {k or '-'} | {ours or '-'} |")


if __name__ == "__main__":
  main()
