"""Runs every benchmark and writes its results to benchmarks/results/.

Run: ``python -m benchmarks.run`` (about an hour on 2 cores), or
``python -m benchmarks.run --quick`` for a short pass.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import common, compile_time, memory, throughput, train_step


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of every script")
  p.add_argument(
    "--only", nargs="*", choices=("throughput", "compile_time", "train_step", "memory")
  )
  args = p.parse_args(argv)
  flags = ["--quick"] if args.quick else []
  print(common.pin_to_one_core(), flush=True)
  for name, module in (
    ("throughput", throughput),
    ("compile_time", compile_time),
    ("train_step", train_step),
    ("memory", memory),
  ):
    if args.only and name not in args.only:
      continue
    print(f"\n=== {name}", flush=True)
    module.main(flags)


if __name__ == "__main__":
  main(sys.argv[1:])
