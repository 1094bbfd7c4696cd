"""Gradient clipping on a model sharded over a 2 x 4 mesh, checked against one device.

Runs on 8 simulated CPU devices (no accelerator needed). An MLP is trained
three ways from the same weights on the same batches, each with
``gc.clip_by_global_norm`` in front of Adam:

1. on one device;
2. under ``jax.jit`` with the kernels sharded FSDP-style over the "model" axis
   and the batch over the "data" axis (GSPMD): the transforms need nothing;
3. with the optimizer step inside ``shard_map``, each device holding its
   shard of the gradient: ``axis_name`` names the axes each leaf is split
   over, and ``None`` marks the replicated biases.

It prints the global gradient norm recorded by ``gc.stats`` at each logged
step for the three runs and their largest relative difference.

With ``--processes N`` the mesh spans N local processes (8 / N devices each),
as it would N hosts: the script starts them on 127.0.0.1 under JAX's
multi-controller runtime (``jax.distributed.initialize``, gloo collectives),
each runs the jit and shard_map trainings on its shards, and their norms are
printed next to the one-process run's. On a real cluster only
``initialize``'s arguments change (the coordinator's address, the number of
processes and this process's id; on Cloud TPU and SLURM it finds them
itself).

Run: ``python examples/sharded_training.py [--processes 2]``
"""

from __future__ import annotations

import os
import sys

# The device count is read when jax starts: 8, or 8 / N in a worker of --processes N.
if "jax" not in sys.modules:
  _PER_PROCESS = (
    8 // int(sys.argv[sys.argv.index("--processes") + 1]) if "--worker" in sys.argv else 8
  )
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_PER_PROCESS}"
  ).strip()

import argparse
import itertools
import json
import socket
import subprocess
import tempfile
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gradctl as gc

WIDTHS = (32, 64, 64, 1)
# FSDP-style layout: kernels split over "model" on their input dimension,
# biases replicated; the batch is split over "data".
PARAM_SPECS = {f"w{i}": P("model") for i in range(len(WIDTHS) - 1)} | {
  f"b{i}": P() for i in range(len(WIDTHS) - 1)
}
AXES = {name: ("model" if spec != P() else None) for name, spec in PARAM_SPECS.items()}


def init_params(seed: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
    params[f"w{i}"] = jnp.asarray(rng.standard_normal((a, b)) * 2.0 / np.sqrt(a), jnp.float32)
    params[f"b{i}"] = jnp.asarray(rng.standard_normal(b) * 0.1, jnp.float32)
  return params


def batch(step: int, size: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(1000 + step)
  x = rng.standard_normal((size, WIDTHS[0])).astype(np.float32)
  y = (np.sin(x[:, :1] * 3) * 10 + x[:, 1:2] ** 2).astype(
    np.float32
  )  # large targets: clipping is active
  return jnp.asarray(x), jnp.asarray(y)


def loss_fn(params, x, y):
  h = x
  for i in range(len(WIDTHS) - 1):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < len(WIDTHS) - 2:
      h = jnp.tanh(h)
  return jnp.mean((h - y) ** 2)


def norm_of(state) -> jax.Array:
  return next(v for k, v in gc.stats(state).items() if k.endswith("/norm"))


def plain_step(tx):
  """A jitted training step with the optimizer applied to the whole gradient."""

  @jax.jit
  def step(params, state, x, y):
    loss, g = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def host_value(x: jax.Array) -> float:
  """A replicated scalar as a Python float, from this process's own copy."""
  return float(np.asarray(x.addressable_data(0)))


def put(tree, shardings):
  """Global arrays from the same host values in every process: each process
  makes the shards its devices hold."""
  return jax.tree.map(
    lambda v, s: jax.make_array_from_callback(np.shape(v), s, lambda i, v=v: np.asarray(v)[i]),
    tree,
    shardings,
  )


def run_steps(step, params, state, steps: int, bsz: int, log_every: int, place=lambda a: a):
  """Trains, and returns the final parameters and (step, recorded norm, loss) rows."""
  out = []
  for t in range(steps):
    x, y = batch(t, bsz)
    params, state, loss = step(params, state, place(x), place(y))
    if t % log_every == 0 or t == steps - 1:
      out.append((t, host_value(norm_of(state)), host_value(loss)))
  return params, out


def train_single(steps: int, bsz: int, log_every: int):
  tx = optax.chain(gc.clip_by_global_norm(1.0), optax.adam(1e-2))
  params = init_params(0)
  return run_steps(plain_step(tx), params, tx.init(params), steps, bsz, log_every)[1]


def train_gspmd(mesh, steps: int, bsz: int, log_every: int):
  tx = optax.chain(gc.clip_by_global_norm(1.0), optax.adam(1e-2))
  shard = {k: NamedSharding(mesh, s) for k, s in PARAM_SPECS.items()}
  params = put(init_params(0), shard)
  data = NamedSharding(mesh, P("data"))
  params, out = run_steps(
    plain_step(tx),
    params,
    jax.jit(tx.init)(params),
    steps,
    bsz,
    log_every,
    place=partial(put, shardings=data),
  )
  for k, spec in PARAM_SPECS.items():
    want = NamedSharding(mesh, spec)
    assert params[k].sharding.is_equivalent_to(want, params[k].ndim), (k, params[k].sharding, spec)
  return out


def train_shard_map(mesh, steps: int, bsz: int, log_every: int):
  # axis_name: kernels are split over "model"; the replicated biases are None.
  tx = optax.chain(gc.clip_by_global_norm(1.0, axis_name=AXES), optax.adam(1e-2))
  shard = {k: NamedSharding(mesh, s) for k, s in PARAM_SPECS.items()}
  params = put(init_params(0), shard)
  state = jax.jit(tx.init)(params)
  state_specs = jax.tree.map(lambda x: x.sharding.spec, state)
  data = NamedSharding(mesh, P("data"))

  def local_update(g, state, params):
    # each device holds its shard of every kernel and a copy of every bias
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  update = jax.shard_map(
    local_update,
    mesh=mesh,
    in_specs=(PARAM_SPECS, state_specs, PARAM_SPECS),
    out_specs=(PARAM_SPECS, state_specs),
  )

  @jax.jit
  def step(params, state, x, y):
    loss, g = jax.value_and_grad(loss_fn)(params, x, y)
    params, state = update(g, state, params)
    return params, state, loss

  return run_steps(step, params, state, steps, bsz, log_every, place=partial(put, shardings=data))[
    1
  ]


def sharded_runs(args) -> dict[str, list]:
  """The jit (GSPMD) and shard_map trainings on a 2 x 4 mesh of every device."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
  # jax.set_mesh from jax 0.7; jax.sharding.use_mesh before
  with (jax.set_mesh if hasattr(jax, "set_mesh") else jax.sharding.use_mesh)(mesh):
    return {
      "jit (GSPMD)": train_gspmd(mesh, args.steps, args.batch, args.log_every),
      "shard_map": train_shard_map(mesh, args.steps, args.batch, args.log_every),
    }


def worker(args) -> None:
  """One of --processes N: joins the run, trains, and process 0 writes the norms."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.worker
  )
  runs = sharded_runs(args)
  if jax.process_index() == 0:
    with open(args.out, "w") as f:
      json.dump(runs, f)
  jax.distributed.shutdown()


def multi_process_runs(args) -> dict[str, list]:
  """Starts --processes local workers, waits for them, and reads their norms."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "norms.json")
    flags = [
      "--steps",
      str(args.steps),
      "--batch",
      str(args.batch),
      "--log-every",
      str(args.log_every),
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    worker_flags = ["--processes", str(args.processes), "--port", str(port), "--out", out]
    procs = [
      subprocess.Popen(
        [sys.executable, __file__, *flags, *worker_flags, "--worker", str(i)], env=env
      )
      for i in range(args.processes)
    ]
    try:
      codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    if any(codes):
      raise SystemExit(f"a worker failed: exit codes {codes}")
    with open(out) as f:
      runs = json.load(f)
  return {f"{k}, {args.processes} processes": v for k, v in runs.items()}


def main(argv: list[str] | None = None) -> float:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument(
    "--processes", type=int, default=1, help="local processes the mesh spans (1, 2, 4 or 8)"
  )
  p.add_argument("--timeout", type=float, default=600, help="seconds the workers may take")
  p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  p.add_argument("--port", type=int, help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.processes not in (1, 2, 4, 8):
    p.error(f"--processes must be 1, 2, 4 or 8 (it splits 8 devices), got {args.processes}")
  if args.worker is not None:
    worker(args)
    return 0.0
  if jax.device_count() < 8:
    raise SystemExit(
      f"needs 8 devices, found {jax.device_count()}: run this script in a fresh process"
    )
  print(f"mesh: 2 x 4 of {jax.devices()[0].platform} devices; params: {PARAM_SPECS}")
  runs = {"one device": train_single(args.steps, args.batch, args.log_every)}
  runs |= sharded_runs(args) if args.processes == 1 else multi_process_runs(args)
  print("| step | " + " | ".join(f"norm, {k}" for k in runs) + " | loss, one device |")
  print("|---|" + "---|" * (len(runs) + 1))
  worst = 0.0
  base = runs["one device"]
  for i, (t, n0, loss) in enumerate(base):
    norms = [runs[k][i][1] for k in runs]
    worst = max(worst, max(abs(n - n0) / n0 for n in norms))
    print(f"| {t} | " + " | ".join(f"{n:.6g}" for n in norms) + f" | {loss:.4g} |")
  print(
    f"\nlargest relative difference of the recorded gradient norms from one device: {worst:.2e}"
  )
  return worst


if __name__ == "__main__":
  main()
