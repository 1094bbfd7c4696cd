"""Starts, waits for and ends the worker processes of tests/test_multiprocess.py.

The workers start as soon as their tests are collected (tests/conftest.py
calls :func:`start`), so that they run alongside the rest of the suite
instead of holding a test worker idle. Under pytest-xdist every test worker
collects them; a lock in the run's shared directory lets the first one start
them and the others find them started. Whoever started them ends them and
their process groups at the end of its session (:func:`stop`), whatever
happened; each worker also ends itself after TIME_LIMIT seconds.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("multiprocess_worker.py")
PROCESSES = 2
DEVICES_PER_PROCESS = 4
TIME_LIMIT = 300.0  # seconds from the start: a worker still running then is killed

_started: list[subprocess.Popen] = []  # the workers this process started
_deadline = [0.0]  # when they must be done, on time.monotonic()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(shared: Path) -> None:
  """Starts the workers into ``shared``, unless a process of this run did."""
  shared.mkdir(parents=True, exist_ok=True)
  with open(shared / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if (shared / "started").exists():
      return
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    for i in range(PROCESSES):
      command = [sys.executable, str(WORKER), str(i), str(PROCESSES), port, str(shared)]
      command.append(str(TIME_LIMIT))
      with open(shared / f"log_{i}.txt", "w") as log:
        _started.append(
          subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
          )
        )
    (shared / "started").write_text(str(time.time()))
    _deadline[0] = time.monotonic() + TIME_LIMIT


def _logs(shared: Path) -> str:
  return "\n".join(
    f"--- worker {i}:\n" + (shared / f"log_{i}.txt").read_text()[-3000:] for i in range(PROCESSES)
  )


def wait(shared: Path) -> list[dict]:
  """What each worker saw; raises RuntimeError, with their logs, if one
  failed or if they are not done within TIME_LIMIT of their start."""
  deadline = float((shared / "started").read_text()) + TIME_LIMIT + 10.0
  results = [shared / f"result_{i}.pkl" for i in range(PROCESSES)]
  errors = [shared / f"error_{i}.txt" for i in range(PROCESSES)]
  while not all(r.exists() for r in results):
    if any(e.exists() for e in errors):
      raise RuntimeError(f"a worker failed\n{_logs(shared)}")
    if time.time() > deadline:
      raise RuntimeError(f"workers not done after {TIME_LIMIT:.0f} s\n{_logs(shared)}")
    time.sleep(0.2)
  return [pickle.loads(r.read_bytes()) for r in results]


def stop(wait: bool) -> None:
  """Ends the workers this process started, and their process groups; with
  ``wait``, first lets them finish within their time limit, for another test
  worker that may still be waiting for their results."""
  while _started:
    p = _started.pop()
    if wait:
      try:
        p.wait(timeout=max(0.0, _deadline[0] - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    p.wait()
