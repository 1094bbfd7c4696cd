"""One process of the multi-process checks (run by tests/test_multiprocess.py).

Usage: ``python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR TIME_LIMIT``

Joins a JAX multi-controller run on 127.0.0.1:PORT with 4 CPU devices of its
own (its launcher sets XLA_FLAGS), runs every check on global arrays whose shards live in different
processes, and pickles what it saw to OUT_DIR/result_PROCESS_ID.pkl: updates
gathered to whole arrays, ``gc.stats`` values, and adaptive states as this
process holds them.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_gradctl as gc  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compat import set_mesh  # noqa: E402
from multiprocess_cases import (  # noqa: E402
  ADAPTIVE,
  AXES,
  SHARD_MAP,
  SPECS,
  global_gradient,
  spiky,
  transforms,
)


def put(tree: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Global arrays: each process makes the shards its devices hold."""
  return {
    k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, SPECS[k]), lambda i, v=v: v[i])
    for k, v in tree.items()
  }


def host(tree):
  """Whole arrays on the host, gathered from every process."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def local(tree):
  """This process's copy of a replicated tree, bit for bit."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def stats(state) -> dict[str, np.ndarray]:
  return {
    k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
    for k, v in gc.stats(state).items()
  }


def check_jit(mesh, out: dict) -> None:
  g = put(global_gradient(0), mesh)
  for name, make in transforms().items():
    tx = make()
    updates, state = jax.jit(tx.update)(g, tx.init(g), g)
    out[f"jit/{name}"] = {"updates": host(updates), "stats": stats(state)}


def check_shard_map(mesh, out: dict) -> None:
  g = put(global_gradient(0), mesh)
  for name in SHARD_MAP:
    tx = transforms()[name](axis_name=AXES)

    def step(g, tx=tx):
      updates, state = tx.update(g, tx.init(g), g)
      return updates, gc.stats(state)

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(SPECS,), out_specs=(SPECS, P())))
    updates, st = fn(g)
    out[f"shard_map/{name}"] = {"updates": host(updates), "stats": host(st)}


def check_adaptive(mesh, out: dict) -> None:
  """Every adaptive transform for 50 steps, then 10 more, in one scanned
  program: the states after 50 (to restore elsewhere) and after 60."""
  txs = {name: transforms()[name]() for name in ADAPTIVE}
  base = put(global_gradient(1), mesh)

  @jax.jit
  def run(states, base, steps):
    def body(states, t):
      g = spiky(base, t)
      return {name: tx.update(g, states[name], g)[1] for name, tx in txs.items()}, None

    return jax.lax.scan(body, states, steps)[0]

  states = run({name: tx.init(base) for name, tx in txs.items()}, base, jnp.arange(50))
  for name in ADAPTIVE:
    out[f"adaptive/{name}/50"] = local(states[name])
  states = run(states, base, jnp.arange(50, 60))
  for name in ADAPTIVE:
    out[f"adaptive/{name}/60"] = local(states[name])


def check_whole_range(mesh, out: dict) -> None:
  names = ("clip_by_global_norm", "unit_rescale_l1", "zscore")
  txs = {name: transforms()[name]() for name in names}
  steps = {name: jax.jit(lambda g, tx=tx: tx.update(g, tx.init(g))) for name, tx in txs.items()}
  for value in (1e-30, 1e37):  # the same programs, compiled once
    g = put(global_gradient(3, value), mesh)
    for name in names:
      updates, state = steps[name](g)
      out[f"range/{value:g}/{name}"] = {"updates": host(updates), "stats": stats(state)}


def check_collectives(mesh, out: dict) -> None:
  """All-reduces in the lowered shard_mapped update, at 10 and at 100 leaves."""
  for leaves in (10, 100):
    tree = {f"l{i}": np.full((16,), i + 1.0, np.float32) for i in range(leaves)}
    specs = {k: P(("data", "model")) for k in tree}
    g = {
      k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, specs[k]), lambda i, v=v: v[i])
      for k, v in tree.items()
    }
    tx = gc.clip_by_global_norm(1.0, axis_name=("data", "model"))

    def update(t, tx=tx):
      return tx.update(t, tx.init(t))[0]

    fn = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(specs,), out_specs=specs))
    out[f"collectives/{leaves}"] = fn.lower(g).as_text().count("all_reduce")


def main(process_id: int, num_processes: int, port: str, out_dir: str) -> None:
  jax.distributed.initialize(
    f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
  )
  assert jax.device_count() == 4 * num_processes, jax.devices()
  mesh = jax.make_mesh((num_processes, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  out: dict = {"process_index": jax.process_index(), "devices": jax.device_count()}
  with set_mesh(mesh):
    for check in (check_jit, check_shard_map, check_adaptive, check_whole_range, check_collectives):
      start = time.perf_counter()
      check(mesh, out)
      print(
        f"process {process_id}: {check.__name__} {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
      )
  path = os.path.join(out_dir, f"result_{process_id}.pkl")
  with open(path + ".tmp", "wb") as f:
    pickle.dump(out, f)
  os.replace(path + ".tmp", path)  # whoever waits sees the whole file or none
  jax.distributed.shutdown()


if __name__ == "__main__":
  process_id, out_dir = int(sys.argv[1]), sys.argv[4]
  signal.alarm(int(float(sys.argv[5])))  # never outlive the time limit, even if orphaned
  try:
    main(process_id, int(sys.argv[2]), sys.argv[3], out_dir)
  except BaseException as e:
    with open(os.path.join(out_dir, f"error_{process_id}.txt"), "w") as f:
      f.write(repr(e))
    raise
